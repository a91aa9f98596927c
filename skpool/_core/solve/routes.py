r"""The routes of the solve, what each costs in memory, and the one table that picks one.

For every cell m, with :math:`B_m = B + \alpha C_m + \delta_m I = L L^\top` and
:math:`A = D D^\top` (D of r columns), two eigenproblems give the same top vectors:

- **full** — eigenvectors z of the whitened n×n matrix :math:`Y Y^\top`,
  :math:`Y = L^{-1} D`; :math:`p = L^{-\top} z`;
- **low-rank** — eigenvectors w of the r×r matrix :math:`Y^\top Y = D^\top B_m^{-1} D`
  (same nonzero eigenvalues); :math:`p = L^{-\top} Y w = B_m^{-1} D w`. With
  :math:`r \le (Q-1)\,C` columns in D this replaces an n×n eigenproblem by an r×r one.

``method="auto"`` takes the low-rank problem when r < n and k <= r (its cost per cell,
:math:`n^3/3 + n^2 r + n r^2 + O(r^3)`, is then below the full one's
:math:`n^3/3 + 2 n^2 r + O(n^3)`), the full problem otherwise (:func:`eigenproblem`).
:data:`ROUTES` then names the route for the device (:func:`choose_route`, the only place
that decides):

================  ==============================  ==============================
device            low-rank                        full
================  ==============================  ==============================
CPU               :class:`LowRankFused`           :class:`Full` (blocked Cholesky)
any other (GPU)   :class:`LowRankBatched`         :class:`Full` (``cholesky_ex``)
================  ==============================  ==============================

A truncated support is a transformation of the problem, not a route
(:class:`~skpool._core.solve.problem.LocalProblems` gathers each cell's sub-blocks): every
route solves the gathered n×n systems exactly as the whole grid's. A new solver or a GPU fast
path is one new :class:`Route` and one entry in :data:`ROUTES`.

Memory budget
    Cells are solved in chunks of :meth:`Route.cells_per_chunk` cells: ``max_memory_bytes``
    (by default from the device's free memory, :func:`skpool._device.memory_budget`)
    divided by :meth:`Route.bytes_per_cell`, the bound on the work matrices of one cell that
    each route states (its docstring gives the formula), at least 1. The output (k, M, N),
    the costs (M, N), the statistics (N×N, N×r) and the float64 copy of B that the ratios of
    an exact float32 solve use are not part of the budget: they are the problem's own size.
    ``tests/core/test_scale.py`` tracks every tensor the solve allocates and
    ``benchmarks/bench_memory.py`` the process's resident memory against the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ... import _device
from .eigen import SUBSPACE_GUARD, top_eigenpairs
from .cholesky import FusedWorkspace, back_substitute, batched_cholesky, fused_cholesky
from .problem import LocalProblems, Problem, factor_with_ridge

__all__ = [
    "Route",
    "LowRankFused",
    "LowRankBatched",
    "Full",
    "ROUTES",
    "choose_route",
    "eigenproblem",
]


class Route:
    """One way to solve a chunk of cells; subclasses state their work and solve."""

    def work_elements(self, size: int, rank: int, k: int, truncated: bool) -> int:
        """Elements of the solve's dtype that one cell's work matrices take at most."""
        raise NotImplementedError

    def bytes_per_cell(self, size, rank, k, dtype, truncated=False) -> int:
        """Work memory of one cell with n = ``size``, r = ``rank``: :meth:`work_elements` in
        ``dtype``, plus, on a truncated support, the float64 sub-block behind its ratios."""
        itemsize = torch.finfo(dtype).bits // 8
        return self.work_elements(size, rank, k, truncated) * itemsize + (
            8 * size**2 if truncated else 0
        )

    def chunk_cap(self, per_cell: int) -> int | None:
        """Cells a chunk holds at most whatever the budget (None: the budget alone decides)."""
        return None

    def cells_per_chunk(self, problem: Problem, k: int, max_memory_bytes: int) -> int:
        """Cells of a chunk: as many as ``max_memory_bytes`` holds (at least 1, at most M)."""
        per_cell = self.bytes_per_cell(problem.size, problem.rank, k, problem.within.dtype,
                                       problem.truncated)
        cells = int(max_memory_bytes) // per_cell
        cap = self.chunk_cap(per_cell)
        if cap is not None:
            cells = min(cells, cap)
        return max(1, min(cells, problem.n_cells))

    def workspace(self, problem: Problem, cells: int):
        """Buffers shared by every chunk of one solve (None: the route needs none)."""
        return None

    def solve_chunk(self, local: LocalProblems, k: int, ridge: float | None, workspace):
        """The top-k generalised eigenvectors (b, n, k) of a chunk's cells, unnormalised."""
        raise NotImplementedError


