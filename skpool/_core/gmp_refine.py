r"""Mixed-precision refinement of the float32 ridge systems of :mod:`skpool._core.gmp`.

``refine_steps=n`` runs n steps of iterative refinement (the residual recomputed in float64
from the descriptors, corrected with the float32 Cholesky factor); ``refine_steps="auto"``
(:func:`_auto_refine`) refines only the samples whose a priori error bound asks for it, stops
each on its observed contraction, and solves in float64 the samples that refinement cannot
bring to :data:`REFINE_TARGET`. :func:`skpool._core.gmp.generalized_max_pool` documents the
contract; this module holds the machinery.
"""

from __future__ import annotations

import torch

__all__ = ["AUTO_REFINE_TOLERANCE", "REFINE_TARGET"]

#: With ``refine_steps="auto"``, float32 solves are refined when the bound
#: ``eps32 * (lambda_max(G) + lam) / lam`` on their relative error, times the cancellation
#: factor of :func:`_cancellation`, exceeds this tolerance (``lambda_max`` bounded above by
#: the trace and by the largest absolute row sum of G).
AUTO_REFINE_TOLERANCE = 1e-4
#: With ``refine_steps="auto"``, a refined sample stops once the error left after its last
#: correction, estimated as ``correction * rho / (1 - rho)`` from the observed contraction
#: ``rho`` (ratio of successive corrections), is below this relative to xi; samples that cannot
#: get there within ``_MAX_AUTO_STEPS`` steps are solved in float64.
REFINE_TARGET = 1e-6
_MAX_AUTO_STEPS = 6
#: A Cholesky pivot ``r_kk**2`` below this many ``eps32 * A_kk`` is at the rounding level of the
#: diagonal entry (the factor floor puts it near ``eps32 * A_kk``): the float32 factor holds no
#: correct digit in that direction, refinement would contract by 1/2 per step at best, and the
#: sample is solved in float64 directly.
_HOPELESS_PIVOT = 2.0
#: Where the a priori bounds ask for refinement, a 1-norm condition estimate
#: (:func:`_condition_estimate`) times this margin decides instead: the estimate never exceeds
#: kappa_1 (>= kappa_2 for symmetric matrices) and is rarely below a third of it (Higham,
#: Sec. 15.3; measured 0.76-0.98 of kappa_1 on ReLU Gram matrices, n = 64-441); its steps.
_ESTIMATE_MARGIN = 3.0
_ESTIMATE_STEPS = 3
#: Float32 sums (and Gram entries) of up to this many terms rounded within a fraction of
#: eps * (1 + rho) here; beyond it their error grew about linearly with the count
#: (:func:`_cancellation`).
_SUM_BLOCK = 1024


def factor_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """x = (L L^T)^-1 b for the Cholesky factors ``factor`` (B, n, n) (lower) and the vectors
    ``rhs`` (B, n), in the factor's dtype: two batched triangular solves, the arithmetic of
    :func:`torch.cholesky_solve` (LAPACK potrs is these two trsm), which on CPU (torch 2.13)
    calls potrs matrix by matrix, 1.3x slower at n = 64 and 4x at n = 512
    (benchmarks/README.md, issue 26)."""
    rhs = rhs.to(factor.dtype)[:, :, None]
    lower = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, lower, upper=True)[..., 0]


