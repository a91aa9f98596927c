r"""Top-k eigenpairs of a batch of symmetric positive semi-definite matrices.

:func:`top_eigenpairs` is a Chebyshev-filtered subspace iteration that stops when every wanted
Ritz pair has a residual below :math:`100\,\epsilon\,\|S\|` (an exact eigenpair of a matrix
that close to S, the guarantee ``eigh`` gives) and hands any matrix that does not get there in
8 rounds to ``eigh``. (A plain block Krylov iteration was tried first and dropped: on random
features the top eigenvalues lie within a few percent of each other and it had not converged
after 12 block steps; the Chebyshev filter on :math:`[0, \theta_p]` with p = k + 12 vectors
separates them by the gap to the p+1-th eigenvalue instead, measured at 2–5 rounds on such
spectra.)
"""

from __future__ import annotations

import torch

__all__ = ["top_eigenpairs", "SUBSPACE_GUARD"]

#: Top-k eigenvectors by subspace iteration (:func:`top_eigenpairs`): guard vectors beyond k,
#: Chebyshev degree per round, rounds before the rest falls back to ``eigh``, and the accepted
#: residual in units of eps * (largest eigenvalue).
SUBSPACE_GUARD = 12
_CHEBYSHEV_DEGREE = 8
_SUBSPACE_ROUNDS = 8
_RESIDUAL_TOLERANCE = 100.0


def top_eigenpairs(matrices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Top-k eigenvalues (b, k) and eigenvectors (b, r, k), descending, of PSD (b, r, r).

    Small problems (:math:`3 (k + 12) > r`) go to :func:`torch.linalg.eigh`. Otherwise a
    batched subspace iteration on :math:`p = k + 12` vectors: one power step from a fixed
    random block, then rounds of a degree-8 Chebyshev filter that damps the interval
    :math:`[0, \theta_p]` (:math:`\theta_p` the smallest Ritz value of the block, at least
    :math:`\theta_1 / 10`), QR and Rayleigh–Ritz. A location is done when each of its top-k
    Ritz pairs has a residual :math:`\|S u - \theta u\| \le 100\,\epsilon\,\theta_1`:
    the pair is then an exact eigenpair of a matrix within :math:`100\,\epsilon\,\|S\|` of S,
    the same kind of backward error as ``eigh``'s, so the vector is as well determined as
    ``eigh`` would give it (angle :math:`\lesssim 100\,\epsilon\,\theta_1/\text{gap}`).
    Locations not done after 8 rounds are solved by ``eigh``. All work is in batched matrix
    products, a QR of (b, r, p) and a p×p ``eigh``: on 256 matrices of r = 288 this takes
    0.05–0.2 s where ``eigh`` takes 0.7 s (2 cores), because ``eigh`` spends its time in the
    memory-bound tridiagonal reduction of the whole matrix.
    """
    count, size, _ = matrices.shape
    width = k + SUBSPACE_GUARD
    if 3 * width > size:
        values, vectors = torch.linalg.eigh(matrices)
        return values[..., -k:].flip(-1), vectors[..., -k:].flip(-1)
    dtype, device = matrices.dtype, matrices.device
    trace = matrices.diagonal(dim1=-2, dim2=-1).sum(-1)
    scale = torch.where(trace > 0, trace, torch.ones_like(trace))[:, None, None]
    normalised = matrices / scale  # eigenvalues in [0, 1] (up to rounding)
    generator = torch.Generator().manual_seed(0)  # the same start on every device
    start = torch.randn(size, width, generator=generator, dtype=torch.float64)
    block = _times(normalised, start.to(dtype=dtype, device=device))
    values = torch.zeros((count, k), dtype=dtype, device=device)
    vectors = torch.zeros((count, size, k), dtype=dtype, device=device)
    active = torch.arange(count, device=device)
    tolerance = _RESIDUAL_TOLERANCE * torch.finfo(dtype).eps
    for round_ in range(_SUBSPACE_ROUNDS):
        current = normalised if active.numel() == count else normalised[active]  # no copy
        if round_ > 0:
            block = _chebyshev_filter(current, block, cutoff)
        block, _ = torch.linalg.qr(block)
        image = _times(current, block)
        ritz_values, rotation = torch.linalg.eigh(_symmetrised(block.mT @ image))
        ritz_values, rotation = ritz_values.flip(-1), rotation.flip(-1)
        block, image = block @ rotation, image @ rotation
        residual = image[..., :k] - block[..., :k] * ritz_values[:, None, :k]
        largest = ritz_values[:, :1].clamp_min(0)
        done = (torch.linalg.vector_norm(residual, dim=-2) <= tolerance * largest).all(dim=-1)
        finished = active[done]
        values[finished] = ritz_values[done, :k]
        vectors[finished] = block[done, :, :k]
        active, block, ritz_values = active[~done], block[~done], ritz_values[~done]
        if active.numel() == 0:
            break
        cutoff = torch.maximum(ritz_values[:, -1], ritz_values[:, 0] / 10)[:, None, None]
    if active.numel():
        exact_values, exact_vectors = torch.linalg.eigh(normalised[active])
        values[active] = exact_values[..., -k:].flip(-1)
        vectors[active] = exact_vectors[..., -k:].flip(-1)
    return values * scale[:, 0], vectors


def _chebyshev_filter(matrices, block, cutoff):
    r""":math:`T_d(2S/c - 1)\,X` with the three-term recurrence (d = ``_CHEBYSHEV_DEGREE``).

    Damps the eigen-directions of S in [0, c] (there :math:`|T_d| \le 1`) and amplifies
    those above c, the more the further above; each column is rescaled at the end.
    """
    previous, current = block, _times(matrices, block) * (2 / cutoff) - block
    for _ in range(_CHEBYSHEV_DEGREE - 1):
        following = 2 * (_times(matrices, current) * (2 / cutoff) - current) - previous
        previous, current = current, following
    return current / torch.linalg.vector_norm(current, dim=-2, keepdim=True).clamp_min(
        torch.finfo(current.dtype).tiny
    )


def _times(matrices: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    r""":math:`S X` for symmetric S (b, r, r) and a block X (b or 1, r, p), computed as
    :math:`(X^\top S)^\top` (a transposed view): streaming S by rows against p < 20 columns,
    this product ran 2.3-2.7x faster than ``S @ X`` (r = 288, p = 13, torch 2.13 + MKL, AVX2
    EPYC, 1 and 2 threads). For an S that is symmetric only up to rounding (a product
    :math:`W W^\top`), it applies :math:`S^\top`, within :math:`\epsilon \|S\|` of S: far below
    the residual tolerance."""
    return (block.mT @ matrices).mT


def _symmetrised(matrices: torch.Tensor) -> torch.Tensor:
    return (matrices + matrices.mT) / 2
