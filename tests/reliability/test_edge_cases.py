"""Numerical edge cases: degenerate data, extreme magnitudes and extreme parameters. Each case is
checked against a float64 reference written here (or the slow reference of Algorithm 1 in
``tests/separability_reference.py``) or against a stated property, and no NaN or infinity ever
leaves the library for finite input: not in the outputs, not in the fitted operators, not in
the gradients of the layers.

One documented exception: ``SeparabilityPooling.eigenvalues_`` holds the separability ratio
``p'Ap / p'(B + alpha C_m)p`` of each row, which is +inf (never NaN) where a row has exactly
zero penalised within-class scatter (alpha = 0 with a singular B: perfect separation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import separability_reference as ref
from reliability.helpers import labelled_maps
from skpool import GeneralizedMaxPooling, SeparabilityPooling
from skpool.nn import GeneralizedMaxPool2d, LogSumExpPool2d, MixedMaxAvgPool2d, SeparabilityPool2d
from skpool.nn.functional import generalized_max_pool2d


def gmp_reference(stacks, lam, normalize=True):
    """float64 GMP of stacks (n, N, C), one sample at a time, as the ridge least-squares problem
    min ||Phi xi - 1||^2 + lam ||xi||^2 solved by an SVD-based lstsq of [Phi; sqrt(lam) I]."""
    out = []
    for phi in np.asarray(stacks, dtype=np.float64):
        n_locations, n_channels = phi.shape
        system = np.vstack([phi, np.sqrt(lam) * np.eye(n_channels)])
        target = np.concatenate([np.ones(n_locations), np.zeros(n_channels)])
        xi = np.linalg.lstsq(system, target, rcond=None)[0]
        norm = np.linalg.norm(xi)
        out.append(xi / norm if normalize and norm > 0 else xi)
    return np.stack(out)


def mean_squared_norm(stacks) -> float:
    stacks = np.asarray(stacks, dtype=np.float64)
    return float(np.mean(np.sum(stacks**2, axis=-1)))


def _stacks(maps):
    return maps.reshape(len(maps), -1, maps.shape[-1])


def _edge_maps(kind, seed=0, shape=(5, 4, 4, 6)):
    rng = np.random.default_rng(seed)
    maps = rng.normal(size=shape)
    if kind == "all-zero":
        maps[:] = 0.0
    elif kind == "relu":
        maps = np.maximum(maps - 1.0, 0.0)  # most entries exactly zero
    elif kind == "constant-channel":
        maps[..., 2] = 7.0
    elif kind == "one-location":
        maps = maps[:, :1, :1]
    elif kind == "one-channel":
        maps = maps[..., :1]
    elif kind == "dead-pixels":
        maps[:, 0, :] = 0.0
        maps[:, 2, 3] = 5.0
    elif kind == "duplicate-descriptors":  # N > C, every descriptor a multiple of one: rank 1
        maps[:, :, :] = maps[:, :1, :1] * rng.normal(size=(1, 4, 4, 1))
        maps[:, 1:3] = maps[:, :1]  # and exact duplicates
    elif kind == "fewer-locations-than-channels":
        maps = maps[:, :1, :3]  # N = 3 <= C = 6: the dual system
    return maps


GMP_KINDS = ["plain", "all-zero", "relu", "constant-channel", "one-location", "one-channel",
             "dead-pixels", "duplicate-descriptors", "fewer-locations-than-channels"]


# ============================================================================================
# Generalized max pooling
@pytest.mark.parametrize("relative_lam", [1e-8, 1.0, 1e8])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", GMP_KINDS)
def test_gmp_matches_the_float64_reference_on_degenerate_data(kind, dtype, relative_lam):
    """lam is given relative to the mean squared descriptor norm. Tolerances: 1e-9 in float64,
    1e-4 in float32 (the estimator refines float32 solves to about 1e-6). All-zero maps pool
    to exact zeros (never NaN).

    Nearly rank-deficient descriptors (all multiples of one vector) at lam = 1e-8 give
    cond(G + lam) ~ 2e9 (float32 data, whose rounding leaves singular values ~1e-8 of the
    largest) or ~1e8 (float64 data): both are solved in float64 (float32 by the estimator's
    fallback), to about n * cond * eps64 < 1e-6."""
    maps = _edge_maps(kind).astype(dtype)
    lam = relative_lam * max(mean_squared_norm(maps), 1.0)
    pooled = GeneralizedMaxPooling(lam_scale="absolute", lam=lam, device="cpu").fit_transform(maps)
    assert pooled.dtype == dtype and np.all(np.isfinite(pooled))
    if kind == "all-zero":
        np.testing.assert_array_equal(pooled, 0.0)
        return
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, rtol=1e-5)
    expected = gmp_reference(_stacks(maps), lam)
    tolerance = 1e-9 if dtype == np.float64 else 1e-4
    if kind == "duplicate-descriptors" and relative_lam == 1e-8:
        tolerance = 1e-6  # float64 normal equations: n * cond(G + lam) * eps64 < 1e-6
    np.testing.assert_allclose(pooled, expected, atol=tolerance)


def test_gmp_float32_refinement_that_cannot_converge_falls_back_to_float64(monkeypatch):
    """Nearly rank-deficient descriptors (every descriptor a multiple of one vector; float32
    rounding leaves singular values ~1e-8 of the largest) at lam = 1e-6 of their mean squared
    norm: cond(G + lam) * eps32 ~ 1, so float32 refinement cannot converge, and every sample
    must be solved in float64.

    Root cause of the earlier failure (-0.603118 vs -0.603018 at atol 1e-4): the refinement
    declared a sample converged when its last correction was below 1e-3, whatever its
    contraction; sample 4 contracted by only ~1/2 per step, so 4e-4 of error was left and the
    float64 solve was never taken. The quantity compared is well conditioned (the float64
    solve of the same float32 data matches the SVD reference to ~1e-9). Now a refined sample
    stops only when ``change * rho / (1 - rho)`` is below 1e-6 (rho the observed contraction),
    and is otherwise solved in float64, as this test checks."""
    from skpool._core import gmp as gmp_module

    maps = _edge_maps("duplicate-descriptors").astype(np.float32)
    stacks = _stacks(maps).astype(np.float64)
    lam = 1e-6 * mean_squared_norm(maps)
    solved_in_float64 = []
    original = gmp_module._solve_float64
    monkeypatch.setattr(
        gmp_module, "_solve_float64",
        lambda phi, *a: solved_in_float64.append(len(phi)) or original(phi, *a),
    )
    pooled = GeneralizedMaxPooling(lam_scale="absolute", lam=lam, device="cpu").fit_transform(maps)
    assert pooled.dtype == np.float32
    assert sum(solved_in_float64) == len(maps)
    # Bound: a float64 Cholesky solve of the normal equations errs by at most about
    # n * eps64 * cond(G + lam) (relative, n = C = 6 here; cond ~ 2e7), doubled by the
    # normalisation, plus the float32 rounding of the output (eps32 per entry).
    n_channels = maps.shape[-1]
    conds = [np.linalg.cond(phi.T @ phi + lam * np.eye(n_channels)) for phi in stacks]
    tolerance = 2 * n_channels * np.finfo(np.float64).eps * max(conds) + np.finfo(np.float32).eps
    assert tolerance < 1e-6  # the comparison is meaningful: far below the 1e-4 error it had
    np.testing.assert_allclose(pooled, gmp_reference(stacks, lam), rtol=0, atol=tolerance)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1e20, 1e30])
@pytest.mark.parametrize("relative_lam", [1e-8, 1.0, 1e8])
def test_gmp_is_scale_equivariant_in_float32_at_extreme_magnitudes(magnitude, relative_lam):
    """xi(s Phi, s^2 lam) = xi(Phi, lam) / s: the normalised output does not depend on s, even
    where s^2 (the Gram matrix) over- or underflows float32 (beyond about 1e+-19)."""
    maps = _edge_maps("relu").astype(np.float32)
    lam = relative_lam * mean_squared_norm(maps)
    scaled = maps * np.float32(magnitude)
    assert np.all(np.isfinite(scaled)) and np.all(scaled[maps != 0] != 0)
    pooled = GeneralizedMaxPooling(lam_scale="absolute", lam=lam * magnitude**2, device="cpu").fit_transform(scaled)
    assert np.all(np.isfinite(pooled))
    np.testing.assert_allclose(pooled, gmp_reference(_stacks(maps), lam), atol=1e-4)
    if relative_lam < 1e-4:
        return  # the rescaled solve's documented ridge floor, eps32 * trace(G), is near lam
    raw = GeneralizedMaxPooling(lam_scale="absolute", lam=lam * magnitude**2, normalize=False, device="cpu")
    unnormalised = raw.fit_transform(scaled).astype(np.float64) * magnitude
    expected = gmp_reference(_stacks(maps), lam, normalize=False)
    np.testing.assert_allclose(unnormalised, expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_gmp_lambda_limits():
    """Stated limits: lam -> inf points like sum pooling; lam -> 0 with N <= C equalises the
    similarities (Phi xi = 1 up to the normalisation)."""
    maps = np.abs(_edge_maps("plain"))
    stacks = _stacks(maps)
    big = GeneralizedMaxPooling(lam_scale="absolute", lam=1e8 * mean_squared_norm(maps), device="cpu")
    sums = stacks.sum(axis=1)
    np.testing.assert_allclose(
        big.fit_transform(maps), sums / np.linalg.norm(sums, axis=1, keepdims=True), atol=1e-6
    )
    wide = _edge_maps("fewer-locations-than-channels")  # N = 3, C = 6
    tiny = GeneralizedMaxPooling(lam_scale="absolute", lam=1e-8 * mean_squared_norm(wide), normalize=False,
                                 device="cpu").fit_transform(wide)
    similarities = np.einsum("bnc,bc->bn", _stacks(wide), tiny)
    np.testing.assert_allclose(similarities, 1.0, atol=1e-6)


# ============================================================================================
# Separability pooling
def reference_operator(maps, labels, stride, alpha, n_components=1, norm="l2"):
    grid = maps.shape[1:3]
    stacks, _, _ = ref.normalise_channels(_stacks(maps).astype(np.float64))
    between, within = ref.scatter_matrices(stacks, labels)
    return ref.operator(between, within, grid, ref.output_shape_for(grid, stride), alpha,
                        n_components, norm)


def assert_sane(pool, maps):
    """Finite operator with unit rows, no NaN ratio, finite transform."""
    assert np.all(np.isfinite(pool.operator_))
    np.testing.assert_allclose(np.linalg.norm(pool.operator_, axis=-1), 1.0, rtol=1e-5)
    assert not np.any(np.isnan(pool.eigenvalues_))
    assert np.all(np.isfinite(pool.channel_mean_)) and np.all(pool.channel_scale_ > 0)
    out = pool.transform(maps)
    assert np.all(np.isfinite(out))
    return out


@pytest.mark.parametrize("solver", ["auto", "full"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_separability_one_channel_and_fewer_samples_than_locations(solver, dtype):
    """One channel, and K·C = 6 < N = 64 (B singular): on an even grid with stride 2 every cell
    centre lies between pixels, so B + alpha C_m is definite and the scipy reference applies."""
    rng = np.random.default_rng(3)
    maps, labels = rng.normal(size=(6, 8, 8, 1)), np.arange(6) % 2
    expected, values = reference_operator(maps, labels, stride=2, alpha=1.0)
    pool = SeparabilityPooling(alpha=1.0, solver=solver, dtype=dtype, device="cpu")
    assert_sane(pool.fit(maps, labels), maps)
    atol = 1e-9 if dtype == "float64" else 1e-3
    ref.assert_same_rows(pool.operator_, expected, atol)
    np.testing.assert_allclose(pool.eigenvalues_, values, rtol=100 * atol)


def test_separability_one_channel_two_components_matches_reference():
    maps, labels = labelled_maps(seed=4, n_samples=30, grid=(5, 4), n_channels=1, n_classes=3)
    expected, values = reference_operator(maps, labels, stride=2, alpha=0.3, n_components=2,
                                          norm="l1")
    pool = SeparabilityPooling(alpha=0.3, n_components=2, norm="l1", device="cpu")
    pool.fit(maps, labels)
    np.testing.assert_allclose(np.abs(pool.operator_).sum(axis=-1), 1.0, rtol=1e-12)
    assert np.all(np.isfinite(pool.transform(maps)))
    ref.assert_same_rows(pool.operator_, expected, 1e-9)
    np.testing.assert_allclose(pool.eigenvalues_, values, rtol=1e-8)


@pytest.mark.parametrize("solver", ["auto", "full"])
def test_separability_singular_within_scatter_without_locality(solver):
    """alpha = 0 and K·C < N: B is singular (rank 4, a 60-dimensional null space) and every
    cell solves the same system B + delta I. Stated, well-defined properties: each row lies in
    B's null space to working precision and separates the class means almost as well as any
    unit vector there can (A = d d^T has rank 1: the best is |P_null d|^2); its reported ratio
    is +inf, never NaN.

    Not asserted: that the rows of different cells are equal bit for bit (they were, by one
    machine's BLAS, until another rounded one batch slot differently). Nor to a tolerance: the
    row's direction inside the null space is set by the ridge delta = u tr(B) against B's own
    rounding there (up to N u |B|, of the same order), so it is determined only to O(1) a
    priori (0.02 rad between skpool and a numpy solve of the same system). Each row pays for
    an angle theta to the best direction with a factor cos(theta)^2 of its separation;
    0.99 allows theta up to 0.1 rad (5x what is seen) and fails for any row that is not
    essentially the best one (a generic null vector separates |P_null d|^2 / 60 on average).
    """
    rng = np.random.default_rng(5)
    maps, labels = rng.normal(size=(6, 8, 8, 1)), np.arange(6) % 2
    pool = SeparabilityPooling(alpha=0.0, solver=solver, device="cpu").fit(maps, labels)
    assert_sane(pool, maps)
    rows = pool.operator_[0]
    stacks = (_stacks(maps) - pool.channel_mean_) / pool.channel_scale_
    between, within = ref.scatter_matrices(stacks, labels)
    values, vectors = np.linalg.eigh(within)
    null = vectors[:, values <= 64 * np.finfo(np.float64).eps * values[-1]]
    assert null.shape[1] == 60
    best = np.linalg.norm(null.T @ np.linalg.eigh(between)[1][:, -1]) ** 2 * np.trace(between)
    for p in rows:
        assert p @ within @ p < 1e-12 * np.trace(within) / len(p)
        assert p @ between @ p > 0.99 * best
    assert not np.any(np.isnan(pool.eigenvalues_))


@pytest.mark.parametrize("solver", ["auto", "full"])
def test_separability_dead_pixel_gets_no_weight(solver):
    """A dead pixel (the same value in every sample) carries no class information: it adds
    nothing to A or B, only locality cost, so every row's weight there is 0 (to rounding) and
    the rows match the scipy reference (6x6 grid, stride 2: centres between pixels)."""
    maps, labels = labelled_maps(seed=6, n_samples=30, grid=(6, 6), n_channels=2, n_classes=3)
    maps[:, 2, 3, :] = 4.0
    expected, _ = reference_operator(maps, labels, stride=2, alpha=0.5)
    pool = SeparabilityPooling(alpha=0.5, solver=solver, device="cpu").fit(maps, labels)
    assert_sane(pool, maps)
    ref.assert_same_rows(pool.operator_, expected, 1e-9)
    assert np.abs(pool.operator_[..., 2 * 6 + 3]).max() < 1e-10


def test_separability_dead_pixel_at_a_cell_centre_stays_finite():
    """Stride 1 puts a cell centre on the dead pixel: there B + alpha C_m is singular and the
    documented ridge decides; the operator is finite, unit-norm, and the transform finite."""
    maps, labels = labelled_maps(seed=7, n_samples=8, grid=(5, 5), n_channels=1, n_classes=2)
    maps[:, 2, 2, 0] = 5.0
    for alpha in (0.0, 1.0):
        assert_sane(SeparabilityPooling(alpha=alpha, stride=1, device="cpu").fit(maps, labels),
                    maps)


def test_separability_constant_channel_is_ignored_and_kept_constant():
    """sigma = 0 for a constant channel: its scale is 1, it adds nothing to A or B (the operator
    equals the fit without it), and its output is that constant everywhere."""
    maps, labels = labelled_maps(seed=8, n_samples=24, grid=(4, 5), n_channels=3, n_classes=3)
    maps[..., 1] = 7.0
    pool = SeparabilityPooling(alpha=0.7, n_components=2, device="cpu").fit(maps, labels)
    out = assert_sane(pool, maps)
    assert pool.channel_scale_[1] == 1.0 and pool.channel_mean_[1] == 7.0
    without = SeparabilityPooling(alpha=0.7, n_components=2, device="cpu").fit(
        maps[..., [0, 2]], labels
    )
    np.testing.assert_allclose(pool.operator_, without.operator_, atol=1e-10)
    np.testing.assert_allclose(out[..., [1, 4]], 7.0, rtol=1e-12)  # channel 1 of both components


def test_separability_one_location_is_the_identity():
    """N = 1: the only unit operator with a nonnegative sum is [[1]]; the transform returns the
    input."""
    maps, labels = labelled_maps(seed=9, n_samples=10, grid=(1, 1), n_channels=3, n_classes=2)
    pool = SeparabilityPooling(alpha=1.0, device="cpu").fit(maps, labels)
    np.testing.assert_allclose(pool.operator_, [[[1.0]]], rtol=1e-12)
    np.testing.assert_allclose(assert_sane(pool, maps), maps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["full", "auto"])
def test_separability_all_zero_maps(solver):
    """All-zero maps (a dead ReLU layer): mean 0, scale 1, A = B = 0. The operator is finite,
    every ratio is 0 and the transform returns zeros."""
    maps, labels = np.zeros((8, 4, 4, 2)), np.arange(8) % 2
    pool = SeparabilityPooling(solver=solver, device="cpu").fit(maps, labels)
    assert np.all(np.isfinite(pool.operator_))
    np.testing.assert_array_equal(pool.eigenvalues_, 0.0)
    np.testing.assert_array_equal(pool.transform(maps), 0.0)
    np.testing.assert_array_equal(pool.channel_scale_, 1.0)


def test_separability_all_zero_maps_rows_are_unit_for_every_solver():
    """A = 0 (no class information): the low-rank route's zero rows fall back to the cell's
    average-pooling row, so every route returns normalised rows."""
    maps, labels = np.zeros((8, 4, 4, 2)), np.arange(8) % 2
    for solver in ("full", "low_rank"):
        pool = SeparabilityPooling(solver=solver, device="cpu").fit(maps, labels)
        np.testing.assert_allclose(np.linalg.norm(pool.operator_, axis=-1), 1.0)


def test_separability_duplicate_samples_do_not_change_the_fit():
    """Every sample twice: the class means, the class-size-weighted B and the population channel
    statistics are unchanged, so the operator is the same (to rounding)."""
    maps, labels = labelled_maps(seed=10, n_samples=18, grid=(4, 4), n_channels=2, n_classes=3)
    once = SeparabilityPooling(alpha=0.5, device="cpu").fit(maps, labels)
    twice = SeparabilityPooling(alpha=0.5, device="cpu").fit(
        np.concatenate([maps, maps]), np.concatenate([labels, labels])
    )
    np.testing.assert_allclose(twice.operator_, once.operator_, atol=1e-10)
    np.testing.assert_allclose(twice.eigenvalues_, once.eigenvalues_, rtol=1e-9)


def test_separability_identical_samples_stay_finite():
    """Every sample the same map: no between- and no within-class variation at all."""
    maps = np.repeat(labelled_maps(seed=11, n_samples=1, grid=(4, 4))[0], 8, axis=0)
    labels = np.arange(8) % 2
    for alpha in (0.0, 1.0):
        assert_sane(SeparabilityPooling(alpha=alpha, device="cpu").fit(maps, labels), maps)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_separability_alpha_zero_gives_one_global_operator(alpha):
    """alpha = 0: no locality, every output cell gets the same (globally most separable) row,
    matching the reference; alpha > 0 makes them differ."""
    maps, labels = labelled_maps(seed=12, n_samples=40, grid=(4, 4), n_channels=2, n_classes=3)
    pool = SeparabilityPooling(alpha=alpha, device="cpu").fit(maps, labels)
    expected, _ = reference_operator(maps, labels, stride=2, alpha=alpha)
    ref.assert_same_rows(pool.operator_, expected, 1e-9)
    spread = np.abs(pool.operator_[0] - pool.operator_[0, :1]).max()
    assert (spread < 1e-12) if alpha == 0 else (spread > 0.1)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-10, 1e10, 1e30])
def test_separability_is_scale_invariant_in_float32(magnitude):
    """Channel normalisation makes the fit scale-invariant: float32 maps multiplied by 1e+-30
    give the operator of the unscaled maps (to 1e-6: the float32 rounding of the input) and a
    transform scaled by the same factor."""
    maps, labels = labelled_maps(seed=13, n_samples=24, grid=(4, 4), n_channels=2, n_classes=3)
    maps = maps.astype(np.float32)
    base = SeparabilityPooling(alpha=0.5, device="cpu").fit(maps, labels)
    scaled = maps * np.float32(magnitude)
    pool = SeparabilityPooling(alpha=0.5, device="cpu").fit(scaled, labels)
    np.testing.assert_allclose(pool.operator_, base.operator_, atol=1e-6)
    out = assert_sane(pool, scaled)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.astype(np.float64) / magnitude, base.transform(maps),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_separability_float32_solve_is_scale_invariant(magnitude):
    """Channel statistics are accumulated in float64 even for a float32 solve."""
    maps, labels = labelled_maps(seed=13, n_samples=24, grid=(4, 4), n_channels=2, n_classes=3)
    maps = maps.astype(np.float32)
    base = SeparabilityPooling(alpha=0.5, dtype="float32", device="cpu").fit(maps, labels)
    scaled = maps * np.float32(magnitude)
    pool = SeparabilityPooling(alpha=0.5, dtype="float32", device="cpu").fit(scaled, labels)
    np.testing.assert_allclose(pool.operator_, base.operator_, atol=1e-4)
    assert np.all(np.isfinite(pool.transform(scaled)))


# ============================================================================================
# Layers: finite outputs and finite gradients in the same cases
LAYER_KINDS = ["plain", "all-zero", "relu", "constant-channel", "one-location", "one-channel",
               "dead-pixels", "duplicate-descriptors", "huge", "tiny"]


def _layer_maps(kind, dtype):
    if kind in ("huge", "tiny"):
        maps = _edge_maps("relu") * (1e30 if kind == "huge" else 1e-30)
    else:
        maps = _edge_maps(kind)
    return torch.from_numpy(maps).permute(0, 3, 1, 2).to(dtype).contiguous()  # (B, C, H, W)


def _layers(x):
    channels, height, width = x.shape[1:]
    rng = np.random.default_rng(0)
    operator = rng.random((2, 1, height * width))
    return {
        "gmp-lam-1e-3": GeneralizedMaxPool2d(lam=1e-3, dtype=x.dtype),
        "gmp-lam-1e3": GeneralizedMaxPool2d(lam=1e3, dtype=x.dtype),
        "gmp-unnormalised": GeneralizedMaxPool2d(lam=1.0, normalize=False, dtype=x.dtype),
        "separability": SeparabilityPool2d(
            operator, rng.normal(size=channels), rng.uniform(0.5, 2, channels), trainable=True,
            output_shape=(1, 1), dtype=x.dtype,
        ),
        "mixed": MixedMaxAvgPool2d(dtype=x.dtype),
        "lse": LogSumExpPool2d(r=3.0, dtype=x.dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layers_outputs_and_gradients_stay_finite(kind, dtype):
    """Every layer on degenerate maps: finite output, and finite gradients with respect to the
    input and every parameter (learnable lambda, mix, sharpness, a trainable operator). The loss
    is a fixed random projection of the output, so no gradient is trivially zero."""
    x = _layer_maps(kind, dtype)
    for name, layer in _layers(x).items():
        x_grad = x.clone().requires_grad_(True)
        out = layer(x_grad)
        assert torch.isfinite(out).all(), name
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        (out * weights / out.detach().abs().amax().clamp_min(1)).sum().backward()
        assert torch.isfinite(x_grad.grad).all(), name
        for parameter_name, parameter in layer.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), (
                name, parameter_name)


@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1e-30])
def test_gmp_gradient_at_extreme_float32_magnitudes_matches_float64(magnitude):
    """Where the float32 Gram matrix overflows (or underflows) the solve is redone on rescaled
    descriptors; the gradient with respect to the input is that of the float64 computation
    (d xi / d Phi scales as 1/s), not NaN. (The functional form: lam = 0.5 s^2 lies outside
    the layer's exp(+-80) range of lambda at these magnitudes.)"""
    base = _layer_maps("plain", torch.float64)
    lam = 0.5 * magnitude**2
    grads = []
    for dtype in (torch.float64, torch.float32):
        x = (base * magnitude).to(dtype).requires_grad_(True)
        weights = torch.linspace(-1, 1, base.shape[1], dtype=dtype)
        (generalized_max_pool2d(x, lam) * weights).sum().backward()
        grads.append(x.grad.double() * magnitude)
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4 * grads[0].abs().max())
