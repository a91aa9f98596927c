"""SeparabilityPooling on data without class information, and on data with some.

Without class information (every sample identical, or the same samples in every class) A is
zero in exact arithmetic and its computed value is rounding, which used to decide the
operator: rows that changed with ``batch_size`` or the sample order by up to 1.6. Now every
row whose between-class term lies within the rounding bound of A
(``ScatterStatistics.between_noise``) is its cell's average-pooling row, with ratio 0, whatever
the batches, the order, the dtype, the solver or the support; rows that see real class
information, however small against B, are solved.
"""

from __future__ import annotations

import numpy as np
import pytest

import separability_reference as ref
from skpool import SeparabilityPooling


def average_rows(grid, stride, norm):
    """Average pooling's rows (M, N), written here: uniform over each cell's stride x stride
    block, divided by their l1 or l2 norm."""
    height, width = grid
    out = ref.output_shape_for(grid, stride)
    rows = np.zeros((out[0] * out[1], height * width))
    for u in range(out[0]):
        for v in range(out[1]):
            block = np.zeros((height, width))
            block[u * stride : (u + 1) * stride, v * stride : (v + 1) * stride] = 1.0
            rows[u * out[1] + v] = block.ravel()
    return rows / np.linalg.norm(rows, ord=1 if norm == "l1" else 2, axis=1, keepdims=True)


def uninformative_maps(kind, seed=0, grid=(6, 6), n_channels=3, n_per_class=8, n_classes=3):
    """Maps (n, H, W, C) without class information, and labels: one map repeated, or the
    same maps in every class; far from zero and not standardised, like real features."""
    rng = np.random.default_rng(seed)
    base = 5.0 * rng.normal(size=(n_per_class, *grid, n_channels)) + 40.0
    if kind == "identical":
        maps = np.repeat(base[:1], n_per_class * n_classes, axis=0)
        labels = np.arange(len(maps)) % n_classes
    else:
        maps = np.concatenate([base] * n_classes)
        labels = np.repeat(np.arange(n_classes), n_per_class)
    return maps, labels


# Rows of the fallback are exact fractions 1/4 (l1) and 1/2 (l2), and their numpy reference
# is computed by one division (and a square root): equal to a couple of u.
FALLBACK_RTOL = 4 * np.finfo(np.float64).eps
EPS64 = float(np.finfo(np.float64).eps)


