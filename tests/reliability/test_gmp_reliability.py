"""Generalized max pooling: the classes of input of issue 14 (uneven scales in float32, ragged
lists with empty stacks or tensors that require grad, parameters changed after ``fit``, empty
batches in the layer) and issue 16's scale-free λ, on the estimator and on the layer.

Float32 results are compared with the float64 least-squares reference of
``tests/gmp_reference.py`` within the per-sample bound stated there (from cond(G + λI)).
"""

from __future__ import annotations

import pickle

import joblib
import numpy as np
import pytest
import torch

from gmp_reference import (
    EPS64,
    auto_solve_bound,
    float32_tolerance,
    gmp_batch,
    mean_squared_norm,
    reference_error_bound,
    solve_error_bound,
    uneven,
    unit_error_bound,
)
from skpool import GeneralizedMaxPooling
from skpool.nn import GeneralizedMaxPool2d
from skpool.nn.functional import generalized_max_pool2d

RATIOS = [1.0, 10.0, 1e2, 1e3, 3e3, 1e4]
SHAPES = {"primal": (5, 49, 16), "dual": (5, 16, 49)}  # (B, N, C): N > C and N <= C


def _errors_and_bounds(got, stacks, lams):
    lams = np.broadcast_to(np.asarray(lams, dtype=np.float64), (len(stacks),))
    errors = np.abs(np.asarray(got, dtype=np.float64) - gmp_batch(stacks, lams)).max(axis=1)
    bounds = np.array([float32_tolerance(phi, lam) for phi, lam in zip(stacks, lams)])
    return errors, bounds


def _float64_bounds(stacks, lams, unit=EPS64):
    """Per sample: skpool's float64 solve within unit_error_bound (at ``unit``), the SVD
    reference within twice its own relative bound (normalised)."""
    lams = np.broadcast_to(np.asarray(lams, dtype=np.float64), (len(stacks),))
    return np.array([unit_error_bound(phi, lam, unit) + 2 * reference_error_bound(phi, lam)
                     for phi, lam in zip(np.asarray(stacks, dtype=np.float64), lams)])


def _to_maps(stacks):
    """(B, N, C) stacks with N = 7 * 7 or 4 * 4 -> channels-first maps (B, C, H, W)."""
    side = int(round(np.sqrt(stacks.shape[1])))
    return torch.from_numpy(stacks).reshape(len(stacks), side, side, -1).permute(0, 3, 1, 2)


