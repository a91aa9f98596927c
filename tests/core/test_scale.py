"""Scale in the separability core: the truncated-support solve (against the exact solve and a
scipy reference of the restricted problem), and the memory budget of the per-location solve
(every tensor the solve allocates, tracked while it runs)."""

import weakref

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import separability_reference as ref
from skpool import SeparabilityPooling
from skpool._core.grid import (
    inside_radius,
    locality_costs,
    output_grid_shape,
    support_within_radius,
)
from skpool._core.scatter import ScatterStatistics, class_weights_from_labels
from skpool._core.solve import routes, top_generalized_eigenvectors
from skpool._core.solve.problem import Problem, prepare


def make_problem(seed, grid, n_channels, n_classes, n_samples=60, dtype=torch.float64):
    """Normalised random stacks with class structure everywhere: (stats, A, B) in float64."""
    rng = np.random.default_rng(seed)
    n_locations = grid[0] * grid[1]
    labels = np.arange(n_samples) % n_classes
    stacks = rng.normal(size=(n_classes, n_locations, n_channels))[labels]
    stacks = stacks + rng.normal(size=(n_samples, n_locations, n_channels))
    stacks, _, _ = ref.normalise_channels(stacks)
    codes = torch.as_tensor(labels)
    weights = class_weights_from_labels(codes, n_classes, dtype=dtype)
    stats = ScatterStatistics.from_batch(torch.as_tensor(stacks, dtype=dtype), codes, weights)
    return stats, stacks, labels


def angles(rows, other):
    """Angle (rad) between corresponding rows of two (..., N) arrays."""
    rows, other = np.asarray(rows), np.asarray(other)
    cosine = np.abs((rows * other).sum(-1)) / (
        np.linalg.norm(rows, axis=-1) * np.linalg.norm(other, axis=-1)
    )
    return np.arccos(np.clip(cosine, 0.0, 1.0))


# ------------------------------------------------------------------------------ supports
def test_supports_list_the_locations_within_the_radius_in_order():
    costs = locality_costs((6, 5), (3, 3))
    index, valid = support_within_radius(costs, 1.6)
    inside = inside_radius(costs, 1.6).numpy()
    assert index.shape[1] == inside.sum(axis=1).max()
    for m in range(9):
        np.testing.assert_array_equal(index[m][valid[m]].numpy(), np.flatnonzero(inside[m]))
    # The boundary is inside: distance exactly 1 from a pixel centre (stride 1).
    assert inside_radius(locality_costs((3, 3), (3, 3)), 1.0)[4].sum() == 5