def _auto_refine(
    phi, target, exact_ridge, factor, solution, dual, diag, scale2, ridge, system, trouble, eps
):
    """``refine_steps="auto"``: refine where the bound and the condition estimate ask for it,
    float64 where refinement cannot reach :data:`REFINE_TARGET`. Returns the (B, C) vectors
    in the dtype of ``phi``."""
    # The error bound eps * (lambda_max(G) / s^2 + ridge) / ridge, with lambda_max(G)
    # bounded by the trace; only where that is not enough, by the smaller of the trace and
    # the largest absolute row sum (Gershgorin; tight for ReLU features, whose Gram matrices
    # are entrywise positive), which costs a pass over G and a second synchronisation.
    # The solve's error is the contraction times the relative error of its right-hand side,
    # which the float32 sum Phi^T 1 (primal; Phi^T alpha, dual) can hold far above eps when
    # its terms cancel (channels centred over the data), and whose rounding grows with the
    # number n of terms beyond a block: the factor (1 + rho) max(1, n / _SUM_BLOCK)
    # (:func:`_cancellation`) carries it into every bound below.
    xi = _weighted_sum(phi, solution) if dual else solution
    cancellation = _cancellation(phi, target, solution, xi, dual)
    contraction = (eps * (diag.sum(dim=1) / scale2 + ridge) / ridge).masked_fill(trouble, 0.0)
    bound = (contraction * cancellation).masked_fill(trouble, 0.0)
    if bool((bound > AUTO_REFINE_TOLERANCE).any()):
        rows = system.detach().abs().sum(dim=2).amax(dim=1).double() / scale2
        contraction = torch.minimum(contraction, eps * rows / ridge).masked_fill(trouble, 0.0)
        bound = (contraction * cancellation).masked_fill(trouble, 0.0)
        needed = bound > AUTO_REFINE_TOLERANCE
    else:
        needed = None
    if needed is None or not bool(needed.any()):
        return xi
    # Both bounds take lambda_min(G) = 0, while G is often well conditioned (the primal G of
    # N >> C descriptors, ReLU features at a tenth of the mean squared norm: cond(G + lam) ~
    # 50 where the bounds say 1e4). Where they ask for refinement, the condition number is
    # estimated with the float32 factor (:func:`_condition_estimate`, a lower estimate, so
    # it counts with a margin of _ESTIMATE_MARGIN) and the samples it clears are left as
    # they are.
    norm = rows * scale2  # ||G + ridge||_1 = its largest absolute row sum (symmetric)
    if bool(needed.all()):
        estimate = _condition_estimate(norm, factor)
    else:
        index = needed.nonzero()[:, 0]
        estimate = torch.zeros_like(bound).index_put(
            (index,), _condition_estimate(norm[index], factor[index])
        )
    # with the exact cancellation (a copy of |Phi|), for these samples only; cleared only by
    # a finite estimate below the tolerance (a NaN from an overflowing solve keeps the
    # sample on the safe side)
    index = needed.nonzero()[:, 0]
    exact = torch.full_like(cancellation, torch.inf).index_put(
        (index,),
        _cancellation(phi[index], target[index], solution[index], xi[index], dual, exact=True),
    )
    needed = needed & ~(eps * _ESTIMATE_MARGIN * estimate * exact <= AUTO_REFINE_TOLERANCE)
    if not bool(needed.any()):
        return xi
    # Pivots at the rounding level of their diagonal entry: no correct digit to refine.
    pivots = factor.detach().diagonal(dim1=1, dim2=2).double().square()
    system_diag = system.detach().diagonal(dim1=1, dim2=2).double()
    hopeless = (pivots <= _HOPELESS_PIVOT * eps * system_diag).any(dim=1)
    to_refine = needed & ~hopeless
    to_float64 = needed & hopeless
    if bool(to_refine.any()):
        index = to_refine.nonzero()[:, 0]
        every = len(index) == len(to_refine)
        pick = (lambda t: t) if every else (lambda t: t[index])
        refined, converged = _refine(
            pick(phi), pick(target), pick(exact_ridge), pick(factor), pick(solution), dual,
            _MAX_AUTO_STEPS, first_contraction=pick(contraction),
        )
        xi = refined if every else xi.index_copy(0, index, refined)
        to_float64 = to_float64.index_put((index,), ~converged)
    if bool(to_float64.any()):
        index = to_float64.nonzero()[:, 0]
        fixed = _solve_float64(phi[index], target[index], exact_ridge[index], dual)
        xi = xi.index_copy(0, index, fixed)
    return xi


