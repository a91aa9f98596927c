r"""The fit protocol of separability pooling: passes over the data, merged statistics, the
distributed split of the output cells, and the solve.

Everything here works on plain descriptions — the grid (H, W), the channels C, the classes and
their sizes (:class:`DataSummary`), batches of stacks (b, N, C) as tensors and class codes —
and on the parameters in :class:`FitSettings`; validating the user's data is the estimator's
job (:class:`skpool.SeparabilityPooling`). The protocol:

1. **Summary** of the data before any scatter is accumulated (the class weights
   :math:`1/K_q` of B need the final class sizes): grid, channels, classes and counts, merged
   over the ranks (:meth:`DataSummary.merge`), then checked against the parameters
   (:func:`output_grid`).
2. **Pass 1** (with channel normalisation): per-channel statistics in float64
   (:func:`channel_statistics`), reduced over the ranks.
3. **Pass 2**: class means and within-class scatter of the normalised batches
   (:func:`scatter_statistics`), reduced over the ranks; the class sizes it saw must be those
   of pass 1.
4. **Solve** (:func:`fit_operator`): the output cells are split between the ranks, each solves
   its slice with :func:`~skpool._core.geneig.top_generalized_eigenvectors` and the rows are
   gathered; rows without class information get their cell's average-pooling row.

With ``distributed`` every rank runs every step (they are collectives) and a failure on one
rank is raised on all of them (:func:`on_every_rank`). Progress: every pass and the solve take
an optional ``progress`` factory, ``progress(description, total, unit)`` returning a context
manager with ``update(n)`` (a ``tqdm`` class fits); None is silent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .._fitted import FittedOperator
from . import distributed as dist
from .geneig import (
    fill_empty_rows,
    no_class_information,
    rows_without_class_information,
    top_generalized_eigenvectors,
)
from .grid import average_pooling_operator, locality_costs, output_grid_shape
from .scatter import (
    ChannelStatistics,
    ScatterStatistics,
    class_weights_from_counts,
    standardise,
)

__all__ = [
    "DataSummary",
    "FitSettings",
    "check_process_group",
    "on_every_rank",
    "output_grid",
    "channel_statistics",
    "scatter_statistics",
    "fit_operator",
    "add_label_counts",
    "codes_of",
    "progress_bar",
]

Progress = Callable[[str, "int | None", str], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class FitSettings:
    """The parameters of a fit, resolved: what the core needs of the estimator.

    ``output_shape`` is None or a checked pair; ``max_memory_bytes`` the solve's budget per
    chunk of cells; ``dtype`` the solve's (float32 or float64), ``device`` a torch device.
    """

    alpha: float
    stride: int
    output_shape: tuple[int, int] | None
    n_components: int
    norm: str
    normalize_channels: bool
    solver: str
    support_radius: float | None
    max_memory_bytes: int
    dtype: torch.dtype
    device: torch.device
    distributed: bool = False


@dataclass(frozen=True)
class DataSummary:
    """What the passes need to know about the data before the scatter statistics.

    grid_shape, n_channels : the samples' grid (H, W) and channels C
    classes, counts : the sorted classes (Q,) and their sizes (Q,) in all the data (all ranks)
    local_counts : the class sizes (Q,) in this process's data
    """

    grid_shape: tuple[int, int]
    n_channels: int
    classes: np.ndarray
    counts: np.ndarray
    local_counts: np.ndarray

    @classmethod
    def of(cls, grid_shape, n_channels: int, classes, counts) -> DataSummary:
        """The summary of one process's data (classes sorted, with their counts)."""
        return cls(tuple(grid_shape), int(n_channels), classes, counts, counts)

    @property
    def n_locations(self) -> int:
        return self.grid_shape[0] * self.grid_shape[1]

    def merge(self, summaries: list[DataSummary]) -> DataSummary:
        """The union of every rank's summary (``summaries``, in rank order), seen from this
        rank's; every rank must have the same grid and channels."""
        classes, counts = None, None
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
        return DataSummary(self.grid_shape, self.n_channels, classes, counts, local_counts)

    def whole(self, distributed: bool) -> DataSummary:
        """The summary of all the data: with ``distributed``, merged over the ranks."""
        return self.merge(dist.all_gather_objects(self)) if distributed else self


