"""Peak memory of a separability fit from data on disk: it must not grow with the sample count.

For each K the parent writes K feature maps (16×16 grid, 64 channels, float32, 10 classes) to a
temporary file with plain writes, then a fresh child process fits ``SeparabilityPooling`` on it
and reports its resident size just before the fit and its peak resident set size during the fit
(``VmHWM``, restarted just before the fit through ``/proc/self/clear_refs``, so import-time
transients do not hide it; ``ru_maxrss`` where there is no /proc). Fits compared:

- ``memmap``: ``fit(np.memmap(path, mode="r", ...), y)``, read batch by batch;
- ``batches``: ``fit_batches`` over a callable yielding memmap slices of 1,000 samples;
- ``memmap, pages kept`` (contrast, not with ``--quick``): the memmap fit with skpool's release
  of the mapping's pages switched off: every page read stays in the resident set until the
  kernel reclaims it. (A kernel that reclaims cold pages proactively, e.g. DAMON "pageout" as on
  the VM of the figures in the report, hides much of this growth; a quick loop over a memmap
  without the release leaves the whole file resident.)
- ``in memory`` (contrast, not with ``--quick``): the whole array loaded first.

Target (issue 7): K = 10,000 vs 40,000 within 10% peak RSS for the chunked fits.

Then the per-location solve's memory budget (``max_memory_mb``): a child solves a 32×32 grid
(N = 1024; 32 locations, 12 with ``--quick``; float64) under several budgets and reports how
much its resident set grew during the solve (peak minus the resident size before it), against
the budget.

Run:  python benchmarks/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

GRID, CHANNELS, CLASSES = (16, 16), 64, 10
# glibc raises its mmap threshold after large frees (up to 32 MiB), after which freed batch
# buffers stay in the heap; a fixed threshold returns every buffer >= 1 MiB to the system.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

PEAK_HELPERS = r"""
import json, resource, sys

def rss_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20

def reset_peak():
    # Linux >= 4.0: the peak RSS restarts from the current RSS, so import-time transients
    # do not hide the fit's own peak. Elsewhere the peak covers the whole process.
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass

def peak_mib():
    # VmHWM: this process's own peak. ru_maxrss is never below the peak of the parent at the
    # time it started this child (Linux keeps the pre-exec peak in it), so prefer VmHWM.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

CHILD_FIT = PEAK_HELPERS + r"""
import numpy as np

path, n_samples, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import torch
from skpool import SeparabilityPooling
import skpool._sklearn.separability as separability

shape = (n_samples, 16, 16, 64)
labels = np.arange(n_samples) % 10
maps = np.memmap(path, dtype=np.float32, mode="r", shape=shape)
pool = SeparabilityPooling(alpha=1.0, stride=2, device="cpu", dtype="float32", batch_size=256)
if mode == "pages kept":
    separability.release_mapped_pages = lambda array: None
if mode == "in memory":
    maps = np.array(maps)
reset_peak()
before = rss_mib()
start = __import__("time").perf_counter()
if mode == "batches":
    def chunks():
        for first in range(0, n_samples, 1000):
            yield maps[first : first + 1000], labels[first : first + 1000]
    pool.fit_batches(chunks)
else:
    pool.fit(maps, labels)
seconds = __import__("time").perf_counter() - start
print(json.dumps({"before": before, "peak": peak_mib(), "seconds": seconds}))
"""

CHILD_SOLVE = PEAK_HELPERS + r"""
import torch
from skpool._core.solve import top_generalized_eigenvectors
from skpool._core.grid import locality_costs

budget_mib, method, n_cells = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
generator = torch.Generator().manual_seed(0)
n, r = 1024, 72
features = torch.randn(n, 3 * n, generator=generator, dtype=torch.float64)
within = features @ features.T / (3 * n)
del features
factor = torch.randn(n, r, generator=generator, dtype=torch.float64)
costs = locality_costs((32, 32), (16, 16))[:n_cells]  # enough for several chunks
reset_peak()
before = rss_mib()
top_generalized_eigenvectors(
    factor, within, costs, 1.0, 1, method=method, max_memory_bytes=int(budget_mib * 2**20)
)
print(json.dumps({"growth": peak_mib() - before}))
"""


