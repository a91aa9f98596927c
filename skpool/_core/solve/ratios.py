r"""Rows of a pooling operator: their sign and norm, separability ratios, class information.

The separability ratio of a row p of output cell m is

.. math::

    \frac{p^\top A p}{p^\top (B + \alpha C_m) p} = \frac{\|D^\top p\|^2}{p^\top B p
    + \alpha \sum_n C_m[n, n]\, p_n^2},

evaluated in float64 by :func:`rayleigh_ratios` (the only place that writes it), with a
numerator or denominator below the rounding bound of its own evaluation counted as 0: an
evaluated 0/0 is 0, no separability. Rows that see no class information beyond the rounding of
A are recognised by :func:`rows_without_class_information`; the estimator replaces them by
average pooling (:func:`fill_empty_rows`).
"""

from __future__ import annotations

import torch

from ..scatter import power_of_two_below

__all__ = [
    "rayleigh_ratios",
    "rows_without_class_information",
    "no_class_information",
    "fill_empty_rows",
    "fix_sign",
    "normalise",
]


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
    between_factor : Tensor of shape (N, r) or (M, N, r)
        D with :math:`A = D D^\top`; or one D per cell (the sub-blocks of a truncated support).
    within : Tensor of shape (N, N) or (M, N, N)
        B; or one B per cell.
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
        evaluation* counts as zero: :math:`\|D^\top p\|` below
        :math:`N u \sum_i |p_i| \|D_i\|` or :math:`p^\top B p` below
        :math:`N u (\sum_i |p_i| \sqrt{B_{ii}})^2` (u the float64 unit roundoff; the
        locality term is a sum of nonnegative terms and is kept as it is). Then 0/0 gives 0
        (no separability), a positive numerator over a zero denominator ``inf``.

    Notes
    -----
    A dot product of n terms is exact to :math:`n u \sum_i |x_i y_i|` (Higham, eq. 3.5), so
    :math:`\|D^\top p\|` to :math:`n u \||D|^\top|p|\| \le n u \sum_i |p_i| \|D_i\|` and
    :math:`p^\top B p` to :math:`n u\, |p|^\top |B| |p| \le n u (\sum_i |p_i| \sqrt{B_{ii}})^2`
    (:math:`|B_{ij}| \le \sqrt{B_{ii} B_{jj}}` for positive semi-definite B). These bounds
    cost O(N) per row instead of another product with B.
    """
    p = vectors.to(torch.float64)
    factor = between_factor.to(torch.float64)
    within = within.to(torch.float64)
    locality = torch.zeros_like(p[..., 0])
    if costs is not None and alpha:
        locality = alpha * (costs.to(torch.float64) * p.square()).sum(dim=-1)
    magnitude = p.abs()
    numerator = _rows_times(p, factor).square().sum(dim=-1)
    factor_weight = _rows_times(magnitude, _scaled_norm(factor)[..., None])[..., 0]
    spread = (_rows_times(p, within) * p).sum(dim=-1)
    roots = within.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    within_weight = _rows_times(magnitude, roots[..., None])[..., 0]
    bound = p.shape[-1] * torch.finfo(torch.float64).eps / 2
    numerator = torch.where(numerator > (bound * factor_weight).square(), numerator, 0.0)
    spread = torch.where(spread > bound * within_weight.square(), spread, 0.0)
    ratios = _ratio(numerator, spread + locality)
    if noise is None:
        return ratios
    return torch.where(rows_without_class_information(p, factor, noise), 0.0, ratios)


def _rows_times(rows: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``rows`` (..., M, N) times one shared (N, c) matrix or one (M, N, c) matrix per row
    index m: (..., M, c), in batched matrix products either way."""
    if matrices.ndim == 2:
        return rows @ matrices
    by_cell = rows.movedim(-2, 0)  # (M, ..., N)
    product = by_cell.reshape(by_cell.shape[0], -1, by_cell.shape[-1]) @ matrices
    return product.reshape(*by_cell.shape[:-1], -1).movedim(0, -2)


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


def fix_sign(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each vector so that its sum is >= 0 (ties: its largest-magnitude entry > 0)."""
    total = vectors.sum(dim=-1, keepdim=True)
    largest = vectors.gather(-1, vectors.abs().argmax(dim=-1, keepdim=True))
    sign = torch.where(total != 0, total.sign(), largest.sign())
    return vectors * torch.where(sign < 0, -1.0, 1.0).to(vectors.dtype)


def normalise(vectors: torch.Tensor, norm: str) -> torch.Tensor:
    """Each vector (last dimension) divided by its l1 or l2 norm; zero vectors stay zero."""
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
    fallback = normalise(fallback.to(operator), norm)
    return torch.where(rows[..., None], fallback.expand_as(operator), operator)
