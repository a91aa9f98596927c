"""The CUDA-only branches outside the solve, run on the CPU through patches: device resolution
and description with CUDA "available", and the distributed fit's choice of where to reduce
(NCCL: the current CUDA device; gloo: the CPU). The real CUDA and NCCL calls run in the
gpu-marked tests at the end (skipped here; ``benchmarks/gpu_check.py`` runs them on a GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

import separability_reference as ref
from reliability.helpers import labelled_maps
from skpool import SeparabilityPooling, _device, describe_device, resolve_device
from skpool._core import distributed
from testing_utils import requires_cuda

MAPS, LABELS = labelled_maps(seed=5, n_samples=24, grid=(5, 4), n_channels=2, n_classes=3)
PARAMS = dict(alpha=0.5, n_components=2, dtype="float64")
EPS64 = float(np.finfo(np.float64).eps)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two CUDA devices named "Test GPU" (no CUDA call reaches the driver)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")


def test_auto_and_cuda_devices_resolve_where_cuda_is_available(two_gpus):
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    assert describe_device("cuda:1") == describe_device("auto") == "GPU Test GPU"
    assert describe_device("cpu").startswith("CPU ")


def test_gpu_paths_are_taken_on_every_device_but_the_cpu():
    assert not _device.takes_gpu_paths(torch.device("cpu"))
    assert not _device.takes_gpu_paths("cpu")
    for device in ("cuda", "cuda:1", "meta", "mps"):
        assert _device.takes_gpu_paths(device), device


# --------------------------------------------------------------------------------------------
# Distributed: where the statistics are reduced
@pytest.mark.parametrize(
    "backend, expected",
    [
        ("gloo", {"cpu": "gloo"}),
        ("nccl", {"cuda": "nccl"}),
        ("cpu:gloo,cuda:nccl", {"cpu": "gloo", "cuda": "nccl"}),
        ("undefined", {"cpu": "gloo", "cuda": "nccl"}),  # init_process_group() without one
    ],
)
def test_the_backends_devices_are_read_from_the_group(monkeypatch, backend, expected):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    devices = distributed.backend_devices()
    assert {device: devices[device] for device in ("cpu", "cuda") if device in devices} == expected


@pytest.mark.parametrize(
    "backend, device, expected",
    [
        ("gloo", "cpu", "cpu"),
        ("gloo", "cuda:1", "cpu"),  # CUDA statistics under gloo: through the host
        ("nccl", "cuda:1", "cuda:1"),
        ("nccl", "cpu", "cuda:1"),  # CPU statistics under NCCL: on the current CUDA device
        ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
        ("cpu:gloo,cuda:nccl", "cuda:0", "cuda:0"),
    ],
)
def test_the_communication_device_follows_the_backend(monkeypatch, backend, device, expected):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # a real CUDA call, patched
    assert distributed.communication_device(torch.device(device)) == torch.device(expected)


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group in this process, destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def assert_same_fit(fit, expected):
    """Two float64 fits of the same data: each row within its first-order bound of the exact
    row (separability_reference.fit_row_bounds), so within twice that of each other."""
    bounds, value_bounds = ref.fit_row_bounds(MAPS.reshape(24, 20, 2), LABELS, (5, 4), (3, 2),
                                              0.5, 2, EPS64)
    ref.assert_same_rows(fit.operator_, expected.operator_, 2 * bounds)
    np.testing.assert_array_less(np.abs(fit.eigenvalues_ - expected.eigenvalues_),
                                 2 * value_bounds)
    # one rank: its gathered channel statistics are its own, copied (between devices at
    # most), so they agree to float64 rounding; 1e-14 leaves 45 ulps for the arithmetic
    np.testing.assert_allclose(fit.channel_mean_, expected.channel_mean_, rtol=1e-14, atol=0)
    np.testing.assert_allclose(fit.channel_scale_, expected.channel_scale_, rtol=1e-14, atol=0)


def test_a_distributed_fit_through_the_nccl_branch(gloo_group, monkeypatch):
    """The group says NCCL (CUDA only); the "current CUDA device" is the CPU with an index
    (``cpu:0``, unequal to the tensors' ``cpu``), so every reduction takes the branch that
    copies the statistics to the backend's device and back, and gloo carries them. What this
    cannot check: the host-device copies themselves (the gpu-marked test below does)."""
    monkeypatch.setattr(distributed, "backend_devices", lambda: {"cuda": "nccl"})
    asked = []
    monkeypatch.setattr(distributed, "current_cuda_device",
                        lambda: asked.append(1) or torch.device("cpu", 0))
    moved = []
    all_reduce, all_gather = dist.all_reduce, dist.all_gather
    monkeypatch.setattr(dist, "all_reduce",
                        lambda tensor, *a, **k: moved.append(tensor.device) or all_reduce(
                            tensor, *a, **k))
    monkeypatch.setattr(dist, "all_gather",
                        lambda pieces, tensor, *a, **k: moved.append(tensor.device) or all_gather(
                            pieces, tensor, *a, **k))
    fit = SeparabilityPooling(**PARAMS, device="cpu", distributed=True).fit(MAPS, LABELS)
    expected = SeparabilityPooling(**PARAMS, device="cpu").fit(MAPS, LABELS)
    assert_same_fit(fit, expected)
    # channel statistics (gather), counts and sums, within-class scatter (reduce), rows and
    # ratios (one rank: not gathered): each through the NCCL branch
    assert len(moved) == 3 and len(asked) == len(moved), (moved, asked)
    rows = torch.arange(6.0).reshape(2, 3)  # the rows' gather, which one rank skips
    assert torch.equal(distributed.all_gather_along(rows, 0, [2]), rows)  # exact: a copy
    assert len(moved) == len(asked) == 4


# --------------------------------------------------------------------------------------------
# On a GPU (skipped here): the real NCCL and CUDA calls
@requires_cuda
@pytest.mark.gpu
def test_the_cuda_memory_budget_is_read_from_the_device():
    free, _ = torch.cuda.mem_get_info()
    budget = _device.memory_budget("cuda")
    assert 0 < budget <= min(16 << 30, free // 2 + torch.cuda.memory_reserved())


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_distributed_fits_on_one_gpu(tmp_path, backend):
    """A one-process group (issue 30: NCCL with world size 1 proves the path): CUDA and CPU
    statistics under NCCL (the CPU ones copied to the GPU for each reduction) and under gloo
    (the CUDA ones copied to the host) give the single-process fit."""
    if backend == "nccl" and not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        for device in ("cuda", "cpu"):
            fit = SeparabilityPooling(**PARAMS, device=device, distributed=True)
            fit.fit(MAPS, LABELS)
            expected = SeparabilityPooling(**PARAMS, device=device).fit(MAPS, LABELS)
            assert_same_fit(fit, expected)
    finally:
        dist.destroy_process_group()
