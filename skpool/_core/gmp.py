r"""Generalized max pooling (Murray & Perronnin, CVPR 2014): batched, on any device.

For one sample :math:`\Phi \in \mathbb{R}^{N \times C}` (N local descriptors of C channels)
and a ridge :math:`\lambda > 0`, the pooled vector is

.. math::

    \xi = \Phi^\top (\Phi\Phi^\top + \lambda I_N)^{-1} 1_N
        = (\Phi^\top\Phi + \lambda I_C)^{-1} \Phi^\top 1_N ,

the ridge-regression solution of :math:`\Phi \xi \approx 1_N`: every descriptor gets the same
similarity to the pooled vector, so frequent (bursty) descriptors no longer dominate as they do in
sum pooling. The two forms are equal; we factor the smaller Gram matrix (the *dual* N×N one when
``N <= C``, the *primal* C×C one otherwise) by batched Cholesky. Limits: ``lam -> inf`` gives the
direction of sum pooling, ``lam -> 0`` with ``N <= C`` gives :math:`\Phi\xi = 1_N`.

This module is the only place in skpool where that formula is computed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "generalized_max_pool",
    "generalized_max_pool_weights",
    "lengths_to_mask",
    "AUTO_REFINE_TOLERANCE",
]

#: With ``refine_steps="auto"``, float32 solves are refined when the bound
#: ``eps32 * (lambda_max(G) + lam) / lam`` on their relative error exceeds this tolerance
#: (``lambda_max`` bounded above by the trace and by the largest absolute row sum of G).
AUTO_REFINE_TOLERANCE = 1e-4
_MAX_AUTO_STEPS = 5
#: With ``refine_steps="auto"``, samples whose last refinement step still corrected the solution
#: by more than this (relative) did not converge; they are solved again in float64.
_REFINE_FAILED = 10 * AUTO_REFINE_TOLERANCE


def lengths_to_mask(lengths: torch.Tensor, n_locations: int) -> torch.Tensor:
    """Boolean mask ``(B, n_locations)`` that is True on the first ``lengths[b]`` locations."""
    positions = torch.arange(n_locations, device=lengths.device)
    return positions[None, :] < lengths[:, None]


def generalized_max_pool(
    features: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    normalize: bool = True,
    mask: torch.Tensor | None = None,
    refine_steps: int | Literal["auto"] = 0,
) -> torch.Tensor:
    r"""Generalized max pooling of a batch of feature stacks.

    Parameters
    ----------
    features : Tensor of shape (B, N, C)
        B samples, each N local descriptors of C channels. Any floating dtype and device.
    lam : float or Tensor of shape () or (B,)
        The ridge :math:`\lambda > 0`, in the units of a squared descriptor norm: with
        ``lam << mean ||phi||^2`` every descriptor's similarity to the result is equalised
        (the "max-pooling-like" regime), with ``lam >> mean ||phi||^2`` the result points like
        sum pooling. A tensor ``lam`` may require grad (the deep layer learns it). A value
        that is not finite and positive raises ValueError (checked in the same device
        synchronisation as the overflow check below, so not while :mod:`torch.compile` traces).
    normalize : bool, default=True
        Divide each pooled vector by its l2 norm; a zero vector (e.g. all-zero descriptors)
        stays zero, never NaN, and its gradient stays finite.
    mask : bool Tensor of shape (B, N), optional
        True at the real locations of a padded batch; padded locations are ignored exactly
        (the result equals pooling the unpadded sample alone).
    refine_steps : int or "auto", default=0
        Steps of mixed-precision iterative refinement for float32 (or lower) input: the
        residual of the ridge system is recomputed in float64 from the descriptors and corrected
        with the float32 Cholesky factor. It removes the :math:`\mathrm{cond}(G)\,\epsilon_{32}`
        error of a plain float32 solve (a relative error of 3e-2 at
        ``lam = 1e-6 mean ||phi||^2`` with N = C becomes 1e-5 after 3 steps) at the price of a
        float64 copy of the batch and two float64 passes over it per step. ``"auto"`` refines
        only batches whose error bound ``q = eps32 * (lambda_max(G) + lam) / lam`` (with
        ``lambda_max`` bounded by the trace and the largest absolute row sum of G) exceeds
        :data:`AUTO_REFINE_TOLERANCE`, with the fewest steps k such that ``q**(k+1)`` is below
        it (at most 5; one device synchronisation, two when the trace alone does not settle it).
        Samples whose last refinement step still
        changed the solution by more than ``10 * AUTO_REFINE_TOLERANCE`` (relative) did not
        converge (``cond(G) * eps32`` near 1 or above, e.g. nearly rank-deficient descriptors
        at a small ``lam``) and are solved again in float64 (one more synchronisation).
        Ignored for float64.

    Returns
    -------
    Tensor of shape (B, C)
        In the dtype of ``features``. The solve itself runs in float32 at least (autocast is
        disabled inside), float64 for float64 input.

    Notes
    -----
    The ridge is compared with the largest diagonal entry :math:`s^2` of the Gram matrix. The
    effective ridge is floored at
    ``eps(dtype) * mean(diag(G))`` so that the factor stays finite for exactly singular Gram
    matrices (dead or duplicated descriptors); below that floor the result is the
    ``lam -> 0`` limit to working precision. Samples whose Gram matrix overflows or underflows
    (descriptors of magnitude beyond about 1e±15 in float32) or whose factorisation fails are
    detected (one device synchronisation) and solved again from descriptors rescaled by their
    largest entry, with a ridge floor of ``eps * trace(G)``. The detection is skipped while
    :mod:`torch.compile` traces, so compiled code assumes moderate magnitudes.
    """
    if features.ndim != 3:
        raise ValueError(
            f"features must have shape (B, N, C), got a {features.ndim}-D tensor."
        )
    out_dtype = features.dtype
    compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    batch, n_locations, n_channels = features.shape
    device = features.device
    if batch == 0 or n_channels == 0:
        return features.new_zeros((batch, n_channels))

    with torch.autocast(device_type=device.type, enabled=False):
        phi = features.to(compute_dtype)
        if mask is not None:
            target = mask.to(compute_dtype)
            phi = phi.masked_fill(~mask[:, :, None], 0.0)  # padding may hold anything, inf too
        else:
            target = phi.new_ones((batch, n_locations))
        if not isinstance(lam, torch.Tensor):
            lam = torch.tensor(float(lam), dtype=torch.float64, device=device)
        lam = lam.double().reshape(-1).expand(batch)

        xi, trouble = _solve(phi, target, lam, normalize, refine_steps, robust=False)
        if not torch.compiler.is_compiling():
            invalid_lam = ~(torch.isfinite(lam) & (lam > 0))
            if bool((trouble | invalid_lam).any()):  # one device synchronisation for both
                if bool(invalid_lam.any()):
                    raise ValueError(
                        "lam must be finite and > 0; got a tensor lam with values "
                        f"{lam[invalid_lam].detach().cpu().tolist()[:5]}."
                    )
                if torch.is_grad_enabled() and (phi.requires_grad or lam.requires_grad):
                    # The troubled samples' first solve holds inf or NaN: even under a zero
                    # gradient its backward gives NaN (0 * inf). Solve the batch again without
                    # them (zero descriptors are finite and differentiable), then replace them.
                    clean = phi.masked_fill(trouble[:, None, None], 0.0)
                    xi, _ = _solve(clean, target, lam, normalize, refine_steps, robust=False)
                xi = _resolve_troubled(xi, trouble, phi, target, lam, normalize, refine_steps)
    return xi.to(out_dtype)


def _solve(
    phi: torch.Tensor,
    target: torch.Tensor,
    lam: torch.Tensor,
    normalize: bool,
    refine_steps: int | str,
    robust: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the ridge system on the smaller Gram matrix.

    ``phi`` (B, N, C), ``target`` (B, N) (1 at real locations, 0 at padding), ``lam`` (B,)
    float64. Returns the pooled (B, C) vectors and a (B,) bool flag of samples whose numbers
    cannot be trusted (overflow, underflow, failed factorisation).
    """
    dtype = phi.dtype
    finfo = torch.finfo(dtype)
    n_locations, n_channels = phi.shape[1:]
    dual = n_locations <= n_channels
    phi_t = phi.transpose(1, 2)
    gram = phi @ phi_t if dual else phi_t @ phi  # (B, n, n), n = min(N, C)
    n = gram.shape[-1]

    diag = gram.detach().diagonal(dim1=1, dim2=2)
    scale2 = diag.amax(dim=1).double()  # s^2, largest squared descriptor (or column) norm
    trace = diag.sum(dim=1).double() if refine_steps == "auto" else None
    trouble = ~torch.isfinite(scale2) | ((scale2 > 0) & (scale2 < finfo.tiny / finfo.eps**2))
    scale2 = torch.where(torch.isfinite(scale2) & (scale2 > 0), scale2, torch.ones_like(scale2))

    # Ridge in units of s^2, floored for singular Gram matrices and capped where the Gram
    # matrix no longer matters (xi is then proportional to 1/lam: shrink it exactly).
    lam_scaled = lam / scale2
    floor = diag.mean(dim=1).double() / scale2 * (finfo.eps * (n if robust else 1))
    lam_cap = n / finfo.eps
    shrink = (lam_scaled / lam_cap).clamp_min(1.0)
    ridge = torch.maximum(lam_scaled / shrink, floor)  # (B,) float64, in units of s^2
    # G + ridge s^2 I, in place: bmm saved its inputs, not its output, for backward.
    system = gram
    system.diagonal(dim1=1, dim2=2).add_((ridge * scale2).to(dtype)[:, None])
    factor, info = torch.linalg.cholesky_ex(system)
    trouble = trouble | (info > 0)

    # Dual: weights alpha on locations, xi = Phi^T alpha. Primal: xi directly.
    rhs = target if dual else _weighted_sum(phi, target)
    solution = torch.cholesky_solve(rhs[:, :, None], factor)[..., 0]

    steps = refine_steps
    if steps == "auto":
        # The error bound eps * (lambda_max(G) / s^2 + ridge) / ridge, with lambda_max(G)
        # bounded by the trace; only where that is not enough, by the smaller of the trace and
        # the largest absolute row sum (Gershgorin; tight for ReLU features, whose Gram matrices
        # are entrywise positive), which costs a pass over G and a second synchronisation.
        bound = (finfo.eps * (trace / scale2 + ridge) / ridge).masked_fill(trouble, 0.0)
        worst = float(bound.max()) if bound.numel() else 0.0
        if worst > AUTO_REFINE_TOLERANCE:  # |G + ridge s^2 I| row sums = |G| row sums + ridge s^2
            rows = system.detach().abs().sum(dim=2).amax(dim=1).double() / scale2
            bound = torch.minimum(bound, finfo.eps * rows / ridge).masked_fill(trouble, 0.0)
            worst = float(bound.max())
        steps = _auto_steps(worst)
    if steps and dtype != torch.float64:
        xi, last = _refine(phi, target, ridge * scale2, factor, solution, dual, steps)
        if refine_steps == "auto":  # refinement that did not converge: solve in float64
            failed = ~(last <= _REFINE_FAILED) & ~trouble
            if bool(failed.any()):
                index = failed.nonzero()[:, 0]
                fixed = _solve_float64(phi[index], target[index], (ridge * scale2)[index], dual)
                xi = xi.index_copy(0, index, fixed)
    else:
        xi = _weighted_sum(phi, solution) if dual else solution

    if normalize:  # the direction does not depend on the positive factor 1/shrink
        norm = torch.linalg.vector_norm(xi, dim=1, keepdim=True)
        xi = xi / torch.where(norm > 0, norm, torch.ones_like(norm))
        finite = torch.isfinite(norm.detach()[:, 0])  # inf or NaN anywhere in xi reaches it
    else:
        xi = (xi.double() / shrink[:, None]).to(dtype)
        finite = torch.isfinite(xi.detach()).all(dim=1)
    trouble = trouble | ~finite
    return xi, trouble


