r"""Batched top-k generalised eigenvectors of :math:`(A,\; B + \alpha C_m)` for all locations.

Row m of a separability pooling operator maximises the separability ratio with a locality
penalty (Birodkar et al. 2019, Algorithm 1):

.. math::

    p_m = \arg\max_p \frac{p^\top A p}{p^\top (B + \alpha C_m) p},
    \qquad A p = \mu\, (B + \alpha C_m)\, p ,

the top generalised eigenvector (the paper's ``top_eigvec((B + alpha C_m)^-1 A)``); the next
ones give further components. For every location m, with :math:`B_m = B + \alpha C_m = L L^\top`
(batched Cholesky) and :math:`A = D D^\top`:

- **full route** — eigenvectors z of the whitened N×N matrix :math:`Y Y^\top`,
  :math:`Y = L^{-1} D`; :math:`p = L^{-\top} z`;
- **low-rank route** — eigenvectors w of the r×r matrix :math:`Y^\top Y = D^\top B_m^{-1} D`
  (same nonzero eigenvalues); :math:`p = L^{-\top} Y w = B_m^{-1} D w`. With
  :math:`r \le (Q-1)\,C` columns in D this replaces an N×N ``eigh`` by an r×r one.

``"auto"`` takes the low-rank route when r < N (its cost per location,
:math:`N^3/3 + N^2 r + N r^2 + O(r^3)`, is then below the full route's
:math:`N^3/3 + 2 N^2 r + O(N^3)`), and the full route otherwise. When
:math:`r > N`, D is first replaced by an N-column factor of A (one N×N ``eigh``).

Both routes factor every :math:`B_m` in chunks of locations bounded by a memory budget; there
is no Python loop over locations otherwise. On CPU the low-rank route factors the augmented
matrix :math:`[B_m;\ D^\top]` by one blocked Cholesky whose work is in batched matrix products
(:func:`skpool._core.solve.cholesky.fused_cholesky`): L, :math:`Y^\top = D^\top L^{-\top}` and :math:`Y^\top Y` come out of
the same pass, a few locations at a time so that they stay in cache, and
:math:`p = L^{-\top} Y w` is a blocked back substitution through the inverted diagonal tiles.
Elsewhere (the full route, GPUs) the systems go through batched ``cholesky_ex`` (blocked on
CPU: :func:`~skpool._core.solve.cholesky.batched_cholesky`) and ``solve_triangular``.

The top k eigenvectors of the r×r (or N×N) matrix come from
:func:`~skpool._core.solve.eigen.top_eigenpairs`: a
Chebyshev-filtered subspace iteration that stops when every wanted Ritz pair has a residual
below :math:`100\,\epsilon\,\|S\|` (an exact eigenpair of a matrix that close to S, the
guarantee ``eigh`` gives) and hands any location that does not get there in 8 rounds to
``eigh``. (A plain block Krylov iteration was tried first and dropped: on random features the
top eigenvalues lie within a few percent of each other and it had not converged after 12 block
steps; the Chebyshev filter on :math:`[0, \theta_p]` with p = k + 12 vectors separates them by
the gap to the p+1-th eigenvalue instead, measured at 2–5 rounds on such spectra.)

Truncated support (opt-in, for large grids)
    With ``support_radius`` ρ, row m may only weigh the :math:`N_m` input locations within
    distance ρ of its centre (:math:`\{n : C_m[n, n] \le \rho^2\}`): the same generalised
    eigenproblem restricted to that support, :math:`A_S p_S = \mu (B_S + \alpha C_{m,S}) p_S`,
    with :math:`A_S = D_S D_S^\top`. Every location's sub-blocks of D, B and C_m are gathered with
    index tensors, padded to the largest support :math:`n = \max_m N_m` (padding decoupled:
    identity in B, zero in D), solved in one batch exactly as above with n in place of N, and
    scattered back into the (k, M, N) operator with exact zeros outside the support. The cost per
    location drops from :math:`O(N^3)` to :math:`O(n^3)`; a radius that covers the whole grid
    gives the exact operator. The truncated row is the best row on its support, so its ratio is
    at most the exact one. How close it is depends on α: where :math:`\alpha\,d^2` dominates B
    the exact row decays like :math:`1/d^2` with the distance d to the centre, so with a large
    α the angle to the exact row falls about like 1/ρ (on a 16×16 grid with α = 1000:
    0.058 rad at most for ρ = 6, 0.037 for ρ = 8), while with a small α the exact rows are
    spread over the grid and truncation changes them (``benchmarks/bench_large_grid.py``).

Memory budget
    Locations are solved in chunks of ``max(1, max_memory_bytes // per_location)``, where
    ``per_location`` bounds the work matrices of one location (``_bytes_per_location``): n×n
    systems and factors (on the CPU low-rank route the (n + r)×n augmented matrix and the
    inverted diagonal tiles), n×r whitened factors, r×r or n×n eigenproblems and their LAPACK
    workspace, and, for a truncated support, the float64 sub-blocks behind the ratios. On the
    CPU low-rank route chunks hold at most 4 locations, or 32 MiB of work if that is more
    (faster: they stay in cache). The
    output (k, M, N), the costs (M, N), the statistics (N×N, N×r) and the float64 copy of B
    that the ratios of an exact float32 solve use are not part of the budget: they are the
    problem's own size. ``tests/core/test_scale.py`` tracks every tensor the solve allocates
    and ``benchmarks/bench_memory.py`` the process's resident memory against the budget.

Singular systems
    B is singular when there are fewer samples than locations (:math:`K\,C < N`), at dead
    (constant) locations, and :math:`\alpha C_m` does not help at the centre of a cell that sits
    on a grid point, nor anywhere with :math:`\alpha = 0`. Every :math:`B_m` therefore gets a
    ridge :math:`\delta_m I` with :math:`\delta_m = \rho \cdot \mathrm{tr}(B_m)/N`, where the
    relative ridge :math:`\rho` defaults to :math:`N\,\epsilon` of the solve's dtype (the size of
    the Cholesky rounding error, so well-conditioned systems are unchanged to working precision:
    :math:`5\cdot10^{-15}` relative in float64 and :math:`3\cdot10^{-6}` in float32 for N = 25;
    on a truncated support N is the support's size :math:`N_m`). Locations whose factorisation
    still fails are factored again with :math:`\rho` multiplied by 100 until it succeeds. A
    direction with no within-class variance then gets a finite ratio of order :math:`1/\rho`
    instead of a crash or NaN.

Scaling and degenerate data
    Before the solve B and α are divided by a power of 4 and D by a power of 2
    (:func:`_equilibrate`): the same eigenproblem, rounded the same way, but with
    :math:`B + \alpha C_m` and D of order 1, so that α = 1e39 with float32 statistics, or
    float64 statistics of magnitude 1e±200, neither overflow in the factorisation nor
    underflow in :math:`D^\top B_m^{-1} D`. The statistics must be finite (a ValueError
    otherwise). The ratios are evaluated in float64, with a numerator or denominator below the
    rounding bound of its own evaluation counted as 0 (:func:`rayleigh_ratios`: an evaluated
    0/0 is 0, no separability). Rows that see no class information beyond the rounding of A
    are recognised by :func:`rows_without_class_information`; the estimator replaces them by
    average pooling (:func:`fill_empty_rows`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .grid import inside_radius, support_within_radius
from .scatter import power_of_two_below
from .solve.cholesky import FusedWorkspace, back_substitute, batched_cholesky, fused_cholesky
from .solve.eigen import SUBSPACE_GUARD, top_eigenpairs

__all__ = [
    "fill_empty_rows",
    "rows_without_class_information",
    "no_class_information",
    "top_eigenpairs",
    "top_generalized_eigenvectors",
    "rayleigh_ratios",
    "batched_cholesky",
    "DEFAULT_MAX_MEMORY_BYTES",
]

#: Default budget for the per-location matrices of one chunk of the solve (1 GiB).
DEFAULT_MAX_MEMORY_BYTES = 1 << 30
_RIDGE_GROWTH = 100.0
#: Column tile of the fused CPU factorisation (:func:`_factor_and_whiten`).
_FUSED_BLOCK = 128
#: Locations per chunk of the fused CPU route: a few large systems at a time stay in cache
#: (measured on 2 cores, N = 1024, r = 288: 1.46 s with 4, 1.81 s with 16, 2.7 s with 256),
#: while small ones (truncated supports) are batched up to about 32 MiB of work per chunk, so
#: that the per-operation overhead stays small.
_CPU_CHUNK = 4
_CPU_CHUNK_BYTES = 32 << 20


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
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Top-k generalised eigenvectors of :math:`(A, B + \alpha C_m)` for every location m.

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
        k, the number of top eigenvectors per location (``1 <= k <= N``).
    norm : {"l1", "l2"}, default="l2"
        Each vector is divided by its l1 or l2 norm, after the sign convention
        :math:`\sum_i p_i \ge 0` (ties, :math:`\sum_i p_i = 0`, make the entry of largest
        magnitude positive).
    method : {"auto", "low_rank", "full"}, default="auto"
        The route (module docstring). ``"low_rank"`` needs ``k <= r``; ``"auto"`` takes it when
        r is below the size of the systems (N, or the largest support).
    ridge : float, optional
        The relative ridge :math:`\rho` (module docstring); default :math:`n_m \epsilon`, with
        :math:`n_m` the size of location m's system (N, or its support).
    support_radius : float, optional
        Truncated support (module docstring): row m only weighs the locations n with
        ``costs[m, n] <= support_radius**2``; zero elsewhere. None (default) solves exactly.
        Every location needs at least k locations in its support.
    max_memory_bytes : int, default=1 GiB
        Budget for the per-location work matrices of one chunk of locations (module docstring:
        about ``(2 n^2 + 2 n r + 3 r^2) * itemsize`` per location for the low-rank route
        (on CPU ``((n + r)(n + b) + 5 r^2 + n b + 3 b^2 + 8 r (k + 12)) * itemsize`` with
        tiles of b = min(n, 128)), ``(7 n^2 + 2 n r) * itemsize`` for the full route, n = N
        without truncation); at least one location is solved at a time.

    Returns
    -------
    vectors : Tensor of shape (k, M, N)
        In the dtype of ``within``; component-major, top component first.
    eigenvalues : float64 Tensor of shape (k, M)
        The ratios :math:`p^\top A p / p^\top (B + \alpha C_m) p` that the returned vectors
        achieve (without the ridge), as :func:`rayleigh_ratios` computes them.
    """
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

    dtype = within.dtype
    costs = costs.to(dtype)
    size = n_locations  # n: the size of every location's system
    if support_radius is not None:
        size = _largest_support(costs, support_radius, n_components)
        if bool(inside_radius(costs, support_radius).all()):  # covers the grid: exact route
            support_radius, size = None, n_locations
    # The ratios are computed in float64 from the statistics as given (not the scaled ones):
    # of B itself, or (truncated supports) of the scaled sub-blocks, scaled back.
    within64 = within.to(torch.float64) if support_radius is None else None
    original_factor, original_alpha = between_factor, alpha
    within, between_factor, alpha, ratio_exponent = _equilibrate(
        within, between_factor, costs, alpha
    )
    factor = between_factor.to(dtype)
    if factor.shape[1] > n_locations:  # more columns than A's rank can use: compress
        factor = _compress_factor(factor)
    rank = factor.shape[1]
    low_rank = method == "low_rank" or (method == "auto" and rank < size and n_components <= rank)
    if low_rank and n_components > rank:
        raise ValueError(
            f"method='low_rank' gives at most r={rank} components (the rank bound of A); "
            f"n_components={n_components} needs method='full'."
        )

    fused = _use_fused_route(low_rank, within.device)
    factor_t = factor.T.contiguous() if fused and support_radius is None else None  # D^T
    per_location = _bytes_per_location(
        size, rank, low_rank, dtype, support_radius is not None, fused, n_components
    )
    chunk = max(1, int(max_memory_bytes) // per_location)
    workspace = None
    if fused:  # one workspace reused by every chunk (no fresh pages per chunk)
        cap = max(_CPU_CHUNK, _CPU_CHUNK_BYTES // per_location)
        chunk = max(1, min(chunk, cap, costs.shape[0]))  # no workspace beyond the M cells
        workspace = FusedWorkspace(within, chunk, size, rank, _FUSED_BLOCK)
    vectors, ratios = [], []
    for start in range(0, costs.shape[0], chunk):
        chunk_costs = costs[start : start + chunk]
        support = None
        if support_radius is not None:
            support = support_within_radius(chunk_costs, support_radius)
        problem = _LocalProblems(factor, within, chunk_costs, alpha, support, factor_t)
        chunk_vectors, chunk_ratios = _solve_chunk(
            problem, n_components, low_rank, ridge, norm, workspace
        )
        vectors.append(chunk_vectors)
        ratios.append(chunk_ratios)
    vectors = torch.cat(vectors).transpose(0, 1)
    if support_radius is None:  # all rows at once: one product with B instead of one a chunk
        return vectors, rayleigh_ratios(vectors, original_factor, within64, costs, original_alpha)
    return vectors, _times_power_of_two(torch.cat(ratios).T, ratio_exponent)


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
        within = _times_power_of_two(within, -exponent)
        within.masked_fill_(within.abs() < torch.finfo(within.dtype).tiny, 0.0)
    factor_exponent = math.frexp(float(factor.abs().max()) if factor.numel() else 0.0)[1]
    factor = _times_power_of_two(factor, -factor_exponent)
    alpha = math.ldexp(alpha, -exponent)
    return within, factor, alpha, 2 * factor_exponent - exponent


def _times_power_of_two(values: torch.Tensor, exponent: int) -> torch.Tensor:
    """values * 2**exponent, in steps of at most 2**±1000 (each a normal float64 number)."""
    while exponent:
        step = max(-1000, min(1000, exponent))
        values = values * math.ldexp(1.0, step)
        exponent -= step
    return values


def _use_fused_route(low_rank: bool, device: torch.device) -> bool:
    """The fused factorisation (:func:`_factor_and_whiten`) serves the low-rank route on CPU;
    GPUs keep batched ``cholesky_ex`` + ``solve_triangular`` (no measurements there yet)."""
    return low_rank and device.type == "cpu"


def rayleigh_ratios(
    vectors: torch.Tensor,
    between_factor: torch.Tensor,
    within: torch.Tensor,
    costs: torch.Tensor | None = None,
    alpha: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Separability ratios :math:`p^\top A p \,/\, p^\top (B + \alpha C_m) p`, in float64.

    Parameters
    ----------
    vectors : Tensor of shape (..., M, N)
        Operator rows p, e.g. ``operator_`` (k, M, N) or an average-pooling operator (M, N).
    between_factor : Tensor of shape (N, r)
        D with :math:`A = D D^\top`.
    within : Tensor of shape (N, N)
        B.
    costs : Tensor of shape (M, N), optional
        Diagonals of :math:`C_m`; ignored (the plain ratio :math:`p^\top A p / p^\top B p`)
        when None or ``alpha == 0``.
    noise : Tensor of shape (N,), optional
        A bound on the rounding error of D's rows from its computation
        (:meth:`skpool._core.scatter.ScatterStatistics.between_noise`): rows whose numerator
        is consistent with an exact :math:`D^\top p = 0`
        (:func:`rows_without_class_information`) get ratio 0, so data without class
        information (identical samples: A and B both zero up to rounding) give 0, not the
        ratio of two rounding errors.

    Returns
    -------
    float64 Tensor of shape (..., M)
        Never NaN. A numerator or denominator that is zero *to the rounding of its own
        evaluation* counts as zero (:func:`_rounded_ratio`): :math:`\|D^\top p\|` below
        :math:`N u \sum_i |p_i| \|D_i\|` or :math:`p^\top B p` below
        :math:`N u (\sum_i |p_i| \sqrt{B_{ii}})^2` (u the float64 unit roundoff; the
        locality term is a sum of nonnegative terms and is kept as it is). Then 0/0 gives 0
        (no separability), a positive numerator over a zero denominator ``inf``.
    """
    p = vectors.to(torch.float64)
    factor = between_factor.to(torch.float64)
    within = within.to(torch.float64)
    locality = torch.zeros_like(p[..., 0])
    if costs is not None and alpha:
        locality = alpha * (costs.to(torch.float64) * p.square()).sum(dim=-1)
    ratios = _rounded_ratio(
        (p @ factor).square().sum(dim=-1),
        p.abs() @ _scaled_norm(factor),
        ((p @ within) * p).sum(dim=-1),
        p.abs() @ within.diagonal().clamp_min(0).sqrt(),
        locality,
        p.shape[-1],
    )
    if noise is None:
        return ratios
    return torch.where(rows_without_class_information(p, factor, noise), 0.0, ratios)


def _rounded_ratio(numerator, factor_weight, spread, within_weight, locality, size):
    r""":math:`\|D^\top p\|^2 / (p^\top B p + \alpha\, p^\top C_m p)` from its parts, with
    a numerator or spread that is zero to the rounding of its evaluation counted as 0.

    A dot product of n = ``size`` terms is exact to :math:`n u \sum_i |x_i y_i|` (Higham, eq.
    3.5), so :math:`\|D^\top p\|` to :math:`n u \||D|^\top|p|\| \le n u \sum_i |p_i|
    \|D_i\|` (``factor_weight``, D's row norms :math:`\|D_i\|`) and :math:`p^\top B p` to
    :math:`n u\, |p|^\top |B| |p| \le n u (\sum_i |p_i| \sqrt{B_{ii}})^2` (``within_weight``;
    :math:`|B_{ij}| \le \sqrt{B_{ii} B_{jj}}` for positive semi-definite B). These
    bounds cost O(N) per row instead of another product with B."""
    bound = size * torch.finfo(torch.float64).eps / 2
    numerator = torch.where(numerator > (bound * factor_weight).square(), numerator, 0.0)
    spread = torch.where(spread > bound * within_weight.square(), spread, 0.0)
    return _ratio(numerator, spread + locality)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator; a zero denominator gives inf (0 / 0 gives 0), never NaN."""
    denominator = denominator.clamp_min(0)
    ratio = numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    infinite = torch.where(numerator > 0, torch.inf, 0.0).to(ratio)
    return torch.where(denominator > 0, ratio, infinite)


def rows_without_class_information(
    vectors: torch.Tensor, between_factor: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    r"""Rows whose between-class term is within the rounding error of A: bool (..., M).

    With ``noise`` (N,) bounding the rounding error of each row of D
    (:meth:`skpool._core.scatter.ScatterStatistics.between_noise`), a row p is flagged when

    .. math::

        \|D^\top p\| \le \sum_n |p_n| \, \text{noise}_n ,

    i.e. when :math:`p^\top A p` is consistent with an exact :math:`D^\top p = 0`: the data
    carry no class information that this row sees. Where the data carry none at all (the
    exact D is 0: identical samples, or the same samples in every class), every row of any
    operator is flagged, however the rounding fell. The problem is homogeneous in A, so a
    small A is not flagged for being small against B, only for being below its own
    rounding. Evaluated in float64, without overflow.
    """
    p = vectors.to(torch.float64)
    captured = _scaled_norm(p @ between_factor.to(torch.float64))
    return captured <= p.abs() @ noise.to(torch.float64)


def no_class_information(between_factor: torch.Tensor, noise: torch.Tensor) -> bool:
    r"""Whether every row of D (N, r) lies within its rounding bound ``noise`` (N,).

    Then :math:`\|D^\top p\| \le \sum_n |p_n| \|D_n\| \le \sum_n |p_n|\,\text{noise}_n`
    for every p: :func:`rows_without_class_information` flags every row of any operator, so
    there is nothing to solve for.
    """
    norms = _scaled_norm(between_factor.to(torch.float64))
    return bool((norms <= noise.to(torch.float64)).all())


def _scaled_norm(values: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dimension, without overflow or underflow of the squares."""
    unit = power_of_two_below(values.abs().amax(dim=-1, keepdim=True))
    return torch.linalg.vector_norm(values / unit, dim=-1) * unit[..., 0]


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


def _bytes_per_location(size, rank, low_rank, dtype, truncated, fused=False, k=1) -> int:
    """Upper bound of the work memory of one location (module docstring, "Memory budget")."""
    if fused:  # the (n + r, n) workspace, S, the inverted diagonal tiles, a column panel, a
        # diagonal tile's factor and inverse (and LAPACK's copy), the subspace blocks of
        # top_eigenpairs (or an r×r eigh) and, for a truncated support, a gathered system
        block = min(size, _FUSED_BLOCK)
        tiles = -(-size // block)
        subspace = 8 * rank * (k + SUBSPACE_GUARD) + 4 * rank**2
        elements = (size + rank) * size + rank**2 + tiles * block**2
        elements += (size + rank) * block + 3 * block**2
        elements += subspace + (size**2 if truncated else 0)
    elif low_rank:
        elements = 2 * size**2 + 2 * size * rank + 3 * rank**2
    else:  # the n×n eigh also takes a copy of its input and a 2n² LAPACK workspace
        elements = 7 * size**2 + 2 * size * rank
    itemsize = torch.finfo(dtype).bits // 8
    ratio_bytes = 8 * size**2 if truncated else 0  # float64 sub-blocks for the ratios
    return elements * itemsize + ratio_bytes


class _LocalProblems:
    """The b systems of a chunk of locations: full (N) or gathered on truncated supports (n).

    ``support`` is None or ``(index, valid)`` of shape (b, n) from
    :func:`skpool._core.grid.support_within_radius`; padded positions are decoupled (zero rows
    and columns in B and D, unit diagonal), so they stay zero in every solution with a nonzero
    eigenvalue and are zeroed explicitly otherwise.
    """

    def __init__(self, factor, within, costs, alpha, support, factor_t=None):
        self.within, self.alpha, self.support = within, alpha, support
        self.factor_t = factor_t  # D^T (r, N) contiguous, for fill_augmented (optional)
        self.count = costs.shape[0]
        if support is None:
            self.factor = factor  # (N, r), shared by the chunk
            self.costs = costs
            self.diagonal = within.diagonal()[None, :] + float(alpha) * costs  # (b, N)
            self.sizes = torch.full_like(self.diagonal[:, :1], costs.shape[1])  # n_m = N
        else:
            index, valid = support
            self.factor = factor[index] * valid[..., None]  # (b, n, r)
            self.costs = costs.gather(1, index) * valid
            self.diagonal = (within.diagonal()[index] + float(alpha) * self.costs) * valid
            self.sizes = valid.sum(dim=1, keepdim=True).to(costs.dtype)  # (b, 1): n_m
        scale = self.diagonal.sum(dim=-1, keepdim=True) / self.sizes  # trace(B_m) / n_m
        self.scale = torch.where(scale > 0, scale, torch.ones_like(scale))

    def blocks(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """B (or its sub-blocks) of the locations ``rows``, a fresh (len(rows), n, n) tensor."""
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
        r""":math:`B + \alpha C_m + \delta_m I` of the locations ``rows`` (padding: unit).

        ``ridge`` (len(rows), 1) holds the relative ridges :math:`\rho_m`.
        """
        system = self.blocks(rows)
        diagonal = self.diagonal[rows] + ridge * self.scale[rows]
        if self.support is not None:
            diagonal = torch.where(self.support[1][rows], diagonal, self.scale[rows])
        system.diagonal(dim1=-2, dim2=-1).copy_(diagonal)
        return system

    def fill_augmented(self, rows: torch.Tensor, ridge: torch.Tensor, out: torch.Tensor) -> None:
        r"""Write :math:`[B + \alpha C_m + \delta_m I;\; D^\top]` of ``rows`` into ``out``.

        ``out`` is (len(rows), n + r, n): rows :n take the lower column tiles of the systems
        (what :func:`_factor_and_whiten` reads; the tiles above the diagonal are left as they
        are), rows n: the transposed factor D^T.
        """
        n = out.shape[-1]
        if self.support is None:
            for start in range(0, n, _FUSED_BLOCK):
                stop = min(start + _FUSED_BLOCK, n)
                out[:, start:n, start:stop] = self.within[start:n, start:stop]
            out[:, n:, :] = self.factor.mT if self.factor_t is None else self.factor_t
            diagonal = self.diagonal[rows] + ridge * self.scale[rows]
            out[:, :n, :].diagonal(dim1=-2, dim2=-1).copy_(diagonal)
        else:
            out[:, :n, :] = self.systems(rows, ridge)
            out[:, n:, :] = self.factor[rows].mT

    def ratios(self, vectors: torch.Tensor) -> torch.Tensor:
        """float64 ratios (b, k) of the normalised vectors (b, n, k) in their own blocks, with
        the rounding rule of :func:`rayleigh_ratios`."""
        p = vectors.to(torch.float64)
        factor = self.factor.to(torch.float64).mT
        within = (self.within if self.support is None else self.blocks()).to(torch.float64)
        locality = float(self.alpha) * (self.costs.to(torch.float64)[..., None] * p.square())
        factor_norms = _scaled_norm(factor.mT)  # (b, n) or (n,): D's row norms
        within_roots = within.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        return _rounded_ratio(
            (factor @ p).square().sum(dim=-2),
            (factor_norms[..., None] * p.abs()).sum(dim=-2),
            ((within @ p) * p).sum(dim=-2),
            (within_roots[..., None] * p.abs()).sum(dim=-2),
            locality.sum(dim=-2),
            p.shape[-2],
        )

    def scatter(self, vectors: torch.Tensor, n_locations: int) -> torch.Tensor:
        """(b, n, k) vectors on the supports → (b, k, N) rows, zero outside the supports."""
        vectors = vectors.mT
        if self.support is None:
            return vectors
        index, valid = self.support
        target = torch.where(valid, index, n_locations)  # padding goes to a dropped column
        rows = vectors.new_zeros((*vectors.shape[:2], n_locations + 1))
        rows.scatter_(2, target[:, None, :].expand_as(vectors), vectors)
        return rows[..., :n_locations]


def _solve_chunk(problem: _LocalProblems, n_components, low_rank, ridge, norm, workspace=None):
    """Normalised rows (b, k, N) and their float64 ratios (b, k) for a chunk of b locations.

    With a ``workspace`` (the low-rank route on CPU) the systems are factored together with
    the whitening of D (:func:`_factor_and_whiten`); otherwise by batched Cholesky followed by
    a batched triangular solve.
    """
    if workspace is not None:
        work, inverses, gram = _factor_and_whiten(problem, ridge, workspace)
        n = work.shape[-1]
        _, small = top_eigenpairs(gram, n_components)  # D^T B_m^-1 D, (b, r, r)
        top = work[:, n:].mT @ small  # Y w, (b, n, k)
        vectors = back_substitute(work, inverses, top)  # L^-T Y w
    else:
        cholesky = _factor_systems(problem, ridge)  # (b, n, n), lower
        factor = problem.factor.expand(problem.count, -1, -1)  # (b, n, r); not copied
        whitened = torch.linalg.solve_triangular(cholesky, factor, upper=False)  # Y = L^-1 D
        if low_rank:
            _, small = top_eigenpairs(whitened.mT @ whitened, n_components)  # (b, r, k)
            top = whitened @ small  # Y w, (b, n, k)
        else:
            gram = whitened @ whitened.mT  # L^-1 A L^-T, (b, n, n)
            del whitened
            _, top = top_eigenpairs(gram, n_components)
            del gram
        vectors = torch.linalg.solve_triangular(cholesky.mT, top, upper=True)  # L^-T z
        del cholesky
    if problem.support is not None:  # exact zeros at the padding (only eigenvalue-0 vectors
        vectors = vectors * problem.support[1][..., None]  # can put anything there)
    vectors = _normalise(_fix_sign(vectors.mT), norm).mT
    ratios = None if problem.support is None else problem.ratios(vectors)
    return problem.scatter(vectors, problem.within.shape[-1]), ratios


def _with_ridge(problem: _LocalProblems, ridge: float | None, factor_rows) -> None:
    """Run ``factor_rows(rows, relative_ridges) -> info`` until every location factors.

    The relative ridge of a location is ``ridge`` or, by default, n_m * eps (its own system
    size, so neither the chunking nor a split of the locations across processes changes it);
    locations whose factorisation fails (info > 0) are factored again with it multiplied
    by 100.
    """
    if ridge is None:
        relative = problem.sizes * torch.finfo(problem.diagonal.dtype).eps
    else:
        relative = torch.full_like(problem.scale, float(ridge))
    index = torch.arange(problem.count, device=problem.diagonal.device)
    while True:
        failed = factor_rows(index, relative[index]) > 0
        if not bool(failed.any()):
            return
        index = index[failed]
        if bool((relative[index] >= 1.0).any()):
            raise FloatingPointError(
                "The systems B + alpha*C_m could not be factored even with a ridge of "
                "trace/N (the statistics are finite and scaled to order 1 before the solve)."
            )
        default = problem.sizes[index] * torch.finfo(relative.dtype).eps  # ridge=0 grows too
        relative[index] = torch.maximum(relative[index] * _RIDGE_GROWTH, default).clamp_max(1.0)


def _factor_systems(problem: _LocalProblems, ridge: float | None) -> torch.Tensor:
    """Cholesky factors of B + alpha C_m + delta_m I for a chunk of locations (b, n, n)."""
    result = []

    def factor_rows(rows, relative):
        systems = problem.systems(rows, relative)
        if systems.device.type == "cpu":  # blocked on CPU; GPUs: cholesky_ex
            factor, info = batched_cholesky(systems, overwrite=True)
        else:
            factor, info = torch.linalg.cholesky_ex(systems)
        if not result:
            result.append(factor)
        else:
            result[0][rows] = factor
        return info

    _with_ridge(problem, ridge, factor_rows)
    return result[0]


def _factor_and_whiten(problem: _LocalProblems, ridge: float | None, workspace: FusedWorkspace):
    r"""L, :math:`Y^\top = D^\top L^{-\top}` and :math:`S = Y^\top Y` of a chunk of locations.

    One blocked left-looking Cholesky of the augmented :math:`(n + r) \times n` matrix
    :math:`[B_m;\ D^\top]` (:func:`skpool._core.solve.cholesky.fused_cholesky`): its first n rows become L, its last r
    rows :math:`Y^\top`, then S is their product. Returns views into the workspace:
    ``work`` (b, n + r, n) (L's below-diagonal tiles in its first n rows, :math:`Y^\top`
    below), the inverses of L's diagonal tiles (b, tiles, block, block), and S (b, r, r).
    """
    count, n = problem.count, problem.diagonal.shape[-1]  # a chunk's supports may be smaller
    rank = problem.factor.shape[-1]
    work, inverses, gram = workspace.views(count, n, rank)
    everything = torch.arange(count, device=work.device)

    def factor_rows(rows, relative):
        whole = rows.numel() == count and bool((rows == everything).all())
        if whole:
            target = (work, inverses, gram)
        else:  # retries of a few locations: their own buffers, copied back below
            size = rows.numel()
            target = tuple(t.new_empty((size, *t.shape[1:])) for t in (work, inverses, gram))
        problem.fill_augmented(rows, relative, target[0])
        info = fused_cholesky(*target, n)
        if not whole:
            work[rows], inverses[rows], gram[rows] = target
        return info

    _with_ridge(problem, ridge, factor_rows)
    return work, inverses, gram


def _compress_factor(factor: torch.Tensor) -> torch.Tensor:
    """An N-column (or fewer) factor F of A = D D^T, from eigh(A): F = U sqrt(lambda+)."""
    values, vectors = torch.linalg.eigh(factor @ factor.T)
    keep = values > values[-1].clamp_min(0) * values.shape[0] * torch.finfo(values.dtype).eps
    if not bool(keep.any()):
        return factor.new_zeros((factor.shape[0], 1))
    return vectors[:, keep] * values[keep].sqrt()


def _fix_sign(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each vector so that its sum is >= 0 (ties: its largest-magnitude entry > 0)."""
    total = vectors.sum(dim=-1, keepdim=True)
    largest = vectors.gather(-1, vectors.abs().argmax(dim=-1, keepdim=True))
    sign = torch.where(total != 0, total.sign(), largest.sign())
    return vectors * torch.where(sign < 0, -1.0, 1.0).to(vectors.dtype)


def _normalise(vectors: torch.Tensor, norm: str) -> torch.Tensor:
    size = torch.linalg.vector_norm(vectors, ord=1 if norm == "l1" else 2, dim=-1, keepdim=True)
    return vectors / torch.where(size > 0, size, torch.ones_like(size))


def fill_empty_rows(
    operator: torch.Tensor,
    fallback: torch.Tensor,
    norm: str,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace rows of ``operator`` (k, M, N) by the ``fallback`` (M, N) row of their cell.

    ``rows`` (k, M) bool selects them; by default the all-zero rows (the low-rank route
    returns :math:`p = B_m^{-1} D w = 0` where A = 0). The estimator passes the rows without
    class information (:func:`rows_without_class_information`) and average pooling as the
    fallback, normalised by ``norm`` like the solved rows.
    """
    if rows is None:
        norms = operator.abs().sum(dim=-1) if norm == "l1" else operator.norm(dim=-1)
        rows = norms == 0
    if not bool(rows.any()):
        return operator
    fallback = _normalise(fallback.to(operator), norm)
    return torch.where(rows[..., None], fallback.expand_as(operator), operator)
