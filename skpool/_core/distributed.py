r"""Reducing separability statistics across processes with :mod:`torch.distributed`.

The statistics of separability pooling are sums over samples, so processes that each read a
shard of the data (one per GPU, node or file) can fit one operator together: each accumulates
its own :class:`~skpool._core.scatter.ChannelStatistics` and
:class:`~skpool._core.scatter.ScatterStatistics`, they are reduced here exactly, and the
solve is shared (each rank solves a slice of the output locations, then the rows are
gathered, so every rank ends with the same operator).

The reductions are centred, like the batch merges: with rank r holding :math:`n_{rq}` samples
of class q with mean :math:`\bar X_{rq}` and within-class scatter :math:`S_r`, the global
class mean is :math:`\bar X_q = \sum_r n_{rq} \bar X_{rq} / \sum_r n_{rq}` (one all-reduce of
the counts and class sums) and

.. math::

    B = \sum_r \Bigl[ S_r + \sum_q w_q\, n_{rq}
        (\bar X_{rq} - \bar X_q)(\bar X_{rq} - \bar X_q)^\top \Bigr]

(one all-reduce of the bracket, which each rank forms from its own statistics and the global
means): no uncentred second moment is formed. The channel statistics are gathered and merged
pairwise in rank order.
Every rank must call every function here, in the same order (they are collectives). The
tensors are reduced on their own device: use the ``gloo`` backend for CPU statistics and
``nccl`` for CUDA ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .scatter import ChannelStatistics, ScatterStatistics

__all__ = [
    "is_initialized",
    "world_size",
    "rank",
    "all_reduce_channel_statistics",
    "all_reduce_scatter_statistics",
    "all_gather_objects",
    "all_gather_along",
]


def is_initialized() -> bool:
    """Whether a default :mod:`torch.distributed` process group is ready."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes of the default group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_initialized() else 0


def all_reduce_channel_statistics(stats: ChannelStatistics) -> ChannelStatistics:
    """Channel statistics of the union of every rank's data (the same on every rank).

    Gathers every rank's (count, mean, std) (2C + 1 numbers) and merges them in rank order
    with :meth:`ChannelStatistics.merge`, which, unlike a sum of squares, cannot overflow.
    """
    n_channels = stats.mean.shape[0]
    packed = torch.cat([stats.count.reshape(1), stats.mean, stats.std])
    pieces = [torch.empty_like(packed) for _ in range(world_size())]
    dist.all_gather(pieces, packed)
    total = None
    for piece in pieces:
        part = ChannelStatistics(piece[0], piece[1 : 1 + n_channels], piece[1 + n_channels :])
        total = part if total is None else total.merge(part)
    return total


def all_reduce_scatter_statistics(stats: ScatterStatistics) -> ScatterStatistics:
    """Scatter statistics of the union of every rank's data (the same on every rank).

    The class weights must already be the global ones (from the class sizes of all ranks).
    """
    n_classes, n_locations, n_channels = stats.means.shape
    local_counts = stats.counts
    sums = stats.means * local_counts[:, None, None]
    totals = torch.cat([local_counts, sums.reshape(-1)])
    dist.all_reduce(totals)
    counts = totals[:n_classes]
    means = totals[n_classes:].reshape(stats.means.shape) / counts.clamp_min(1)[:, None, None]
    # The rank's within-class scatter about the global class means: S_r + w_q n_rq d d^T.
    gain = (stats.class_weights * local_counts).sqrt()
    delta = (stats.means - means) * gain[:, None, None]  # zero for classes the rank lacks
    columns = delta.permute(1, 0, 2).reshape(n_locations, n_classes * n_channels)
    columns = columns.to(stats.within.dtype)  # the class means may be kept in float64
    within = stats.within + columns @ columns.T
    dist.all_reduce(within)
    return ScatterStatistics(counts, means, within, stats.class_weights)


def all_gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (small picklable metadata only)."""
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_along(tensor: torch.Tensor, dim: int, sizes: list[int]) -> torch.Tensor:
    """Concatenate, along ``dim`` and in rank order, every rank's ``tensor``.

    Rank r's tensor has ``sizes[r]`` entries along ``dim`` (the other dimensions agree); it is
    padded to the largest size for the collective and trimmed afterwards.
    """
    largest = max(sizes)
    padding = list(tensor.shape)
    padding[dim] = largest - tensor.shape[dim]
    padded = torch.cat([tensor, tensor.new_zeros(padding)], dim=dim).contiguous()
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([piece.narrow(dim, 0, size) for piece, size in zip(pieces, sizes)], dim=dim)
