"""The paths skpool takes on a GPU, run on the CPU with the same numerics checks as the CPU's.

Every test here runs with :func:`skpool._device.takes_gpu_paths` patched to say "GPU" for the
CPU (the autouse fixture ``gpu_paths``), so that:

- the solve takes the GPU routes of :data:`skpool._core.solve.routes.ROUTES`
  (``LowRankBatched`` and ``Full``, by batched ``torch.linalg.cholesky_ex`` and
  ``solve_triangular``, without the CPU route's chunk cap): the fixture checks after each
  test that every route chosen was a GPU one;
- the scatter statistics stream each batch at once (the CPU centres a few samples at a time:
  the fixture shrinks that to one sample, so the two paths differ in every test);
- the memory budget is read for the tensors' device (the CPU's here; the CUDA branch, a real
  CUDA call, is tested through a patched ``mem_get_info`` in ``test_memory_budget.py``).

The core tests are the CPU's own, collected again here under the fixture (assigned below,
with their parametrisations): scipy float64 references with their tolerances, chunking,
memory budgets and progress. What cannot run here: the CUDA kernels themselves (cuSOLVER's
``cholesky_ex``, cuBLAS): the gpu-marked tests (``tests/reliability/test_determinism.py``) and
``benchmarks/gpu_check.py`` run those where a GPU is at hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import separability_reference as ref
from core import test_fast_solve as fast_solve
from core import test_scale as scale
from core import test_separability_core as core
from reliability.helpers import labelled_maps
from skpool import SeparabilityPooling, _device
from skpool._core import scatter
from skpool._core.solve import generalized, routes

GPU_ROUTES = {id(route) for (kind, _), route in routes.ROUTES.items() if kind == "gpu"}


@pytest.fixture(autouse=True)
def gpu_paths(monkeypatch):
    """Force the GPU paths on the CPU; afterwards check that the test consulted the switch and
    that every route the solve chose was a GPU route."""
    seen = {"devices": [], "routes": []}

    def forced(device):
        seen["devices"].append(torch.device(device))
        return True

    choose_route = routes.choose_route

    def recorded(problem, method, k):
        route = choose_route(problem, method, k)
        seen["routes"].append(route)
        return route

    monkeypatch.setattr(_device, "takes_gpu_paths", forced)
    monkeypatch.setattr(generalized, "choose_route", recorded)
    monkeypatch.setattr(scatter, "_CENTRING_CHUNK", 1)  # the CPU path: one sample at a time
    yield seen
    assert seen["devices"], "the test never reached a GPU/CPU decision"
    assert all(id(route) in GPU_ROUTES for route in seen["routes"]), seen["routes"]


# --------------------------------------------------------------------------------------------
# The CPU's core tests, collected again under the fixture
# statistics: streamed at once against the per-sample float64 reference
test_scatter_matches_per_sample_reference = core.test_scatter_matches_per_sample_reference
test_chunked_and_merged_statistics_equal_one_shot = (
    core.test_chunked_and_merged_statistics_equal_one_shot)
# the GPU routes against scipy's generalised eigh (float64 and float32, both eigenproblems)
test_operator_matches_scipy_reference = core.test_operator_matches_scipy_reference
test_auto_route_without_low_rank_gain_matches_scipy = (
    core.test_auto_route_without_low_rank_gain_matches_scipy)
test_singular_within_scatter_gives_finite_operator = (
    core.test_singular_within_scatter_gives_finite_operator)
test_solve_is_invariant_to_power_of_two_scalings = (
    core.test_solve_is_invariant_to_power_of_two_scalings)
test_huge_alpha_gives_the_limit_rows = core.test_huge_alpha_gives_the_limit_rows


@pytest.mark.parametrize("n_samples", [40, 6])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_route_matches_scipy_on_a_large_rank(rng, monkeypatch, n_samples, dtype):
    """r = 50: the subspace eigensolver iterates (its CPU variant with ``fused=True`` would
    test the CPU's route again: the GPU table's route is taken whatever the CPU's is)."""
    fast_solve.test_low_rank_routes_match_scipy_on_a_large_rank(
        rng, monkeypatch, n_samples, dtype, fused=False)


# truncated supports, chunk sizes from the budget (no cap on the GPU routes), progress
test_radius_covering_the_grid_equals_the_exact_solve = (
    scale.test_radius_covering_the_grid_equals_the_exact_solve)
test_truncated_rows_solve_the_restricted_problem = (
    scale.test_truncated_rows_solve_the_restricted_problem)
test_chunks_of_locations_do_not_change_the_result = (
    core.test_chunks_of_locations_do_not_change_the_result)
test_solve_stays_within_its_memory_budget = scale.test_solve_stays_within_its_memory_budget
test_progress_counts_every_output_cell_once = scale.test_progress_counts_every_output_cell_once


# --------------------------------------------------------------------------------------------
# The estimator end to end
MAPS, LABELS = labelled_maps(seed=2, n_samples=30, grid=(6, 5), n_channels=3, n_classes=3)


@pytest.mark.parametrize("dtype, unit", [("float64", ref.np.finfo(np.float64).eps),
                                         ("float32", ref.np.finfo(np.float32).eps)])
@pytest.mark.parametrize("solver, route", [("auto", routes.LowRankBatched),
                                           ("full", routes.Full)])
def test_the_estimator_on_gpu_paths_matches_the_reference(gpu_paths, dtype, unit, solver,
                                                          route):
    """A fit on the GPU paths against scipy's Algorithm 1 on the same data (float64), each
    row within the sum of the fit's first-order bound (its solve precision) and the
    reference's (float64), as the CPU fits are checked; the batch (10 samples) is streamed
    at once, and the solve chunked by a small budget (3 cells a chunk, 9 cells)."""
    budget_mb = 3 * routes.ROUTES["gpu", "full"].bytes_per_cell(30, 6, 2, torch.float64) / 2**20
    pool = SeparabilityPooling(alpha=0.5, n_components=2, solver=solver, dtype=dtype,
                               device="cpu", batch_size=10, max_memory_mb=budget_mb)
    pool.fit(MAPS, LABELS)
    assert [type(chosen) for chosen in gpu_paths["routes"]] == [route]
    assert gpu_paths["routes"][0].cholesky is torch.linalg.cholesky_ex
    stacks = MAPS.reshape(30, 30, 3)
    normalised, _, _ = ref.normalise_channels(stacks)
    between, within = ref.scatter_matrices(normalised, LABELS)
    expected, values = ref.operator(between, within, (6, 5), (3, 3), 0.5, 2, "l2")
    own, own_values = ref.fit_row_bounds(stacks, LABELS, (6, 5), (3, 3), 0.5, 2, unit)
    exact, exact_values = ref.fit_row_bounds(stacks, LABELS, (6, 5), (3, 3), 0.5, 2,
                                             float(np.finfo(np.float64).eps))
    ref.assert_same_rows(pool.operator_, expected, own + exact)
    np.testing.assert_array_less(np.abs(pool.eigenvalues_ - values), own_values + exact_values)
