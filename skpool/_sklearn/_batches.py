"""Data that does not fit in memory: re-iterable batches, and memory maps read batch by batch.

- :func:`reiterable` turns what a user gives to ``fit_batches`` (a DataLoader, a list, any
  re-iterable, or a callable returning a fresh iterator) into a function that starts a new
  pass over the data, and refuses one-shot iterators (generators), which a two-pass fit would
  silently exhaust.
- :func:`release_mapped_pages` keeps reading a :class:`numpy.memmap` from growing the process:
  pages of a file mapping that have been read count in its resident memory until the kernel
  evicts them, so a full pass over a memmap would otherwise leave the whole file resident.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["reiterable", "split_batch", "release_mapped_pages"]

# Shared mappings only: dropping pages of a private (copy-on-write, mode "c") mapping would
# discard the user's modifications, while shared pages stay in the page cache and are read back.
_SHARED_MODES = ("r", "r+", "w+")


def reiterable(batches, name: str = "batches") -> Callable[[], Iterator]:
    """A function returning a fresh iterator over ``batches`` at every call.

    Raises TypeError for a one-shot iterator (an :class:`~collections.abc.Iterator`: a
    generator, a ``map``, an open file) and for objects that are neither iterable nor callable.
    """
    if hasattr(batches, "__iter__"):
        if isinstance(batches, Iterator):
            raise TypeError(
                f"{name} is a one-shot iterator ({type(batches).__name__}), but the fit reads the "
                "data twice (pass 1: channel statistics and class sizes; pass 2: scatter "
                "statistics). Pass a re-iterable (a list, a torch DataLoader) or a callable "
                "that returns a fresh iterator, e.g. `lambda: make_batches()`."
            )
        return lambda: iter(batches)
    if callable(batches):
        return lambda: iter(batches())
    raise TypeError(
        f"{name} must be a re-iterable of (X_batch, y_batch) pairs (e.g. a torch DataLoader) or "
        f"a callable returning an iterator over them; got {type(batches).__name__}."
    )


def split_batch(item, position: int) -> tuple:
    """``(X_batch, y_batch)`` from one item of the batches, with a clear error otherwise."""
    try:
        features, labels = item
    except (TypeError, ValueError):
        raise TypeError(
            f"Batch {position} is not a pair (X_batch, y_batch); got "
            f"{type(item).__name__}. Yield (features, labels) from the batches."
        ) from None
    return features, labels


def release_mapped_pages(array) -> None:
    """Drop the resident pages of the shared :class:`numpy.memmap` behind ``array``, if any.

    ``madvise(MADV_DONTNEED)`` on the whole mapping: the data stay in the kernel's page cache
    (and in the file) and are read back on the next access; only this process's resident set
    shrinks. Anything that is not a view of a shared memmap (private "c" maps, torch tensors,
    plain arrays) is left alone; where the platform lacks ``madvise`` this does nothing.
    """
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mapping = getattr(base, "_mmap", None)
    if mapping is None or getattr(base, "mode", None) not in _SHARED_MODES:
        return
    if not hasattr(mmap, "MADV_DONTNEED"):  # pragma: no cover - platforms without madvise
        return
    try:
        mapping.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):  # pragma: no cover - closed or unsupported mapping
        pass