@pytest.mark.parametrize("kind", ["identical", "duplicated"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("solver", ["auto", "low_rank", "full"])
@pytest.mark.parametrize("support_radius", [None, 1.6])
def test_without_class_information_every_row_is_average_pooling(kind, dtype, solver,
                                                                 support_radius):
    maps, labels = uninformative_maps(kind)
    params = dict(alpha=0.5, n_components=2, solver=solver, dtype=dtype, device="cpu",
                  support_radius=support_radius)
    rng = np.random.default_rng(1)
    fits = []
    for batch_size, order in [(256, np.arange(len(maps))), (1, rng.permutation(len(maps))),
                              (5, rng.permutation(len(maps)))]:
        pool = SeparabilityPooling(batch_size=batch_size, **params)
        fits.append(pool.fit(maps[order], labels[order]))
    expected = average_rows((6, 6), 2, "l2")
    for pool in fits:
        np.testing.assert_allclose(pool.operator_, np.stack([expected] * 2),
                                   rtol=FALLBACK_RTOL, atol=0)
        np.testing.assert_array_equal(pool.eigenvalues_, 0.0)
        # Exact between fits: the rows are the fallback, one computation from the grid
        # whatever the batches or the order (not a solve that rounding could move).
        np.testing.assert_array_equal(pool.operator_, fits[0].operator_)
    # The transform pools the normalised maps and restores their scale and mean:
    # P (F - mu) / sigma * sigma + mu = P F + (1 - sum_n p_n) mu (a float64 reference). The
    # rows are exact fractions in both dtypes; the rest rounds at a few u of the dtype per
    # operation over 4 pooled terms (16 u, relative to outputs of the data's magnitude).
    stacks = maps.reshape(len(maps), 36, 3)
    shift = (1 - expected.sum(axis=1))[None, :, None] * fits[0].channel_mean_
    pooled = (np.einsum("mn,bnc->bmc", expected, stacks) + shift).reshape(len(maps), 3, 3, 3)
    eps = np.finfo(np.float32 if dtype == "float32" else np.float64).eps
    out = fits[0].transform(maps)
    np.testing.assert_allclose(out[..., :3], pooled, rtol=16 * eps)
    np.testing.assert_allclose(out[..., 3:], pooled, rtol=16 * eps)
    ratios = fits[0].separability_ratios(maps, labels)
    np.testing.assert_array_equal(ratios.learned, 0.0)
    np.testing.assert_array_equal(ratios.average, 0.0)


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("normalize_channels", [True, False])
def test_without_class_information_other_norms_and_raw_channels(norm, normalize_channels):
    maps, labels = uninformative_maps("duplicated", seed=2, grid=(5, 4), n_channels=2)
    pool = SeparabilityPooling(alpha=2.0, norm=norm, normalize_channels=normalize_channels,
                               device="cpu").fit(maps, labels)
    expected = average_rows((5, 4), 2, norm)
    np.testing.assert_allclose(pool.operator_[0], expected, rtol=FALLBACK_RTOL, atol=0)
    np.testing.assert_array_equal(pool.eigenvalues_, 0.0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_class_information_in_one_corner_with_truncated_supports(dtype):
    """The same maps in both classes except in the top-left 2x2 corner. With a support of
    radius 1.6 the cells far from the corner see no class information (average rows, ratio 0,
    the same for every batching); those whose support reaches the corner are solved."""
    maps, labels = uninformative_maps("duplicated", seed=3, n_classes=2, n_per_class=12)
    rng = np.random.default_rng(4)
    maps[labels == 1, :2, :2] += 3.0 + rng.normal(size=(12, 2, 2, 3))
    fits = [
        SeparabilityPooling(alpha=0.5, support_radius=1.6, dtype=dtype, batch_size=size,
                            device="cpu").fit(maps[order], labels[order])
        for size, order in [(256, np.arange(24)), (1, rng.permutation(24)), (7, np.arange(24))]
    ]
    expected = average_rows((6, 6), 2, "l2")
    # Which cells' supports (within 1.6 of the centre ((u + 0.5) * 2 - 0.5, ...)) reach the
    # corner pixels (i, j < 2): cells (0, 0), (0, 1) and (1, 0), not the other six.
    corner = [(i, j) for i in range(2) for j in range(2)]
    centres = [(2 * u + 0.5, 2 * v + 0.5) for u in range(3) for v in range(3)]
    sees_corner = np.array([
        any(np.hypot(i - row, j - col) <= 1.6 for i, j in corner) for row, col in centres
    ])
    assert sees_corner.sum() == 3
    for pool in fits:
        rows, values = pool.operator_[0], pool.eigenvalues_[0]
        np.testing.assert_allclose(rows[~sees_corner], expected[~sees_corner],
                                   rtol=FALLBACK_RTOL, atol=0)
        np.testing.assert_array_equal(values[~sees_corner], 0.0)
        assert np.all(values[sees_corner] > 0)
        assert np.abs(rows[sees_corner] - expected[sees_corner]).max() > 0.1
        # The fallback rows are one computation from the grid: exact across the fits.
        np.testing.assert_array_equal(rows[~sees_corner], fits[0].operator_[0][~sees_corner])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shift", [1e-3, 1e-7])
def test_small_class_differences_are_information(dtype, shift):
    """Class means 1e-3 or 1e-7 of the spread apart (otherwise the same maps in every class):
    far above the rounding of A (its bound is about 1e-12 of the data's magnitude here; the
    class means stay in float64 even for a float32 solve), so the rows are solved, not
    average pooling, and match the scipy reference of Algorithm 1 on the same data. A small A
    against B is not a loss of information (the eigenvectors do not depend on A's scale).
    Tolerance per row: separability_reference.fit_row_bounds for skpool's fit (solve dtype)
    and for the reference (float64), which both carry A's cancellation: class means 1e-7 of
    the spread apart leave A about K u |X| / shift ~ 1e-6 relative, amplified by the row's
    sqrt(kappa_s) kappa_s mu_1 / gap."""
    rng = np.random.default_rng(5)
    maps, labels = uninformative_maps("duplicated", seed=6, n_classes=3)
    maps = maps + shift * rng.normal(size=(3, 6, 6, 3))[labels]
    pool = SeparabilityPooling(alpha=0.5, dtype=dtype, device="cpu").fit(maps, labels)
    assert np.all(pool.eigenvalues_ > 0)
    raw = maps.reshape(len(maps), 36, 3)
    stacks, _, _ = ref.normalise_channels(raw)
    between, within = ref.scatter_matrices(stacks, labels)
    expected, _ = ref.operator(between, within, (6, 6), (3, 3), 0.5, 1, "l2")
    unit = np.finfo(np.float32 if dtype == "float32" else np.float64).eps
    own, _ = ref.fit_row_bounds(raw, labels, (6, 6), (3, 3), 0.5, 1, unit)
    reference, _ = ref.fit_row_bounds(raw, labels, (6, 6), (3, 3), 0.5, 1, EPS64)
    ref.assert_same_rows(pool.operator_, expected, own + reference)
