r"""The per-cell systems :math:`(A,\; B + \alpha C_m + \delta_m I)` that every route solves.

:func:`prepare` turns the statistics into a :class:`Problem` (scaled, in the solve's dtype,
with its truncated support); :meth:`Problem.cells` hands out a chunk of cells as
:class:`LocalProblems`; :func:`factor_with_ridge` factors them, growing the ridge where a
factorisation fails. A route (:mod:`skpool._core.solve.routes`) only sees n×n systems and an
n×r factor per cell, whether n is the whole grid or a truncated support.

Truncated support (opt-in, for large grids)
    With ``support_radius`` ρ, row m may only weigh the :math:`N_m` input locations within
    distance ρ of its centre (:math:`\{n : C_m[n, n] \le \rho^2\}`): the same generalised
    eigenproblem restricted to that support, :math:`A_S p_S = \mu (B_S + \alpha C_{m,S}) p_S`,
    with :math:`A_S = D_S D_S^\top`. Every cell's sub-blocks of D, B and C_m are gathered with
    index tensors, padded to the largest support :math:`n = \max_m N_m` (padding decoupled:
    identity in B, zero in D), solved in one batch by the same route with n in place of N, and
    scattered back into the (k, M, N) operator with exact zeros outside the support. The cost
    per cell drops from :math:`O(N^3)` to :math:`O(n^3)`; a radius that covers the whole grid
    gives the exact operator. The truncated row is the best row on its support, so its ratio is
    at most the exact one. How close it is depends on α: where :math:`\alpha\,d^2` dominates B
    the exact row decays like :math:`1/d^2` with the distance d to the centre, so with a large
    α the angle to the exact row falls about like 1/ρ (on a 16×16 grid with α = 1000:
    0.058 rad at most for ρ = 6, 0.037 for ρ = 8), while with a small α the exact rows are
    spread over the grid and truncation changes them (``benchmarks/bench_large_grid.py``).

Singular systems
    B is singular when there are fewer samples than locations (:math:`K\,C < N`), at dead
    (constant) locations, and :math:`\alpha C_m` does not help at the centre of a cell that sits
    on a grid point, nor anywhere with :math:`\alpha = 0`. Every :math:`B_m` therefore gets a
    ridge :math:`\delta_m I` with :math:`\delta_m = \rho \cdot \mathrm{tr}(B_m)/N`, where the
    relative ridge :math:`\rho` defaults to :math:`N\,\epsilon` of the solve's dtype (the size of
    the Cholesky rounding error, so well-conditioned systems are unchanged to working precision:
    :math:`5\cdot10^{-15}` relative in float64 and :math:`3\cdot10^{-6}` in float32 for N = 25;
    on a truncated support N is the support's size :math:`N_m`). Cells whose factorisation
    still fails are factored again with :math:`\rho` multiplied by 100 until it succeeds. A
    direction with no within-class variance then gets a finite ratio of order :math:`1/\rho`
    instead of a crash or NaN.

Scaling and degenerate data
    Before the solve B and α are divided by a power of 4 and D by a power of 2
    (:func:`_equilibrate`): the same eigenproblem, rounded the same way, but with
    :math:`B + \alpha C_m` and D of order 1, so that α = 1e39 with float32 statistics, or
    float64 statistics of magnitude 1e±200, neither overflow in the factorisation nor
    underflow in :math:`D^\top B_m^{-1} D`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from ..grid import inside_radius, support_within_radius
from .ratios import fix_sign, normalise, rayleigh_ratios

__all__ = ["Problem", "LocalProblems", "prepare", "factor_with_ridge", "times_power_of_two"]

_RIDGE_GROWTH = 100.0


@dataclass(frozen=True)
class Problem:
    """The whole solve, scaled (:func:`_equilibrate`) and in the solve's dtype."""

    factor: torch.Tensor  #: (N, r) scaled D, at most N columns
    within: torch.Tensor  #: (N, N) scaled B
    costs: torch.Tensor  #: (M, N) diagonals of the C_m
    alpha: float  #: scaled alpha
    support_radius: float | None  #: None: every cell's system is the whole grid
    size: int  #: n, the size of the largest system (N, or the largest support)
    ratio_exponent: int  #: ratios of the scaled problem times 2**ratio_exponent: the original's

    @property
    def truncated(self) -> bool:
        return self.support_radius is not None

    @property
    def rank(self) -> int:
        return self.factor.shape[1]

    @property
    def n_cells(self) -> int:
        return self.costs.shape[0]

    @cached_property
    def factor_t(self) -> torch.Tensor:
        """D^T (r, N), contiguous: copied once, not once a chunk (for
        :meth:`LocalProblems.fill_augmented`)."""
        return self.factor.T.contiguous()

    def cells(self, start: int, stop: int) -> LocalProblems:
        """The systems of output cells ``start:stop``."""
        costs = self.costs[start:stop]
        support = None
        if self.truncated:
            support = support_within_radius(costs, self.support_radius)
        return LocalProblems(self, costs, support)


