"""Issue 28, class 3: float32 GMP within its stated bound when the float32 sums cancel.

The stated bound (README, Guarantees): with rho = || |Phi|^T 1 || / || Phi^T 1 || (the
cancellation of the float32 sum Phi^T 1; 1 without cancellation) and n locations,

    B = 2 eps32 cond(G + lam I) (1 + rho) max(1, n / 1024);

float32 "auto" is within B of the float64 solution of the same values where B <= 2e-4, and
otherwise within 2e-6 + 2n eps64 cond (refined or solved in float64). The old decision
ignored rho: per-channel-centred descriptors (relative lam = 1) and N(0, 1) descriptors
(lam = 100) with many locations were left unrefined at errors up to 1.4e-4."""

import numpy as np
import pytest

from skpool import GeneralizedMaxPooling

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


def _centred_relu(rng, n_samples, n, c):
    relu = np.maximum(rng.normal(size=(n_samples, n, c)), 0.0)
    return relu - relu.mean(axis=(0, 1), keepdims=True)  # centred per channel over the data


def _normal(rng, n_samples, n, c):
    return rng.normal(size=(n_samples, n, c))


def _reference(stacks, lam_rel):
    """Unit xi of the float64 solve of the same (float32-rounded) values, cond(G + lam I)
    and rho, per sample."""
    gram = np.einsum("bnc,bnd->bcd", stacks, stacks)
    lam = lam_rel * np.trace(gram, axis1=1, axis2=2) / stacks.shape[1]
    system = gram + lam[:, None, None] * np.eye(gram.shape[1])
    xi = np.linalg.solve(system, stacks.sum(axis=1)[..., None])[..., 0]
    rho = (np.linalg.norm(np.abs(stacks).sum(axis=1), axis=1)
           / np.linalg.norm(stacks.sum(axis=1), axis=1))
    return xi / np.linalg.norm(xi, axis=1, keepdims=True), np.linalg.cond(system), rho


@pytest.mark.parametrize("make, lam", [(_centred_relu, 1.0), (_normal, 100.0)],
                         ids=["centred-relu-lam1", "normal-lam100"])
@pytest.mark.parametrize("n, c", [(49, 64), (1024, 32), (16384, 4)])
def test_float32_gmp_within_the_stated_bound(make, lam, n, c):
    rng = np.random.default_rng(n + c)
    maps = make(rng, 6, n, c).astype(np.float32)
    got = GeneralizedMaxPooling(lam=lam, device="cpu").fit_transform(maps)
    expected, cond, rho = _reference(maps.astype(np.float64), lam)
    errors = np.linalg.norm(got - expected, axis=1)
    stated = 2 * EPS32 * cond * (1 + rho) * max(1.0, n / 1024)
    # where the stated bound is above 2e-4 the result must be refined (2e-6), plus the
    # reference's own float64 error (2 n eps64 cond, doubled by the normalisation)
    refined = 2e-6 + 2 * n * EPS64 * cond
    bounds = np.where(stated <= 2e-4, stated, refined)
    assert np.all(errors <= bounds), (errors / bounds).max()