def write_maps(path: str, n_samples: int, seed: int = 0) -> None:
    """K float32 maps with class-dependent means, written chunk by chunk (no mapping)."""
    rng = np.random.default_rng(seed)
    class_means = rng.standard_normal((CLASSES, *GRID, CHANNELS), dtype=np.float32)
    with open(path, "wb") as file:
        for first in range(0, n_samples, 2000):
            count = min(2000, n_samples - first)
            labels = np.arange(first, first + count) % CLASSES
            chunk = rng.standard_normal((count, *GRID, CHANNELS), dtype=np.float32)
            chunk += 0.5 * class_means[labels]
            file.write(chunk.tobytes())


def run_child(code: str, *args, **env_extra) -> dict:
    # One thread unless told otherwise: memory, not speed, is measured here, and a single
    # thread keeps the run time steady on a shared machine.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **env_extra)
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, env=env, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K = 2,000 vs 8,000; no contrast rows")
    args = parser.parse_args()
    sizes = (2_000, 8_000) if args.quick else (10_000, 40_000)
    modes = ["memmap", "batches"]
    if not args.quick:
        modes += ["memmap, pages kept", "in memory"]

    print(f"grid {GRID[0]}x{GRID[1]}, C={CHANNELS}, Q={CLASSES}, float32 data and fit, "
          "batch_size 256, stride 2")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for n_samples in sizes:
            path = os.path.join(folder, f"maps_{n_samples}.f32")
            start = time.perf_counter()
            write_maps(path, n_samples)
            size_mib = os.path.getsize(path) / 2**20
            print(f"K={n_samples}: wrote {size_mib:.0f} MiB in {time.perf_counter() - start:.1f} s")
            for mode in modes:
                results[mode, n_samples] = run_child(CHILD_FIT, path, n_samples, mode)
                if mode in ("memmap", "batches"):
                    fixed = run_child(CHILD_FIT, path, n_samples, mode, **FIXED_MMAP_THRESHOLD)
                    results[mode, n_samples]["fixed"] = fixed["peak"]
            os.remove(path)

    small, large = sizes
    print(f"\n{'fit':<20} {'K':>7} {'RSS before':>11} {'peak RSS':>10} {'ratio':>6}   "
          f"{'peak, fixed mmap threshold':>26} {'ratio':>6} {'fit s':>6}")
    for mode in modes:
        for n_samples in sizes:
            row = results[mode, n_samples]
            ratio = fixed_ratio = fixed = ""
            if "fixed" in row:
                fixed = f"{row['fixed']:.0f} MiB"
            if n_samples == large:
                ratio = f"{row['peak'] / results[mode, small]['peak']:.3f}"
                if "fixed" in row:
                    fixed_ratio = f"{row['fixed'] / results[mode, small]['fixed']:.3f}"
            print(f"{mode:<20} {n_samples:>7} {row['before']:7.0f} MiB {row['peak']:6.0f} MiB "
                  f"{ratio:>6}   {fixed:>26} {fixed_ratio:>6} {row['seconds']:6.1f}")
    print("ratio: peak at K={:,} / peak at K={:,}. 'fixed mmap threshold': the same fit with "
          "MALLOC_MMAP_THRESHOLD_={}, which stops glibc\nfrom keeping freed batch buffers in "
          "its heap, so the peak RSS follows the live memory (the default allocator adds a "
          "few % of noise).".format(large, small, FIXED_MMAP_THRESHOLD["MALLOC_MMAP_THRESHOLD_"]))

    budgets, n_cells = ((64, 256), 12) if args.quick else ((32, 128, 512), 32)
    print(f"\nper-location solve, 32x32 grid (N=1024, {n_cells} of the M=256 locations, r=72, "
          "float64): RSS growth vs budget")
    print(f"{'route':<10} {'budget MiB':>10} {'per location MiB':>17} {'growth MiB':>11}")
    per_location = {"low_rank": (2 * 1024**2 + 2 * 1024 * 72 + 3 * 72**2) * 8 / 2**20,
                    "full": (7 * 1024**2 + 2 * 1024 * 72) * 8 / 2**20}
    for method in ("low_rank", "full"):
        for budget in budgets:
            growth = run_child(CHILD_SOLVE, budget, method, n_cells)["growth"]
            print(f"{method:<10} {budget:>10} {per_location[method]:17.1f} {growth:11.0f}")


if __name__ == "__main__":
    main()
