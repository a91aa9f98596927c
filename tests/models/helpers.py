"""Shared by the model tests (``models.helpers``)."""

import torch

from skpool.nn import SeparabilityPool2d


def random_layer(k, grid, seed=0, stats_channels=None):
    """A SeparabilityPool2d with a random (k, M, N) operator for a stride-2 point on ``grid``,
    with random channel statistics for ``stats_channels`` channels if given."""
    out = (-(-grid[0] // 2), -(-grid[1] // 2))
    generator = torch.Generator().manual_seed(seed)
    operator = torch.randn(k, out[0] * out[1], grid[0] * grid[1], generator=generator)
    stats = ()
    if stats_channels is not None:
        stats = (torch.randn(stats_channels, generator=generator),
                 torch.rand(stats_channels, generator=generator) + 0.5)
    return SeparabilityPool2d(operator, *stats, output_shape=out, grid_shape=grid)