def _cancellation(phi, target, solution, xi, dual, exact=False) -> torch.Tensor:
    r"""``(1 + rho) * max(1, n / _SUM_BLOCK)`` (B,) float64, n the sample's locations, with

    .. math:: \rho = \frac{\sum_i |w_i|\,\|\phi_i\|_2}{\|\sum_i w_i \phi_i\|_2} \ge 1

    (``exact``: :math:`\| |\Phi|^\top |w| \|_2` as the numerator, which the sum of norms
    bounds) for the float32 sum that the solve's right-hand side (primal, w = the target, 1 at the
    real locations) or its result (dual, w = alpha) is: its relative rounding error is about
    eps times rho (1 for descriptors pointing alike; large where the terms nearly cancel, as
    with channels centred over the data; inf where they cancel exactly). The numerator bounds
    :math:`\| |\Phi|^\top |w| \|_2` (triangle inequality) and costs one pass over the rows
    without a copy of Phi. From the float32 values: where the sum is rounding noise, rho is
    still of order 1/eps, which asks for refinement as it should. Measured on a Sapphire
    Rapids CPU (MKL), unrefined float32 errors were within 0.5 * 2 eps (1 + rho) cond(G + lam)
    up to n = 1024 locations and grew about linearly in n beyond (centred ReLU descriptors:
    1.9 at n = 4096, 7.1 at 16384): hence the factor n / _SUM_BLOCK there
    (``tests/reliability/test_gmp_cancellation.py`` checks the resulting bound)."""
    phi, target = phi.detach(), target.detach()
    weights, total = (solution.detach(), xi.detach()) if dual else (target, None)
    if total is None:
        total = _weighted_sum(phi, target)
    if exact:
        magnitude = torch.linalg.vector_norm(_weighted_sum(phi.abs(), weights.abs()), dim=1)
    else:
        row_norms = torch.linalg.vector_norm(phi, dim=2)  # (B, N), contiguous: no copy of phi
        magnitude = (weights.abs() * row_norms).sum(dim=1)
    magnitude = magnitude.double()
    size = torch.linalg.vector_norm(total, dim=1).double()
    terms = (target != 0).sum(dim=1).double()
    growth = (terms / _SUM_BLOCK).clamp_min(1.0)
    return (1 + magnitude / size) * growth  # NaN for an all-zero sample: stays 0


