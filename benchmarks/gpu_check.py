"""The first GPU run's one command: the CUDA tests and every GPU figure, into one JSON.

Runs, each figure written beside its target (issue 30) as soon as it is measured:

1. ``tests``: pytest on the gpu-marked tests (the CUDA subset; they skip without CUDA), in a
   child process with its own CUDA context: passed, failed, errors, skipped, the failures.
2. ``separability_fit``: ``SeparabilityPooling(n_components=2, dtype="float32").fit`` on
   C = 256, K = 20,000, Q = 100 maps on a 32×32 grid (stride 2: M = 256), the maps already
   on the device: target < 0.5 s.
3. ``exact_grid``: the exact solve of the 64×64 grid (M = 1,024, N = 4,096; C = 8, K = 200,
   Q = 10: ``bench_large_grid.py``'s problem), float32: target < 2 s.
4. ``gmp_vs_gram``: the GMP transform (the estimator's and layer's defaults) over the batched
   Gram matrix alone at (N, C) = (49, 2048), (441, 2048), (196, 512), (1024, 64), batch 256:
   target ≤ 1.5× (``bench_gmp.py``'s arms).
5. ``gmp_layer``: ``GeneralizedMaxPool2d`` forward + backward over its forward, at the
   ResNet-18 head (4×4, 512) and (7×7, 2048), batch 256: target ≤ 2.5×.
6. ``resnet18_step``: one SGD training step of the CIFAR ResNet-18 (32×32×3, batch 128) with
   each global head (avg, max, mixed, LSE, GMP), over the average head: GMP ≤ 1.15×.

Beside the timed figures: the syncing calls of one call (``item``, ``tolist``, ``__bool__``,
``__float__``, ``__int__``, ``cpu``, ``numpy``, ``nonzero``, counted by a
:class:`~torch.overrides.TorchFunctionMode`), figures of their own with target 0 per training
step and per layer forward+backward (issue 27), without one for the fit (per batch) and the
transform; and each timed figure's ``peak_bytes``, the peak memory of one call (tensor storage
live at once beyond what was live before: ``torch.cuda.max_memory_allocated`` on CUDA, a
dispatch-mode count on the CPU).

Every section runs even when another failed (its error is recorded); the JSON is rewritten
after each section, so a run stopped at its time limit keeps what it measured. The whole run
is held to ``--budget-s`` (480 s: a section that would start later is skipped, saying so).
``--device cpu --quick`` runs it all on tiny sizes in seconds (``tests/test_gpu_check.py``).

Run:  python benchmarks/gpu_check.py [--device auto|cpu|cuda] [--quick] [--out FILE]
      [--tests PATH ...] [--tests-timeout-s 240] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # the helpers beside this script, this tree's skpool

import bench_gmp  # noqa: E402
import bench_large_grid  # noqa: E402
from _timing import median_time, synchronize  # noqa: E402

import skpool  # noqa: E402
from skpool import SeparabilityPooling, describe_device, resolve_device  # noqa: E402
from skpool._core.gmp import generalized_max_pool  # noqa: E402
from skpool._device import free_memory, memory_budget  # noqa: E402
from skpool.nn import GeneralizedMaxPool2d  # noqa: E402

#: The calls that make the host wait for the device (issue 27).
SYNCING = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy",
                     "nonzero"})

#: The comparisons of the targets.
COMPARISONS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b}

#: Sizes of each section: the GPU run (issue 30) and ``--quick`` (seconds on a CPU).
SIZES = {
    False: dict(
        separability=dict(samples=20_000, grid=32, channels=256, classes=100, stride=2),
        exact_grid=dict(grid=(64, 64), channels=8, samples=200, classes=10, stride=2),
        gmp_shapes=bench_gmp.SHAPES, gmp_batch=256,
        layer_shapes=[(4, 4, 512), (7, 7, 2048)], layer_batch=256,
        resnet=dict(batch=128, size=32, width=1.0),
        repeats=5,
    ),
    True: dict(
        separability=dict(samples=60, grid=6, channels=3, classes=3, stride=2),
        exact_grid=dict(grid=(8, 8), channels=2, samples=24, classes=3, stride=2),
        gmp_shapes=[(16, 32), (36, 32), (25, 16), (64, 8)], gmp_batch=4,
        layer_shapes=[(2, 2, 8), (3, 3, 16)], layer_batch=4,
        resnet=dict(batch=4, size=8, width=1 / 16),
        repeats=2,
    ),
}


# --------------------------------------------------------------------------------------------
# Counting syncs and memory
class SyncCounter(TorchFunctionMode):
    """Counts the calls of :data:`SYNCING` (methods and ``torch.nonzero``) while active."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