# --------------------------------------------------------------------------------------------
# Ranks
def check_process_group(distributed: bool) -> None:
    """``distributed=True`` needs a process group (checked before any collective)."""
    if distributed and not dist.is_initialized():
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group) in every process; none is initialised."
        )


def on_every_rank(step: Callable, distributed: bool):
    """``step()``; with ``distributed``, every rank raises when any rank's step failed.

    Without this a rank that fails before a collective would leave the others waiting in it.
    The failing rank raises its own error, the others a RuntimeError naming it.
    """
    if not distributed:
        return step()
    try:
        result, error = step(), None
    except Exception as exc:  # re-raised below, here or on the other ranks
        result, error = None, exc
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = dist.all_gather_objects(message)
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise RuntimeError(f"SeparabilityPooling.fit failed on rank {rank}: {message}")
    return result


# --------------------------------------------------------------------------------------------
# Checks of the data against the parameters
def output_grid(summary: DataSummary, settings: FitSettings) -> tuple[int, int]:
    """Check the data against the parameters before reading it; return the output grid."""
    if len(summary.classes) < 2:
        raise ValueError(
            "SeparabilityPooling needs samples of at least two classes to measure "
            f"separability; got 1 class ({summary.classes[0]})."
        )
    out_shape = output_grid_shape(summary.grid_shape, settings.stride, settings.output_shape)
    if settings.n_components > summary.n_locations:
        raise ValueError(
            f"n_components={settings.n_components} exceeds the {summary.n_locations} input "
            "locations per sample."
        )
    return out_shape


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


# --------------------------------------------------------------------------------------------
# The passes
def progress_bar(progress: Progress | None, description: str, total=None, unit="sample"):
    """``progress(description, total, unit)``, or a silent bar when ``progress`` is None."""
    if progress is None:
        return contextlib.nullcontext(_SilentBar())
    return progress(description, total, unit)


class _SilentBar:
    def update(self, n: int = 1) -> None:
        pass


def channel_statistics(batches: Iterable[torch.Tensor], bar=None) -> ChannelStatistics | None:
    """Pass 1: per-channel count, mean and centred sum of squares of the batches (b, N, C).

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
    """Pass 2: class means and within-class scatter of the normalised batches.

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


# --------------------------------------------------------------------------------------------
# From the passes to the operator
def fit_operator(
    summary: DataSummary,
    channels: ChannelStatistics | None,
    scatter_pass: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    settings: FitSettings,
    progress: Progress | None = None,
) -> FittedOperator:
    """Reduce the channel statistics, run pass 2 (``scatter_pass()`` yields (batch, codes)),
    solve, and return the fitted operator (numpy arrays, without ``params``).

    ``summary`` is the whole data's (:meth:`DataSummary.whole`), ``channels`` this rank's
    pass-1 statistics (None without channel normalisation).
    """
    device, dtype, distributed = settings.device, settings.dtype, settings.distributed
    if channels is None:
        mean = torch.zeros(summary.n_channels, dtype=torch.float64, device=device)
        scale = torch.ones_like(mean)
    else:
        if distributed:
            channels = dist.all_reduce_channel_statistics(channels)
        # float64 whatever the solve's dtype (only C numbers each): the features are
        # normalised in float64 and only then rounded to the solve's dtype
        mean, scale = channels.mean, channels.scale
    grid, out_shape = summary.grid_shape, output_grid(summary, settings)
    weights = class_weights_from_counts(
        torch.as_tensor(summary.counts, dtype=torch.float64, device=device)
    )

    def second_pass():
        total = int(summary.local_counts.sum())
        with progress_bar(progress, "scatter statistics", total) as bar:
            stats = scatter_statistics(scatter_pass(), weights, mean, scale, dtype, bar)
        _check_same_counts(stats, summary)
        return stats

    stats = on_every_rank(second_pass, distributed)
    if distributed:
        stats = dist.all_reduce_scatter_statistics(stats)
    _check_statistics(stats, settings)
    factor, noise = stats.between_factor(), stats.between_noise()
    if no_class_information(factor, noise):  # every row would be rounding noise
        cells, locations = out_shape[0] * out_shape[1], grid[0] * grid[1]
        operator = stats.within.new_zeros((settings.n_components, cells, locations))
        eigenvalues = torch.zeros(operator.shape[:2], dtype=torch.float64, device=device)
    else:
        operator, eigenvalues = _solve(stats, factor, grid, out_shape, settings, progress)
    # Rows that see no class information beyond the rounding of A get the cell's
    # average-pooling row, whatever the rounding fell like (batch size, sample order).
    empty = rows_without_class_information(operator, factor, noise)
    stride = settings.stride if settings.output_shape is None else None
    average = average_pooling_operator(
        grid, out_shape, stride=stride, dtype=operator.dtype, device=operator.device
    )
    operator = fill_empty_rows(operator, average, settings.norm, empty)
    eigenvalues = torch.where(empty, 0.0, eigenvalues)
    return FittedOperator(
        operator=operator.cpu().numpy(),
        channel_mean=mean.cpu().double().numpy(),
        channel_scale=scale.cpu().double().numpy(),
        grid_shape=grid,
        output_shape=out_shape,
        classes=summary.classes,
        eigenvalues=eigenvalues.cpu().numpy(),
    )


