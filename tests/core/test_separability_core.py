"""The separability pooling core (grid, scatter, generalised eigenvectors) against slow float64
references written from Algorithm 1 of Birodkar et al. (2019), and the paper's properties."""

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import separability_reference as ref
from skpool._core import geneig
from skpool._core.geneig import batched_cholesky, rayleigh_ratios, top_generalized_eigenvectors
from skpool._core.grid import (
    average_pooling_operator,
    locality_costs,
    output_centres,
    output_grid_shape,
)
from skpool._core.scatter import (
    ChannelStatistics,
    ScatterStatistics,
    between_class_factor,
    class_weights_from_labels,
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
    factor = torch.eye(3, dtype=torch.float64)[:, :1]
    within = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    rows = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    np.testing.assert_array_equal(rayleigh_ratios(rows, factor, within).numpy(), [0.0, np.inf, 0.0])


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
    monkeypatch.setattr(geneig, "_CHOLESKY_BLOCK", 8)
    stats, _, _, costs, expected = reference_problem((7, 7), 2, 0.5)
    for method in ("low_rank", "full"):
        vectors, values = top_generalized_eigenvectors(
            stats.between_factor(), stats.within, costs, 0.5, 2, norm="l1", method=method
        )
        ref.assert_same_rows(vectors.numpy(), expected["l1"][0], 1e-8)