class _LiveStorage(TorchDispatchMode):
    """The most bytes of tensor storage that ops allocated and kept alive at once (CPU)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and storage.nbytes():
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def peak_bytes(fn, device: torch.device) -> int:
    """Bytes of tensor storage live at once during ``fn()`` beyond those live before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with _LiveStorage() as memory:
        fn()
    return int(memory.peak)


def syncs(fn) -> dict:
    """The syncing calls of one ``fn()``: their total and each one's count."""
    with SyncCounter() as counter:
        fn()
    return {"total": counter.total, "calls": dict(sorted(counter.calls.items()))}


# --------------------------------------------------------------------------------------------
# The report
class Report:
    """The JSON being built: header, tests, figures, errors; rewritten after every section."""

    def __init__(self, path: Path, device: torch.device, args):
        self.path = path
        self.started = time.perf_counter()
        self.data = {
            "device": describe_device(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "skpool": skpool.__version__,
            "quick": bool(args.quick),
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "memory": {"free_bytes": free_memory(device), "budget_bytes": memory_budget(device)},
            "tests": None,
            "figures": [],
            "skipped": [],
            "errors": [],
            "seconds": 0.0,
        }

    def figure(self, section, name, value, unit, target=None, **details):
        """One measured figure and its target, ``(comparison, bound)`` such as ``("<", 0.5)``,
        or None."""
        met = None if target is None else bool(COMPARISONS[target[0]](value, target[1]))
        self.data["figures"].append({
            "section": section, "name": name, "value": float(value), "unit": unit,
            "target": None if target is None else f"{target[0]} {target[1]:g}",
            "met": met, **details,
        })

    def write(self):
        self.data["seconds"] = round(time.perf_counter() - self.started, 2)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def run_section(report: Report, name: str, budget_s: float, section, *args):
    """``section(report, *args)``, its error recorded rather than raised; skipped when the
    run's time is spent."""
    if report.elapsed() > budget_s:
        reason = f"past the {budget_s:g} s budget"
        report.data["skipped"].append({"section": name, "reason": reason})
    else:
        start = time.perf_counter()
        try:
            section(report, *args)
        except Exception as exc:  # recorded: the other sections still run
            report.data["errors"].append({
                "section": name, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8),
            })
        try:  # each section's cached memory back to the driver, for the next one's peak
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except RuntimeError as exc:  # a sticky CUDA error of the section: recorded above
            report.data["errors"].append({"section": name, "error": f"empty_cache: {exc}"})
        print(f"[{name}] {time.perf_counter() - start:.1f} s", flush=True)
    report.write()


