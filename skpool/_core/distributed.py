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
Every rank must call every function here, in the same order (they are collectives).

Where the tensors are reduced (:func:`communication_device`): on their own device when the
group has a backend for it, else copied to one it has and back. ``gloo`` takes CPU tensors
(its CUDA support lacks ``all_gather``), ``nccl`` CUDA ones, on the current CUDA device
(each process sets its own with :func:`torch.cuda.set_device`, as NCCL needs anyway); a
group initialised without a backend (``cpu:gloo,cuda:nccl``) has both. So a CPU fit runs
under NCCL and a CUDA fit under gloo, at the cost of a copy of the statistics (an N×N matrix
and the class means) per reduction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .scatter import ChannelStatistics, ScatterStatistics

__all__ = [
    "is_initialized",
    "backend_devices",
    "communication_device",
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


#: The device types whose tensors each backend's ``all_reduce`` and ``all_gather`` take.
BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",), "mpi": ("cpu",), "ucc": ("cpu", "cuda")}


def backend_devices() -> dict[str, str]:
    """Device type -> backend of the default group: ``{"cpu": "gloo"}`` for a gloo group,
    ``{"cuda": "nccl"}`` for an NCCL one, both for ``"cpu:gloo,cuda:nccl"`` and for a group
    initialised without a backend (``"undefined"``: torch's default backend per device)."""
    name = str(dist.get_backend()).lower()
    if ":" in name:  # "cpu:gloo,cuda:nccl"
        return dict(part.split(":", 1) for part in name.split(","))
    if name == "undefined":
        return dict(dist.Backend.default_device_backend_map)
    return {device: name for device in BACKEND_DEVICES.get(name, ("cpu",))}


def communication_device(device: torch.device) -> torch.device:
    """Where tensors on ``device`` are reduced: ``device`` itself when the default group has a
    backend for its type, else the current CUDA device for a CUDA-only group (NCCL), else the
    CPU. The one place that decides; the tests patch :func:`backend_devices` and
    :func:`current_cuda_device` to take the NCCL branch on the CPU."""
    backends = backend_devices()
    if device.type in backends:
        return device
    if "cpu" not in backends and "cuda" in backends:
        return current_cuda_device()
    return torch.device("cpu")


def current_cuda_device() -> torch.device:
    """The CUDA device NCCL reduces on in this process (a real CUDA call)."""
    return torch.device("cuda", torch.cuda.current_device())


def _reduced(tensor: torch.Tensor, collective) -> torch.Tensor:
    """``collective(t)`` on ``tensor`` copied to the :func:`communication_device` (in place
    on ``tensor`` itself where that is its own device), the result back on its device."""
    there = communication_device(tensor.device)
    if there == tensor.device:
        collective(tensor)
        return tensor
    moved = tensor.to(there)
    collective(moved)
    return moved.to(tensor.device)


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on every rank), in rank order, on its device."""
    there = communication_device(tensor.device)
    moved = tensor.to(there).contiguous()
    pieces = [torch.empty_like(moved) for _ in range(world_size())]
    dist.all_gather(pieces, moved)
    return [piece.to(tensor.device) for piece in pieces]


def all_reduce_channel_statistics(stats: ChannelStatistics) -> ChannelStatistics:
    """Channel statistics of the union of every rank's data (the same on every rank).

    Gathers every rank's (count, mean, std) (2C + 1 numbers) and merges them in rank order
    with :meth:`ChannelStatistics.merge`, which, unlike a sum of squares, cannot overflow.
    """
    n_channels = stats.mean.shape[0]
    packed = torch.cat([stats.count.reshape(1), stats.mean, stats.std])
    total = None
    for piece in _all_gather(packed):
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
    totals = _reduced(torch.cat([local_counts, sums.reshape(-1)]), dist.all_reduce)
    counts = totals[:n_classes]
    means = totals[n_classes:].reshape(stats.means.shape) / counts.clamp_min(1)[:, None, None]
    # The rank's within-class scatter about the global class means: S_r + w_q n_rq d d^T.
    gain = (stats.class_weights * local_counts).sqrt()
    delta = (stats.means - means) * gain[:, None, None]  # zero for classes the rank lacks
    columns = delta.permute(1, 0, 2).reshape(n_locations, n_classes * n_channels)
    columns = columns.to(stats.within.dtype)  # the class means may be kept in float64
    within = _reduced(stats.within + columns @ columns.T, dist.all_reduce)
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
    padded = torch.cat([tensor, tensor.new_zeros(padding)], dim=dim)
    pieces = _all_gather(padded)
    return torch.cat([piece.narrow(dim, 0, size) for piece, size in zip(pieces, sizes)], dim=dim)
