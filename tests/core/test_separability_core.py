"""The separability pooling core (grid, scatter, generalised eigenvectors) against slow float64
references written from Algorithm 1 of Birodkar et al. (2019), and the paper's properties."""

import math
import sys
import zlib

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import separability_reference as ref
from skpool._core.grid import (
    average_pooling_operator,
    inside_radius,
    locality_costs,
    output_centres,
    output_grid_shape,
)
from skpool._core.scatter import (
    ChannelStatistics,
    ScatterStatistics,
    between_class_factor,
    class_weights_from_labels,
    standardise,
)
from skpool._core.solve import (
    batched_cholesky,
    cholesky,
    no_class_information,
    rayleigh_ratios,
    rows_without_class_information,
    top_generalized_eigenvectors,
)
from testing_utils import DEVICES

GRIDS = [(5, 5), (6, 5), (7, 7)]
STRIDES = [1, 2, 3]


def make_stacks(rng, n_samples, n_locations, n_channels, n_classes, offset=0.0):
    """Random stacks (K, N, C) with class-dependent means, and balanced-ish labels."""
    labels = np.arange(n_samples) % n_classes
    rng.shuffle(labels)
    class_means = rng.normal(size=(n_classes, n_locations, n_channels))
    stacks = class_means[labels] + rng.normal(size=(n_samples, n_locations, n_channels)) + offset
    return stacks, labels


def core_statistics(stacks, labels, chunks=None, dtype=torch.float64):
    """ScatterStatistics of (K, N, C) numpy stacks, merged over the given chunks of samples."""
    tensor = torch.as_tensor(stacks, dtype=dtype)
    codes = torch.as_tensor(labels)
    weights = class_weights_from_labels(codes, int(labels.max()) + 1, dtype=dtype)
    chunks = chunks or [np.arange(len(stacks))]
    total = None
    for index in chunks:
        part = ScatterStatistics.from_batch(tensor[index], codes[index], weights)
        total = part if total is None else total.merge(part)
    return total


# ---------------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("grid", GRIDS + [(1, 4), (8, 8)])
@pytest.mark.parametrize("stride", STRIDES + [4])
def test_output_grid_is_ceil_of_grid_over_stride(grid, stride):
    assert output_grid_shape(grid, stride) == (math.ceil(grid[0] / stride), math.ceil(grid[1] / stride))


def test_output_shape_overrides_stride_and_is_checked():
    assert output_grid_shape((7, 5), 2, (3, 2)) == (3, 2)
    with pytest.raises(ValueError, match="output_shape"):
        output_grid_shape((7, 5), 2, (8, 2))
    with pytest.raises(ValueError, match="output_shape"):
        output_grid_shape((7, 5), 2, (0, 2))
    with pytest.raises(ValueError, match="stride"):
        output_grid_shape((7, 5), 0)


