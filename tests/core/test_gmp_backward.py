"""The analytic GMP backward (issue 26) against float64 autograd through a plain solve.

The reference differentiates xi = solve(Phi^T Phi + lam I, Phi^T t) (then / ||xi||) in
float64 with torch's own autograd, written here, slow and independent of skpool's factor
reuse. "Old" is what skpool did before: float32 autograd through the Cholesky factorisation
and its solves.

Bound: each gradient is a product of two solves with G + lam I (the forward's xi and the
backward's v = (G + lam I)^-1 xi_bar) and O(n) sums; to first order its relative error is at
most about 2 * eps * cond(G + lam I) (one per solve) plus n * eps for the sums. The tests use
``GRADIENT_MARGIN * (2 cond + n) * eps`` with n = max(N, C) and a margin of 4 for the
constants of the Cholesky error bound (measured: at most 0.15 of the bound in float64,
0.07 in float32, on these cases).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skpool._core.gmp import generalized_max_pool
from gmp_reference import ridge_condition

SHAPES = [(12, 40), (24, 24), (50, 10), (1, 5), (7, 1)]  # N < C, N = C, N > C, edge cases
EPS = {torch.float32: float(torch.finfo(torch.float32).eps),
       torch.float64: float(torch.finfo(torch.float64).eps)}
GRADIENT_MARGIN = 4.0


def reference(phi, lam, mask, relative, normalize):
    """float64 GMP by torch.linalg.solve on the primal system, autograd end to end."""
    phi = phi.double()
    target = torch.ones(phi.shape[:2], dtype=torch.float64) if mask is None else mask.double()
    phi = phi * target[:, :, None]
    lam = lam.double().reshape(-1).expand(len(phi))
    if relative:
        lam = lam * phi.square().sum(dim=(1, 2)) / target.sum(dim=1).clamp_min(1.0)
    eye = torch.eye(phi.shape[2], dtype=torch.float64)
    system = phi.transpose(1, 2) @ phi + lam[:, None, None] * eye
    xi = torch.linalg.solve(system, (target[:, None, :] @ phi)[:, 0, :, None])[..., 0]
    return xi / xi.norm(dim=1, keepdim=True) if normalize else xi


def old_float32(phi, lam, mask, relative, normalize):
    """skpool's backward before issue 26: autograd through float32 Cholesky and its solve of
    the smaller system (no floor, no refinement; moderate lam here)."""
    target = torch.ones(phi.shape[:2]) if mask is None else mask.float()
    phi = phi * target[:, :, None]
    lam = lam.reshape(-1).expand(len(phi)).float()
    if relative:
        lam = lam * phi.square().sum(dim=(1, 2)) / target.sum(dim=1).clamp_min(1.0)
    n, c = phi.shape[1:]
    if n <= c:
        system = phi @ phi.transpose(1, 2) + lam[:, None, None] * torch.eye(n)
        alpha = torch.cholesky_solve(target[:, :, None], torch.linalg.cholesky(system))
        xi = (alpha.transpose(1, 2) @ phi)[:, 0]
    else:
        system = phi.transpose(1, 2) @ phi + lam[:, None, None] * torch.eye(c)
        rhs = (target[:, None, :] @ phi).transpose(1, 2)
        xi = torch.cholesky_solve(rhs, torch.linalg.cholesky(system))[..., 0]
    return xi / xi.norm(dim=1, keepdim=True) if normalize else xi


def gradients(function, phi, lam, weights, *args):
    phi = phi.detach().clone().requires_grad_(True)
    lam = lam.detach().clone().requires_grad_(True)
    (function(phi, lam, *args) * weights).sum().backward()
    return phi.grad.double(), lam.grad.double()


def skpool_function(refine_steps):
    def pool(phi, lam, mask, relative, normalize):
        return generalized_max_pool(
            phi, lam, lam_scale="relative" if relative else "absolute", normalize=normalize,
            mask=mask, refine_steps=refine_steps,
        )
    return pool


def gradient_bound(phi, lam_absolute, eps):
    n = max(phi.shape[1:])
    cond = max(ridge_condition(p, l) for p, l in zip(phi, lam_absolute))
    return GRADIENT_MARGIN * (2 * cond + n) * eps


def phi_scale(grad_phi, phi, weights, args):
    """The size against which the error of dL/dPhi is relative: its own norm, or where the
    output barely depends on Phi (C = 1 normalised: the output is +-1, the gradient exactly 0)
    the size of its terms, ||weights|| ||output|| / ||Phi||."""
    mask = args[0]
    phi = phi.double() if mask is None else phi.double() * mask[:, :, None]  # real locations
    with torch.no_grad():
        out = reference(phi, torch.tensor(1.0), *args)
    terms = float(weights.double().norm() * out.norm() / phi.norm())
    return max(float(grad_phi.norm()), terms)


def lam_scale(grad_phi_scale, grad_lam, phi, lam, mask):
    """The size against which the error of dL/dlam is relative: lam dL/dlam is a sum of the
    same products as <Phi, dL/dPhi> (both are derivatives along a scaling, of lam or of Phi),
    so it can cancel to far below their size; its error cannot."""
    phi = phi.double() if mask is None else phi.double() * mask[:, :, None]  # real locations
    return max(float(grad_lam.abs()), grad_phi_scale * float(phi.norm()) / float(lam))


def relative_difference(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_case(rng, n, c, masked, relative):
    phi = torch.from_numpy(rng.standard_normal((3, n, c))).float()
    mask = None
    if masked and n > 1:
        mask = torch.ones(3, n, dtype=torch.bool)
        mask[1, n // 2:] = False
        phi[1, n // 2:] = 1e3  # padding holds anything
    lam = torch.tensor(0.5 if relative else 0.5 * c)
    weights = torch.from_numpy(rng.standard_normal((3, c))).float()
    return phi, lam, mask, weights


def lam_absolute(phi, lam, mask, relative):
    stacks = phi.double().numpy().copy()
    lams = []
    for b, p in enumerate(stacks):
        if mask is not None:
            p[~mask[b].numpy()] = 0.0
        count = p.shape[0] if mask is None else max(int(mask[b].sum()), 1)
        lams.append(float(lam) * (np.sum(p**2) / count if relative else 1.0))
    return stacks, lams


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("n,c", SHAPES)
def test_gradients_match_float64_autograd_through_a_plain_solve(rng, n, c, relative, masked,
                                                               normalize):
    phi, lam, mask, weights = make_case(rng, n, c, masked, relative)
    args = (mask, relative, normalize)
    expected_phi, expected_lam = gradients(reference, phi.double(), lam.double(),
                                           weights.double(), *args)
    stacks, lams = lam_absolute(phi, lam, mask, relative)
    for dtype, steps in ((torch.float64, 0), (torch.float32, 0), (torch.float32, "auto")):
        got_phi, got_lam = gradients(skpool_function(steps), phi.to(dtype), lam.to(dtype),
                                     weights.to(dtype), *args)
        bound = gradient_bound(stacks, lams, EPS[dtype])
        error = float((got_phi - expected_phi).norm())
        assert error <= bound * phi_scale(expected_phi, phi, weights, args), (dtype, steps)
        scale = phi_scale(expected_phi, phi, weights, args)
        assert float((got_lam - expected_lam).abs()) <= bound * lam_scale(
            scale, expected_lam, phi, lam, mask), (dtype, steps)
        if mask is not None:  # no gradient reaches the padding
            assert float(got_phi[1, n // 2:].abs().max()) == 0.0


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("n,c", SHAPES)
def test_old_and_new_backward_agree(rng, n, c, relative):
    """Every test shape: the analytic backward and the autograd-through-Cholesky one (both
    float32) within twice the bound (each within the bound of the float64 gradient)."""
    phi, lam, mask, weights = make_case(rng, n, c, True, relative)
    args = (mask, relative, True)
    new = gradients(skpool_function(0), phi, lam, weights, *args)
    old = gradients(old_float32, phi, lam, weights, *args)
    stacks, lams = lam_absolute(phi, lam, mask, relative)
    bound = 2 * gradient_bound(stacks, lams, EPS[torch.float32])
    assert float((new[0] - old[0]).norm()) <= bound * phi_scale(old[0], phi, weights, args)
    scale = phi_scale(old[0], phi, weights, args)
    assert float((new[1] - old[1]).abs()) <= bound * lam_scale(scale, old[1], phi, lam, mask)


@pytest.mark.parametrize("n,c", [(6, 4), (3, 5)])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
# Two routes even in float64: an int refine_steps solves the exactly rescaled descriptors
# (the scale folded into the backward), "auto" the descriptors as given (checked for
# overflow instead); the double backward rebuilds each route's dependence on Phi.
@pytest.mark.parametrize("refine_steps", [0, "auto"], ids=["rescaled", "checked"])
def test_gradcheck_and_gradgradcheck_with_mask(rng, n, c, relative, normalize, refine_steps):
    phi = torch.from_numpy(rng.standard_normal((3, n, c))).requires_grad_(True)
    lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[1, -2:] = False

    def pool(p, l):
        return generalized_max_pool(
            p, l, lam_scale="relative" if relative else "absolute", normalize=normalize,
            mask=mask, refine_steps=refine_steps,
        )

    assert torch.autograd.gradcheck(pool, (phi, lam))
    assert torch.autograd.gradgradcheck(pool, (phi, lam))


def test_refined_backward_matches_float64_where_plain_float32_does_not(rng):
    """At a tiny lam (eps32 * cond ~ 0.1) the float32 factor alone gives gradients with no
    correct digit; "auto" computes the refined samples' gradients in float64 and an int
    refine_steps refines the backward's solves like the forward's."""
    phi = torch.from_numpy(rng.standard_normal((2, 32, 32))).float()
    lam = torch.tensor(1e-6 * float(phi.double().square().sum(-1).mean()))
    weights = torch.from_numpy(rng.standard_normal((2, 32))).float()
    args = (None, False, True)
    expected = gradients(reference, phi.double(), lam.double(), weights.double(), *args)
    stacks, lams = lam_absolute(phi, lam, None, False)
    cond = max(ridge_condition(p, l) for p, l in zip(stacks, lams))
    assert EPS[torch.float32] * cond > 1e-2
    plain = gradients(skpool_function(0), phi, lam, weights, *args)
    auto = gradients(skpool_function("auto"), phi, lam, weights, *args)
    assert relative_difference(plain[0], expected[0]) > 1e-3
    # float64 gradients from the float32-rounded forward result: the error of that result
    # (REFINE_TARGET-level, plus float32 rounding) times cond for the backward's solve
    assert relative_difference(auto[0], expected[0]) <= GRADIENT_MARGIN * (
        1e-6 + EPS[torch.float32]) * cond