# ============================================================================================
# Uneven scales in float32 (issue 14, item 1)
@pytest.mark.parametrize("lam", [1e-3, 0.1, 1.0])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("axis", ["channel", "location"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_estimator_float32_under_uneven_scales(shape, axis, ratio, lam):
    """One channel or one location `ratio` times the rest (the issue: 10-33% off at 3e3)."""
    stacks = uneven(np.random.default_rng(0), SHAPES[shape], axis, ratio)
    pooled = GeneralizedMaxPooling(lam=lam, lam_scale="absolute", device="cpu").fit_transform(
        stacks
    )
    assert pooled.dtype == np.float32
    errors, bounds = _errors_and_bounds(pooled, stacks, lam)
    assert np.all(errors <= bounds), (errors / bounds).max()


@pytest.mark.parametrize("relative_lam", [1e-3, 1e-1, 1.0, 10.0])
@pytest.mark.parametrize("ratio", [1e2, 1e4])
@pytest.mark.parametrize("kind", ["uniform", "normal", "relu"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_estimator_float32_under_random_scales_ragged_and_relative(shape, kind, ratio,
                                                                    relative_lam):
    """Every channel and location scaled by its own factor in [1, ratio]; the same stacks as a
    ragged list (padded and masked inside) with a relative lam and batch_size=2."""
    stacks = uneven(np.random.default_rng(1), SHAPES[shape], "random", ratio, kind)
    ragged = [phi[: len(phi) - i] for i, phi in enumerate(stacks)]
    pooled = GeneralizedMaxPooling(
        lam=relative_lam, lam_scale="relative", batch_size=2, device="cpu"
    ).fit_transform(ragged)
    lams = [relative_lam * mean_squared_norm(phi) for phi in ragged]
    for i, (phi, lam) in enumerate(zip(ragged, lams)):
        errors, bounds = _errors_and_bounds(pooled[i : i + 1], phi[None], lam)
        assert errors[0] <= bounds[0], (i, errors[0] / bounds[0])


@pytest.mark.parametrize("lam", [1e-3, 1.0])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("axis", ["channel", "location"])
@pytest.mark.parametrize("side,channels", [(7, 16), (4, 49)], ids=["primal", "dual"])
def test_layer_float32_under_uneven_scales(side, channels, axis, ratio, lam):
    """GeneralizedMaxPool2d with its defaults but lam (refine_steps="auto") is as accurate."""
    stacks = uneven(np.random.default_rng(2), (4, side * side, channels), axis, ratio)
    layer = GeneralizedMaxPool2d(lam=lam, lam_scale="absolute")
    with torch.no_grad():
        out = layer(_to_maps(stacks))
    assert out.dtype == torch.float32
    errors, bounds = _errors_and_bounds(out.numpy(), stacks, lam)
    assert np.all(errors <= bounds), (errors / bounds).max()


@pytest.mark.parametrize("ratio", [1e3, 1e4])
@pytest.mark.parametrize("axis", ["channel", "location"])
def test_layer_float32_gradients_under_uneven_scales_are_finite_and_match_float64(axis, ratio):
    """Backward through refinement and the float64 fallback. The float32 layer's gradient is
    compared, per sample, with the float64 layer's at the same lam (the float32 layer's
    exp(log 0.1)) on the same values. The backward pass solves the same system again (the
    adjoint) and the normalisation's derivative doubles relative errors, so the gradient's
    relative error is about 4 x the forward solve's: a sample solved in float64 is within
    the float64 bound; a refined one's gradient differentiates the refinement steps, whose
    adjoint contracts at the same rate for the same number of steps as the forward, so it is
    within the refined forward's REFINE_TARGET-level bound; an unrefined one within the plain
    float32 bound. gmp_reference.auto_solve_bound is the largest of the three that applies.
    In eval mode: in a training step "auto" is the plain float32 solve (no host decision, issue
    27), whose gradients test_gmp_backward.py bounds by eps32 * cond."""
    stacks = uneven(np.random.default_rng(3), (3, 16, 49), axis, ratio)
    weights = torch.from_numpy(np.random.default_rng(4).standard_normal((3, 49)))
    grads = []
    lam = 0.1
    for dtype in (torch.float32, torch.float64):
        maps = _to_maps(stacks).to(dtype).requires_grad_(True)
        layer = GeneralizedMaxPool2d(lam=lam, lam_scale="absolute", dtype=dtype).eval()
        (layer(maps) * weights.to(dtype)).sum().backward()
        lam = float(layer.lam.detach())  # the float64 layer takes the float32 layer's lam
        grads.append((maps.grad.double(), layer.log_lam.grad.double()))
    (g32, lam32), (g64, lam64) = grads
    assert torch.isfinite(g32).all() and torch.isfinite(lam32)
    for b, phi in enumerate(stacks.astype(np.float64)):
        relative = 4 * auto_solve_bound(phi, lam)
        assert float((g32[b] - g64[b]).norm()) <= relative * float(g64[b].norm())


# ============================================================================================
# Scale-free lambda (issue 16, item 1)
@pytest.mark.parametrize("scale", [1e-20, 1e-3, 1.0, 1e3, 1e20])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relative_lam_makes_the_estimator_scale_invariant(scale, dtype):
    """xi(s Phi) has the direction of xi(Phi) under a relative lam (the ridge scales with
    s^2): both within their bound of the reference of the unscaled stacks, float32's that of
    the reference (float32_tolerance), float64's the solve's (unit_error_bound) plus the
    reference's own. The scaled stacks are the unscaled ones rounded once more (u per
    entry): within the plain solve's bound at the dtype (whose Gram and right-hand side terms
    count m >= 2 and N >= 1 roundings per entry)."""
    stacks = uneven(np.random.default_rng(5), (4, 20, 8), "random", 10.0, "relu").astype(dtype)
    scaled = (stacks * dtype(scale)).astype(dtype)
    assert np.all(np.isfinite(scaled))
    pool = GeneralizedMaxPooling(lam=0.3, lam_scale="relative", device="cpu")
    base, pooled = pool.fit_transform(stacks), pool.fit_transform(scaled)
    lams = [0.3 * mean_squared_norm(phi) for phi in stacks.astype(np.float64)]
    unit = np.finfo(dtype).eps
    rounding = np.array([unit_error_bound(phi, lam, unit) for phi, lam in
                         zip(stacks.astype(np.float64), lams)])
    for got, extra in ((base, 0.0), (pooled, rounding)):
        if dtype == np.float64:
            errors = np.abs(got - gmp_batch(stacks, lams)).max(axis=1)
            bounds = _float64_bounds(stacks, lams)
        else:
            errors, bounds = _errors_and_bounds(got, stacks, lams)
        assert np.all(errors <= bounds + extra), (errors / (bounds + extra)).max()


def test_absolute_lam_is_the_papers_and_stays_reachable():
    """lam_scale="absolute" is lam itself; "relative" with lam / mean||phi||^2 is the same."""
    stacks = uneven(np.random.default_rng(6), (3, 12, 5), "random", 3.0, "normal").astype(
        np.float64
    )
    lam = 2.5
    absolute = GeneralizedMaxPooling(lam=lam, lam_scale="absolute", device="cpu")
    bounds = _float64_bounds(stacks, lam)
    errors = np.abs(absolute.fit_transform(stacks) - gmp_batch(stacks, lam)).max(axis=1)
    assert np.all(errors <= bounds), (errors / bounds).max()
    for i, phi in enumerate(stacks):
        relative = GeneralizedMaxPooling(
            lam=lam / mean_squared_norm(phi), lam_scale="relative", device="cpu"
        )
        # Two computations of the same ridge (the relative one rounds lam / msn * msn, which
        # the solve's bound counts as a rounding of lam): each within its bound
        np.testing.assert_allclose(relative.fit_transform(phi[None])[0],
                                   absolute.transform(phi[None])[0], rtol=0,
                                   atol=2 * unit_error_bound(phi, lam, EPS64))


def test_relative_lam_counts_only_real_locations_of_a_padded_batch():
    """Masked (padded) locations count neither in the solve nor in the mean squared norm."""
    rng = np.random.default_rng(7)
    images = [rng.standard_normal((3, h, w)) for h, w in [(4, 5), (2, 2), (3, 1)]]
    padded = torch.from_numpy(rng.standard_normal((3, 3, 4, 5)) * 100)
    mask = torch.zeros(3, 4, 5, dtype=torch.bool)
    for b, image in enumerate(images):
        padded[b, :, : image.shape[1], : image.shape[2]] = torch.from_numpy(image)
        mask[b, : image.shape[1], : image.shape[2]] = True
    got = generalized_max_pool2d(padded, 0.4, mask=mask, lam_scale="relative")
    for b, image in enumerate(images):
        phi = image.reshape(3, -1).T
        lam = 0.4 * mean_squared_norm(phi)
        expected = gmp_batch(phi[None], lam)[0]
        # the masked batch's sums run over 20 slots (padding as zeros)
        stack = np.zeros((20, 3))
        stack[: len(phi)] = phi
        bound = unit_error_bound(stack, lam, EPS64) + 2 * reference_error_bound(phi, lam)
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=0, atol=bound)


def test_relative_lam_of_all_zero_descriptors_is_zero_not_nan():
    maps = torch.zeros(2, 4, 3, 3, requires_grad=True)
    layer = GeneralizedMaxPool2d(lam=1.0, lam_scale="relative")
    out = layer(maps)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.zeros(2, 4))
    assert torch.isfinite(maps.grad).all() and torch.isfinite(layer.log_lam.grad)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (2, 7, 2, 2)], ids=["N>C", "N<=C"])
