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
from gmp_reference import (
    auto_solve_bound,
    auto_unit_bound,
    reference_error_bound,
    solve_error_bound,
    unit_error_bound,
)
from reliability.helpers import labelled_maps
from rounding import EPS32, EPS64, assert_rows_within, eps
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


def gmp_bounds(stacks, lam, dtype, normalize=True):
    """Per-sample max-abs bound of the estimator's output (refine_steps="auto") against
    :func:`gmp_reference` on the same values: float64 within the solve's first-order bound,
    float32 within gmp_reference's "auto" bound; plus the SVD reference's own (normalising
    doubles relative errors; un-normalised outputs carry them times ||xi||)."""
    bounds = []
    for phi in np.asarray(stacks, dtype=np.float64):
        reference = reference_error_bound(phi, lam)
        if normalize:
            own = (unit_error_bound(phi, lam, EPS64) if dtype == np.float64
                   else auto_unit_bound(phi, lam))
            bounds.append(own + 2 * reference)
        else:
            own = (solve_error_bound(phi, lam, EPS64) if dtype == np.float64
                   else auto_solve_bound(phi, lam))
            size = np.linalg.norm(gmp_reference(phi[None], lam, normalize=False))
            bounds.append((own + reference) * size)
    return np.array(bounds)


def unit_norm_rtol(n_entries, dtype):
    """|norm - 1| of a row normalised in ``dtype`` and measured by numpy in it: the
    normalisation's norm and division and numpy's norm, (2 n + 4) eps."""
    return (2 * n_entries + 4) * eps(dtype)


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
    """lam is given relative to the mean squared descriptor norm. Tolerances: per sample, the
    solve's first-order bound in float64, gmp_reference's "auto" bound in float32 (refined
    to about 1e-6 or solved in float64 where eps32 * cond is large), each plus the SVD
    reference's own. All-zero maps pool to exact zeros (never NaN).

    Nearly rank-deficient descriptors (all multiples of one vector) at lam = 1e-8 give
    cond(G + lam) ~ 2e9 (float32 data, whose rounding leaves singular values ~1e-8 of the
    largest) or ~1e8 (float64 data): both are solved in float64 (float32 by the estimator's
    fallback), and the bounds grow with that cond."""
    maps = _edge_maps(kind).astype(dtype)
    lam = relative_lam * max(mean_squared_norm(maps), 1.0)
    pooled = GeneralizedMaxPooling(lam_scale="absolute", lam=lam, device="cpu").fit_transform(maps)
    assert pooled.dtype == dtype and np.all(np.isfinite(pooled))
    if kind == "all-zero":
        np.testing.assert_array_equal(pooled, 0.0)  # zero descriptors pool to 0 by design
        return
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0,
                               rtol=unit_norm_rtol(maps.shape[-1], dtype))
    expected = gmp_reference(_stacks(maps), lam)
    assert_rows_within(pooled, expected, gmp_bounds(_stacks(maps), lam, dtype))


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
    from skpool._core import gmp_refine as gmp_module

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
    # The float64 fallback is taken (for all five samples where this test was written; on
    # this session's Sapphire Rapids CPU one sample's refinement converges instead, within
    # the same bound below): the path depends on the float32 kernels' rounding, the
    # accuracy checked below does not.
    assert sum(solved_in_float64) >= len(maps) - 1
    # Bound: the float64 solve's first-order bound (gmp_reference.unit_error_bound: cond(G +
    # lam) ~ 2e7 times the Gram's and Cholesky's size factors, doubled by the
    # normalisation), the float32 rounding of the output, and the SVD reference's own.
    bounds = np.array([unit_error_bound(phi, lam, EPS64, EPS32) + 2 * reference_error_bound(
        phi, lam) for phi in stacks])
    assert bounds.max() < 1e-5  # the comparison is meaningful: far below the 1e-4 error it had
    assert_rows_within(pooled, gmp_reference(stacks, lam), bounds)


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
    # The scaled maps are the unscaled ones rounded once more (u per entry): that moves the
    # exact result by at most the plain float32 solve's bound (whose Gram and right-hand side
    # terms count m >= 2 and N >= 1 roundings per entry); on top, the "auto" bound and the
    # reference's own.
    stacks = _stacks(maps).astype(np.float64)
    rounding = np.array([unit_error_bound(phi, lam, EPS32) for phi in stacks])
    assert_rows_within(pooled, gmp_reference(stacks, lam),
                       gmp_bounds(stacks, lam, np.float32) + rounding)
    if relative_lam < 1e-4:
        return  # the rescaled solve's documented ridge floor, n eps32 G_ii, is near lam
    raw = GeneralizedMaxPooling(lam_scale="absolute", lam=lam * magnitude**2, normalize=False, device="cpu")
    unnormalised = raw.fit_transform(scaled).astype(np.float64) * magnitude
    expected = gmp_reference(stacks, lam, normalize=False)
    rounding = np.array([solve_error_bound(phi, lam, EPS32) for phi in stacks])
    rounding = rounding * np.linalg.norm(expected, axis=1)
    assert_rows_within(unnormalised, expected,
                       gmp_bounds(stacks, lam, np.float32, normalize=False) + rounding)