def _auto_steps(error_bound: float) -> int:
    """Refinement steps that bring a first error ``q`` below the tolerance: q**(k+1) <= tol."""
    if error_bound <= AUTO_REFINE_TOLERANCE:
        return 0
    if not error_bound < 0.5:  # also NaN: refine as much as allowed rather than crash
        return _MAX_AUTO_STEPS
    needed = math.ceil(math.log(AUTO_REFINE_TOLERANCE) / math.log(error_bound)) - 1
    return min(max(needed, 1), _MAX_AUTO_STEPS)


def _weighted_sum(phi: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[b, i] * phi[b, i, :]``: (B, N, C), (B, N) -> (B, C), one pass over phi."""
    return (weights[:, None, :] @ phi)[:, 0, :]


def _refine(phi, target, ridge, factor, solution, dual, steps):
    """Mixed-precision iterative refinement of the ridge system (see the docstring).

    Returns the refined (B, C) vectors and, per sample (B,), the size of the last correction
    relative to the solution: small once the refinement has converged (or stagnates at the
    rounding level), large where it does not converge (cond(G) * eps of the factor's dtype near
    1 or above, e.g. a nearly rank-deficient Gram matrix at a small ridge).
    """
    phi64 = phi.double()
    ridge = ridge[:, None]
    rhs = target.double() if dual else _weighted_sum(phi64, target.double())
    current = solution.double()
    for _ in range(steps):
        if dual:  # (Phi Phi^T + ridge) alpha
            applied = (phi64 @ _weighted_sum(phi64, current)[:, :, None])[..., 0]
        else:  # (Phi^T Phi + ridge) xi
            applied = _weighted_sum(phi64, (phi64 @ current[:, :, None])[..., 0])
        residual = rhs - applied - ridge * current
        correction = torch.cholesky_solve(residual.to(phi.dtype)[:, :, None], factor)
        step = correction[..., 0].double()
        current = current + step
    size = torch.linalg.vector_norm(current, dim=1)
    last = torch.linalg.vector_norm(step, dim=1) / torch.where(size > 0, size, 1.0)
    xi = _weighted_sum(phi64, current) if dual else current
    return xi.to(phi.dtype), last


def _solve_float64(phi, target, ridge, dual):
    """The unrefined ridge solution (B, C) computed in float64 (for samples whose float32
    refinement did not converge), returned in the dtype of ``phi``."""
    phi64 = phi.double()
    phi64_t = phi64.transpose(1, 2)
    system = phi64 @ phi64_t if dual else phi64_t @ phi64
    system.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
    factor, _ = torch.linalg.cholesky_ex(system)
    rhs = target.double() if dual else _weighted_sum(phi64, target.double())
    solution = torch.cholesky_solve(rhs[:, :, None], factor)[..., 0]
    xi = _weighted_sum(phi64, solution) if dual else solution
    return xi.to(phi.dtype)


def _resolve_troubled(xi, trouble, phi, target, lam, normalize, refine_steps):
    """Solve the flagged samples again from descriptors rescaled by their largest entry."""
    index = trouble.nonzero()[:, 0]
    sub = phi[index]
    amax = sub.detach().abs().amax(dim=(1, 2)).double()
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    sub = sub / amax.to(sub.dtype)[:, None, None]
    fixed, still = _solve(
        sub, target[index], lam[index] / amax.square(), normalize, refine_steps, robust=True
    )
    if bool(still.any()):
        raise FloatingPointError(
            "generalized_max_pool: the ridge system could not be solved even after rescaling "
            "and a ridge of eps*trace(G); are the descriptors finite?"
        )
    if not normalize:
        fixed = (fixed.double() / amax[:, None]).to(fixed.dtype)
    return xi.index_copy(0, index, fixed)


def generalized_max_pool_weights(
    features: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The weight of every location in the pooled vector: :math:`\xi = \sum_i w_i \phi_i`.

    With :math:`w = (\Phi\Phi^\top + \lambda I)^{-1} 1_N`, the identity
    :math:`\lambda w = 1_N - \Phi\xi` gives the weights from the (un-normalised) pooled vector.
    Frequent descriptors get small weights, rare ones large: this is what GMP pictures show.
    Computed in float64 (it is meant for inspection and plots, not for speed).

    Parameters
    ----------
    features : Tensor of shape (B, N, C)
    lam : float or Tensor of shape () or (B,)
    mask : bool Tensor of shape (B, N), optional
        Padded locations get weight 0.

    Returns
    -------
    Tensor of shape (B, N), float64.
    """
    phi = features.double()
    if mask is not None:
        phi = phi.masked_fill(~mask[:, :, None], 0.0)
    target = phi.new_ones(phi.shape[:2]) if mask is None else mask.double()
    xi = generalized_max_pool(phi, lam, normalize=False, mask=mask)
    lam = torch.as_tensor(lam, dtype=torch.float64, device=phi.device).reshape(-1, 1)
    return (target - (phi @ xi[:, :, None])[..., 0]) / lam
