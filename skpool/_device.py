"""Device resolution shared by every face of skpool (no sklearn import).

A ``device`` parameter is stored unchanged by the estimators and resolved here when it
is used: ``"auto"`` means CUDA when available, otherwise CPU; asking for an accelerator (CUDA,
MPS, XPU) where there is none is a clear :class:`ValueError`, never a silent fallback. The
layers and networks check their constructors' ``device`` and their moves (``.to``, ``.cuda``)
here too (:func:`check_device`, :class:`CheckedMoves`).

Also decided here for every device: whether skpool takes its GPU paths there
(:func:`takes_gpu_paths`) and the solve's memory budget from the device's free memory
(:func:`memory_budget`).
"""

from __future__ import annotations

import platform

import torch

__all__ = [
    "resolve_device",
    "describe_device",
    "check_device",
    "CheckedMoves",
    "takes_gpu_paths",
    "free_memory",
    "memory_budget",
]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's ``device`` argument into a :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "cuda:<index>", "mps", "xpu"}, torch.device or None
        ``None`` and ``"auto"`` pick ``"cuda"`` when :func:`torch.cuda.is_available`
        and ``"cpu"`` otherwise.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the string is not a device torch knows, if an accelerator (CUDA, MPS, XPU) is
        requested but not available, or if its index is out of range.
    TypeError
        If ``device`` is neither a string nor a :class:`torch.device`.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str):
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"Unknown device {device!r}: expected 'auto', 'cpu', 'cuda' or "
                "'cuda:<index>'."
            ) from exc
    elif isinstance(device, torch.device):
        resolved = device
    else:
        raise TypeError(
            f"device must be a string or a torch.device, got {type(device).__name__}."
        )
    if resolved.type in _ACCELERATORS:
        name, available, count = _ACCELERATORS[resolved.type]
        if not available():
            where = "backends.mps" if resolved.type == "mps" else resolved.type
            raise ValueError(
                f"device={str(device)!r} was requested but {name} is not available "
                f"on this machine (torch.{where}.is_available() is False); use "
                "device='cpu' or device='auto'."
            )
        if resolved.index is not None and resolved.index >= count():
            raise ValueError(
                f"device={str(device)!r} was requested but only "
                f"{count()} {name} device(s) are visible."
            )
    elif resolved.type != "cpu":
        raise ValueError(
            f"Unsupported device {str(device)!r}: expected 'auto', 'cpu', 'cuda', 'mps' or "
            "'xpu'."
        )
    return resolved


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


#: The accelerators a ``device`` may name: their name in messages, whether this machine has
#: one, and how many it has (what torch would otherwise answer with its own RuntimeError or
#: AssertionError, deep inside the first tensor moved there). Looked up at each call, so that
#: a patched ``torch.cuda`` (the tests of the CUDA branches) is seen.
_ACCELERATORS = {
    "cuda": ("CUDA", lambda: torch.cuda.is_available(), lambda: torch.cuda.device_count()),
    "mps": ("MPS", lambda: torch.backends.mps.is_available(), lambda: 1),
    "xpu": ("XPU", _xpu_available, lambda: torch.xpu.device_count()),
}


def check_device(device) -> None:
    """Refuse, with :func:`resolve_device`'s ValueError, a ``device`` argument of a torch
    factory or move (a string, a :class:`torch.device`, a CUDA index, or None for the
    default) that names an accelerator this machine lacks; the layers' constructors call it
    and :class:`CheckedMoves` their ``.to``/``.cuda``/``.xpu``."""
    if device is None:
        return
    if isinstance(device, int) and not isinstance(device, bool):
        device = torch.device(device)  # an index means the current accelerator (torch's rule)
    resolve_device(device)