@dataclass(frozen=True)
class LowRankFused(Route):
    r"""Low-rank route on CPU: factorisation and whitening in one blocked pass.

    :func:`~skpool._core.solve.cholesky.fused_cholesky` factors the augmented matrices
    :math:`[B_m;\ D^\top]`, giving L, :math:`Y^\top = D^\top L^{-\top}` and
    :math:`S = Y^\top Y` together; the top w of S come from
    :func:`~skpool._core.solve.eigen.top_eigenpairs`, and :math:`p = L^{-\top} Y w` is a
    blocked back substitution through L's inverted diagonal tiles. ``block`` is the column
    tile. Work per cell, in elements, with :math:`b = \min(n, \text{block})` and
    :math:`t = \lceil n / b \rceil` tiles: the (n + r)×n augmented matrix, S, the inverted
    tiles :math:`t b^2`, a column panel :math:`(n + r) b` and a tile's factor, inverse and
    LAPACK copy :math:`3 b^2`, the subspace blocks of ``top_eigenpairs``
    :math:`8 r (k + 12) + 4 r^2`, and on a truncated support the gathered n×n system.

    Chunks hold at most ``cache_cells`` cells, or ``cache_bytes`` of work if that is more:
    a few large systems at a time stay in cache, while small ones (truncated supports) are
    batched up to about 32 MiB of work per chunk, so that the per-operation overhead stays
    small. The cap trades cache reuse in the large products against the per-call cost of
    the small-tile work (LAPACK's 64×64 Cholesky and triangular inverse take 20–50 µs per
    matrix on an AVX2 EPYC with torch 2.13's MKL, whatever the batch). Measured, N = 1024,
    r = 288, 2 cores: 1.46 s with 4, 1.81 s with 16, 2.7 s with 256 on the AVX-512 machine
    the code was first written on (f32 GEMM 351–390 GFLOP/s); 3.7–4.2 s with 4 and
    3.3–3.4 s with 16 (3.5 s with 32) on a 2-vCPU AMD EPYC with AVX2 only (GEMM 105–170
    GFLOP/s; later runs 3.0–3.2 s with 8 and with 16). The default, 8, is as fast as 16
    there and closer to 4, the AVX-512 machine's best (not re-measured there).
    """

    block: int = 128
    cache_cells: int = 8
    cache_bytes: int = 32 << 20

    def work_elements(self, size, rank, k, truncated):
        block = min(size, self.block)
        tiles = -(-size // block)
        elements = (size + rank) * size + rank**2 + tiles * block**2
        elements += (size + rank) * block + 3 * block**2
        elements += 8 * rank * (k + SUBSPACE_GUARD) + 4 * rank**2
        return elements + (size**2 if truncated else 0)

    def chunk_cap(self, per_cell):
        return max(self.cache_cells, self.cache_bytes // per_cell)

    def workspace(self, problem, cells):
        return FusedWorkspace(problem.within, cells, problem.size, problem.rank, self.block)

    def solve_chunk(self, local, k, ridge, workspace):
        work, inverses, gram = factor_with_ridge(local, ridge, partial(self._factor, workspace))
        _, small = top_eigenpairs(gram, k)  # D^T B_m^-1 D, (b, r, r)
        # Y w, (b, n, k), as (w^T Y^T)^T: Y^T's rows are contiguous in the workspace, and
        # the transposed read (Y^T)^T w ran 20x slower (k = 1, AVX2 EPYC, 2 cores)
        top = (small.mT @ work[:, local.size :]).mT
        return back_substitute(work, inverses, top)  # L^-T Y w

    def _factor(self, workspace: FusedWorkspace, local: LocalProblems, rows, relative):
        """The cells ``rows``: in the workspace when they are the whole chunk, else (retries
        of a few cells) in buffers of their own."""
        target = workspace.views(local.count, local.size, local.problem.rank)
        if rows.numel() < local.count:
            target = tuple(t.new_empty((rows.numel(), *t.shape[1:])) for t in target)
        local.fill_augmented(rows, relative, target[0], self.block)
        return target, fused_cholesky(*target, local.size)


def _factor_systems(cholesky, local: LocalProblems, ridge: float | None) -> torch.Tensor:
    """Cholesky factors (b, n, n) of a chunk's systems, by ``cholesky(systems)``."""

    def factor(local, rows, relative):
        lower, info = cholesky(local.systems(rows, relative))
        return (lower,), info

    return factor_with_ridge(local, ridge, factor)[0]


def _whiten(cholesky, local: LocalProblems, ridge: float | None):
    """L (b, n, n) and :math:`Y = L^{-1} D` (b, n, r) of a chunk of cells."""
    lower = _factor_systems(cholesky, local, ridge)
    factor = local.factor.expand(local.count, -1, -1)  # (b, n, r); not copied
    return lower, torch.linalg.solve_triangular(lower, factor, upper=False)


#: The blocked CPU Cholesky, working in the systems it is given.
_blocked_cholesky = partial(batched_cholesky, overwrite=True)


@dataclass(frozen=True)
class LowRankBatched(Route):
    r"""Low-rank route by batched ``cholesky`` and ``solve_triangular`` (the GPU route).

    :math:`Y = L^{-1} D`, the top w of the r×r :math:`Y^\top Y`, :math:`p = L^{-\top} Y w`.
    Work per cell, in elements: :math:`2 n^2 + 2 n r + 3 r^2` (the system and its factor,
    Y and Y w, the r×r matrix and its eigensolver).
    """

    cholesky: Callable = torch.linalg.cholesky_ex

    def work_elements(self, size, rank, k, truncated):
        return 2 * size**2 + 2 * size * rank + 3 * rank**2

    def solve_chunk(self, local, k, ridge, workspace):
        lower, whitened = _whiten(self.cholesky, local, ridge)
        _, small = top_eigenpairs(whitened.mT @ whitened, k)  # (b, r, k)
        top = whitened @ small  # Y w, (b, n, k)
        return torch.linalg.solve_triangular(lower.mT, top, upper=True)  # L^-T Y w


@dataclass(frozen=True)
class Full(Route):
    r"""Full route: the top z of the n×n :math:`Y Y^\top = L^{-1} A L^{-\top}`,
    :math:`p = L^{-\top} z`.

    Work per cell, in elements: :math:`7 n^2 + 2 n r` (the system, its factor, Y, the n×n
    matrix, and an n×n ``eigh``'s copy of its input and its :math:`2 n^2` LAPACK workspace).
    """

    cholesky: Callable = torch.linalg.cholesky_ex

    def work_elements(self, size, rank, k, truncated):
        return 7 * size**2 + 2 * size * rank

    def solve_chunk(self, local, k, ridge, workspace):
        lower, whitened = _whiten(self.cholesky, local, ridge)
        gram = whitened @ whitened.mT  # L^-1 A L^-T, (b, n, n)
        del whitened
        _, top = top_eigenpairs(gram, k)
        del gram
        return torch.linalg.solve_triangular(lower.mT, top, upper=True)  # L^-T z


#: The route of each (device kind, eigenproblem), device kind "cpu" or "gpu" (any other
#: device). GPUs keep batched ``cholesky_ex`` + ``solve_triangular`` (no measurements of the
#: fused or blocked factorisations there yet).
ROUTES: dict[tuple[str, str], Route] = {
    ("cpu", "low_rank"): LowRankFused(),
    ("cpu", "full"): Full(cholesky=_blocked_cholesky),
    ("gpu", "low_rank"): LowRankBatched(),
    ("gpu", "full"): Full(),
}


def eigenproblem(method: str, size: int, rank: int, k: int) -> str:
    """``"low_rank"`` or ``"full"`` for ``method`` on systems of n = ``size``, r = ``rank``."""
    if method == "auto":
        return "low_rank" if rank < size and k <= rank else "full"
    if method == "low_rank" and k > rank:
        raise ValueError(
            f"solver='low_rank' gives at most r={rank} components (the rank bound of A); "
            f"n_components={k} needs solver='full'."
        )
    return method


def choose_route(problem: Problem, method: str, k: int) -> Route:
    """The route (:data:`ROUTES`) for ``problem`` on its device, with ``method``: a GPU's
    where :func:`skpool._device.takes_gpu_paths` says so (every device but the CPU; the tests
    patch it to run the GPU routes on the CPU)."""
    kind = "gpu" if _device.takes_gpu_paths(problem.within.device) else "cpu"
    return ROUTES[kind, eigenproblem(method, problem.size, problem.rank, k)]