def test_gradcheck_relative_lam(normalize, shape):
    """The relative ridge lam * trace(G) / N is differentiated too (not detached): the layer's
    gradient is the true gradient of the scale-invariant function it computes."""
    torch.manual_seed(1)
    maps = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(shape[0], *shape[2:], dtype=torch.bool)
    mask[1, 0, 0] = False

    def pool(x, value):
        return generalized_max_pool2d(x, value, normalize, mask, lam_scale="relative")

    assert torch.autograd.gradcheck(pool, (maps, lam))
    assert torch.autograd.gradgradcheck(pool, (maps, lam))


def test_relative_lam_gradient_is_orthogonal_to_the_input():
    """Scale invariance f(s x) = f(x) means d/ds f(s x) = 0 = <grad f, x> (Euler): the layer
    cannot push its input's scale. Bound: the gradient's own error (the backward pass solves
    the adjoint system and the normalisation doubles: 4 x the solve's relative bound) and
    the inner product's rounding (n eps64 over its n = 288 terms), times |grad| |x|."""
    maps = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 6, dtype=torch.float64)
    (generalized_max_pool2d(maps, 0.2, lam_scale="relative") * weights).sum().backward()
    inner = (maps.grad * maps.detach()).sum()
    stacks = maps.detach().flatten(2).transpose(1, 2).numpy()
    relative = max(solve_error_bound(phi, 0.2 * mean_squared_norm(phi), EPS64) for phi in stacks)
    bound = 4 * relative + maps.numel() * EPS64
    assert abs(float(inner)) <= bound * float(maps.grad.norm() * maps.detach().norm())