# --------------------------------------------------------------------------------------------
# 1. The CUDA tests
def cuda_tests(report: Report, paths: list[str], timeout_s: float):
    """pytest -m gpu on ``paths``, in a child process; counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as folder:
        junit = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", *paths]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
            returncode, output, timed_out = done.returncode, done.stdout + done.stderr, False
        except subprocess.TimeoutExpired as exc:
            returncode, timed_out = None, True
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(
                exc.stdout, bytes) else (exc.stdout or "")
        result = {"command": command[1:], "returncode": returncode, "timed_out": timed_out,
                  "seconds": round(time.perf_counter() - start, 1),
                  "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
                  "output_tail": output[-4000:]}
        if junit.exists():
            for case in ElementTree.parse(junit).getroot().iter("testcase"):
                name = f"{case.get('classname')}::{case.get('name')}"
                outcome = next((child.tag for child in case
                                if child.tag in ("failure", "error", "skipped")), "passed")
                key = {"failure": "failed", "error": "errors"}.get(outcome, outcome)
                result[key] += 1
                if key in ("failed", "errors"):
                    result["failures"].append(name)
    report.data["tests"] = result


# --------------------------------------------------------------------------------------------
# 2. The separability fit
def device_maps(samples, grid, channels, classes, device, seed=0):
    """``bench_separability.make_data``'s maps, drawn on the device: unit noise with class
    information planted at 4 pixels, float32, and labels 0..Q-1 in turn. (Its numpy draw
    would hold 5.2e9 float64 values on the host at the GPU size: a minute and 40 GB.)"""
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.arange(samples, device=device) % classes
    maps = torch.randn((samples, grid * grid, channels), generator=generator, device=device)
    pixels = torch.randint(0, grid * grid, (4,), generator=generator, device=device)
    signal = torch.randn((classes, 4, channels), generator=generator, device=device)
    maps[:, pixels] += 2.0 * signal[labels]
    return maps.view(samples, grid, grid, channels), labels.cpu().numpy()


def separability_fit(report: Report, device, sizes, repeats):
    size = sizes["separability"]
    maps, labels = device_maps(size["samples"], size["grid"], size["channels"], size["classes"],
                               device)
    pool = SeparabilityPooling(stride=size["stride"], n_components=2, dtype="float32",
                               device=device)

    def fit():
        pool.fit(maps, labels)

    seconds = median_time(fit, device, repeats=repeats, warmup=1)
    shape = (f"C={size['channels']}, K={size['samples']}, Q={size['classes']}, "
             f"{size['grid']}x{size['grid']} grid, M={pool.operator_.shape[1]}, top-2, float32")
    report.figure("separability_fit", "fit seconds", seconds, "s", ("<", 0.5), size=shape,
                  peak_bytes=peak_bytes(fit, device))
    counted = syncs(fit)  # per batch, not per cell (issue 27): reported, no target
    report.figure("separability_fit", "syncs per fit", counted["total"], "calls", size=shape,
                  batches=-(-size["samples"] // pool.batch_size), calls=counted["calls"])


# --------------------------------------------------------------------------------------------
# 3. The exact 64x64 grid
def exact_grid(report: Report, device, sizes, repeats):
    size = sizes["exact_grid"]
    args = argparse.Namespace(**{key: size[key] for key in ("channels", "samples", "classes",
                                                             "stride")})
    stats, costs = bench_large_grid.problem(size["grid"], args, torch.float32, device)

    def solve():
        bench_large_grid.solve(stats, costs, 1.0, None)

    seconds = median_time(solve, device, repeats=max(1, repeats - 2), warmup=1)
    grid = size["grid"]
    report.figure("exact_grid", "exact solve seconds", seconds, "s", ("<", 2.0),
                  size=f"{grid[0]}x{grid[1]} grid (N={costs.shape[1]}), M={costs.shape[0]}, "
                       f"C={size['channels']}, K={size['samples']}, Q={size['classes']}, "
                       "top-1, float32",
                  peak_bytes=peak_bytes(solve, device))


# --------------------------------------------------------------------------------------------
# 4. GMP against the batched Gram
def gmp_vs_gram(report: Report, device, sizes, repeats):
    batch = sizes["gmp_batch"]
    for n, c in sizes["gmp_shapes"]:
        phi = torch.randn(batch, n, c, device=device).clamp_min_(0)  # ReLU features

        def gmp():  # the estimator's and the layer's defaults
            generalized_max_pool(phi, 1.0, lam_scale="relative", refine_steps="auto")

        t_gmp = median_time(gmp, device, repeats=3 * repeats)
        t_gram = median_time(lambda: bench_gmp.gram_only(phi), device, repeats=3 * repeats)
        size = f"B={batch}, N={n}, C={c}, float32, relative lambda 1"
        report.figure("gmp_vs_gram", f"GMP / Gram at ({n}, {c})", t_gmp / t_gram, "ratio",
                      ("<=", 1.5), size=size, gmp_ms=1e3 * t_gmp, gram_ms=1e3 * t_gram,
                      peak_bytes=peak_bytes(gmp, device))
        counted = syncs(gmp)
        report.figure("gmp_vs_gram", f"syncs per GMP transform at ({n}, {c})",
                      counted["total"], "calls", None, size=size, calls=counted["calls"])


# --------------------------------------------------------------------------------------------
# 5. The GMP layer: forward + backward over forward
def gmp_layer(report: Report, device, sizes, repeats):
    batch = sizes["layer_batch"]
    for h, w, c in sizes["layer_shapes"]:
        layer = GeneralizedMaxPool2d().to(device)
        maps = torch.randn(batch, c, h, w, device=device).relu_().requires_grad_()
        grad = torch.randn(batch, c, device=device)

        def forward():
            with torch.no_grad():
                layer(maps)

        def step():
            maps.grad = None
            layer.zero_grad(set_to_none=True)
            layer(maps).backward(grad)

        t_forward = median_time(forward, device, repeats=3 * repeats)
        t_step = median_time(step, device, repeats=3 * repeats)
        size = f"B={batch}, {h}x{w} grid, C={c}, float32"
        report.figure("gmp_layer", f"forward+backward / forward at ({h}x{w}, {c})",
                      t_step / t_forward, "ratio", ("<=", 2.5), size=size,
                      forward_ms=1e3 * t_forward, forward_backward_ms=1e3 * t_step,
                      peak_bytes=peak_bytes(step, device))
        counted = syncs(step)
        report.figure("gmp_layer", f"syncs per forward+backward at ({h}x{w}, {c})",
                      counted["total"], "calls", ("==", 0), size=size, calls=counted["calls"])


# --------------------------------------------------------------------------------------------
# 6. A ResNet-18 training step with each head
def resnet_steps(report: Report, device, sizes, repeats):
    """The ResNet-18 step with each global head of ``skpool.models`` (GMP against average)."""
    from skpool.models import ResNet18

    size = sizes["resnet"]
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn((size["batch"], 3, size["size"], size["size"]), generator=generator,
                         device=device)
    labels = torch.randint(0, 10, (size["batch"],), generator=generator, device=device)
    times, memory, counted = {}, {}, {}
    for head in RESNET_HEADS:
        torch.manual_seed(0)
        model = ResNet18(width_multiplier=size["width"], global_pool=head).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()

        times[head] = median_time(step, device, repeats=2 * repeats, warmup=2)
        memory[head], counted[head] = peak_bytes(step, device), syncs(step)
    shape = (f"batch {size['batch']}, {size['size']}x{size['size']}x3, width "
             f"x{size['width']:g}, SGD momentum 0.9")
    for head, seconds in times.items():
        report.figure("resnet18_step", f"{head} step / avg step", seconds / times["avg"], "ratio",
                      ("<=", 1.15) if head == "gmp" else None, size=shape,
                      step_ms=1e3 * seconds, peak_bytes=memory[head])
    for head in times:
        report.figure("resnet18_step", f"syncs per {head} step", counted[head]["total"],
                      "calls", ("==", 0), size=shape, calls=counted[head]["calls"])


RESNET_HEADS = ("avg", "max", "mixed", "lse", "gmp")

SECTIONS = [
    ("separability_fit", separability_fit),
    ("exact_grid", exact_grid),
    ("gmp_vs_gram", gmp_vs_gram),
    ("gmp_layer", gmp_layer),
    ("resnet18_step", resnet_steps),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds on a CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--tests", nargs="*", default=["tests"],
                        help="paths for pytest -m gpu (none: no tests)")
    parser.add_argument("--tests-timeout-s", type=float, default=240.0)
    parser.add_argument("--budget-s", type=float, default=480.0)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    sizes = SIZES[args.quick]
    report = Report(args.out, device, args)
    print(f"device: {report.data['device']}; writing {args.out}", flush=True)
    if args.tests:
        run_section(report, "tests", args.budget_s, cuda_tests, args.tests,
                    min(args.tests_timeout_s, args.budget_s))
    for name, section in SECTIONS:
        run_section(report, name, args.budget_s, section, device, sizes, sizes["repeats"])
    for figure in report.data["figures"]:
        verdict = {True: "met", False: "NOT met", None: ""}[figure["met"]]
        print(f"{figure['section']:<17} {figure['name']:<42} {figure['value']:10.4g} "
              f"{figure['unit']:<6} {figure['target'] or '':<8} {verdict}")
    tests = report.data["tests"]
    if tests is not None:
        print(f"tests: {tests['passed']} passed, {tests['failed']} failed, "
              f"{tests['errors']} errors, {tests['skipped']} skipped"
              + (" (timed out)" if tests["timed_out"] else ""))
    for error in report.data["errors"]:
        print(f"ERROR in {error['section']}: {error['error']}")
    failed = report.data["errors"] or (tests is not None and (
        tests["failed"] or tests["errors"] or tests["timed_out"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
