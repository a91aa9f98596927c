"""Timing helpers shared by the benchmarks: medians of synchronised runs, and the GEMM peak."""

from __future__ import annotations

import statistics
import time

import torch

from skpool import describe_device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds, synchronising the device around each run."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_peak_gflops(device: torch.device, size: int = 2048, dtype=torch.float32) -> float:
    """The machine's own dense GEMM rate (GFLOP/s): the 'peak' the benchmarks compare with."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = median_time(lambda: a @ b, device, repeats=5)
    return 2 * size**3 / seconds / 1e9


def describe(device: torch.device) -> str:
    """The device in words (:func:`skpool.describe_device`)."""
    return describe_device(device)