class CheckedMoves:
    """A mixin for :class:`torch.nn.Module`: ``.to``, ``.cuda`` and ``.xpu`` check the target
    device with :func:`check_device` before moving anything, so a missing accelerator is the
    same ValueError as everywhere else in skpool (not torch's AssertionError)."""

    def to(self, *args, **kwargs):
        check_device(torch._C._nn._parse_to(*args, **kwargs)[0])
        return super().to(*args, **kwargs)

    def cuda(self, device=None):
        check_device(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")
        return super().cuda(device)

    def xpu(self, device=None):
        check_device(torch.device("xpu", device) if isinstance(device, int) else device or "xpu")
        return super().xpu(device)


def describe_device(device: str | torch.device | None = "auto") -> str:
    """The machine behind a figure, in words: the GPU's name, or the CPU model with the SIMD
    level that ATen dispatches to (``DEFAULT``, ``AVX2``, ``AVX512``) and the number of
    torch threads, e.g. ``"CPU AMD EPYC, ATen AVX2, 2 torch threads"``. Timings and results
    that depend on the kernels (benchmarks, the example tables) print it beside them.
    """
    device = resolve_device(device)
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return (
        f"CPU {_cpu_model()}, ATen {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} torch threads"
    )


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# --------------------------------------------------------------------------------------------
# The paths taken on a GPU
def takes_gpu_paths(device: torch.device) -> bool:
    """Whether skpool takes its GPU paths for tensors on ``device``: on every device but the
    CPU. The one place that decides (the solve's routes,
    :func:`skpool._core.solve.routes.choose_route`, and the statistics' batching,
    :meth:`skpool._core.scatter.ScatterStatistics.from_batch`); the tests patch it to run the
    GPU paths on the CPU, with the same checks as the CPU paths.
    """
    return torch.device(device).type != "cpu"


# --------------------------------------------------------------------------------------------
# Memory budgets
#: ``max_memory_mb=None`` (the default) gives the solve this share of the memory free on its
#: device, at most the cap: on CUDA half of what the device has free (the other half for
#: the statistics, the operator and whatever else the process or a neighbour allocates
#: meanwhile), at most 16 GiB (a chunk of 16 GiB already holds, for N = 4096, over 100 cells
#: whose Cholesky factorisations each fill the GPU: larger chunks would only take memory
#: from a training run sharing the GPU; not yet measured on a GPU); on the host a quarter
#: of the available memory, at most 1 GiB (the former fixed default, so on a machine with
#: 4 GiB or more available the CPU solve runs exactly as it was measured).
BUDGET_SHARE = {"cuda": 0.5, "host": 0.25}
BUDGET_CAP = {"cuda": 16 << 30, "host": 1 << 30}
#: The budget where the free memory cannot be read (no /proc/meminfo: not Linux).
FALLBACK_BUDGET = 1 << 30


def free_memory(device: str | torch.device) -> int | None:
    """Bytes that new tensors on ``device`` can take now, or None where this cannot be read.

    CUDA: what the driver reports free (:func:`torch.cuda.mem_get_info`) plus what PyTorch's
    caching allocator holds reserved but unused (free to torch, not to the driver). Any other
    device (CPU, and the devices that share the host's memory): the host's ``MemAvailable``
    from ``/proc/meminfo`` (Linux; None elsewhere).
    """
    device = torch.device(device)
    if device.type == "cuda":  # a real CUDA call: the tests patch these three functions
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(0, int(cached))
    return host_available()


def host_available(meminfo: str = "/proc/meminfo") -> int | None:
    """The host's available memory in bytes (``MemAvailable`` of ``meminfo``), or None."""
    try:
        with open(meminfo) as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    value, unit = line.split()[1:3]  # "MemAvailable:  23606620 kB"
                    return int(value) * {"kB": 1 << 10}[unit]  # the kernel writes kB
    except (OSError, ValueError, IndexError, KeyError):
        pass
    return None


def memory_budget(device: str | torch.device, max_memory_mb: float | None = None) -> int:
    """The solve's memory budget in bytes on ``device``.

    ``max_memory_mb`` as given (MiB) when it is a number; for None, :data:`BUDGET_SHARE` of
    :func:`free_memory` at most :data:`BUDGET_CAP` (the CUDA entries on a CUDA device, the
    host's elsewhere), or :data:`FALLBACK_BUDGET` where the free memory cannot be read.
    Read when the solve starts, so it sees the memory the statistics left free.
    """
    if max_memory_mb is not None:
        return int(max_memory_mb * 2**20)
    device = torch.device(device)
    free = free_memory(device)
    if free is None:
        return FALLBACK_BUDGET
    kind = "cuda" if device.type == "cuda" else "host"
    return max(1, min(int(BUDGET_SHARE[kind] * free), BUDGET_CAP[kind]))
