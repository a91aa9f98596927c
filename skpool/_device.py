"""Device resolution shared by every face of skpool (no sklearn import).

A ``device`` parameter is stored unchanged by the estimators and resolved here when it
is used: ``"auto"`` means CUDA when available, otherwise CPU; asking for CUDA where
there is none is a clear :class:`ValueError`, never a silent fallback.
"""

from __future__ import annotations

import platform

import torch

__all__ = ["resolve_device", "describe_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's ``device`` argument into a :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "cuda:<index>"}, torch.device or None
        ``None`` and ``"auto"`` pick ``"cuda"`` when :func:`torch.cuda.is_available`
        and ``"cpu"`` otherwise.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the string is not a device torch knows, if CUDA is requested but not
        available, or if the CUDA index is out of range.
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
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(device)!r} was requested but CUDA is not available "
                "on this machine (torch.cuda.is_available() is False); use "
                "device='cpu' or device='auto'."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(device)!r} was requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible."
            )
    elif resolved.type not in ("cpu", "mps", "xpu"):
        raise ValueError(
            f"Unsupported device {str(device)!r}: expected 'auto', 'cpu' or 'cuda'."
        )
    return resolved


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
