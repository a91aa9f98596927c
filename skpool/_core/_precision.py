"""Full float32 matmul precision inside the numerical core, whatever the user's global setting.

``torch.set_float32_matmul_precision("high")`` or ``"medium"`` (what many GPU training scripts
set to get TF32 or bfloat16 GEMMs) would let every matmul and factorisation of the core run with
10-bit mantissas on Ampere-or-later GPUs: scatter statistics and Gram matrices would lose three
digits without a warning. The core's entry points run inside :func:`highest_matmul_precision`,
which sets ``"highest"`` and restores the caller's setting afterwards, also when the call raises.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["highest_matmul_precision", "with_highest_matmul_precision"]


@contextlib.contextmanager
def highest_matmul_precision():
    """Run the block at ``"highest"`` float32 matmul precision; restore the caller's setting
    afterwards (also on an exception). A no-op while :mod:`torch.compile` traces (the setting
    is global state, not part of a graph) and where the setting is ``"highest"`` already."""
    if torch.compiler.is_compiling():
        yield
        return
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def with_highest_matmul_precision(function):
    """Decorator form of :func:`highest_matmul_precision` (for the core's entry points)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with highest_matmul_precision():
            return function(*args, **kwargs)

    return wrapper