def _condition_estimate(norm: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    r"""1-norm condition estimates (b,) float64 of SPD matrices A with 1-norms ``norm`` (b,)
    and Cholesky factors ``factor`` (b, n, n): :math:`\|A\|_1` times Hager's estimate of
    :math:`\|A^{-1}\|_1` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
    Alg. 15.4, as LAPACK's ``xLACN2``): _ESTIMATE_STEPS power steps on
    :math:`\|A^{-1} x\|_1` over unit vectors, plus the alternating-sign test vector (solved
    with the first step), five solves with the factor in all. Each candidate is
    :math:`\|A^{-1} x\|_1` for an x of unit 1-norm, so the estimate never exceeds the true
    norm; it is rarely below a third of it (Higham, Sec. 15.3), and the caller counts it
    with a margin. For symmetric A, :math:`\kappa_2 \le \kappa_1`."""
    factor = factor.detach()
    count, n, _ = factor.shape
    steps = torch.arange(n, dtype=torch.float64, device=factor.device)
    alternating = (1 - 2 * (steps % 2)) * (1 + steps / max(n - 1, 1))  # 1-norm 3n/2
    x = torch.stack(
        [torch.full_like(steps, 1.0 / n), alternating * (2 / (3 * n))], dim=1
    ).to(factor.dtype).expand(count, n, 2)  # unit 1-norm columns
    inverse = factor.new_zeros(count, dtype=torch.float64)
    for step in range(_ESTIMATE_STEPS):
        y = torch.cholesky_solve(x, factor)  # A^-1 x
        inverse = torch.maximum(inverse, y.abs().sum(dim=1).amax(dim=1).double())
        if step == _ESTIMATE_STEPS - 1:
            break
        z = torch.cholesky_solve(torch.sign(y[..., :1]), factor)  # A^-T sign(y), A = A^T
        x = torch.zeros_like(z).scatter_(1, z.abs().argmax(dim=1, keepdim=True), 1.0)
    return norm.double() * inverse


def _weighted_sum(phi: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[b, i] * phi[b, i, :]``: (B, N, C), (B, N) -> (B, C), one pass over phi."""
    return (weights[:, None, :] @ phi)[:, 0, :]


def _refine(phi, target, ridge, factor, solution, dual, steps, first_contraction=None):
    """Mixed-precision iterative refinement of the ridge system (see the docstring).

    ``ridge`` (B, n) float64 is the diagonal added to G in the residual. Runs ``steps`` steps;
    with ``first_contraction`` (the a priori bound of the contraction, (B,)) it is adaptive:
    a sample stops once its estimated remaining error ``change * rho / (1 - rho)`` is below
    :data:`REFINE_TARGET` (``change`` the last correction of xi relative to xi, ``rho`` the
    ratio of the last two changes, the a priori bound for the first), and is given up when
    ``rho >= 1`` or when the steps left cannot get it there at its observed ``rho``.

    Returns the refined (B, C) vectors in the dtype of ``phi`` and the (B,) bool flag of the
    samples that converged (None unless adaptive).
    """
    phi64 = phi.double()
    target64 = target.double()
    rhs = target64 if dual else _weighted_sum(phi64, target64)
    current = solution.double()  # alpha (dual) or xi (primal)
    xi = _weighted_sum(phi64, current) if dual else current
    adaptive = first_contraction is not None
    if adaptive:
        previous = None
        active = torch.ones(len(phi), dtype=torch.bool, device=phi.device)
        converged = torch.zeros_like(active)
    for step_number in range(steps):
        similarities = (phi64 @ xi[:, :, None])[..., 0]  # Phi xi, (B, N)
        applied = similarities if dual else _weighted_sum(phi64, similarities)
        residual = rhs - applied - ridge * current
        step = factor_solve(factor, residual).double()
        new_current = current + step
        new_xi = _weighted_sum(phi64, new_current) if dual else new_current
        if not adaptive:
            current, xi = new_current, new_xi
            continue
        size = torch.linalg.vector_norm(new_xi.detach(), dim=1)
        change = torch.linalg.vector_norm((new_xi - xi).detach(), dim=1) / torch.where(
            size > 0, size, torch.ones_like(size)
        )
        first = previous is None
        rho = first_contraction if first else change / previous.clamp_min(1e-300)
        previous = change
        # torch.where, not a product: a sample stopped early keeps its (finite) value and
        # gets no gradient through the later steps.
        current = torch.where(active[:, None], new_current, current)
        xi = torch.where(active[:, None], new_xi, xi)
        contracting = rho < 1
        remaining = change * rho / (1 - rho).clamp_min(1e-300)  # error left, if contracting
        done = active & ((change == 0) | (contracting & (remaining <= REFINE_TARGET)))
        if not first:  # one change says nothing about rho: give up from the second step on
            left = steps - step_number - 1
            out_of_reach = remaining * rho.clamp(max=1.0) ** left > REFINE_TARGET
            active = active & ~(~done & (~contracting | out_of_reach))
        converged = converged | done
        active = active & ~done
        if not bool(active.any()):
            break
    return xi.to(phi.dtype), (converged if adaptive else None)


def _solve_float64(phi, target, ridge, dual):
    """The ridge solution (B, C) computed in float64 (for samples that float32 refinement
    cannot bring to :data:`REFINE_TARGET`), ``ridge`` (B, n) the diagonal added to G, returned
    in the dtype of ``phi``."""
    phi64 = phi.double()
    phi64_t = phi64.transpose(1, 2)
    system = phi64 @ phi64_t if dual else phi64_t @ phi64
    system = system + torch.diag_embed(ridge)
    factor, _ = torch.linalg.cholesky_ex(system)
    rhs = target.double() if dual else _weighted_sum(phi64, target.double())
    solution = factor_solve(factor, rhs)
    xi = _weighted_sum(phi64, solution) if dual else solution
    return xi.to(phi.dtype)


def _refine_solve(phi, diagonal, factor, rhs, solution, dual, steps):
    """``steps`` float64 refinement steps of ``solution`` (B, n) of M x = ``rhs`` (B, n), M =
    Phi^T Phi + D (primal) or Phi Phi^T + D (dual), D = ``diagonal`` (B, n) float64, with the
    float32 Cholesky factor of M (the backward's solves, refined as the forward's were).
    Returns x in the dtype of ``phi``."""
    phi64 = phi.double()
    rhs64 = rhs.double()
    x = solution.double()
    for _ in range(steps):
        if dual:  # Phi (Phi^T x)
            applied = (phi64 @ _weighted_sum(phi64, x)[:, :, None])[..., 0]
        else:  # Phi^T (Phi x)
            applied = _weighted_sum(phi64, (phi64 @ x[:, :, None])[..., 0])
        residual = rhs64 - applied - diagonal * x
        x = x + factor_solve(factor, residual).double()
    return x.to(phi.dtype)