def test_gmp_lambda_limits():
    """Stated limits: lam -> inf points like sum pooling; lam -> 0 with N <= C equalises the
    similarities (Phi xi = 1 up to the normalisation)."""
    maps = np.abs(_edge_maps("plain"))
    stacks = _stacks(maps)
    lam = 1e8 * mean_squared_norm(maps)
    big = GeneralizedMaxPooling(lam_scale="absolute", lam=lam, device="cpu")
    sums = stacks.sum(axis=1)
    # lam xi = (I + G/lam)^-1 Phi^T 1 turns Phi^T 1 by theta <= t / (1 - t), t = ||G|| /
    # lam; unit vectors that far apart differ by <= theta per entry; plus the rounding of
    # the output and of the normalised sum (N-term sums, a C-term norm).
    bounds = []
    for phi in stacks:
        t = np.linalg.norm(phi.T @ phi, 2) / lam
        bounds.append(t / (1 - t) + unit_error_bound(phi, lam, EPS64)
                      + (len(phi) + phi.shape[1] + 2) * EPS64)
    assert_rows_within(big.fit_transform(maps), sums / np.linalg.norm(sums, axis=1, keepdims=True),
                       np.array(bounds))
    wide = _edge_maps("fewer-locations-than-channels")  # N = 3, C = 6
    lam = 1e-8 * mean_squared_norm(wide)
    tiny = GeneralizedMaxPooling(lam_scale="absolute", lam=lam, normalize=False,
                                 device="cpu").fit_transform(wide)
    similarities = np.einsum("bnc,bc->bn", _stacks(wide), tiny)
    for phi, xi, sim in zip(_stacks(wide), tiny, similarities):
        # Phi xi = 1 - lam (Phi Phi^T + lam I)^-1 1 exactly: off by <= lam sqrt(N) /
        # (sigma_min^2 + lam); rounding: ||Phi|| ||xi|| times xi's bound, and the check's
        # C-term products.
        exact = lam * np.sqrt(len(phi)) / (np.linalg.eigvalsh(phi @ phi.T)[0] + lam)
        rounding = np.linalg.norm(phi, 2) * np.linalg.norm(xi) * solve_error_bound(phi, lam, EPS64)
        rounding += phi.shape[1] * EPS64 * (np.abs(phi) @ np.abs(xi)).max()
        np.testing.assert_allclose(sim, 1.0, rtol=0, atol=exact + rounding)


# ============================================================================================
# Separability pooling
def reference_operator(maps, labels, stride, alpha, n_components=1, norm="l2"):
    grid = maps.shape[1:3]
    stacks, _, _ = ref.normalise_channels(_stacks(maps).astype(np.float64))
    between, within = ref.scatter_matrices(stacks, labels)
    return ref.operator(between, within, grid, ref.output_shape_for(grid, stride), alpha,
                        n_components, norm)


