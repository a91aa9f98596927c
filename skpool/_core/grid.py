r"""The output grid of separability pooling: its shape, its cell centres and locality costs.

Input locations are the cells of an H×W grid, numbered row-major (``n = i*W + j``, the order of
``features.reshape(B, H*W, C)`` for channels-last maps); output locations are the cells of an
H'×W' grid, numbered the same way (``m = u*W' + v``). With a stride s,
:math:`H' = \lceil H/s \rceil` and :math:`W' = \lceil W/s \rceil`.

Output cell (u, v) is centred at the input coordinates (0-based, centre-aligned)

.. math::

    c_{uv} = \bigl((u + 0.5)\,H/H' - 0.5,\; (v + 0.5)\,W/W' - 0.5\bigr),

the centre of the 2×2 block it pools for stride 2, and its locality cost is the diagonal
:math:`C_m = \mathrm{diag}\bigl(\|(i, j) - c_m\|^2\bigr)` of squared distances from every input
location to that centre (Birodkar et al. 2019, Algorithm 1). The diagonals are returned as one
(M, N) tensor, never as M dense N×N matrices.

A truncated support of radius ρ keeps, for output cell m, the input locations within distance ρ
of its centre, i.e. where :math:`C_m[n, n] \le \rho^2` (:func:`support_within_radius`).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "output_grid_shape",
    "output_centres",
    "locality_costs",
    "average_pooling_operator",
    "inside_radius",
    "support_within_radius",
]


def output_grid_shape(
    grid_shape: tuple[int, int],
    stride: int | None = None,
    output_shape: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The output grid (H', W'): ``output_shape`` when given, else ``ceil((H, W) / stride)``.

    Raises ValueError for a non-positive stride, or an output grid that is empty or larger than
    the input grid (separability pooling does not upsample).
    """
    height, width = (int(v) for v in grid_shape)
    if output_shape is None:
        if stride is None or int(stride) < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}.")
        return math.ceil(height / int(stride)), math.ceil(width / int(stride))
    out_h, out_w = (int(v) for v in output_shape)
    if not (1 <= out_h <= height and 1 <= out_w <= width):
        raise ValueError(
            f"output_shape={tuple(output_shape)} must have 1 <= H' <= {height} and "
            f"1 <= W' <= {width} (the input grid is {height}x{width})."
        )
    return out_h, out_w


def output_centres(
    grid_shape: tuple[int, int],
    output_shape: tuple[int, int],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Centres of the output cells in input coordinates: Tensor of shape (M, 2), rows (row, col)."""
    rows = _axis_centres(grid_shape[0], output_shape[0], dtype, device)
    cols = _axis_centres(grid_shape[1], output_shape[1], dtype, device)
    return torch.cartesian_prod(rows, cols).reshape(-1, 2)


def locality_costs(
    grid_shape: tuple[int, int],
    output_shape: tuple[int, int],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Diagonals of the locality costs :math:`C_m`: Tensor of shape (M, N).

    ``costs[m, i*W + j]`` is the squared Euclidean distance from input location (i, j) to the
    centre of output cell m (see :func:`output_centres`).
    """
    height, width = grid_shape
    row_centres = _axis_centres(height, output_shape[0], dtype, device)
    col_centres = _axis_centres(width, output_shape[1], dtype, device)
    rows = torch.arange(height, dtype=dtype, device=device)
    cols = torch.arange(width, dtype=dtype, device=device)
    row_cost = (rows[None, :] - row_centres[:, None]).square()  # (H', H)
    col_cost = (cols[None, :] - col_centres[:, None]).square()  # (W', W)
    costs = row_cost[:, None, :, None] + col_cost[None, :, None, :]  # (H', W', H, W)
    return costs.reshape(output_shape[0] * output_shape[1], height * width)


def inside_radius(costs: torch.Tensor, radius: float) -> torch.Tensor:
    """Bool Tensor (M, N): input location n lies within ``radius`` of the centre of cell m.

    ``costs`` (M, N) are the squared distances of :func:`locality_costs`; a location exactly at
    the radius is inside (a relative tolerance of 1e-12 absorbs rounding of the squares). Any
    radius is accepted: one whose square is beyond the float range (1e300) squares to infinity
    (a float product, where ``**`` would raise OverflowError) and covers every location.
    """
    radius = float(radius)
    return costs <= radius * radius * (1 + 1e-12)


def support_within_radius(
    costs: torch.Tensor, radius: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors of the truncated supports of every output cell, padded to the largest.

    Parameters
    ----------
    costs : Tensor of shape (M, N)
        Squared distances (:func:`locality_costs`).
    radius : float
        In input pixels.

    Returns
    -------
    index : int64 Tensor of shape (M, n)
        Row m lists, in increasing order, the input locations within ``radius`` of cell m's
        centre, then (padding) other locations; n is the largest support.
    valid : bool Tensor of shape (M, n)
        False at the padding.
    """
    inside = inside_radius(costs, radius)
    sizes = inside.sum(dim=1)
    width = int(sizes.max()) if sizes.numel() else 0
    # A stable sort of "outside" flags puts each row's support first, in increasing order.
    index = torch.sort((~inside).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=costs.device)[None, :] < sizes[:, None]
    return index, valid


def average_pooling_operator(
    grid_shape: tuple[int, int],
    output_shape: tuple[int, int],
    *,
    stride: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Average pooling as an operator of shape (M, N): each row uniform over its cell's block.

    With ``stride`` s the block of output cell (u, v) is rows ``[u*s, (u+1)*s)`` and columns
    ``[v*s, (v+1)*s)``, clipped to the grid (``avg_pool2d(kernel_size=s, stride=s,
    ceil_mode=True)``). Without it the blocks are those of adaptive average pooling: rows
    ``[floor(u*H/H'), ceil((u+1)*H/H'))``, likewise for columns.
    """
    rows = _axis_blocks(grid_shape[0], output_shape[0], stride, dtype, device)  # (H', H)
    cols = _axis_blocks(grid_shape[1], output_shape[1], stride, dtype, device)  # (W', W)
    operator = rows[:, None, :, None] * cols[None, :, None, :]
    operator = operator.reshape(output_shape[0] * output_shape[1], -1)
    return operator / operator.sum(dim=1, keepdim=True)


def _axis_centres(size: int, out_size: int, dtype, device) -> torch.Tensor:
    cells = torch.arange(out_size, dtype=torch.float64, device=device)
    return ((cells + 0.5) * (size / out_size) - 0.5).to(dtype)


def _axis_blocks(size: int, out_size: int, stride: int | None, dtype, device) -> torch.Tensor:
    """Membership (out_size, size) of input positions in each output cell's block, as 0/1."""
    cells = torch.arange(out_size, device=device)[:, None]
    positions = torch.arange(size, device=device)[None, :]
    if stride is not None:
        inside = positions // int(stride) == cells
    else:  # adaptive pooling: start = floor(u*size/out), stop = ceil((u+1)*size/out)
        start = (cells * size) // out_size
        stop = -((-(cells + 1) * size) // out_size)
        inside = (positions >= start) & (positions < stop)
    return inside.to(dtype)