def test_centres_are_block_centres_for_stride_two_and_pixels_for_stride_one():
    centres = output_centres((4, 6), output_grid_shape((4, 6), 2)).numpy()
    expected = [(2 * u + 0.5, 2 * v + 0.5) for u in range(2) for v in range(3)]
    np.testing.assert_allclose(centres, expected)
    centres = output_centres((3, 2), (3, 2)).numpy()
    np.testing.assert_allclose(centres, [(i, j) for i in range(3) for j in range(2)])


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("stride", STRIDES)
def test_locality_costs_match_dense_reference(grid, stride):
    out = ref.output_shape_for(grid, stride)
    costs = locality_costs(grid, out).numpy()
    expected = [
        np.diag(ref.locality_cost_matrix(grid, out, u, v)) for u in range(out[0]) for v in range(out[1])
    ]
    np.testing.assert_allclose(costs, np.stack(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("stride", STRIDES)
def test_average_pooling_operator_matches_torch_avg_pool(rng, grid, stride):
    out = output_grid_shape(grid, stride)
    maps = torch.as_tensor(rng.normal(size=(3, 2, *grid)))  # (B, C, H, W)
    expected = F.avg_pool2d(maps, stride, stride, ceil_mode=True)
    operator = average_pooling_operator(grid, out, stride=stride)
    pooled = torch.einsum("mn,bcn->bcm", operator, maps.flatten(2)).reshape(expected.shape)
    torch.testing.assert_close(pooled, expected, rtol=1e-12, atol=1e-12)
    adaptive = average_pooling_operator(grid, out)
    pooled = torch.einsum("mn,bcn->bcm", adaptive, maps.flatten(2)).reshape(expected.shape)
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(maps, out), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- the statistics
@pytest.mark.parametrize("n_classes,n_channels", [(2, 1), (3, 2), (5, 3)])
def test_scatter_matches_per_sample_reference(rng, n_classes, n_channels):
    stacks, labels = make_stacks(rng, 23, 12, n_channels, n_classes)
    between, within = ref.scatter_matrices(stacks, labels)
    stats = core_statistics(stacks, labels)
    factor = stats.between_factor()
    assert factor.shape == (12, (n_classes - 1) * n_channels)
    np.testing.assert_allclose((factor @ factor.T).numpy(), between, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(stats.between().numpy(), between, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(stats.within.numpy(), within, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_chunked_and_merged_statistics_equal_one_shot(seed):
    rng = np.random.default_rng(seed)
    stacks, labels = make_stacks(rng, 40, 9, 2, 4, offset=1e6)  # large means: cancellation test
    one_shot = core_statistics(stacks, labels)
    # Random chunks, some without every class (the first of a single sample), merged in a tree.
    order = rng.permutation(40)
    cuts = np.union1d(rng.choice(np.arange(2, 40), size=5, replace=False), [1])
    weights = class_weights_from_labels(torch.as_tensor(labels), 4)
    parts = [
        ScatterStatistics.from_batch(torch.as_tensor(stacks[c]), torch.as_tensor(labels[c]), weights)
        for c in np.split(order, cuts)
    ]
    assert any((part.counts == 0).any() for part in parts)
    while len(parts) > 1:
        parts = [a.merge(b) for a, b in zip(parts[::2], parts[1::2])] + parts[len(parts) // 2 * 2 :]
    merged = parts[0]
    torch.testing.assert_close(merged.counts, one_shot.counts)
    torch.testing.assert_close(merged.means, one_shot.means, rtol=1e-13, atol=1e-9)
    _, within = ref.scatter_matrices(stacks - 1e6, labels)  # exact reference, offset removed
    np.testing.assert_allclose(merged.within.numpy(), within, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(one_shot.within.numpy(), within, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(
        merged.between().numpy(), one_shot.between().numpy(), rtol=1e-8, atol=1e-6
    )


def test_merge_refuses_different_class_weights(rng):
    stacks, labels = make_stacks(rng, 10, 4, 1, 2)
    a = core_statistics(stacks, labels)
    b = ScatterStatistics.from_batch(
        torch.as_tensor(stacks), torch.as_tensor(labels), torch.tensor([1.0, 2.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="class weights"):
        a.merge(b)


def test_channel_statistics_merge_equals_one_shot(rng):
    data = torch.as_tensor(rng.normal(loc=1e5, size=(30, 7, 3)))
    merged = ChannelStatistics.from_batch(data[:4])
    bounds = [4, 11, 12, 29, 30]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        merged = merged.merge(ChannelStatistics.from_batch(data[start:stop]))
    flat = data.reshape(-1, 3).numpy()
    np.testing.assert_allclose(merged.mean.numpy(), flat.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(merged.scale.numpy(), flat.std(axis=0), rtol=1e-9)
    dead = ChannelStatistics.from_batch(torch.zeros(5, 2, 2))
    np.testing.assert_array_equal(dead.scale.numpy(), [1.0, 1.0])


def test_between_factor_has_q_minus_one_blocks_of_columns(rng):
    means = torch.as_tensor(rng.normal(size=(4, 6, 2)))
    factor = between_class_factor(means)
    centred = (means - means.mean(dim=0)).permute(1, 0, 2).reshape(6, -1)
    assert factor.shape == (6, 6)
    torch.testing.assert_close(factor @ factor.T, centred @ centred.T)


# ------------------------------------------------------------- the generalised eigenproblem
_REFERENCE_CACHE = {}


def reference_problem(grid, stride, alpha, n_classes=3, n_channels=2):
    """(between, within, costs, reference operator for k=2 with both norms), cached."""
    key = (grid, stride, alpha, n_classes, n_channels)
    if key not in _REFERENCE_CACHE:
        rng = np.random.default_rng(zlib.crc32(repr(key).encode()))
        n_locations = grid[0] * grid[1]
        stacks, labels = make_stacks(rng, 12 * n_classes, n_locations, n_channels, n_classes)
        stacks, _, _ = ref.normalise_channels(stacks)
        between, within = ref.scatter_matrices(stacks, labels)
        stats = core_statistics(stacks, labels)
        out = ref.output_shape_for(grid, stride)
        expected = {
            norm: ref.operator(between, within, grid, out, alpha, 2, norm) for norm in ("l1", "l2")
        }
        _REFERENCE_CACHE[key] = (stats, between, within, locality_costs(grid, out), expected)
    return _REFERENCE_CACHE[key]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("method", ["low_rank", "full"])
@pytest.mark.parametrize("n_components", [1, 2])
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_operator_matches_scipy_reference(grid, stride, method, n_components, norm, dtype, atol):
    stats, _, _, costs, expected = reference_problem(grid, stride, alpha=0.5)
    rows, values = expected[norm]
    vectors, eigenvalues = top_generalized_eigenvectors(
        stats.between_factor().to(dtype),
        stats.within.to(dtype),
        costs.to(dtype),
        0.5,
        n_components,
        norm=norm,
        method=method,
    )
    assert vectors.dtype == dtype and vectors.shape == (n_components, *rows.shape[1:])
    ref.assert_same_rows(vectors.numpy(), rows[:n_components], atol)
    np.testing.assert_allclose(eigenvalues.numpy(), values[:n_components], rtol=10 * atol)


@pytest.mark.parametrize("n_classes,n_channels", [(4, 3), (6, 3)])  # r = N = 9 and r = 15 > N
def test_auto_route_without_low_rank_gain_matches_scipy(n_classes, n_channels):
    grid = (3, 3)
    stats, _, _, costs, expected = reference_problem(grid, 1, 2.0, n_classes, n_channels)
    assert stats.between_factor().shape[1] >= 9
    vectors, eigenvalues = top_generalized_eigenvectors(
        stats.between_factor(), stats.within, costs, 2.0, 2, norm="l2"
    )
    rows, values = expected["l2"]
    ref.assert_same_rows(vectors.numpy(), rows, 1e-8)
    np.testing.assert_allclose(eigenvalues.numpy(), values, rtol=1e-8)


def test_top_eigenvalue_is_the_achieved_ratio_and_the_maximum(rng):
    stats, between, within, costs, _ = reference_problem((5, 5), 2, 0.5)
    vectors, eigenvalues = top_generalized_eigenvectors(
        stats.between_factor(), stats.within, costs, 0.5, 2
    )
    p = vectors.numpy()  # (k, M, N)
    penalised = within[None] + 0.5 * np.stack([np.diag(c) for c in costs.numpy()])  # (M, N, N)
    achieved = np.einsum("kmi,ij,kmj->km", p, between, p) / np.einsum("kmi,mij,kmj->km", p, penalised, p)
    np.testing.assert_allclose(eigenvalues.numpy(), achieved, rtol=1e-10)
    assert np.all(eigenvalues[0].numpy() >= eigenvalues[1].numpy())
    trials = rng.normal(size=(200, 1, 25))
    trial_ratio = np.einsum("tmi,ij,tmj->tm", trials, between, trials) / np.einsum(
        "tmi,mij,tmj->tm", trials, penalised, trials
    )
    assert np.all(trial_ratio <= eigenvalues[0].numpy() * (1 + 1e-12))


def test_rows_follow_sign_convention_and_norm():
    stats, _, _, costs, _ = reference_problem((6, 5), 2, 0.5)
    for norm, order in (("l1", 1), ("l2", 2)):
        vectors, _ = top_generalized_eigenvectors(
            stats.between_factor(), stats.within, costs, 0.5, 2, norm=norm
        )
        assert np.all(vectors.numpy().sum(axis=-1) >= 0)
        np.testing.assert_allclose(np.linalg.norm(vectors.numpy(), ord=order, axis=-1), 1.0, rtol=1e-12)


def test_chunks_of_locations_do_not_change_the_result():
    stats, _, _, costs, _ = reference_problem((7, 7), 1, 0.5)
    for method in ("low_rank", "full"):
        whole, whole_values = top_generalized_eigenvectors(
            stats.between_factor(), stats.within, costs, 0.5, 2, method=method
        )
        one_by_one, values = top_generalized_eigenvectors(
            stats.between_factor(), stats.within, costs, 0.5, 2, method=method, max_memory_bytes=1
        )
        torch.testing.assert_close(one_by_one, whole, rtol=0, atol=1e-12)
        torch.testing.assert_close(values, whole_values, rtol=1e-12, atol=0)


@pytest.mark.parametrize("stride", STRIDES)
def test_large_alpha_localises_each_row_around_its_centre(stride):
    stats, between, _, costs, _ = reference_problem((7, 7), stride, 0.5)
    costs_np = costs.numpy()
    spread, mean_sq_distance = [], []
    for alpha in (0.0, 1.0, 100.0, 1e5):
        vectors, _ = top_generalized_eigenvectors(stats.between_factor(), stats.within, costs, alpha)
        p = vectors[0].numpy()
        # pT C_m p / pT A p cannot increase with alpha (compare the optimality of both alphas).
        spread.append((costs_np * p**2).sum(axis=1) / np.einsum("mi,ij,mj->m", p, between, p))
        mean_sq_distance.append((costs_np * p**2).sum(axis=1) / (p**2).sum(axis=1))
    spread = np.stack(spread)
    assert np.all(np.diff(spread, axis=0) <= 1e-9 * spread[:-1])
    assert mean_sq_distance[0].min() > 5.0  # alpha = 0: spread over the whole 7x7 grid
    assert mean_sq_distance[-1].max() < 1.0  # alpha = 1e5: within about a pixel of the centre
    if stride == 1:  # the centre is a pixel, of zero cost: all the mass goes there
        on_centre = (p**2 * (costs_np == 0)).sum(axis=1)
        assert on_centre.min() > 0.999


@pytest.mark.parametrize("method", ["low_rank", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_singular_within_scatter_gives_finite_operator(rng, method, dtype):
    """Fewer samples than locations, a dead pixel, alpha = 0 and centres on pixels (stride 1)."""
    grid = (5, 5)
    stacks, labels = make_stacks(rng, 6, 25, 1, 2)
    stacks[:, 7] = 3.0  # dead (constant) pixel
    stats = core_statistics(stacks, labels, dtype=dtype)
    assert torch.linalg.matrix_rank(stats.within.double()) < 25
    for alpha in (0.0, 1.0):
        vectors, values = top_generalized_eigenvectors(
            stats.between_factor(), stats.within, locality_costs(grid, grid, dtype=dtype), alpha,
            method=method,
        )
        assert torch.isfinite(vectors).all() and not torch.isnan(values).any()
        np.testing.assert_allclose(torch.linalg.vector_norm(vectors, dim=-1).numpy(), 1.0, rtol=1e-5)


def test_zero_within_scatter_and_indefinite_within_are_handled(rng):
    stacks, labels = make_stacks(rng, 8, 9, 1, 2)
    means = np.stack([stacks[labels == q].mean(axis=0) for q in (0, 1)])
    stats = core_statistics(means[labels], labels)  # every sample at its class mean: B = 0
    assert float(stats.within.abs().max()) < 1e-12
    costs = locality_costs((3, 3), (2, 2))
    vectors, values = top_generalized_eigenvectors(stats.between_factor(), stats.within * 0, costs, 0.0)
    assert torch.isfinite(vectors).all() and not torch.isnan(values).any()
    assert torch.isinf(values).all()  # no within-class spread at all: infinite separability
    # Slightly indefinite B (e.g. from rounding): the ridge grows until the factorisation works.
    stats = core_statistics(stacks, labels)
    shift = 1e-3 * float(stats.within.diagonal().mean())
    indefinite = stats.within - shift * torch.eye(9, dtype=torch.float64)
    assert torch.linalg.cholesky_ex(indefinite)[1] > 0
    vectors, _ = top_generalized_eigenvectors(stats.between_factor(), indefinite, costs, 0.0)
    assert torch.isfinite(vectors).all()


def test_rayleigh_ratios_are_finite_for_zero_rows():
    """Exact values (no rounding anywhere): 0/0 -> 0, x/0 -> inf, 0/x -> 0."""
    factor = torch.eye(3, dtype=torch.float64)[:, :1]
    within = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    rows = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    np.testing.assert_array_equal(rayleigh_ratios(rows, factor, within).numpy(), [0.0, np.inf, 0.0])


def test_rayleigh_ratio_of_two_rounding_residues_is_zero():
    """p = (1, -1 + 2**-52) against d = (1, 1), B = d d^T: p'd = 2**-52 and p'Bp = 2**-104 are
    both below the rounding bound of their evaluation (N u sum |p_i||d_i| = 4.4e-16 and
    N u (sum |p_i| sqrt(B_ii))^2 = 8.9e-16, N = 2): an evaluated 0/0, defined as 0 (no
    separability), not their quotient 1 or inf."""
    d = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    p = torch.tensor([[1.0, -1.0 + 2.0**-52], [1.0, 0.5]], dtype=torch.float64)
    assert float(p[0] @ d[:, 0]) == 2.0**-52  # the residue is there (an exact subtraction)
    ratios = rayleigh_ratios(p, d, d @ d.T).numpy()
    assert ratios[0] == 0.0
    np.testing.assert_allclose(ratios[1], 1.0, rtol=1e-15)  # resolved: A = B, so exactly 1
    # A resolved numerator over a denominator that is rounding only: inf.
    within = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    rows = torch.tensor([[1.0, 1.0 + 2.0**-52]], dtype=torch.float64)
    assert float((rows @ within @ rows.T).squeeze()) != 0.0
    assert rayleigh_ratios(rows, d, within).item() == np.inf


def test_rayleigh_ratios_with_the_noise_bound_are_zero_without_class_information():
    """Identical samples in every class: A and B are zero in exact arithmetic, the computed
    class means differ by rounding. Without the statistics' noise bound that rounding gives
    a ratio (inf, the denominator being zero); with it every row has ratio 0."""
    rng = np.random.default_rng(0)
    stacks = np.repeat(rng.normal(size=(1, 9, 2)) * 1e3 + 7.0, 24, axis=0)
    labels = np.arange(24) % 3
    stats = core_statistics(stacks, labels, chunks=np.array_split(rng.permutation(24), 5))
    factor = stats.between_factor()
    rows = torch.as_tensor(rng.normal(size=(40, 9)))
    ratios = rayleigh_ratios(rows, factor, stats.within, noise=stats.between_noise())
    np.testing.assert_array_equal(ratios.numpy(), 0.0)
    if float(factor.abs().max()) > 0:  # the rounding left a residue (usual): it was a ratio
        assert bool((rayleigh_ratios(rows, factor, stats.within) > 0).any())


# ------------------------------------------------------------- rounding of the between factor
def _noise_free_stacks(rng, kind, n_samples, n_classes, dtype):
    """Stacks without class information (A = 0 exactly): one sample repeated, or the same
    samples in every class, shuffled; of magnitude 1e-3..1e3 with a mean up to 1e5."""
    scale, offset = 10.0 ** rng.uniform(-3, 3), 10.0 ** rng.uniform(-3, 5)
    base = rng.normal(size=(n_samples // n_classes, 9, 2)) * scale + offset
    if kind == "identical":
        stacks = np.repeat(base[:1], n_samples, axis=0)
        labels = np.arange(n_samples) % n_classes
    else:
        stacks = np.concatenate([base] * n_classes)
        labels = np.repeat(np.arange(n_classes), len(base))
    order = rng.permutation(len(stacks))
    return stacks[order].astype(dtype), labels[order]


@pytest.mark.parametrize("kind", ["identical", "duplicated"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", range(6))
def test_between_noise_bounds_the_rounding_of_data_without_class_information(kind, dtype, seed):
    """The bound of ScatterStatistics.between_noise holds however the samples are batched:
    every row of the computed D (exactly 0) lies within it, so no operator row is taken for
    class information (no_class_information)."""
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 5))
    stacks, labels = _noise_free_stacks(rng, kind, 12 * n_classes, n_classes, dtype)
    sizes = [1, 5, len(stacks)]
    cuts = np.arange(sizes[seed % 3], len(stacks), sizes[seed % 3])
    stats = core_statistics(stacks, labels, chunks=np.split(np.arange(len(stacks)), cuts),
                            dtype=torch.float64 if dtype == np.float64 else torch.float32)
    factor, noise = stats.between_factor(), stats.between_noise()
    assert no_class_information(factor, noise)
    rows = torch.as_tensor(rng.normal(size=(30, 9)))
    assert bool(rows_without_class_information(rows, factor, noise).all())


@pytest.mark.parametrize("shift", [1.0, 1e-6])
def test_class_information_is_not_taken_for_rounding(rng, shift):
    """Class means that differ by a planted shift (down to 1e-6 of the within-class spread,
    far above the float64 rounding bound of about 1e-13 here) are information: no row of the
    solved operator is flagged, and the operator does not depend on the shift's size (the
    within-class noise is centred per class, so B does not change and A scales by shift**2,
    which leaves the eigenvectors as they are)."""
    labels = np.arange(48) % 3
    pattern = rng.normal(size=(3, 9, 2))
    noise = rng.normal(size=(48, 9, 2))
    for q in range(3):
        noise[labels == q] -= noise[labels == q].mean(axis=0)
    stats = core_statistics(noise + shift * pattern[labels], labels)
    factor, bound = stats.between_factor(), stats.between_noise()
    assert not no_class_information(factor, bound)
    costs = locality_costs((3, 3), (2, 2))
    vectors, values = top_generalized_eigenvectors(factor, stats.within, costs, 0.5)
    assert not bool(rows_without_class_information(vectors, factor, bound).any())
    assert bool((values > 0).all())
    unit = core_statistics(noise + pattern[labels], labels)
    expected, _ = top_generalized_eigenvectors(unit.between_factor(), unit.within, costs, 0.5)
    # D is known to a relative error of at most noise_n / |D_n| (~1e-7 for shift 1e-6); the
    # rows move by that times the inverse relative eigengap, taken as at most 1e3 here.
    relative = float((bound / factor.norm(dim=1)).max())
    np.testing.assert_allclose(vectors.numpy(), expected.numpy(), atol=1e3 * relative + 1e-12)


# ------------------------------------------------------------ magnitudes, overflow, scaling
@pytest.mark.parametrize("magnitude", [1e-300, 1e-150, 1.0, 1e150, 1e300])
def test_channel_statistics_of_any_finite_magnitude(rng, magnitude):
    """Channels of magnitude 1e-300..1e300 (one channel always at 1e300, one at 1e-300, in the
    same batches): means and standard deviations as numpy's of the same values scaled by an
    exact power of two, through uneven merges. A sum of squares would overflow (or underflow)
    here. rtol 1e-12: both sides sum 60 terms of comparable size, an error of at most
    60 u (4.4; Higham) ~ 7e-15 relative per quantity, with a margin of 100."""
    z = rng.normal(size=(20, 3, 3)) + 1.0
    data = z * np.array([magnitude, 1e300, 1e-300])
    tensor = torch.as_tensor(data)
    merged = ChannelStatistics.from_batch(tensor[:1])
    for start, stop in [(1, 7), (7, 8), (8, 20)]:
        merged = merged.merge(ChannelStatistics.from_batch(tensor[start:stop]))
    exponents = np.frexp(np.abs(data).max(axis=(0, 1)))[1]
    unit_data = np.ldexp(data, -exponents)  # exact
    expected_mean = np.ldexp(unit_data.mean(axis=(0, 1)), exponents)
    expected_std = np.ldexp(unit_data.std(axis=(0, 1)), exponents)
    np.testing.assert_allclose(merged.mean.numpy(), expected_mean, rtol=1e-12)
    np.testing.assert_allclose(merged.std.numpy(), expected_std, rtol=1e-12)
    np.testing.assert_allclose(merged.scale.numpy(), expected_std, rtol=1e-12)


def test_standardise_does_not_overflow_near_the_largest_float():
    """Values +-1.5e308 (mean -5e307): F - mu = 2e308 would overflow; the halved formula gives
    sqrt(2) and -1/sqrt(2) (a few roundings: rtol 1e-15)."""
    values = torch.tensor([[1.5e308], [-1.5e308], [-1.5e308]], dtype=torch.float64)
    stats = ChannelStatistics.from_batch(values)
    assert torch.isfinite(stats.std).all()
    out = standardise(values, stats.mean, stats.scale)[:, 0].numpy()
    np.testing.assert_allclose(out, [math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)],
                               rtol=1e-15)


@pytest.mark.parametrize("method", ["low_rank", "full"])
@pytest.mark.parametrize("exponents", [(-300, -100), (300, 100), (-300, 100), (150, -120)])
def test_solve_is_invariant_to_power_of_two_scalings(method, exponents):
    """D * 2**a, B * 4**b and alpha * 4**b pose the same eigenproblem: the vectors agree and
    the ratios scale by 4**(a - b), also where the unscaled arithmetic would over- or underflow
    (D 1e+-90, B and alpha 1e+-60, their products 1e+-180 .. 1e+-240). The solve scales by
    powers of two, so the agreement is to rounding (atol 1e-12, rtol 1e-12 for the ratios;
    the references agree to 1e-9 at worst)."""
    stats, _, _, costs, _ = reference_problem((5, 5), 2, 0.5)
    factor, within = stats.between_factor(), stats.within
    a, b = exponents
    vectors, values = top_generalized_eigenvectors(factor, within, costs, 0.5, 2, method=method)
    scaled, scaled_values = top_generalized_eigenvectors(
        factor * 2.0**a, within * 4.0**b, costs, 0.5 * 4.0**b, 2, method=method
    )
    assert torch.isfinite(scaled).all()
    np.testing.assert_allclose(scaled.numpy(), vectors.numpy(), atol=1e-12)
    np.testing.assert_allclose(scaled_values.numpy() / 4.0 ** (a - b), values.numpy(), rtol=1e-12)


def _limit_operator(between, grid, out, norm="l2"):
    """alpha -> inf: B vanishes against alpha C_m; rows are the top eigenvectors of (A, C_m)
    (scipy, float64; C_m definite where no centre sits on a pixel)."""
    rows = []
    for u in range(out[0]):
        for v in range(out[1]):
            cost = ref.locality_cost_matrix(grid, out, u, v)
            _, vectors = scipy.linalg.eigh(between, cost)
            top = vectors[:, -1]
            top = top * (1.0 if top.sum() >= 0 else -1.0)
            rows.append(top / np.linalg.norm(top, ord=1 if norm == "l1" else 2))
    return np.stack(rows)[None]


@pytest.mark.parametrize("dtype,alpha,atol", [
    (torch.float64, 1e39, 1e-9), (torch.float64, 1e300, 1e-9), (torch.float32, 1e39, 1e-3),
    (torch.float32, 1e30, 1e-3),
])
@pytest.mark.parametrize("method", ["low_rank", "full"])
def test_huge_alpha_gives_the_limit_rows(dtype, alpha, atol, method):
    """alpha C_m beyond the dtype's range (1e39 * 8 in float32, 1e300 * 8 in float64) used to
    overflow the factorisation; the rows are the alpha -> inf limit. atol: 1e-9 for float64
    (as the references), 1e-3 for float32 (README: an operator solved in float32)."""
    stats, between, _, costs, _ = reference_problem((6, 6), 2, 0.5)
    vectors, values = top_generalized_eigenvectors(
        stats.between_factor().to(dtype), stats.within.to(dtype), costs, alpha, method=method
    )
    assert torch.isfinite(vectors).all() and torch.isfinite(values).all()
    ref.assert_same_rows(vectors.numpy(), _limit_operator(between, (6, 6), (3, 3)), atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huge_alpha_with_centres_on_pixels_concentrates_on_the_centre(dtype):
    """Stride 1: C_m is zero at the centre pixel, so as alpha -> inf the row tends to that
    pixel alone (its cost is 0, every other location's is alpha * d^2)."""
    stats, _, _, costs, _ = reference_problem((5, 5), 1, 0.5)
    vectors, _ = top_generalized_eigenvectors(
        stats.between_factor().to(dtype), stats.within.to(dtype), costs, 1e39
    )
    on_centre = (vectors[0].double() ** 2 * (costs == 0)).sum(dim=1)
    assert torch.isfinite(vectors).all() and float(on_centre.min()) > 0.999


def test_non_finite_statistics_are_refused():
    stats, _, _, costs, _ = reference_problem((5, 5), 2, 0.5)
    factor, within = stats.between_factor(), stats.within
    bad = within.clone()
    bad[0, 0] = torch.inf
    with pytest.raises(ValueError, match="B holds NaN or infinity"):
        top_generalized_eigenvectors(factor, bad, costs, 0.5)
    with pytest.raises(ValueError, match="D holds NaN"):
        top_generalized_eigenvectors(factor * torch.nan, within, costs, 0.5)
    with pytest.raises(ValueError, match="alpha must be finite"):
        top_generalized_eigenvectors(factor, within, costs, math.inf)


@pytest.mark.parametrize("radius", [10.0, 1e200, 1e300, sys.float_info.max, math.inf])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_radius_covering_the_grid_is_the_exact_solve(radius, dtype):
    """Every support is the whole grid (radius >= the largest distance, about 5.7 here): the
    solve takes the exact route, the same computation as support_radius=None (hence equal
    bit for bit); radius**2 beyond the float range used to raise OverflowError."""
    stats, _, _, costs, _ = reference_problem((6, 6), 2, 0.5)
    args = (stats.between_factor().to(dtype), stats.within.to(dtype), costs, 0.5, 2)
    assert bool(inside_radius(costs, radius).all())
    exact, exact_values = top_generalized_eigenvectors(*args)
    covering, values = top_generalized_eigenvectors(*args, support_radius=radius)
    np.testing.assert_array_equal(covering.numpy(), exact.numpy())
    np.testing.assert_array_equal(values.numpy(), exact_values.numpy())


def test_bad_arguments_are_refused():
    stats, _, _, costs, _ = reference_problem((5, 5), 2, 0.5)
    args = (stats.between_factor(), stats.within, costs)
    with pytest.raises(ValueError, match="n_components"):
        top_generalized_eigenvectors(*args, 0.5, 26)
    with pytest.raises(ValueError, match="alpha"):
        top_generalized_eigenvectors(*args, -1.0)
    with pytest.raises(ValueError, match="norm"):
        top_generalized_eigenvectors(*args, 0.5, norm="max")
    with pytest.raises(ValueError, match="method"):
        top_generalized_eigenvectors(*args, 0.5, method="lanczos")
    with pytest.raises(ValueError, match="low_rank"):  # r = 4 components at most
        top_generalized_eigenvectors(*args, 0.5, 5, method="low_rank")
    with pytest.raises(ValueError, match="costs"):
        top_generalized_eigenvectors(args[0], args[1], costs[:, :3], 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_device_results_match_cpu_float64(device, dtype):
    stats, _, _, costs, expected = reference_problem((6, 5), 2, 0.5)
    rows, _ = expected["l2"]
    for method in ("low_rank", "full"):
        vectors, values = top_generalized_eigenvectors(
            stats.between_factor().to(device, dtype),
            stats.within.to(device, dtype),
            costs.to(device, dtype),
            0.5,
            2,
            method=method,
        )
        assert vectors.device.type == device
        ref.assert_same_rows(vectors.cpu().numpy(), rows, 1e-8 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocked_cholesky_matches_lapack_and_reports_failures(rng, dtype):
    a = torch.as_tensor(rng.normal(size=(5, 23, 30)), dtype=dtype)
    systems = a @ a.mT
    systems[2, 9, 9] = -1.0  # fails at the 10th pivot
    factor, info = batched_cholesky(systems, block_size=4)
    expected, expected_info = torch.linalg.cholesky_ex(systems)
    torch.testing.assert_close(info, expected_info)
    ok = [0, 1, 3, 4]
    torch.testing.assert_close(factor[ok], expected[ok])
    assert torch.equal(factor[ok], factor[ok].tril())
    assert int(info[2]) == 10


def test_solve_through_the_blocked_cholesky_matches_scipy(monkeypatch):
    monkeypatch.setattr(cholesky, "_CHOLESKY_BLOCK", 8)
    stats, _, _, costs, expected = reference_problem((7, 7), 2, 0.5)
    for method in ("low_rank", "full"):
        vectors, values = top_generalized_eigenvectors(
            stats.between_factor(), stats.within, costs, 0.5, 2, norm="l1", method=method
        )
        ref.assert_same_rows(vectors.numpy(), expected["l1"][0], 1e-8)