def row_bounds(maps, labels, stride, alpha, n_components=1, solve_eps=EPS64, norm="l2",
               fits=1):
    """Per-row (k, M) bounds of rows and ratios for comparing ``fits`` skpool fits (solved in
    ``solve_eps``) with each other (fits=2) or one fit with the scipy reference (fits=1):
    separability_reference.fit_row_bounds per skpool fit, row_error_bounds at eps64 for the
    reference. An l1-normalised row v / ||v||_1 moves by at most 2 sqrt(N) times the unit
    vector's error (||v||_1 >= ||v||_2 = 1)."""
    grid = maps.shape[1:3]
    out = ref.output_shape_for(grid, stride)
    stacks = _stacks(maps).astype(np.float64)
    vectors, values = ref.fit_row_bounds(stacks, labels, grid, out, alpha, n_components,
                                         solve_eps)
    if fits == 1:
        normalised, _, _ = ref.normalise_channels(stacks)
        between, within = ref.scatter_matrices(normalised, labels)
        reference = ref.row_error_bounds(between, within, ref.locality_costs(grid, out), alpha,
                                         n_components, EPS64)
        vectors, values = vectors + reference[0], values + reference[1]
    else:
        vectors, values = fits * vectors, fits * values
    if norm == "l1":
        vectors = 2 * np.sqrt(stacks.shape[1]) * vectors
    return vectors, values


def assert_sane(pool, maps):
    """Finite operator with unit rows, no NaN ratio, finite transform."""
    assert np.all(np.isfinite(pool.operator_))
    np.testing.assert_allclose(np.linalg.norm(pool.operator_, axis=-1), 1.0,
                               rtol=unit_norm_rtol(pool.operator_.shape[-1], pool.operator_.dtype))
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
    vector_bounds, value_bounds = row_bounds(maps, labels, 2, 1.0, solve_eps=eps(dtype))
    ref.assert_same_rows(pool.operator_, expected, vector_bounds)
    np.testing.assert_array_less(np.abs(pool.eigenvalues_ - values), value_bounds)


def test_separability_one_channel_two_components_matches_reference():
    maps, labels = labelled_maps(seed=4, n_samples=30, grid=(5, 4), n_channels=1, n_classes=3)
    expected, values = reference_operator(maps, labels, stride=2, alpha=0.3, n_components=2,
                                          norm="l1")
    pool = SeparabilityPooling(alpha=0.3, n_components=2, norm="l1", device="cpu")
    pool.fit(maps, labels)
    # l1 norm 1 to the rounding of two N-term sums and a division
    np.testing.assert_allclose(np.abs(pool.operator_).sum(axis=-1), 1.0,
                               rtol=unit_norm_rtol(20, np.float64))
    assert np.all(np.isfinite(pool.transform(maps)))
    vector_bounds, value_bounds = row_bounds(maps, labels, 2, 0.3, 2, norm="l1")
    ref.assert_same_rows(pool.operator_, expected, vector_bounds)
    np.testing.assert_array_less(np.abs(pool.eigenvalues_ - values), value_bounds)


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
    # numerical rank at N eps ||B|| (numpy's matrix_rank rule)
    null = vectors[:, values <= 64 * np.finfo(np.float64).eps * values[-1]]
    assert null.shape[1] == 60
    best = np.linalg.norm(null.T @ np.linalg.eigh(between)[1][:, -1]) ** 2 * np.trace(between)
    for p in rows:
        # In B's null space to working precision: the solve's ridge delta = u tr(B) and
        # B's rounding (N u |B|) leave p'Bp at most about N eps tr(B)
        assert p @ within @ p <= len(p) * np.finfo(np.float64).eps * np.trace(within)
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
    vector_bounds, _ = row_bounds(maps, labels, 2, 0.5)
    ref.assert_same_rows(pool.operator_, expected, vector_bounds)
    # The dead pixel decouples from the problem (zero row and column of A and B, positive
    # locality cost): its weight is 0 exactly, computed to within the row's bound
    np.testing.assert_array_less(np.abs(pool.operator_[..., 2 * 6 + 3]), vector_bounds)


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
    # The same statistics in exact arithmetic, other shapes (other kernels): two fits
    vector_bounds, _ = row_bounds(maps[..., [0, 2]], labels, 2, 0.7, 2, fits=2)
    ref.assert_same_rows(pool.operator_, without.operator_, vector_bounds)
    # Exact: (7 - 7) / 1 = 0, P 0 = 0, 0 * 1 + 7 = 7 in floating point (channel 1 of both
    # components)
    np.testing.assert_array_equal(out[..., [1, 4]], 7.0)