def prepare(between_factor, within, costs, alpha, n_components, support_radius) -> Problem:
    """The :class:`Problem` of checked statistics (a radius covering the grid: no truncation)."""
    dtype, n_locations = within.dtype, within.shape[-1]
    costs = costs.to(dtype)
    size = n_locations
    if support_radius is not None:
        size = _largest_support(costs, support_radius, n_components)
        if bool(inside_radius(costs, support_radius).all()):  # covers the grid: exact route
            support_radius, size = None, n_locations
    within, factor, alpha, exponent = _equilibrate(within, between_factor, costs, alpha)
    factor = factor.to(dtype)
    if factor.shape[1] > n_locations:  # more columns than A's rank can use: compress
        factor = _compress_factor(factor)
    return Problem(factor, within, costs, alpha, support_radius, size, exponent)


def _largest_support(costs, radius, n_components) -> int:
    """Size of the largest support within ``radius``; checks every support holds k locations."""
    if not radius > 0:
        raise ValueError(f"support_radius must be positive, got {radius!r}.")
    sizes = inside_radius(costs, radius).sum(dim=1)
    smallest = int(sizes.min())
    if smallest < n_components:
        needed = costs.sort(dim=1).values[:, n_components - 1].max().sqrt()
        raise ValueError(
            f"support_radius={radius} leaves an output location with {smallest} input "
            f"location(s) in its support, fewer than n_components={n_components}; the smallest "
            f"radius that works is {float(needed):.4g}."
        )
    return int(sizes.max())


def _equilibrate(within, factor, costs, alpha):
    r"""B, D and alpha scaled by powers of two so that :math:`B + \alpha C_m` and D are O(1).

    The eigenvectors of :math:`(A, B + \alpha C_m)` do not change when B and α are divided
    by the same s, or D by t. With powers of two, s a power of 4 (so that the square roots of
    the Cholesky factorisation scale exactly too), the scaled problem rounds exactly as the
    original wherever neither over- nor underflows, so ordinary problems are solved bit for
    bit as without the scaling; but α = 1e39 with float32 statistics (α C_m beyond float32's
    range) or float64 statistics of magnitude 1e±200 no longer overflow in the factorisation
    or underflow in :math:`D^\top B_m^{-1} D`. Entries of B that the scaling takes below the
    smallest normal number are set to 0: they are more than :math:`10^{37}` (float32) times
    below the largest diagonal entry, far below the ridge (module docstring). Returns the
    scaled B, D and α, and the exponent of :math:`t^2/s`, the power of two that turns ratios of
    the scaled problem into those of the original.
    """
    largest = float(within.diagonal().abs().max()) if within.numel() else 0.0
    exponent = math.frexp(largest)[1]  # largest < 2**exponent
    largest_cost = float(costs.max()) if costs.numel() else 0.0
    if alpha > 0 and largest_cost > 0:  # alpha * largest_cost < 2**(...), without overflow
        exponent = max(exponent, math.frexp(alpha)[1] + math.frexp(largest_cost)[1])
    exponent += exponent % 2  # s = 2**exponent, a power of 4
    if exponent:  # a scaled copy (the caller's B is left as it is)
        within = times_power_of_two(within, -exponent)
        within.masked_fill_(within.abs() < torch.finfo(within.dtype).tiny, 0.0)
    factor_exponent = math.frexp(float(factor.abs().max()) if factor.numel() else 0.0)[1]
    factor = times_power_of_two(factor, -factor_exponent)
    alpha = math.ldexp(alpha, -exponent)
    return within, factor, alpha, 2 * factor_exponent - exponent


