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

from ._precision import highest_matmul_precision, with_highest_matmul_precision
from .gmp_refine import (
    AUTO_REFINE_TOLERANCE,
    REFINE_TARGET,
    _auto_refine,
    _refine,
    _refine_solve,
    _weighted_sum,
    factor_solve,
)

__all__ = [
    "generalized_max_pool",
    "generalized_max_pool_weights",
    "lengths_to_mask",
    "AUTO_REFINE_TOLERANCE",
    "REFINE_TARGET",
]

def lengths_to_mask(lengths: torch.Tensor, n_locations: int) -> torch.Tensor:
    """Boolean mask ``(B, n_locations)`` that is True on the first ``lengths[b]`` locations."""
    positions = torch.arange(n_locations, device=lengths.device)
    return positions[None, :] < lengths[:, None]


def generalized_max_pool(
    features: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    lam_scale: Literal["absolute", "relative"] = "absolute",
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
        The ridge :math:`\lambda > 0` (see ``lam_scale``). With ``lam << mean ||phi||^2``
        every descriptor's similarity to the result is equalised (the "max-pooling-like"
        regime), with ``lam >> mean ||phi||^2`` the result points like sum pooling. A tensor
        ``lam`` may require grad (the deep layer learns it). A value that is not finite and
        positive raises ValueError (a tensor is checked at the cost of a device
        synchronisation, not while :mod:`torch.compile` traces).
    lam_scale : {"absolute", "relative"}, default="absolute"
        ``"absolute"``: the ridge is ``lam`` itself, in the units of a squared descriptor norm
        (the papers' λ). ``"relative"``: the ridge of each sample is ``lam`` times its mean
        squared descriptor norm, :math:`\lambda = \mathrm{lam}\cdot\mathrm{trace}(\Phi^\top
        \Phi)/N` (N the real locations under ``mask``), which makes the pooled direction
        invariant to :math:`\Phi \to s\Phi`; the ridge is then a differentiable function of
        the descriptors too (gradients include it). A sample of all-zero descriptors pools
        to zero either way.
    normalize : bool, default=True
        Divide each pooled vector by its l2 norm; a zero vector (e.g. all-zero descriptors)
        stays zero, never NaN, and its gradient stays finite.
    mask : bool Tensor of shape (B, N), optional
        True at the real locations of a padded batch; padded locations are ignored exactly
        (the result equals pooling the unpadded sample alone).
    refine_steps : int or "auto", default=0
        Mixed-precision iterative refinement for float32 (or lower) input: the residual of the
        ridge system is recomputed in float64 from the descriptors and corrected with the
        float32 Cholesky factor. An int runs that many steps (and as many on the backward's
        solves), without any device synchronisation. ``"auto"`` makes the result
        agree with the float64 solution of the same descriptors: it refines only the samples
        whose error bound ``q = eps32 * (lambda_max(G) + lam) / lam`` (``lambda_max`` bounded
        by the trace and the largest absolute row sum of G) exceeds
        :data:`AUTO_REFINE_TOLERANCE` and so does ``3 eps32 kappa_1``, with kappa_1 the
        1-norm condition number of ``G + lam I`` estimated from the float32 factor (Hager's
        estimator, never above the true value and rarely below a third of it; the bound
        takes lambda_min(G) = 0, the estimate sees a well-conditioned G), until the error
        estimated from the observed
        contraction is below :data:`REFINE_TARGET` (at most 6 steps, one synchronisation
        each); samples whose refinement cannot get there (``cond * eps32`` near 1 or above:
        nearly rank-deficient descriptors at a small ``lam``, or one channel or one location
        orders of magnitude above the rest, so that one direction dominates G), and those
        whose float32 factor has a pivot at the rounding level of its diagonal, are solved in
        float64. Ignored for float64 input; ``"auto"`` means 0 steps while
        :mod:`torch.compile` traces (compiled code has no data-dependent branches). The
        backward of an ``"auto"`` solve computes the gradients of the samples it refined in
        float64 (one more synchronisation).

    Returns
    -------
    Tensor of shape (B, C)
        In the dtype of ``features``. The solve itself runs in float32 at least (autocast is
        disabled inside), float64 for float64 input.

    Notes
    -----
    **Accuracy.** A Cholesky solve's error does not depend on a diagonal scaling of the
    system (van der Sluis): the float32 solve is accurate to about ``eps32 * cond(D A D)``
    for the best diagonal ``D``, so channels (primal system, ``N > C``) or locations (dual
    system, ``N <= C``) of very different magnitudes cost nothing by themselves. What float32
    cannot represent is one *direction* dominating the Gram matrix (one location far above
    the rest with ``N > C``, one channel far above the rest with ``N <= C``): ``"auto"``
    detects it and solves those samples in float64.

    **Singular Gram matrices.** The factor's diagonal is floored entry by entry at
    ``eps(dtype) * (G_ii + eps * max_j G_jj)``, a perturbation within Cholesky's own
    backward error (``|dA_ij| <= c n eps sqrt(A_ii A_jj)``), so that it stays finite for
    exactly singular Gram matrices (dead or duplicated descriptors) without changing the
    accuracy of any other solve. Refinement and the float64 solve use the same floor with
    ``eps64``: below it the result is the ``lam -> 0`` limit to working precision. Samples
    whose Gram matrix overflows or underflows (descriptors of magnitude beyond about 1e±15 in
    float32) or whose factorisation fails are detected (one device synchronisation) and
    solved again from descriptors rescaled by their largest entry, with the floor multiplied
    by ``n``. The detection is skipped while :mod:`torch.compile` traces, so compiled code
    assumes moderate magnitudes. That is ``"auto"``; an int ``refine_steps`` makes no host
    decision: every sample is solved from descriptors rescaled by the power of two nearest
    their largest entry (exact, so no Gram matrix overflows or underflows), and a sample
    whose factorisation fails even so (a Gram matrix singular to working precision with a
    ridge below about ``n * eps * G_ii``) or whose descriptors are not finite gives NaN.

    **Gradients.** Analytic (:class:`_RidgeSolve`): the backward reuses the forward's
    Cholesky factor for one more solve (v = (G + lam I)^-1 xi_bar) and O(N C) products per
    sample; lam's gradient through the derivative of the floored ridge, and the exact
    rescaling, the relative ridge's dependence on Phi and the normalisation analytically too
    (no pass over Phi beyond the one that builds its gradient, and one for a relative
    ridge). Double backward works (differentiable solves with the same factor).

    **Precision.** The solve runs at "highest" float32 matmul precision whatever
    :func:`torch.set_float32_matmul_precision` says (restored afterwards), so TF32 or
    bfloat16 GEMMs never enter the Gram matrix.
    """
    check_options(lam_scale, refine_steps)
    check_lam_values(lam)
    return _generalized_max_pool(
        features, lam, lam_scale=lam_scale, normalize=normalize, mask=mask,
        refine_steps=refine_steps,
    )


@with_highest_matmul_precision
def _generalized_max_pool(features, lam, *, lam_scale, normalize, mask, refine_steps):
    """:func:`generalized_max_pool` without the check of a tensor ``lam`` (the layers' lam is
    finite and positive by construction): no device synchronisation unless
    ``refine_steps="auto"``."""
    if features.ndim != 3:
        raise ValueError(
            f"features must have shape (B, N, C), got a {features.ndim}-D tensor."
        )
    out_dtype = features.dtype
    compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    batch, n_locations, n_channels = features.shape
    device = features.device
    if batch == 0 or n_channels == 0 or n_locations == 0:
        return _empty_result(features, lam)

    with torch.autocast(device_type=device.type, enabled=False):
        phi = features.to(compute_dtype)
        if mask is not None:
            target = mask.to(compute_dtype)
            phi = phi.masked_fill(~mask[:, :, None], 0.0)  # padding may hold anything, inf too
        else:
            target = phi.new_ones((batch, n_locations))
        if not isinstance(lam, torch.Tensor):
            lam = torch.full((), float(lam), dtype=torch.float64, device=device)
        lam = lam.double().reshape(-1).expand(batch)
        relative = lam_scale == "relative"

        if refine_steps != "auto":
            # No host decision at all: every sample is rescaled by the power of two nearest
            # its largest entry (exact; no Gram matrix can overflow or underflow), so only a
            # failed factorisation is left to flag, on the device (see _solve_rescaled).
            xi = _solve_rescaled(phi, target, lam, normalize, refine_steps, relative)
            return xi.to(out_dtype)
        xi, trouble = _solve(phi, target, lam, normalize, refine_steps, False, relative)
        if not torch.compiler.is_compiling() and bool(trouble.any()):  # one synchronisation
            if torch.is_grad_enabled() and (phi.requires_grad or lam.requires_grad):
                # The troubled samples' first solve holds inf or NaN: even under a zero
                # gradient its backward gives NaN (0 * inf). Solve the batch again without
                # them (zero descriptors are finite and differentiable), then replace them.
                clean = phi.masked_fill(trouble[:, None, None], 0.0)
                xi, _ = _solve(clean, target, lam, normalize, refine_steps, False, relative)
            xi = _resolve_troubled(
                xi, trouble, phi, target, lam, normalize, refine_steps, relative
            )
    return xi.to(out_dtype)


def check_lam_values(lam) -> None:
    """ValueError unless ``lam`` is finite and > 0 everywhere; for a tensor one device
    synchronisation, skipped while :mod:`torch.compile` traces (the layers, whose lam is
    positive by construction, call the unchecked forms and have none)."""
    if not isinstance(lam, torch.Tensor):
        if not (math.isfinite(float(lam)) and float(lam) > 0):
            raise ValueError(f"lam must be finite and > 0, got {lam!r}.")
    elif not torch.compiler.is_compiling():
        valid = torch.isfinite(lam) & (lam > 0)
        if not bool(valid.all()):
            raise ValueError(
                "lam must be finite and > 0; got a tensor lam with values "
                f"{lam.detach()[~valid].cpu().tolist()[:5]}."
            )


def check_options(lam_scale, refine_steps) -> None:
    """ValueError unless ``lam_scale`` is "absolute" or "relative" and ``refine_steps`` is
    "auto" or an int >= 0 (shared with the layer, which checks them at construction)."""
    if lam_scale not in ("absolute", "relative"):
        raise ValueError(f"lam_scale must be 'absolute' or 'relative', got {lam_scale!r}.")
    if not (
        refine_steps == "auto"
        or (isinstance(refine_steps, int) and not isinstance(refine_steps, bool)
            and refine_steps >= 0)
    ):
        raise ValueError(f"refine_steps must be 'auto' or an int >= 0, got {refine_steps!r}.")


def _empty_result(features: torch.Tensor, lam) -> torch.Tensor:
    """Zeros (B, C) for a batch without samples, channels or locations, still connected to the
    autograd graph of ``features`` and ``lam`` (so ``backward`` works, with zero gradients)."""
    out = features.sum(dim=1) * 0  # (B, C); an empty sum, so no 0 * inf
    if isinstance(lam, torch.Tensor) and lam.requires_grad:
        out = out + (lam.sum() * 0).to(out.dtype)
    return out


def _solve(
    phi: torch.Tensor,
    target: torch.Tensor,
    lam: torch.Tensor,
    normalize: bool,
    refine_steps: int | str,
    robust: bool,
    relative: bool,
    checked: bool = True,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the ridge system on the smaller Gram matrix.

    ``phi`` (B, N, C), ``target`` (B, N) (1 at real locations, 0 at padding), ``lam`` (B,)
    float64: the ridge, or with ``relative`` its multiple of the mean squared norm. With
    ``scales`` (B,) float64 (exact powers of two, :func:`_power_of_two_scales`) the system
    solved is that of ``phi * scales`` (an absolute ``lam`` in its units) and the gradient
    is returned for ``phi``. Returns the pooled (B, C) vectors and a (B,) bool flag of
    samples whose numbers cannot be trusted (overflow, underflow, failed factorisation;
    without ``checked``, for rescaled descriptors, only the failed factorisations, in fewer
    operations).

    The rescaled descriptors, the Gram matrix, its factor, the relative ridge's mean squared
    norm and the floored, capped ridge are computed outside autograd; :class:`_RidgeSolve`
    holds the analytic backward: it reuses the factor, gives ``lam``'s gradient through
    dD/dlam, and folds the rescaling and the relative ridge's dependence on ``phi`` into the
    descriptors' gradient (no pass over them beyond the one that builds it).
    """
    dtype = phi.dtype
    finfo = torch.finfo(dtype)
    n_locations, n_channels = phi.shape[1:]
    dual = n_locations <= n_channels
    with torch.no_grad():
        scaled = phi.detach() if scales is None else phi.detach() * scales.to(dtype)[:, None, None]
        scaled_t = scaled.transpose(1, 2)
        gram = scaled @ scaled_t if dual else scaled_t @ scaled  # (B, n, n), n = min(N, C)
        if relative:
            # trace(Phi^T Phi) / (real locations), from either side's Gram matrix (both
            # traces are ||Phi||_F^2); 1 where it is 0 or not finite (all-zero samples pool
            # to zero whatever the ridge; overflowing ones are re-solved rescaled, where it
            # is computed again).
            trace = gram.diagonal(dim1=1, dim2=2).sum(dim=1).double()
            count = target.sum(dim=1).double().clamp_min(1.0)
            usable = torch.isfinite(trace) & (trace > 0)
            multiplier = torch.where(usable, trace / count, 1.0)
            trace_weight = usable / count  # d multiplier / d trace
            ridge_lam = lam.detach() * multiplier
        else:
            multiplier = trace_weight = None
            ridge_lam = lam.detach()
    n = gram.shape[-1]

    with torch.no_grad():  # the ridge's gradient is the sensitivity below, not a graph
        diag = gram.diagonal(dim1=1, dim2=2).double()  # (B, n)
        scale2 = diag.amax(dim=1)  # s^2, largest squared descriptor (or column) norm
        if checked:
            trouble = ~torch.isfinite(scale2) | (
                (scale2 > 0) & (scale2 < finfo.tiny / finfo.eps**2)
            )
            underflow_or_zero = scale2 == 0  # all-zero descriptors, or G underflowed
            scale2 = torch.where(torch.isfinite(scale2) & (scale2 > 0), scale2, 1.0)
        else:  # rescaled descriptors: s^2 finite unless they are not (their result is NaN)
            scale2 = torch.where(scale2 > 0, scale2, 1.0)
        unit_diag = diag / scale2[:, None]  # G_ii / s^2, in [0, 1]

        # The problem's ridge in units of s^2, capped where the Gram matrix no longer matters
        # (xi is then proportional to 1/lam: shrink it exactly). The factor's diagonal is
        # floored entry by entry within Cholesky's own backward error (see the Notes), never
        # by a mean: one large channel or location must not raise the ridge of the others.
        lam_scaled = ridge_lam / scale2
        unshrunk = lam_scaled * (finfo.eps / n) < 1.0
        ridge = torch.where(unshrunk, lam_scaled, n / finfo.eps)[:, None]  # (B, 1) float64
        factor_diagonal = torch.maximum(ridge, _ridge_floor(unit_diag, finfo.eps, n, robust))
        system = gram  # G + diag, in place (nothing else holds gram)
        system.diagonal(dim1=1, dim2=2).add_((factor_diagonal * scale2[:, None]).to(dtype))
        factor, info = torch.linalg.cholesky_ex(system)
        trouble = trouble | (info > 0) if checked else info > 0

        steps = 0 if dtype == torch.float64 else refine_steps
        if steps == "auto" and torch.compiler.is_compiling():
            steps = 0
        if steps:  # refinement and the float64 solve aim at the problem with the float64 floor
            floor = _ridge_floor(unit_diag, torch.finfo(torch.float64).eps, n, robust)
            solve_diagonal = torch.maximum(ridge, floor)
        else:
            solve_diagonal = factor_diagonal
        # d(diagonal)/d(lam) per entry: 1 where the ridge is above the floor and uncapped,
        # 0 where the floor or the cap holds it (floor + keep * (ridge - floor): the
        # gradient of max(ridge, floor) of earlier versions, ties to the ridge).
        sensitivity = ((ridge >= solve_diagonal) & unshrunk[:, None]).to(torch.float64)
        solve_diagonal = solve_diagonal * scale2[:, None]  # (B, n) float64
    auto = (diag, scale2, ridge[:, 0], trouble, finfo.eps) if steps == "auto" else None
    xi, _, _ = _RidgeSolve.apply(
        phi, lam, scaled, scales, multiplier, trace_weight, solve_diagonal, sensitivity, target,
        factor, system, dual, steps, auto,
    )

    if normalize:  # the direction does not depend on the positive factor 1/shrink
        xi, norm = _Normalize.apply(xi)
        finite = torch.isfinite(norm) if checked else None  # inf/NaN reach it
    else:  # xi / shrink, shrink = max(1, lam eps / (n s^2)) a function of lam (and of Phi)
        ridge_of_lam = _ridge_of(phi, lam, scales, trace_weight)
        shrink = (ridge_of_lam / scale2 * (finfo.eps / n)).clamp_min(1.0)
        xi = (xi.double() / shrink[:, None]).to(dtype)
        finite = torch.isfinite(xi.detach()).all(dim=1) if checked else None
    if checked:
        # All-zero descriptors pool to exactly zero; a nonzero result there: G underflowed.
        trouble = trouble | ~finite | (underflow_or_zero & (xi.detach() != 0).any(dim=1))
    return xi, trouble


def _ridge_of(phi, lam, scales, trace_weight):
    """Each sample's ridge (B,) float64 as a differentiable function of ``lam`` and, relative
    (``trace_weight`` given: usable / real locations), of the descriptors (rescaled by
    ``scales``): what the normalisation-free result and the double backward differentiate."""
    if trace_weight is None:
        return lam
    scaled = phi if scales is None else phi * scales.to(phi.dtype)[:, None, None]
    trace = scaled.square().sum(dim=(1, 2)).double()
    return lam * torch.where(trace_weight > 0, trace * trace_weight, 1.0)


class _Normalize(torch.autograd.Function):
    """x / ||x|| per row of (B, C), a zero row left zero (divided by 1), with the analytic
    backward (g - y (y . g)) / ||x|| (g where the row is zero) instead of autograd's dozen
    operations through the norm; differentiable again (the backward recomputes y from x under
    ``create_graph``). Second output, not differentiable: the (B,) norms."""

    @staticmethod
    def forward(ctx, x):
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        safe = torch.where(norm > 0, norm, 1.0)
        y = x / safe
        ctx.save_for_backward(x, y, safe)
        ctx.mark_non_differentiable(norm)
        return y, norm[:, 0]

    @staticmethod
    def backward(ctx, grad, _grad_norm):
        x, y, safe = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: y and ||x|| as functions of x
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            safe = torch.where(norm.detach() > 0, norm, 1.0)
            y = x / safe
        return (grad - y * (y * grad).sum(dim=1, keepdim=True)) / safe


class _RidgeSolve(torch.autograd.Function):
    r"""The unnormalised pooled vectors xi (B, C) of the ridge systems whose Cholesky factor
    is given, with the analytic backward.

    Inputs: ``phi`` (B, N, C), the descriptors (may require grad); ``lam`` (B,) float64
    (may require grad), each sample's ridge, or with ``multiplier`` its multiple of the mean
    squared norm; ``scaled``, the descriptors the system is built from (``phi * scales``,
    computed without autograd, or ``phi`` itself); ``scales`` (B,) float64 or None;
    ``multiplier`` (B,) float64 or None (absolute ridge): the relative ridge's mean squared
    norm of ``scaled`` (1 where it is 0 or not finite), ``trace_weight`` its derivative by
    the trace (usable / real locations); ``diagonal`` (B, n) float64, the diagonal D added to
    the Gram matrix (the ridge, floored and capped: a function of the ridge computed without
    autograd), and ``sensitivity`` (B, n) float64, dD/dridge (1 where the ridge holds, 0
    where the floor or the cap does: D is piecewise linear in the ridge, so the ridge's
    gradient is sum_i dD_i * sensitivity_i and its second derivative through D is 0);
    ``target`` (B, N) (1 at real locations);
    ``factor`` (B, n, n), the Cholesky factor of ``system`` = Gram + D in the dtype of phi;
    ``dual`` (N <= C: the N x N system); ``steps`` (0, an int, or "auto": the forward's float64
    refinement, :mod:`skpool._core.gmp_refine`); ``auto`` (the arguments of
    :func:`_auto_refine` that the solve does not hold).

    In the formulas below Phi stands for ``scaled``; the gradient of ``phi`` is ``scales``
    times theirs (folded into the rank-2 factors), plus, relative, the ridge's term
    2 lam trace_weight scales ridge_bar scaled (one in-place pass).

    Primal (G = Phi^T Phi + D, xi = G^-1 Phi^T t), with v = G^-1 xi_bar (one solve with the
    saved factor): dPhi = (t - Phi xi) v^T - (Phi v) xi^T, dD = -v * xi. Dual (K = Phi Phi^T
    + D, alpha = K^-1 t, xi = Phi^T alpha), with u = K^-1 Phi xi_bar: dPhi = alpha (xi_bar -
    Phi^T u)^T - u xi^T, dD = -u * alpha. The two agree (u = Phi v, t - Phi xi = D alpha for a
    scalar D). Costs a solve and O(N C) per sample, against the forward's factorisation.

    The backward solve runs in the factor's precision. Where the forward refined (an int
    ``steps``: that many float64 refinement steps of the backward solves too; ``"auto"``:
    the samples whose result the refinement changed, detected on the device) the backward is
    refined likewise (``"auto"``: its samples' gradients computed in float64). With
    ``create_graph`` the backward is written in differentiable operations (its solves through
    :class:`_FactorSolve`), so double backward works.

    Outputs: xi (in the dtype of phi), and, not differentiable, the unrefined float32 solution
    (alpha or xi) and the (B,) bool flag of the samples "auto" changed.
    """

    # forward takes ctx (no setup_context): Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call, 0.1-0.2 ms per step.
    @staticmethod
    def forward(ctx, phi, lam, scaled, scales, multiplier, trace_weight, diagonal, sensitivity,
                target, factor, system, dual, steps, auto):
        rhs = target if dual else _weighted_sum(scaled, target)
        solution = factor_solve(factor, rhs)
        plain = _weighted_sum(scaled, solution) if dual else solution
        if steps == "auto":
            diag, scale2, ridge, trouble, eps = auto
            xi = _auto_refine(
                scaled, target, diagonal, factor, solution, dual, diag, scale2, ridge, system,
                trouble, eps,
            )
            changed = (xi != plain).any(dim=1)
        elif steps:
            xi, _ = _refine(scaled, target, diagonal, factor, solution, dual, steps)
            changed = torch.zeros(len(phi), dtype=torch.bool, device=phi.device)
        else:
            xi = plain
            changed = torch.zeros(len(phi), dtype=torch.bool, device=phi.device)
        if xi is solution:  # primal, unrefined: the non-differentiable output is a copy
            solution = solution.clone()
        ctx.mark_non_differentiable(solution, changed)
        ctx.save_for_backward(
            phi, lam, scaled, scales, multiplier, trace_weight, diagonal, sensitivity, target,
            factor, xi, solution, changed,
        )
        ctx.dual, ctx.steps = dual, steps
        return xi, solution, changed

    @staticmethod
    def backward(ctx, grad_xi, _grad_solution, _grad_changed):
        (phi, lam, scaled, scales, multiplier, trace_weight, diagonal, sensitivity, target,
         factor, xi, solution, changed) = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()
        if create_graph:
            # Double backward: the rescaled descriptors, the relative ridge and D as the
            # differentiable functions of phi and lam they are (same values; ridge -
            # ridge.detach() is exactly 0), so that second derivatives see them.
            scaled = phi if scales is None else phi * scales.to(phi.dtype)[:, None, None]
            ridge = _ridge_of(phi, lam, scales, trace_weight)
            if trace_weight is not None:
                multiplier = ridge / lam
            if ridge.requires_grad:
                diagonal = diagonal + sensitivity * (ridge - ridge.detach())[:, None]
        with torch.autocast(device_type=phi.device.type, enabled=False), \
                highest_matmul_precision():
            grad_phi, grad_diagonal = _ridge_solve_backward(
                scaled, diagonal, target, factor, xi, solution, changed, grad_xi, ctx.dual,
                ctx.steps, scales,
            )
        grad_ridge = (grad_diagonal * sensitivity).sum(dim=1)
        if multiplier is None:
            return (grad_phi, grad_ridge, *[None] * 12)
        # Relative: ridge = lam * trace(scaled^T scaled) * trace_weight (where usable), whose
        # gradient 2 lam trace_weight scaled, times scales for phi (one factor of the two,
        # the other in scaled: no float32 overflow beyond that of the gradient itself).
        weight = 2 * lam * trace_weight * grad_ridge
        if scales is not None:
            weight = weight * scales
        weight = weight.to(phi.dtype)[:, None, None]
        if create_graph:
            grad_phi = grad_phi + scaled * weight
        else:
            grad_phi.addcmul_(scaled, weight)  # grad_phi is a fresh buffer of phi's layout
        return (grad_phi, grad_ridge * multiplier, *[None] * 12)


def _ridge_solve_backward(phi, diagonal, target, factor, xi, solution, changed, grad, dual,
                          steps, scales=None):
    """The gradients (dPhi, dD) of :class:`_RidgeSolve` (formulas in its docstring), dPhi
    times ``scales`` (B,) where given (the gradient of the descriptors before rescaling)."""
    create_graph = torch.is_grad_enabled()
    grad = grad.to(phi.dtype)
    if create_graph:  # differentiable solves (the factor itself is a constant)
        def solve(rhs):
            return _FactorSolve.apply(phi, diagonal, rhs, factor, dual)
    else:
        refine = steps if isinstance(steps, int) else 0

        def solve(rhs):
            x = factor_solve(factor, rhs)
            return _refine_solve(phi, diagonal, factor, rhs, x, dual, refine) if refine else x

    if dual:
        alpha = solution
        if create_graph or (isinstance(steps, int) and steps):
            alpha = solve(target)  # differentiable, or refined like the forward
        u = solve((phi @ grad[:, :, None])[..., 0])  # K^-1 Phi xi_bar, (B, N)
        rest = grad - _weighted_sum(phi, u)  # xi_bar - Phi^T u = D v
        grad_phi = _outer_difference(alpha, rest, u, xi, phi, scales)
        grad_diagonal = -(u * alpha)
    else:
        v = solve(grad)  # G^-1 xi_bar, (B, C)
        residual = target - (phi @ xi[:, :, None])[..., 0]  # t - Phi xi, (B, N)
        phi_v = (phi @ v[:, :, None])[..., 0]
        grad_phi = _outer_difference(residual, v, phi_v, xi, phi, scales)
        grad_diagonal = -(v * xi)
    grad_diagonal = grad_diagonal.to(diagonal.dtype)
    if steps == "auto" and not create_graph and bool(changed.any()):  # "auto" synchronises
        # The samples whose forward the refinement changed: their gradients in float64.
        index = changed.nonzero()[:, 0]
        fixed_phi, fixed_diagonal = _ridge_solve_backward_float64(
            phi[index], diagonal[index], target[index], grad[index], dual,
            None if scales is None else scales[index],
        )
        grad_phi = grad_phi.index_copy(0, index, fixed_phi.to(grad_phi.dtype))
        grad_diagonal = grad_diagonal.index_copy(0, index, fixed_diagonal)
    return grad_phi, grad_diagonal


def _outer_difference(a, b, c, d, like, scales=None):
    """a b^T - c d^T per sample, (B, N, C) from (B, N), (B, C), (B, N), (B, C), times
    ``scales`` (B,) where given (folded into a and c): one batched
    product of (B, N, 2) by (B, 2, C), a single pass over the output, laid out in memory as
    ``like`` (the descriptors) where those are a transposed view, as the layers' channels-first
    maps give: autograd then hands the maps their gradient, and adds other gradients of the
    descriptors to it, without a transposing copy."""
    if scales is not None:  # exact powers of two, split so that no factor overflows alone
        half = torch.exp2(torch.floor(torch.log2(scales) / 2))
        left, right = half.to(a.dtype)[:, None], (scales / half).to(a.dtype)[:, None]
        a, b, c, d = a * left, b * right, c * left, d * right
    if not like.is_contiguous() and like.mT.is_contiguous():
        return (torch.stack([b, d], dim=2) @ torch.stack([a, -c], dim=1)).mT
    return torch.stack([a, -c], dim=2) @ torch.stack([b, d], dim=1)


def _ridge_solve_backward_float64(phi, diagonal, target, grad, dual, scales=None):
    """:func:`_ridge_solve_backward` in float64 with a float64 factorisation (for the samples
    whose forward needed float64 refinement or a float64 solve)."""
    phi64 = phi.double()
    phi64_t = phi64.transpose(1, 2)
    system = phi64 @ phi64_t if dual else phi64_t @ phi64
    factor, _ = torch.linalg.cholesky_ex(system + torch.diag_embed(diagonal))
    target64 = target.double()
    rhs = target64 if dual else _weighted_sum(phi64, target64)
    solution = factor_solve(factor, rhs)
    xi = _weighted_sum(phi64, solution) if dual else solution
    no_change = torch.zeros(len(phi), dtype=torch.bool, device=phi.device)
    return _ridge_solve_backward(
        phi64, diagonal, target64, factor, xi, solution, no_change, grad.double(), dual, 0,
        scales,
    )


class _FactorSolve(torch.autograd.Function):
    r"""y = M^-1 b with M = Phi^T Phi + D (primal) or Phi Phi^T + D (dual) and its given
    Cholesky factor, differentiable in Phi, D and b to any order (what the backward of
    :class:`_RidgeSolve` calls under ``create_graph``). With w = M^-1 y_bar: db = w,
    dD = -w * y, dPhi = -(Phi y) w^T - (Phi w) y^T (primal) or -w (Phi^T y)^T - y (Phi^T w)^T
    (dual)."""

    @staticmethod
    def forward(ctx, phi, diagonal, rhs, factor, dual):
        output = factor_solve(factor, rhs)
        ctx.save_for_backward(phi, diagonal, factor, output)
        ctx.dual = dual
        return output

    @staticmethod
    def backward(ctx, grad_y):
        phi, diagonal, factor, y = ctx.saved_tensors
        with torch.autocast(device_type=phi.device.type, enabled=False), \
                highest_matmul_precision():
            if torch.is_grad_enabled():
                w = _FactorSolve.apply(phi, diagonal, grad_y, factor, ctx.dual)
            else:
                w = factor_solve(factor, grad_y)
            if ctx.dual:
                phi_t_y, phi_t_w = _weighted_sum(phi, y), _weighted_sum(phi, w)
                grad_phi = _outer_difference(-w, phi_t_y, y, phi_t_w, phi)
            else:
                phi_y = (phi @ y[:, :, None])[..., 0]
                phi_w = (phi @ w[:, :, None])[..., 0]
                grad_phi = _outer_difference(-phi_y, w, phi_w, y, phi)
            grad_diagonal = -(w * y).to(diagonal.dtype)
        return grad_phi, grad_diagonal, w, None, None


def _ridge_floor(unit_diag: torch.Tensor, eps: float, n: int, robust: bool) -> torch.Tensor:
    """The factor's diagonal floor, (B, n) in units of s^2: ``eps * (G_ii + eps s^2)`` (times
    n for the rescaled solves)."""
    return (n if robust else 1) * eps * (unit_diag + eps)


def _power_of_two_scales(phi: torch.Tensor):
    """Exact per-sample rescaling of ``phi`` (B, N, C) by a power of two c = 2**-e, e the
    exponent of its largest entry (amax <= 2**e < 2 amax; 1 for all-zero samples), clamped to
    the normal range of the dtype so that c itself is a normal number: the rescaled largest
    entry is in [1/2, 1) (in [2**-24, 8) for descriptors at the very limits of float32), so
    no Gram matrix of finite descriptors overflows or underflows. Returns c (B,) float64
    (:func:`_solve` rescales, outside autograd). Non-finite samples stay as they are (their
    result is NaN)."""
    # frexp gives exponent 0 for 0 (scale 1); for inf or NaN whatever it gives is clamped
    _, exponent = torch.frexp(_largest_magnitude(phi.detach()))
    finfo = torch.finfo(phi.dtype)
    limit = min(-math.frexp(finfo.tiny)[1], math.frexp(finfo.max)[1] - 1)  # 125 for float32
    return torch.exp2((-exponent).clamp(-limit, limit).double())


def _largest_magnitude(phi: torch.Tensor) -> torch.Tensor:
    """max |phi[b]| per sample, (B,), NaN where phi[b] holds a NaN: two reductions without a
    temporary, over the memory order (the layers' stacks are transposed views of
    channels-first maps, over which a reduction across both axes is several times slower)."""
    if not phi.is_contiguous() and phi.transpose(1, 2).is_contiguous():
        phi = phi.transpose(1, 2)
    flat = phi.reshape(len(phi), -1)
    return torch.maximum(flat.amax(dim=1), -flat.amin(dim=1))  # measured faster than aminmax


def _solve_rescaled(phi, target, lam, normalize, refine_steps, relative):
    """The ridge solution of every sample from its descriptors rescaled by
    :func:`_power_of_two_scales`, without a device synchronisation: finite descriptors of any
    magnitude can no longer overflow or underflow the Gram matrix. A factorisation that fails
    anyway (a Gram matrix singular to working precision at a ridge below about
    ``n * eps * G_ii``, where Cholesky's rounding exceeds the floor) gives NaN for its sample,
    as do non-finite descriptors: ``refine_steps="auto"`` detects both and re-solves."""
    scales = _power_of_two_scales(phi)
    # A relative lam is recomputed from the rescaled descriptors: it scales the same way.
    lam = lam if relative else lam * scales.square()
    xi, failed = _solve(
        phi, target, lam, normalize, refine_steps, False, relative, False, scales
    )
    if not normalize:  # xi(Phi, lam) = c xi(c Phi, c^2 lam)
        xi = (xi.double() * scales[:, None]).to(xi.dtype)
    return xi.masked_fill(failed[:, None], torch.nan)


def _resolve_troubled(xi, trouble, phi, target, lam, normalize, refine_steps, relative):
    """Solve the flagged samples again from descriptors rescaled by the power of two nearest
    their largest entry: an exact rescaling (a nearly singular Gram matrix would turn the
    rounding of a division by the entry itself into an O(1) change of the result)."""
    index = trouble.nonzero()[:, 0]
    sub = phi[index]
    scales = _power_of_two_scales(sub)
    # A relative lam is recomputed from the rescaled descriptors: it scales the same way.
    sub_lam = lam[index] if relative else lam[index] * scales.square()
    fixed, still = _solve(
        sub, target[index], sub_lam, normalize, refine_steps, True, relative, scales=scales
    )
    if bool(still.any()):
        raise FloatingPointError(
            "generalized_max_pool: the ridge system could not be solved even after rescaling "
            "and a ridge floor of n * eps * G_ii: non-finite descriptors, or an absolute lam "
            "too far from the descriptors' squared scale for the dtype to represent both."
        )
    if not normalize:
        fixed = (fixed.double() * scales[:, None]).to(fixed.dtype)
    return xi.index_copy(0, index, fixed)


def generalized_max_pool_weights(
    features: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    lam_scale: Literal["absolute", "relative"] = "absolute",
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
    lam_scale : {"absolute", "relative"}, default="absolute"
        As in :func:`generalized_max_pool`.
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
    xi = generalized_max_pool(phi, lam, lam_scale=lam_scale, normalize=False, mask=mask)
    lam = torch.as_tensor(lam, dtype=torch.float64, device=phi.device).reshape(-1)
    if lam_scale == "relative":
        squared = phi.square().sum(dim=(1, 2))
        mean = squared / target.sum(dim=1).clamp_min(1.0)
        lam = lam * torch.where(mean > 0, mean, torch.ones_like(mean))
    return (target - (phi @ xi[:, :, None])[..., 0]) / lam[:, None]