def _check_same_counts(stats: ScatterStatistics | None, summary: DataSummary) -> None:
    seen = np.zeros(0) if stats is None else stats.counts.cpu().numpy()
    if not np.array_equal(seen, summary.local_counts):
        raise ValueError(
            "The batches changed between the two passes over the data (class sizes "
            f"{summary.local_counts.tolist()} in pass 1, "
            f"{seen.astype(np.int64).tolist()} in pass 2). "
            "Both passes must yield the same samples; random augmentation or "
            "drop_last with shuffling break this."
        )


def _check_statistics(stats: ScatterStatistics, settings: FitSettings) -> None:
    """The scatter statistics must be finite (normalised features always are)."""
    if bool(torch.isfinite(stats.within).all()) and bool(torch.isfinite(stats.means).all()):
        return
    remedies = [] if settings.dtype == torch.float64 else ["dtype='float64'"]
    remedies += [] if settings.normalize_channels else ["normalize_channels=True"]
    raise ValueError(
        f"The within-class scatter of the features overflows {str(settings.dtype)[6:]} "
        f"(features of too large a magnitude); use {' or '.join(remedies) or 'smaller features'}."
    )


def _solve(stats, factor, grid, out_shape, settings: FitSettings, progress):
    """The operator (k, M, N) and ratios (k, M); distributed: each rank solves a slice of the
    output cells and the slices are gathered in rank order."""
    device, k = settings.device, settings.n_components
    costs = locality_costs(grid, out_shape, dtype=settings.dtype, device=device)
    ranks = dist.world_size() if settings.distributed else 1
    cells = torch.arange(costs.shape[0]).tensor_split(ranks)
    mine = cells[dist.rank()]

    def solve():
        if mine.numel() == 0:  # more ranks than output cells
            return (
                stats.within.new_zeros((k, 0, costs.shape[1])),
                torch.zeros((k, 0), dtype=torch.float64, device=device),
            )
        with progress_bar(progress, "solve", mine.numel(), "cell") as bar:
            # the bar goes to the solve only when there is one to show
            shown = {} if progress is None else {"progress": bar}
            return top_generalized_eigenvectors(
                factor,
                stats.within,
                costs[mine.to(device)],
                float(settings.alpha),
                int(k),
                norm=settings.norm,
                method=settings.solver,
                support_radius=settings.support_radius,
                max_memory_bytes=settings.max_memory_bytes,
                **shown,
            )

    operator, eigenvalues = on_every_rank(solve, settings.distributed)
    if ranks > 1:
        sizes = [part.numel() for part in cells]
        operator = dist.all_gather_along(operator, 1, sizes)
        eigenvalues = dist.all_gather_along(eigenvalues, 1, sizes)
    return operator, eigenvalues