def test_separability_one_location_is_the_identity():
    """N = 1: the only unit operator with a nonnegative sum is [[1]]; the transform returns the
    input."""
    maps, labels = labelled_maps(seed=9, n_samples=10, grid=(1, 1), n_channels=3, n_classes=2)
    pool = SeparabilityPooling(alpha=1.0, device="cpu").fit(maps, labels)
    # v / ||v|| of a single entry: 1 to the norm's and the division's rounding
    np.testing.assert_allclose(pool.operator_, [[[1.0]]], rtol=unit_norm_rtol(1, np.float64))
    # P = [[1]]: ((F - mu) / sigma) * sigma + mu rounds a few times (pooling_bound, N = 1)
    bound = ref.pooling_bound(_stacks(maps), pool.operator_, pool.channel_mean_,
                              pool.channel_scale_, EPS64)
    np.testing.assert_allclose(assert_sane(pool, maps), maps, rtol=0, atol=bound)


@pytest.mark.parametrize("solver", ["full", "auto"])
def test_separability_all_zero_maps(solver):
    """All-zero maps (a dead ReLU layer): mean 0, scale 1, A = B = 0. The operator is finite,
    every ratio is 0 and the transform returns zeros."""
    maps, labels = np.zeros((8, 4, 4, 2)), np.arange(8) % 2
    pool = SeparabilityPooling(solver=solver, device="cpu").fit(maps, labels)
    assert np.all(np.isfinite(pool.operator_))
    # Exact by design: no class information gives ratio 0, zero maps pool to 0, sigma = 0 -> 1
    np.testing.assert_array_equal(pool.eigenvalues_, 0.0)
    np.testing.assert_array_equal(pool.transform(maps), 0.0)
    np.testing.assert_array_equal(pool.channel_scale_, 1.0)


def test_separability_all_zero_maps_rows_are_unit_for_every_solver():
    """A = 0 (no class information): the low-rank route's zero rows fall back to the cell's
    average-pooling row, so every route returns normalised rows."""
    maps, labels = np.zeros((8, 4, 4, 2)), np.arange(8) % 2
    for solver in ("full", "low_rank"):
        pool = SeparabilityPooling(solver=solver, device="cpu").fit(maps, labels)
        np.testing.assert_allclose(np.linalg.norm(pool.operator_, axis=-1), 1.0,
                                   rtol=unit_norm_rtol(16, np.float64))


def test_separability_duplicate_samples_do_not_change_the_fit():
    """Every sample twice: the class means, the class-size-weighted B and the population channel
    statistics are unchanged, so the operator is the same (to rounding)."""
    maps, labels = labelled_maps(seed=10, n_samples=18, grid=(4, 4), n_channels=2, n_classes=3)
    once = SeparabilityPooling(alpha=0.5, device="cpu").fit(maps, labels)
    doubled = np.concatenate([maps, maps]), np.concatenate([labels, labels])
    twice = SeparabilityPooling(alpha=0.5, device="cpu").fit(*doubled)
    # Two fits whose statistics differ by rounding (sums of 2K and of K terms)
    vector_bounds, value_bounds = row_bounds(*doubled, 2, 0.5, fits=2)
    ref.assert_same_rows(twice.operator_, once.operator_, vector_bounds)
    np.testing.assert_array_less(np.abs(twice.eigenvalues_ - once.eigenvalues_), value_bounds)


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
    vector_bounds, _ = row_bounds(maps, labels, 2, alpha)
    ref.assert_same_rows(pool.operator_, expected, vector_bounds)
    spread = np.abs(pool.operator_[0] - pool.operator_[0, :1]).max(axis=-1)
    if alpha == 0:
        # Every cell solves the same system, possibly in other batch slots (other
        # rounding): equal within two row bounds, not bit for bit
        twice, _ = row_bounds(maps, labels, 2, alpha, fits=2)
        np.testing.assert_array_less(spread, twice[0])
    else:
        assert spread.max() > 0.1  # the locality term moves the rows: a property, not rounding


