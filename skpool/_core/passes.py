r"""The passes of the separability fit over the data, and what they know of it.

- :class:`DataSummary`: the plain description of the data the passes need before any scatter
  is accumulated — the grid (H, W), the channels C, the classes and their sizes — merged over
  the processes of a distributed fit;
- pass 1: per-channel statistics in float64 (:func:`channel_pass` when the class sizes are
  known, :func:`first_pass` when they are counted on the way);
- pass 2: class means and within-class scatter of the normalised batches
  (:func:`scatter_statistics` of :func:`labelled` batches).

Batches are given as ``(sample indices, tensor (b, N, C))`` pairs on the device. Progress:
``progress(description, total, unit)`` returns a context manager with ``update(n)`` (a tqdm
class fits); None is silent (:func:`progress_bar`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from . import distributed as dist
from .scatter import ChannelStatistics, ScatterStatistics, standardise

__all__ = [
    "DataSummary",
    "add_label_counts",
    "codes_of",
    "progress_bar",
    "channel_statistics",
    "scatter_statistics",
    "labelled",
    "first_pass",
    "channel_pass",
]

Progress = Callable[[str, "int | None", str], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class DataSummary:
    """What the passes need to know about the data before the scatter statistics.

    grid_shape, n_channels : the samples' grid (H, W) and channels C
    classes, counts : the sorted classes (Q,) and their sizes (Q,) in all the data (all ranks)
    local_counts : the class sizes (Q,) in this process's data
    float32_data : whether every sample was float32 (or narrower) in every process: the
        solve's precision when ``dtype="auto"``
    """

    grid_shape: tuple[int, int]
    n_channels: int
    classes: np.ndarray
    counts: np.ndarray
    local_counts: np.ndarray
    float32_data: bool = False

    @classmethod
    def of(cls, grid_shape, n_channels: int, classes, counts, float32_data=False) -> DataSummary:
        """The summary of one process's data (classes sorted, with their counts)."""
        return cls(tuple(grid_shape), int(n_channels), classes, counts, counts, float32_data)

    @property
    def n_locations(self) -> int:
        return self.grid_shape[0] * self.grid_shape[1]

    def merge(self, summaries: list[DataSummary]) -> DataSummary:
        """The union of every rank's summary (``summaries``, in rank order), seen from this
        rank's; every rank must have the same grid and channels."""
        classes, counts = None, None
        float32_data = all(other.float32_data for other in summaries)
        for rank, other in enumerate(summaries):
            if (other.grid_shape, other.n_channels) != (self.grid_shape, self.n_channels):
                raise ValueError(
                    f"Rank {rank} has a {other.grid_shape[0]}x{other.grid_shape[1]} grid with "
                    f"{other.n_channels} channels, this rank a {self.grid_shape[0]}x"
                    f"{self.grid_shape[1]} grid with {self.n_channels}; every rank must pass "
                    "data of the same shape."
                )
            classes, counts = add_label_counts(classes, counts, other.classes, other.counts)
        local_counts = np.zeros_like(counts)
        local_counts[np.searchsorted(classes, self.classes)] = self.local_counts
        return DataSummary(
            self.grid_shape, self.n_channels, classes, counts, local_counts, float32_data
        )

    def whole(self, distributed: bool) -> DataSummary:
        """The summary of all the data: with ``distributed``, merged over the ranks."""
        return self.merge(dist.all_gather_objects(self)) if distributed else self


def add_label_counts(classes, counts, labels, label_counts=None):
    """Merge labels (or unique labels with their counts) into sorted (classes, counts)."""
    if label_counts is None:
        labels, label_counts = np.unique(labels, return_counts=True)
    if classes is None:
        return labels, label_counts
    merged = np.union1d(classes, labels)
    total = np.zeros(len(merged), dtype=np.int64)
    np.add.at(total, np.searchsorted(merged, classes), counts)
    np.add.at(total, np.searchsorted(merged, labels), label_counts)
    return merged, total