def times_power_of_two(values: torch.Tensor, exponent: int) -> torch.Tensor:
    """values * 2**exponent, in steps of at most 2**±1000 (each a normal float64 number)."""
    while exponent:
        step = max(-1000, min(1000, exponent))
        values = values * math.ldexp(1.0, step)
        exponent -= step
    return values


def _compress_factor(factor: torch.Tensor) -> torch.Tensor:
    """An N-column (or fewer) factor F of A = D D^T, from eigh(A): F = U sqrt(lambda+)."""
    values, vectors = torch.linalg.eigh(factor @ factor.T)
    keep = values > values[-1].clamp_min(0) * values.shape[0] * torch.finfo(values.dtype).eps
    if not bool(keep.any()):
        return factor.new_zeros((factor.shape[0], 1))
    return vectors[:, keep] * values[keep].sqrt()


class LocalProblems:
    """The b systems of a chunk of cells: full (N) or gathered on truncated supports (n).

    ``support`` is None or ``(index, valid)`` of shape (b, n) from
    :func:`skpool._core.grid.support_within_radius`; padded positions are decoupled (zero rows
    and columns in B and D, unit diagonal), so they stay zero in every solution with a nonzero
    eigenvalue and are zeroed explicitly otherwise (:meth:`finish`).
    """

    def __init__(self, problem: Problem, costs: torch.Tensor, support):
        self.problem, self.within, self.alpha = problem, problem.within, problem.alpha
        self.support, self.count = support, costs.shape[0]
        if support is None:
            self.factor = problem.factor  # (N, r), shared by the chunk
            self.costs = costs
            self.diagonal = self.within.diagonal()[None, :] + float(self.alpha) * costs  # (b, N)
            self.sizes = torch.full_like(self.diagonal[:, :1], costs.shape[1])  # n_m = N
        else:
            index, valid = support
            self.factor = problem.factor[index] * valid[..., None]  # (b, n, r)
            self.costs = costs.gather(1, index) * valid
            diagonal = self.within.diagonal()[index] + float(self.alpha) * self.costs
            self.diagonal = diagonal * valid
            self.sizes = valid.sum(dim=1, keepdim=True).to(costs.dtype)  # (b, 1): n_m
        scale = self.diagonal.sum(dim=-1, keepdim=True) / self.sizes  # trace(B_m) / n_m
        self.scale = torch.where(scale > 0, scale, torch.ones_like(scale))

    @property
    def size(self) -> int:
        """n of this chunk's systems (a chunk's supports may be smaller than the largest)."""
        return self.diagonal.shape[-1]

    def blocks(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """B (or its sub-blocks) of the cells ``rows``, a fresh (len(rows), n, n) tensor."""
        within = self.within
        count = self.count if rows is None else rows.numel()
        if self.support is None:
            return within.expand(count, -1, -1).clone()
        index, valid = self.support
        if rows is not None:
            index, valid = index[rows], valid[rows]
        block = within[index[:, :, None], index[:, None, :]]  # broadcast indices: no n×n index
        return block.masked_fill_(~valid[:, :, None], 0).masked_fill_(~valid[:, None, :], 0)

    def systems(self, rows: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
        r""":math:`B + \alpha C_m + \delta_m I` of the cells ``rows`` (padding: unit).

        ``ridge`` (len(rows), 1) holds the relative ridges :math:`\rho_m`.
        """
        system = self.blocks(rows)
        diagonal = self.diagonal[rows] + ridge * self.scale[rows]
        if self.support is not None:
            diagonal = torch.where(self.support[1][rows], diagonal, self.scale[rows])
        system.diagonal(dim1=-2, dim2=-1).copy_(diagonal)
        return system

    def fill_augmented(self, rows, ridge: torch.Tensor, out: torch.Tensor, block: int) -> None:
        r"""Write :math:`[B + \alpha C_m + \delta_m I;\; D^\top]` of ``rows`` into ``out``.

        ``out`` is (len(rows), n + r, n): rows :n take the lower column tiles (of width
        ``block``) of the systems, what :func:`skpool._core.solve.cholesky.fused_cholesky` reads
        (the tiles above the diagonal are left as they are); rows n: the transposed factor D^T.
        """
        n = out.shape[-1]
        if self.support is None:
            for start in range(0, n, block):
                stop = min(start + block, n)
                out[:, start:n, start:stop] = self.within[start:n, start:stop]
            out[:, n:, :] = self.problem.factor_t
            diagonal = self.diagonal[rows] + ridge * self.scale[rows]
            out[:, :n, :].diagonal(dim1=-2, dim2=-1).copy_(diagonal)
        else:
            out[:, :n, :] = self.systems(rows, ridge)
            out[:, n:, :] = self.factor[rows].mT

    def finish(self, vectors: torch.Tensor, norm: str):
        """Rows (b, k, N) from a route's (b, n, k) solution: zero at the padding, signed and
        normalised (:func:`~skpool._core.solve.ratios.fix_sign`, ``normalise``), scattered from
        the supports; with their float64 ratios (k, b) on a truncated support (else None: the
        caller evaluates all rows at once against the whole B)."""
        if self.support is not None:  # exact zeros at the padding (only eigenvalue-0 vectors
            vectors = vectors * self.support[1][..., None]  # can put anything there)
        vectors = normalise(fix_sign(vectors.mT), norm).mT
        ratios = None
        if self.support is not None:  # in the sub-blocks of the scaled problem
            ratios = rayleigh_ratios(
                vectors.permute(2, 0, 1), self.factor, self.blocks(), self.costs, self.alpha
            )
        return self._scatter(vectors), ratios

    def _scatter(self, vectors: torch.Tensor) -> torch.Tensor:
        """(b, n, k) vectors on the supports → (b, k, N) rows, zero outside the supports."""
        vectors = vectors.mT
        if self.support is None:
            return vectors
        n_locations = self.within.shape[-1]
        index, valid = self.support
        target = torch.where(valid, index, n_locations)  # padding goes to a dropped column
        rows = vectors.new_zeros((*vectors.shape[:2], n_locations + 1))
        rows.scatter_(2, target[:, None, :].expand_as(vectors), vectors)
        return rows[..., :n_locations]


def factor_with_ridge(local: LocalProblems, ridge: float | None, factor):
    """Factor every cell of ``local``, growing the ridge of the cells that fail.

    ``factor(local, rows, relative)`` factors the cells ``rows`` with relative ridges
    ``relative`` (len(rows), 1) and returns ``(tensors, info)``: a tuple of (len(rows), ...)
    results and the (len(rows),) int info of :func:`torch.linalg.cholesky_ex` (> 0: failed).
    The relative ridge of a cell is ``ridge`` or, by default, n_m * eps (its own system size,
    so neither the chunking nor a split of the cells across processes changes it); cells whose
    factorisation fails are factored again with it multiplied by 100, and their results
    written over the failed ones. Returns the tensors of all cells.
    """
    if ridge is None:
        relative = local.sizes * torch.finfo(local.diagonal.dtype).eps
    else:
        relative = torch.full_like(local.scale, float(ridge))
    rows = torch.arange(local.count, device=local.diagonal.device)
    tensors, info = factor(local, rows, relative[rows])
    while bool((failed := info > 0).any()):
        rows = rows[failed]
        if bool((relative[rows] >= 1.0).any()):
            raise FloatingPointError(
                "The systems B + alpha*C_m could not be factored even with a ridge of "
                "trace/N (the statistics are finite and scaled to order 1 before the solve)."
            )
        default = local.sizes[rows] * torch.finfo(relative.dtype).eps  # ridge=0 grows too
        relative[rows] = torch.maximum(relative[rows] * _RIDGE_GROWTH, default).clamp_max(1.0)
        retried, info = factor(local, rows, relative[rows])
        if rows.numel() == local.count:  # every cell again: the new results replace the old
            tensors = retried
            continue
        for whole, part in zip(tensors, retried):
            whole[rows] = part
    return tensors