@pytest.mark.parametrize("magnitude", [1e-30, 1e-10, 1e10, 1e30])
def test_separability_is_scale_invariant_in_float32(magnitude):
    """Channel normalisation makes the fit scale-invariant: float32 maps multiplied by 1e+-30
    give the operator of the same values scaled back (the scaled maps divided by the factor
    in float64: the data the fit saw, not the unscaled maps, which differ by the float32
    rounding of the product), within two fits' row bounds; and a float32 transform of the
    scaled maps within the pooling product's float32 bound of its float64 value."""
    maps, labels = labelled_maps(seed=13, n_samples=24, grid=(4, 4), n_channels=2, n_classes=3)
    maps = maps.astype(np.float32)
    scaled = maps * np.float32(magnitude)
    seen = scaled.astype(np.float64) / magnitude
    base = SeparabilityPooling(alpha=0.5, device="cpu", dtype="float64").fit(seen, labels)
    # float64 solves (dtype="auto" would follow the float32 maps): scaling is what is tested
    pool = SeparabilityPooling(alpha=0.5, device="cpu", dtype="float64").fit(scaled, labels)
    vector_bounds, _ = row_bounds(seen, labels, 2, 0.5, fits=2)
    ref.assert_same_rows(pool.operator_, base.operator_, vector_bounds)
    out = assert_sane(pool, scaled)
    assert out.dtype == np.float32
    stacks = _stacks(seen)
    mean, scale = pool.channel_mean_ / magnitude, pool.channel_scale_ / magnitude
    pooled = np.einsum("kmn,bnc->bmkc", pool.operator_, (stacks - mean) / scale) * scale + mean
    expected = pooled.reshape(len(maps), 2, 2, -1)
    bound = ref.pooling_bound(stacks, pool.operator_, mean, scale, EPS32)
    bound += ref.pooling_bound(stacks, pool.operator_, mean, scale, EPS64)
    np.testing.assert_allclose(out.astype(np.float64) / magnitude, expected, rtol=0, atol=bound)


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_separability_float32_solve_is_scale_invariant(magnitude):
    """Channel statistics are accumulated in float64 even for a float32 solve: the fit of
    the scaled maps is the fit of the same values scaled back, within two float32 fits'
    row bounds."""
    maps, labels = labelled_maps(seed=13, n_samples=24, grid=(4, 4), n_channels=2, n_classes=3)
    maps = maps.astype(np.float32)
    scaled = maps * np.float32(magnitude)
    seen = scaled.astype(np.float64) / magnitude
    base = SeparabilityPooling(alpha=0.5, dtype="float32", device="cpu").fit(seen, labels)
    pool = SeparabilityPooling(alpha=0.5, dtype="float32", device="cpu").fit(scaled, labels)
    vector_bounds, _ = row_bounds(seen, labels, 2, 0.5, solve_eps=EPS32, fits=2)
    ref.assert_same_rows(pool.operator_, base.operator_, vector_bounds)
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
    # Per sample: the backward pass solves the same system again (the adjoint) and the
    # normalisation's derivative doubles relative errors, so the float32 gradient is within
    # 2 x 2 x the float32 solve's relative bound of the float64 one; the input's rounding to
    # float32 and the rescaled re-solve's n eps32 floor are covered at twice the unit.
    stacks = base.flatten(2).transpose(1, 2).numpy()
    for phi, g32, g64 in zip(stacks, grads[1], grads[0]):
        rtol = 4 * solve_error_bound(phi, 0.5, 2 * EPS32) + 2 * solve_error_bound(phi, 0.5, EPS64)
        assert float((g32 - g64).norm()) <= rtol * float(g64.norm())
