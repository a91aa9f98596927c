"""The solve's memory budget (``max_memory_mb``): explicit numbers as given, the default (None)
from the memory free on the solve's device when it starts -- CUDA's through a patched
``torch.cuda.mem_get_info`` (no GPU here), the host's from ``/proc/meminfo``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import separability_reference as ref
from reliability.helpers import labelled_maps
from skpool import SeparabilityPooling, _device
from skpool._core.solve import routes

GIB = 1 << 30


@pytest.fixture
def cuda_memory(monkeypatch):
    """Patch the three CUDA calls of :func:`skpool._device.free_memory`; returns a dict whose
    ``free``, ``reserved`` and ``allocated`` (bytes) the test sets, and the calls' devices."""
    state = {"free": 0, "reserved": 0, "allocated": 0, "devices": []}

    def mem_get_info(device=None):
        state["devices"].append(device)
        return state["free"], 80 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    return state


@pytest.mark.parametrize(
    "free, reserved, allocated, expected",
    [
        (10 * GIB, 0, 0, 5 * GIB),  # half the free memory
        (10 * GIB, 3 * GIB, 1 * GIB, 6 * GIB),  # + what torch's allocator holds unused
        (70 * GIB, 0, 0, 16 * GIB),  # capped
        (4096, 0, 0, 2048),  # nearly full: a small budget (the solve then takes 1 cell)
    ],
)
def test_the_cuda_budget_is_half_the_free_device_memory_capped(
    cuda_memory, free, reserved, allocated, expected
):
    cuda_memory.update(free=free, reserved=reserved, allocated=allocated)
    assert _device.free_memory(torch.device("cuda", 1)) == free + reserved - allocated
    assert cuda_memory["devices"] == [torch.device("cuda", 1)]  # the solve's own device
    assert _device.memory_budget(torch.device("cuda", 1)) == expected
    assert _device.memory_budget("cuda") == expected


def test_an_explicit_budget_does_not_read_the_free_memory(monkeypatch):
    def unreadable(*args):
        raise AssertionError("an explicit budget must not read the free memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", unreadable)
    monkeypatch.setattr(_device, "host_available", unreadable)
    assert _device.memory_budget("cuda", 8) == 8 << 20
    assert _device.memory_budget("cpu", 0.5) == 1 << 19
    assert _device.memory_budget("cpu", 1024) == GIB


@pytest.mark.parametrize(
    "available_kib, expected",
    [(2 << 20, 512 << 20), (64 << 20, GIB), (16, 4 << 10)],  # 2 GiB, 64 GiB, 16 KiB free
)
def test_the_host_budget_is_a_quarter_of_the_available_memory_capped(
    tmp_path, monkeypatch, available_kib, expected
):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        f"MemTotal:       32000000 kB\nMemFree:          100000 kB\n"
        f"MemAvailable:   {available_kib:>8} kB\nBuffers:           1000 kB\n"
    )
    assert _device.host_available(str(meminfo)) == available_kib << 10
    monkeypatch.setattr(_device, "host_available", lambda: available_kib << 10)
    assert _device.memory_budget("cpu") == expected
    assert _device.memory_budget(torch.device("meta")) == expected  # any device but CUDA


def test_an_unreadable_host_memory_falls_back_to_the_former_default(tmp_path, monkeypatch):
    assert _device.host_available(str(tmp_path / "missing")) is None
    (tmp_path / "odd").write_text("MemAvailable: lots\n")
    assert _device.host_available(str(tmp_path / "odd")) is None
    monkeypatch.setattr(_device, "host_available", lambda: None)
    assert _device.memory_budget("cpu") == _device.FALLBACK_BUDGET == GIB


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="no /proc/meminfo (not Linux)")
def test_this_hosts_available_memory_is_read():
    """Linux: MemAvailable is there, positive and at most MemTotal."""
    with open("/proc/meminfo") as info:
        total = next(int(line.split()[1]) for line in info if line.startswith("MemTotal:"))
    available = _device.host_available()
    assert available is not None and 0 < available <= total << 10


# --------------------------------------------------------------------------------------------
# The estimator and the solve
@pytest.fixture
def chunk_budgets(monkeypatch):
    """Record the budget every solve divides into chunks."""
    budgets = []
    cells_per_chunk = routes.Route.cells_per_chunk

    def spy(self, problem, k, max_memory_bytes):
        budgets.append(max_memory_bytes)
        return cells_per_chunk(self, problem, k, max_memory_bytes)

    monkeypatch.setattr(routes.Route, "cells_per_chunk", spy)
    return budgets


def test_the_default_budget_follows_the_free_memory_and_an_explicit_one_is_kept(
    monkeypatch, chunk_budgets
):
    """Default None: the budget is read when the solve starts (a changed free memory changes
    it at the next fit), numbers in MiB are kept; every budget gives the same operator to
    rounding (other chunks: other batched LAPACK calls)."""
    maps, labels = labelled_maps(seed=3, n_samples=24, grid=(6, 6), n_channels=2, n_classes=3)
    assert SeparabilityPooling().max_memory_mb is None
    free = {"bytes": 2 * GIB}
    monkeypatch.setattr(_device, "host_available", lambda: free["bytes"])
    pool = SeparabilityPooling(solver="full", device="cpu")
    default = pool.fit(maps, labels).operator_
    free["bytes"] = 40 << 10  # 40 KiB free: a 10 KiB budget
    small = pool.fit(maps, labels).operator_
    explicit = SeparabilityPooling(solver="full", device="cpu", max_memory_mb=0.5)
    explicit.fit(maps, labels)
    assert chunk_budgets == [512 << 20, 10 << 10, 1 << 19]
    # full route, N = 36: (7 N^2 + 2 N r) float64 elements a cell, r <= 4: ~75 KiB, so the
    # 10 KiB budget solves one cell at a time; the others all 9 cells at once
    assert routes.Full().bytes_per_cell(36, 4, 1, torch.float64) > 10 << 10
    # two float64 computations of the same rows: each within its first-order bound of the
    # exact row (separability_reference.fit_row_bounds), so within twice that of each other
    bounds, _ = ref.fit_row_bounds(maps.reshape(24, 36, 2), labels, (6, 6), (3, 3), 1.0, 1,
                                   float(np.finfo(np.float64).eps))
    ref.assert_same_rows(small, default, 2 * bounds)
    ref.assert_same_rows(explicit.operator_, default, 2 * bounds)


def test_none_is_a_valid_budget_and_non_positive_numbers_are_not():
    maps, labels = labelled_maps(seed=4, n_samples=12)
    SeparabilityPooling(max_memory_mb=None, device="cpu").fit(maps, labels)
    for bad in (0, -1.0, "auto"):
        with pytest.raises(ValueError, match="max_memory_mb"):
            SeparabilityPooling(max_memory_mb=bad, device="cpu").fit(maps, labels)


def test_the_core_solve_reads_the_budget_of_its_tensors_device(monkeypatch, chunk_budgets):
    """``top_generalized_eigenvectors`` without a budget asks :func:`memory_budget` for the
    device of ``within``."""
    from skpool._core.solve import generalized

    asked = []
    monkeypatch.setattr(generalized, "memory_budget",
                        lambda device: asked.append(device) or 12345)
    within = torch.eye(4, dtype=torch.float64)
    costs = torch.ones((2, 4), dtype=torch.float64)
    generalized.top_generalized_eigenvectors(torch.ones((4, 1), dtype=torch.float64), within,
                                             costs, 1.0)
    assert asked == [within.device] and chunk_budgets == [12345]