def test_layer_lam_scale_is_a_keyword_saved_and_shown():
    layer = GeneralizedMaxPool2d(lam=0.5, lam_scale="relative")
    assert "lam_scale='relative'" in repr(layer)
    clone = pickle.loads(pickle.dumps(layer))
    maps = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(clone(maps), layer(maps), rtol=0, atol=0)  # same code and data
    with pytest.raises(ValueError, match="lam_scale must be 'absolute' or 'relative'"):
        GeneralizedMaxPool2d(lam_scale="mean")


# ============================================================================================
# Ragged lists (issue 14, items 7 and 8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_size", [1, 256])
def test_ragged_tensors_that_require_grad_are_read_like_plain_ones(dtype, batch_size):
    rng = np.random.default_rng(8)
    plain = [torch.as_tensor(rng.standard_normal((n, 4)), dtype=dtype) for n in (3, 7, 1)]
    tracked = [t.clone().requires_grad_(True) for t in plain]
    pool = GeneralizedMaxPooling(lam=0.5, device="cpu", batch_size=batch_size)
    expected = pool.fit_transform(plain)
    got = pool.fit(tracked).transform(tracked)
    np.testing.assert_array_equal(got, expected)  # the same values, code and batches: exact
    assert all(t.grad is None for t in tracked)  # nothing was differentiated


def test_empty_stack_error_names_the_first_empty_index_and_counts_them():
    stacks = [np.ones((2, 3)), np.zeros((0, 3)), np.ones((1, 3)), np.zeros((0, 3))]
    with pytest.raises(ValueError, match=r"Stack 1 has no locations.*2 empty stack\(s\)"):
        GeneralizedMaxPooling(device="cpu").fit(stacks)
    with pytest.raises(ValueError, match=r"Stack 0 has no locations"):
        GeneralizedMaxPooling(device="cpu").transform([torch.zeros(0, 3), torch.ones(2, 3)])