def codes_of(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Codes in [0, Q) of labels that must all be among the (sorted) classes."""
    codes = np.searchsorted(classes, labels).clip(0, len(classes) - 1)
    unseen = classes[codes] != labels
    if np.any(unseen):
        raise ValueError(
            f"Label {labels[np.argmax(unseen)]!r} appears in the second pass over the batches "
            "but not in the first: both passes must yield the same samples."
        )
    return codes


def progress_bar(progress: Progress | None, description: str, total=None, unit="sample"):
    """``progress(description, total, unit)``, or a silent bar when ``progress`` is None."""
    if progress is None:
        return contextlib.nullcontext(_SilentBar())
    return progress(description, total, unit)


class _SilentBar:
    def update(self, n: int = 1) -> None:
        pass


def channel_statistics(batches: Iterable[torch.Tensor], bar=None) -> ChannelStatistics | None:
    """Per-channel count, mean and centred sum of squares of the batches (b, N, C).

    Always accumulated in float64 (the solve's dtype is used later): squared deviations of
    float32 maps beyond about 1e19 overflow float32, those below 1e-19 underflow it. None
    when ``batches`` yields nothing; ``bar.update(b)`` after every batch.
    """
    total = None
    for batch in batches:
        stats = ChannelStatistics.from_batch(batch.to(torch.float64))
        total = stats if total is None else total.merge(stats)
        if bar is not None:
            bar.update(batch.shape[0])
    return total


def scatter_statistics(batches, class_weights, mean, scale, dtype, bar=None):
    """Class means and within-class scatter of the normalised batches.

    ``batches`` yields (features (b, N, C), class codes (b,)); None when it yields nothing.
    The features are normalised with the float64 channel statistics in float64 (float64 data
    of magnitude 1e40, or channels with a mean of 1e8, would lose everything to a float32
    cast first); the class means stay in float64 and the within-class scatter is accumulated
    in ``dtype``, the solve's. ``bar.update(b)`` after every batch.
    """
    total = None
    for batch, labels in batches:
        normalised = standardise(batch.to(torch.float64), mean, scale)
        stats = ScatterStatistics.from_batch(normalised, labels, class_weights, dtype)
        total = stats if total is None else total.merge(stats)
        if bar is not None:
            bar.update(batch.shape[0])
    return total


def labelled(indexed_batches, codes: torch.Tensor):
    """(batch, class codes) of every ``(sample indices, batch)``, ``codes`` (n,) on the
    batches' device: what :func:`scatter_statistics` reads."""
    for index, batch in indexed_batches:
        yield batch, codes[torch.as_tensor(index, device=codes.device)]


def first_pass(batches, read, normalize_channels: bool, progress=None):
    """Pass 1 over batches whose class sizes are not known before: class sizes and channel
    statistics.

    ``batches`` yields ``(stacks, labels)``: a description of one batch (``grid_shape``,
    ``n_channels``, ``n_samples``) with its labels (b,); ``read(stacks)`` yields its
    ``(sample indices, tensor (b', N, C))`` on the device. Returns the summary of this
    process's data and its channel statistics (None without ``normalize_channels``).
    """
    first, channels, classes, counts, float32_data = None, None, None, None, True
    description = "class sizes" + (" and channel statistics" if normalize_channels else "")
    with progress_bar(progress, description) as bar:
        for stacks, labels in batches:
            first = stacks if first is None else first
            float32_data = float32_data and stacks.dtype != torch.float64
            classes, counts = add_label_counts(classes, counts, labels)
            if not normalize_channels:
                bar.update(stacks.n_samples)
                continue
            more = channel_statistics((batch for _, batch in read(stacks)), bar)
            channels = more if channels is None else channels.merge(more)
    if first is None:
        raise ValueError("batches yielded no (X_batch, y_batch) pair; nothing to fit.")
    summary = DataSummary.of(first.grid_shape, first.n_channels, classes, counts, float32_data)
    return summary, channels


def channel_pass(indexed_batches, total: int, progress=None) -> ChannelStatistics | None:
    """Pass 1 over data whose class sizes are known: the channel statistics of the
    ``(sample indices, batch)`` pairs, ``total`` samples in all."""
    with progress_bar(progress, "channel statistics", total) as bar:
        return channel_statistics((batch for _, batch in indexed_batches), bar)