# ------------------------------------------------------------------------ truncated solve
@pytest.mark.parametrize("grid,stride", [((7, 7), 1), ((6, 5), 2), ((7, 6), 3)])
@pytest.mark.parametrize("method", ["low_rank", "full"])
@pytest.mark.parametrize("n_components,norm", [(1, "l2"), (2, "l1")])
def test_radius_covering_the_grid_equals_the_exact_solve(grid, stride, method, n_components, norm):
    stats, _, _ = make_problem(1, grid, 2, 3)
    costs = locality_costs(grid, output_grid_shape(grid, stride))
    args = (stats.between_factor(), stats.within, costs, 0.5, n_components)
    exact, exact_values = top_generalized_eigenvectors(*args, norm=norm, method=method)
    diagonal = float(np.hypot(*grid))
    truncated, values = top_generalized_eigenvectors(
        *args, norm=norm, method=method, support_radius=diagonal
    )
    torch.testing.assert_close(truncated, exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(values, exact_values, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["low_rank", "full"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_truncated_rows_solve_the_restricted_problem(method, dtype, atol):
    """Against scipy's eigh of the sub-blocks A_S, B_S + alpha C_S of every support."""
    grid, stride, alpha, radius = (7, 6), 2, 0.5, 2.3
    stats, stacks, labels = make_problem(2, grid, 2, 3, dtype=dtype)
    between, within = ref.scatter_matrices(stacks, labels)
    out = output_grid_shape(grid, stride)
    costs = locality_costs(grid, out)
    vectors, values = top_generalized_eigenvectors(
        stats.between_factor(), stats.within, costs.to(dtype), alpha, 2, norm="l2",
        method=method, support_radius=radius, max_memory_bytes=50_000,  # several chunks
    )
    inside = inside_radius(costs, radius).numpy()
    expected_rows = np.zeros((2, *costs.shape))
    expected_values = np.zeros((2, costs.shape[0]))
    for m in range(costs.shape[0]):
        support = np.flatnonzero(inside[m])
        system = within + alpha * np.diag(costs[m].numpy())
        eigenvalues, eigenvectors = scipy.linalg.eigh(
            between[np.ix_(support, support)], system[np.ix_(support, support)]
        )
        top = eigenvectors[:, ::-1][:, :2].T
        top = top * np.where(top.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
        expected_rows[:, m, support] = top / np.linalg.norm(top, axis=1, keepdims=True)
        expected_values[:, m] = eigenvalues[::-1][:2]
    assert vectors.dtype == dtype
    ref.assert_same_rows(vectors.numpy(), expected_rows, atol)
    np.testing.assert_allclose(values.numpy(), expected_values, rtol=10 * atol)


def test_support_outside_the_radius_is_exactly_zero_and_the_ratio_a_lower_bound():
    grid = (9, 8)
    stats, _, _ = make_problem(3, grid, 2, 4)
    costs = locality_costs(grid, output_grid_shape(grid, 2))
    args = (stats.between_factor(), stats.within, costs, 2.0, 2)
    _, exact_values = top_generalized_eigenvectors(*args)
    previous = None
    for radius in (1.0, 2.0, 3.5, 5.0):
        vectors, values = top_generalized_eigenvectors(*args, support_radius=radius)
        inside = inside_radius(costs, radius)
        assert torch.all(vectors[:, ~inside] == 0)  # exactly, not approximately
        assert (vectors[:, inside] != 0).float().mean() > 0.99
        # A restriction of the same maximisation: never above the exact optimum, and
        # non-decreasing as the (nested) supports grow.
        assert torch.all(values[0] <= exact_values[0] * (1 + 1e-10))
        if previous is not None:
            assert torch.all(values[0] >= previous * (1 - 1e-10))
        previous = values[0]


def test_large_alpha_truncation_stays_close_to_the_exact_operator():
    """16x16 grid, stride 2. Measured (max / median angle of the 64 top rows, rad):
    alpha = 1: radius 6 -> 1.4 / 0.28; alpha = 1000: radius 4 -> 0.080 / 0.037,
    radius 6 -> 0.058 / 0.019, radius 8 -> 0.037 / 0.011. With the quadratic cost the exact rows
    decay like 1/d^2 where alpha*d^2 dominates B, so the angle falls about like 1/radius."""
    grid = (16, 16)
    stats, _, _ = make_problem(0, grid, 4, 5, n_samples=120)
    costs = locality_costs(grid, output_grid_shape(grid, 2))
    measured = {}
    for alpha in (1.0, 1000.0):
        args = (stats.between_factor(), stats.within, costs, alpha)
        exact, _ = top_generalized_eigenvectors(*args)
        for radius in (4.0, 6.0, 8.0):
            truncated, _ = top_generalized_eigenvectors(*args, support_radius=radius)
            measured[alpha, radius] = angles(truncated[0], exact[0])
    large = measured[1000.0, 6.0]
    assert large.max() < 0.1 and np.median(large) < 0.03
    assert np.median(measured[1.0, 6.0]) > 5 * np.median(large)  # alpha is what makes it local
    medians = [np.median(measured[1000.0, radius]) for radius in (4.0, 6.0, 8.0)]
    assert medians[0] > medians[1] > medians[2]


def test_truncated_solve_is_independent_of_the_chunks():
    grid = (8, 8)
    stats, _, _ = make_problem(4, grid, 3, 3)
    costs = locality_costs(grid, (8, 8))
    args = (stats.between_factor(), stats.within, costs, 1.0, 2)
    whole, whole_values = top_generalized_eigenvectors(*args, support_radius=2.5)
    one_by_one, values = top_generalized_eigenvectors(
        *args, support_radius=2.5, max_memory_bytes=1
    )
    torch.testing.assert_close(one_by_one, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(values, whole_values, rtol=1e-12, atol=0)


def test_too_small_or_bad_radius_is_a_clear_error():
    stats, _, _ = make_problem(5, (6, 6), 1, 2)
    costs = locality_costs((6, 6), (3, 3))  # stride 2: nearest pixels at sqrt(0.5)
    args = (stats.between_factor(), stats.within, costs, 1.0)
    with pytest.raises(ValueError, match=r"fewer than n_components=1.*smallest radius .* 0\.7071"):
        top_generalized_eigenvectors(*args, support_radius=0.5)
    with pytest.raises(ValueError, match="positive"):
        top_generalized_eigenvectors(*args, support_radius=0.0)
    top_generalized_eigenvectors(*args, support_radius=0.7072)  # the four nearest pixels


def test_estimator_support_radius(rng):
    labels = np.arange(40) % 2
    maps = rng.normal(size=(40, 8, 8, 2)) + labels[:, None, None, None]
    exact = SeparabilityPooling(alpha=10.0, device="cpu").fit(maps, labels)
    whole = SeparabilityPooling(alpha=10.0, support_radius=12.0, device="cpu").fit(maps, labels)
    np.testing.assert_allclose(whole.operator_, exact.operator_, rtol=0, atol=1e-12)
    local = SeparabilityPooling(alpha=10.0, support_radius=2.0, device="cpu").fit(maps, labels)
    costs = locality_costs((8, 8), (4, 4)).numpy()
    assert np.all(local.operator_[:, costs > 4.0 + 1e-9] == 0)
    assert local.transform(maps).shape == (40, 4, 4, 2)
    with pytest.raises(ValueError, match="support_radius"):
        SeparabilityPooling(support_radius=-1.0, device="cpu").fit(maps, labels)


# -------------------------------------------------------------------------- memory budget
class LiveTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated while active (inputs excluded)."""

    def __init__(self, *existing):
        super().__init__()
        self.existing = {tensor.untyped_storage().data_ptr() for tensor in existing}
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or key in self.existing or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


@pytest.mark.parametrize(
    "method,radius,n_cells",
    [("low_rank", None, 100), ("full", None, 24), ("low_rank", 5.0, 100), ("full", 5.0, 100)],
)
def test_solve_stays_within_its_memory_budget(method, radius, n_cells, monkeypatch):
    """20x20 grid (N = 400, float64): one location needs about 2.6 MB (low-rank) or 6.4 MB
    (full) of work matrices. Beyond the budget only the output-sized tensors may be live.
    The CPU low-rank route caps its chunks at a few locations (cache); the cap is lifted here
    so that the budget alone sets the chunk size."""
    uncapped = routes.LowRankFused(cache_cells=10**6)
    monkeypatch.setitem(routes.ROUTES, ("cpu", "low_rank"), uncapped)
    grid = (20, 20)
    stats, _, _ = make_problem(6, grid, 4, 5, n_samples=40)
    factor, within = stats.between_factor(), stats.within
    costs = locality_costs(grid, (10, 10))[:n_cells]
    output_bytes = 2 * costs.numel() * 8  # (k, M, N), k = 2
    peaks = {}
    for budget in (16 << 20, 64 << 20):
        with LiveTensorMemory(factor, within, costs) as memory:
            top_generalized_eigenvectors(
                factor, within, costs, 1.0, 2, method=method, support_radius=radius,
                max_memory_bytes=budget,
            )
        peaks[budget] = memory.peak
        assert memory.peak <= budget + 4 * output_bytes, (budget, memory.peak)
    if radius is None and method == "low_rank":  # the tracker sees the chunks grow
        assert peaks[64 << 20] > (16 << 20) + 4 * output_bytes


class CountingProgress:
    """Stands in for a tqdm bar: records every ``update(n)``."""

    def __init__(self):
        self.updates = []

    def update(self, n):
        self.updates.append(n)


@pytest.mark.parametrize("method,radius", [("low_rank", None), ("full", None), ("low_rank", 2.5)])
def test_progress_counts_every_output_cell_once(method, radius):
    """A budget of five cells' work per chunk (16 cells): updates of 5, 5, 5 and 1, and the
    same result as without a progress object (the same chunks and operations)."""
    grid = (8, 8)
    stats, _, _ = make_problem(7, grid, 3, 4, n_samples=30)
    costs = locality_costs(grid, output_grid_shape(grid, 2))
    args = (stats.between_factor(), stats.within, costs, 1.0, 2)
    problem = prepare(*args, radius)
    route = routes.choose_route(problem, method, 2)
    per_cell = route.bytes_per_cell(problem.size, problem.rank, 2, torch.float64, problem.truncated)
    options = dict(method=method, support_radius=radius, max_memory_bytes=5 * per_cell)
    progress = CountingProgress()
    vectors, values = top_generalized_eigenvectors(*args, progress=progress, **options)
    assert progress.updates == [5, 5, 5, 1]
    quiet_vectors, quiet_values = top_generalized_eigenvectors(*args, **options)
    assert torch.equal(vectors, quiet_vectors) and torch.equal(values, quiet_values)


@pytest.mark.parametrize(
    "device,method,k,expected",
    [
        ("cpu", "auto", 2, routes.LowRankFused),  # r = 6 < N = 16
        ("cpu", "auto", 7, routes.Full),  # k > r
        ("cpu", "full", 1, routes.Full),
        ("meta", "auto", 2, routes.LowRankBatched),  # any device but the CPU: batched
        ("meta", "full", 1, routes.Full),
    ],
)
def test_one_table_picks_the_route(device, method, k, expected):
    """The route from the device and the eigenproblem, nothing else (:data:`routes.ROUTES`);
    CPU routes factor by the blocked Cholesky, the others by ``cholesky_ex``."""
    within = torch.eye(16, device=device, dtype=torch.float64)
    problem = Problem(
        factor=torch.ones((16, 6), device=device, dtype=torch.float64), within=within,
        costs=torch.ones((4, 16), device=device, dtype=torch.float64), alpha=1.0,
        support_radius=None, size=16, ratio_exponent=0,
    )
    route = routes.choose_route(problem, method, k)
    assert type(route) is expected
    if isinstance(route, routes.Full):
        assert (route.cholesky is torch.linalg.cholesky_ex) == (device != "cpu")
    with pytest.raises(ValueError, match="at most r=6 components"):
        routes.choose_route(problem, "low_rank", 7)