# ============================================================================================
# Parameters validated where they are used (issue 14, item 3)
@pytest.mark.parametrize(
    "params,name",
    [
        ({"batch_size": -1}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lam": 0.0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"lam_scale": "mean"}, "lam_scale"),
        ({"normalize": "yes"}, "normalize"),
        ({"grid_shape": (3,)}, "grid_shape"),
    ],
)
def test_transform_validates_parameters_changed_after_fit(params, name, tmp_path):
    """Through set_params, and through a saved estimator whose parameters were altered."""
    maps = np.random.default_rng(9).random((3, 4, 4, 2))
    pool = GeneralizedMaxPooling(device="cpu").fit(maps)
    pool.set_params(**params)
    with pytest.raises(ValueError, match=name):
        pool.transform(maps)
    tampered = GeneralizedMaxPooling(device="cpu").fit(maps)
    tampered.__dict__.update(params)  # as a stored file could hold them
    joblib.dump(tampered, tmp_path / "gmp.joblib")
    with pytest.raises(ValueError, match=name):
        joblib.load(tmp_path / "gmp.joblib").transform(maps)


def test_pickles_from_before_lam_scale_keep_their_absolute_lam():
    """An estimator pickled before ``lam_scale`` existed meant an absolute lam."""
    maps = np.random.default_rng(10).random((3, 4, 4, 2)) * 5
    pool = GeneralizedMaxPooling(lam=0.7, lam_scale="absolute", device="cpu").fit(maps)
    old = pool.__getstate__()
    del old["lam_scale"]
    restored = GeneralizedMaxPooling.__new__(GeneralizedMaxPooling)
    restored.__setstate__(old)
    assert restored.lam_scale == "absolute"
    # exact: the same parameters, the same code on the same data
    np.testing.assert_array_equal(restored.transform(maps), pool.transform(maps))


# ============================================================================================
# Empty batches in the layer (issue 14, item 9)
@pytest.mark.parametrize("lam_scale", ["absolute", "relative"])
@pytest.mark.parametrize("flatten", [True, False])
def test_layer_on_an_empty_batch_stays_connected_to_autograd(flatten, lam_scale):
    maps = torch.randn(0, 5, 3, 3, requires_grad=True)
    layer = GeneralizedMaxPool2d(lam=2.0, flatten=flatten, lam_scale=lam_scale)
    out = layer(maps, mask=torch.zeros(0, 3, 3, dtype=torch.bool))
    assert out.shape == ((0, 5) if flatten else (0, 5, 1, 1)) and out.requires_grad
    out.sum().backward()
    assert maps.grad.shape == maps.shape
    assert layer.log_lam.grad is not None and float(layer.log_lam.grad) == 0.0


# -- found by an adversarial review (third session) ---------------------------------------------


@pytest.mark.parametrize("dtype, power", [(np.float32, -140), (np.float64, -1060)])
def test_subnormal_descriptors_pool_like_their_normal_multiples(dtype, power):
    """A sample whose every descriptor is subnormal (float32 from about 1e-38, float64 from
    2.2e-308) is finite data: its Gram matrix underflows, and the rescaled re-solve has to
    scale by more than the dtype's largest power of two, in two steps. Integer-valued
    descriptors below 2**8 times 2**power are exact subnormals, so the sample is exactly a
    power-of-two multiple of the normal one, and the normalised GMP vector (relative lam: scale
    free) must be the normal sample's, within the float32 bound of ``gmp_reference`` (float64
    runs meet it by far)."""
    rng = np.random.default_rng(3)
    normal = rng.integers(0, 8, size=(2, 3, 3, 4)).astype(np.float64)
    tiny = np.ldexp(normal, power).astype(dtype)
    assert np.all((tiny == 0) | (np.abs(tiny) < np.finfo(dtype).tiny))  # all subnormal or 0
    assert np.array_equal(np.ldexp(tiny.astype(np.float64), -power), normal)  # exact
    got = GeneralizedMaxPooling(lam=1.0).fit_transform(tiny)
    expected = GeneralizedMaxPooling(lam=1.0).fit_transform(normal.astype(dtype))
    assert np.isfinite(got).all()
    stacks = normal.reshape(2, 9, 4)
    bounds = [float32_tolerance(phi, 1.0 * mean_squared_norm(phi)) for phi in stacks]
    np.testing.assert_array_less(np.abs(got - gmp_batch(stacks, [
        mean_squared_norm(phi) for phi in stacks])).max(axis=1), bounds)
    np.testing.assert_array_less(np.abs(got - expected).max(axis=1), 2 * np.array(bounds))
