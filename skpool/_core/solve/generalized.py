r"""Batched top-k generalised eigenvectors of :math:`(A,\; B + \alpha C_m)` for all cells.

Row m of a separability pooling operator maximises the separability ratio with a locality
penalty (Birodkar et al. 2019, Algorithm 1):

.. math::

    p_m = \arg\max_p \frac{p^\top A p}{p^\top (B + \alpha C_m) p},
    \qquad A p = \mu\, (B + \alpha C_m)\, p ,

the top generalised eigenvector (the paper's ``top_eigvec((B + alpha C_m)^-1 A)``); the next
ones give further components. :func:`top_generalized_eigenvectors` checks the statistics,
sets up the scaled per-cell systems (:mod:`~skpool._core.solve.problem`; when D has more
columns than N, it is first replaced by an N-column factor of A, one N×N ``eigh``), lets
:func:`~skpool._core.solve.routes.choose_route` pick the route, solves the cells in chunks
of the route's size (there is no Python loop over cells otherwise) and evaluates the ratios
(:func:`~skpool._core.solve.ratios.rayleigh_ratios`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..._device import memory_budget
from .problem import prepare, times_power_of_two
from .ratios import rayleigh_ratios
from .routes import choose_route

__all__ = ["top_generalized_eigenvectors"]


def top_generalized_eigenvectors(
    between_factor: torch.Tensor,
    within: torch.Tensor,
    costs: torch.Tensor,
    alpha: float,
    n_components: int = 1,
    *,
    norm: Literal["l1", "l2"] = "l2",
    method: Literal["auto", "low_rank", "full"] = "auto",
    ridge: float | None = None,
    support_radius: float | None = None,
    max_memory_bytes: int | None = None,
    progress=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Top-k generalised eigenvectors of :math:`(A, B + \alpha C_m)` for every cell m.

    Parameters
    ----------
    between_factor : Tensor of shape (N, r)
        D with :math:`A = D D^\top` (see :func:`skpool._core.scatter.between_class_factor`).
    within : Tensor of shape (N, N)
        B, symmetric positive semi-definite. Its dtype (float32 or float64) is the solve's.
    costs : Tensor of shape (M, N)
        Diagonals of the locality costs :math:`C_m` (see
        :func:`skpool._core.grid.locality_costs`), nonnegative.
    alpha : float
        Locality weight :math:`\alpha \ge 0`.
    n_components : int, default=1
        k, the number of top eigenvectors per cell (``1 <= k <= N``).
    norm : {"l1", "l2"}, default="l2"
        Each vector is divided by its l1 or l2 norm, after the sign convention
        :math:`\sum_i p_i \ge 0` (ties, :math:`\sum_i p_i = 0`, make the entry of largest
        magnitude positive).
    method : {"auto", "low_rank", "full"}, default="auto"
        The eigenproblem (:mod:`skpool._core.solve.routes`). ``"low_rank"`` needs ``k <= r``;
        ``"auto"`` takes it when r is below the size of the systems (N, or the largest support).
    ridge : float, optional
        The relative ridge :math:`\rho` (:mod:`skpool._core.solve.problem`); default
        :math:`n_m \epsilon`, with :math:`n_m` the size of cell m's system (N, or its support).
    support_radius : float, optional
        Truncated support (:mod:`skpool._core.solve.problem`): row m only weighs the locations
        n with ``costs[m, n] <= support_radius**2``; zero elsewhere. None (default) solves
        exactly. Every cell needs at least k locations in its support.
    max_memory_bytes : int, optional
        Budget for the per-cell work matrices of one chunk of cells; each route states its
        memory per cell (:mod:`skpool._core.solve.routes`). At least one cell is solved at a
        time. Default: from the memory free on the device of ``within`` now
        (:func:`skpool._device.memory_budget`: half of a CUDA device's, at most 16 GiB; a
        quarter of the host's, at most 1 GiB).
    progress : object with an ``update(n)`` method, optional
        E.g. a ``tqdm`` bar: ``update`` is called after each chunk with the number of output
        cells it finished (M in all).

    Returns
    -------
    vectors : Tensor of shape (k, M, N)
        In the dtype of ``within``; component-major, top component first.
    eigenvalues : float64 Tensor of shape (k, M)
        The ratios :math:`p^\top A p / p^\top (B + \alpha C_m) p` that the returned vectors
        achieve (without the ridge), as :func:`~skpool._core.solve.ratios.rayleigh_ratios`
        computes them.
    """
    _check_arguments(between_factor, within, costs, alpha, n_components, norm, method)
    problem = prepare(between_factor, within, costs, alpha, n_components, support_radius)
    route = choose_route(problem, method, n_components)
    if max_memory_bytes is None:
        max_memory_bytes = memory_budget(within.device)
    cells = route.cells_per_chunk(problem, n_components, max_memory_bytes)
    workspace = route.workspace(problem, cells)
    rows, ratios = [], []
    for start in range(0, problem.n_cells, cells):
        local = problem.cells(start, start + cells)
        chunk_rows, chunk_ratios = local.finish(
            route.solve_chunk(local, n_components, ridge, workspace), norm
        )
        rows.append(chunk_rows)
        ratios.append(chunk_ratios)
        if progress is not None:
            progress.update(local.count)
    vectors = torch.cat(rows).transpose(0, 1)
    if not problem.truncated:  # all rows at once: one product with B instead of one a chunk
        return vectors, rayleigh_ratios(vectors, between_factor, within, problem.costs, alpha)
    return vectors, times_power_of_two(torch.cat(ratios, dim=1), problem.ratio_exponent)


def _check_arguments(between_factor, within, costs, alpha, n_components, norm, method):
    """ValueError naming the first argument that does not describe a solvable problem."""
    n_locations = within.shape[-1]
    if within.shape != (n_locations, n_locations) or between_factor.shape[0] != n_locations:
        raise ValueError(
            f"within must be (N, N) and between_factor (N, r); got {tuple(within.shape)} and "
            f"{tuple(between_factor.shape)}."
        )
    if costs.ndim != 2 or costs.shape[1] != n_locations:
        raise ValueError(f"costs must be (M, {n_locations}); got {tuple(costs.shape)}.")
    if not 1 <= n_components <= n_locations:
        raise ValueError(
            f"n_components must be between 1 and N={n_locations}, got {n_components}."
        )
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}.")
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}.")
    if method not in ("auto", "low_rank", "full"):
        raise ValueError(f"method must be 'auto', 'low_rank' or 'full', got {method!r}.")
    for name, value in (("B", within), ("D", between_factor), ("the costs", costs)):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"{name} holds NaN or infinity; the statistics of the solve must be finite."
            )
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}.")
