r"""The fit protocol of separability pooling, from the user's data to the fitted operator.

On plain descriptions (:mod:`skpool._core.passes`: the grid, channels, classes and counts,
batches of tensors) and the parameters in :class:`FitSettings`; validating the user's data
is the caller's job (:class:`skpool.SeparabilityPooling`), given here as functions. The
protocol:

1. **Summary** of the data before any scatter is accumulated (the class weights
   :math:`1/K_q` of B need the final class sizes): merged over the ranks, then checked
   against the parameters (:func:`output_grid`) before the data are read — for arrays
   (:func:`fit_stacks`) from the labels, for batches (:func:`fit_batches`) counted in pass 1.
2. **Pass 1** (with channel normalisation, or to count the classes): per-channel statistics
   in float64, reduced over the ranks.
3. **Pass 2**: class means and within-class scatter of the normalised batches, reduced over
   the ranks; the class sizes it saw must be those of pass 1.
4. **Solve** (:func:`fit_operator`): the output cells are split between the ranks, each solves
   its slice with :func:`~skpool._core.solve.top_generalized_eigenvectors` and the rows are
   gathered; rows without class information get their cell's average-pooling row.

With ``distributed`` every rank runs every step (they are collectives) and a failure on one
rank is raised on all of them (:func:`on_every_rank`). Every pass and the solve report to an
optional ``progress`` factory (:func:`skpool._core.passes.progress_bar`).
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .._device import resolve_device
from .._fitted import FittedOperator
from .._grid import check_grid
from . import distributed as dist
from ._precision import with_highest_matmul_precision
from .solve import (
    fill_empty_rows,
    no_class_information,
    rows_without_class_information,
    top_generalized_eigenvectors,
)
from .grid import average_pooling_operator, locality_costs, output_grid_shape
from .passes import (
    DataSummary,
    Progress,
    channel_pass,
    codes_of,
    first_pass,
    labelled,
    progress_bar,
    scatter_statistics,
)
from .scatter import ChannelStatistics, ScatterStatistics, class_weights_from_counts

__all__ = [
    "DTYPES",
    "FitSettings",
    "check_process_group",
    "on_every_rank",
    "output_grid",
    "fit_stacks",
    "fit_batches",
    "fit_operator",
]

#: The solve's dtype of each value of the ``dtype`` parameter.
#: The solve's precision; "auto" (None here) follows the data: float32 when every sample is
#: float32 (or narrower), float64 otherwise (see :attr:`FitSettings.dtype`).
DTYPES = {"auto": None, "float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class FitSettings:
    """The parameters of a fit, resolved: what the core needs of the estimator.

    ``output_shape`` is None or a checked pair; ``max_memory_bytes`` the solve's budget per
    chunk of cells (None: from the device's free memory when the solve starts); ``dtype``
    the solve's (float32 or float64), ``device`` a torch device.
    """

    alpha: float
    stride: int
    output_shape: tuple[int, int] | None
    n_components: int
    norm: str
    normalize_channels: bool
    solver: str
    support_radius: float | None
    max_memory_bytes: int | None
    dtype: torch.dtype | None  # None: follow the data (DataSummary.float32_data)
    device: torch.device
    distributed: bool = False

    @classmethod
    def from_params(cls, params: dict) -> FitSettings:
        """The settings of :class:`skpool.SeparabilityPooling`'s (checked) parameters: the
        device resolved, the output grid checked, the memory budget in bytes."""
        return cls(
            alpha=float(params["alpha"]),
            stride=int(params["stride"]),
            output_shape=check_grid(params["output_shape"], "output_shape", optional=True),
            n_components=int(params["n_components"]),
            norm=params["norm"],
            normalize_channels=bool(params["normalize_channels"]),
            solver=params["solver"],
            support_radius=params["support_radius"],
            max_memory_bytes=(None if params["max_memory_mb"] is None
                              else int(params["max_memory_mb"] * 2**20)),
            dtype=DTYPES[params["dtype"]],
            device=resolve_device(params["device"]),
            distributed=bool(params["distributed"]),
        )


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
# The protocol
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


@with_highest_matmul_precision
def fit_stacks(validate: Callable, read: Callable, distributed: bool, progress=None):
    """Fit on data whose labels are known up front (arrays, memmaps, tensors).

    ``validate()`` (run on every rank) returns ``(settings, stacks, labels)``: the
    :class:`FitSettings`, a description of the data (``grid_shape``, ``n_channels``,
    ``n_samples``) and its labels (n,); ``read(stacks, device)`` yields its
    ``(sample indices, batch)`` pairs. Returns the :class:`FittedOperator` (without params).
    """

    def summarise():
        settings, stacks, labels = validate()
        classes, counts = np.unique(labels, return_counts=True)
        summary = DataSummary.of(
            stacks.grid_shape, stacks.n_channels, classes, counts,
            float32_data=stacks.dtype != torch.float64,
        )
        return settings, stacks, labels, summary

    settings, stacks, labels, summary = on_every_rank(summarise, distributed)
    summary = summary.whole(distributed)
    output_grid(summary, settings)  # before any data is read
    batches = partial(read, stacks, settings.device)
    channels = None
    if settings.normalize_channels:
        pass_1 = partial(channel_pass, batches(), stacks.n_samples, progress)
        channels = on_every_rank(pass_1, distributed)
    codes = torch.as_tensor(np.searchsorted(summary.classes, labels), device=settings.device)
    return fit_operator(summary, channels, partial(labelled, batches(), codes), settings, progress)


@with_highest_matmul_precision
def fit_batches(start: Callable, batches: Callable, read: Callable, distributed: bool,
                progress=None):
    """Fit on batches read twice, whose class sizes are counted in pass 1.

    ``start()`` (run on every rank) returns ``(settings, start_pass)``; ``batches(start_pass,
    summary)`` yields the validated ``(stacks, labels)`` of one pass (``summary`` None in
    pass 1, the first pass's afterwards); ``read(stacks, device)`` yields a batch's
    ``(sample indices, batch)`` pairs. Returns the :class:`FittedOperator` (without params).
    """

    def pass_1():
        settings, start_pass = start()
        read_on_device = partial(read, device=settings.device)
        summary, channels = first_pass(
            batches(start_pass, None), read_on_device, settings.normalize_channels, progress
        )
        return settings, start_pass, summary, channels

    settings, start_pass, summary, channels = on_every_rank(pass_1, distributed)
    summary = summary.whole(distributed)

    def scatter_pass():
        for stacks, labels in batches(start_pass, summary):
            codes = torch.as_tensor(codes_of(labels, summary.classes), device=settings.device)
            yield from labelled(read(stacks, settings.device), codes)

    return fit_operator(summary, channels, scatter_pass, settings, progress)


@with_highest_matmul_precision
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
    if settings.dtype is None:  # "auto": the data's precision
        float32 = torch.float32 if summary.float32_data else torch.float64
        settings = dataclasses.replace(settings, dtype=float32)
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

