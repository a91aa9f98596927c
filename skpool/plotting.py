"""Pictures of what the pooling operators do (needs matplotlib: ``pip install "skpool[plot]"``).

- :func:`plot_operator` — a learned separability pooling operator as heatmaps of its rows at
  evenly spaced output cells (Birodkar et al. 2019, Figure 1a), in a signed colour map centred
  at 0, each cell's centre marked.
- :func:`plot_gmp_weights` — the weight of every location in a generalized max pooled vector,
  next to the image the feature map came from.

Both return a :class:`matplotlib.figure.Figure` (made with pyplot, so notebooks show it) and
never call ``show()``; save it with ``fig.savefig(...)`` and close it with
``matplotlib.pyplot.close(fig)``. The numbers come from the estimators and the core: nothing
is recomputed here. Figures stay a readable size: :func:`plot_gmp_weights` draws at most
``max_images`` rows (8 by default) and :func:`plot_operator` at most ``max_panels`` panels
(64 by default); pass ``None`` to lift either limit.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ._core.gmp import generalized_max_pool_weights
from ._core.grid import output_centres
from ._grid import check_grid
from ._parameters import check_integer

__all__ = ["plot_operator", "plot_gmp_weights"]

#: Output grids up to this size per axis are shown whole by default.
_ALL_CELLS_UP_TO = 5
#: Default limits on the figure's size: rows of plot_gmp_weights, panels of plot_operator.
_MAX_IMAGES = 8
_MAX_PANELS = 64


def plot_operator(
    operator,
    locations=None,
    *,
    component: int = 0,
    grid_shape: tuple[int, int] | None = None,
    output_shape: tuple[int, int] | None = None,
    cmap: str = "RdBu_r",
    colorbar: bool = True,
    panel_size: float = 1.6,
    title: str | None = None,
    max_panels: int | None = _MAX_PANELS,
):
    """Heatmaps of a separability pooling operator's rows at evenly spaced output cells.

    Row m of the operator (N weights) is drawn on the H×W input grid: where output cell m takes
    its input from, and with which sign. The colour scale is shared by all panels and symmetric
    about 0 (red positive, blue negative with the default map); a black ``+`` marks the cell's
    centre in input coordinates.

    Parameters
    ----------
    operator : fitted SeparabilityPooling, FittedOperator, SeparabilityPool2d, or array
        An array (or tensor) of shape (k, M, N) or (M, N) needs ``grid_shape`` and
        ``output_shape`` unless both grids are square.
    locations : None, int, (int, int), "all", or sequence of (u, v)
        Which output cells to show: an ``r`` or ``(r, c)`` picks r×c cells evenly spaced over
        the output grid (laid out as on the grid), ``"all"`` every cell, a list of ``(u, v)``
        pairs those cells (in a row). None: every cell of grids up to 5×5, else 4×4 evenly
        spaced ones.
    component : int, default=0
        Which of the k components (eigenvectors) to show.
    grid_shape, output_shape : (int, int), optional
        The input grid (H, W) and output grid (H', W') of an array ``operator``.
    cmap : str, default="RdBu_r"
        A diverging colour map.
    colorbar : bool, default=True
    panel_size : float, default=1.6
        Size of one panel in inches.
    title : str, optional
        Figure title; by default it names the grids and the component.
    max_panels : int or None, default=64
        Most panels (output cells) to draw; asking for more (``"all"`` on a large output grid,
        a large count or list) is a ValueError, since the figure grows with the panels
        (``panel_size`` inches each). None: no limit.

    Returns
    -------
    matplotlib.figure.Figure
        Its first axes are the heatmaps, row-major; the colorbar's axes (if any) come last.
    """
    plt = _pyplot()
    weights, grid, out = _operator_and_grids(operator, grid_shape, output_shape)
    if not 0 <= component < weights.shape[0]:
        raise ValueError(
            f"component={component} is out of range: the operator has {weights.shape[0]} "
            "component(s)."
        )
    layout = _cell_layout(locations, out)
    n_panels = sum(len(row) for row in layout)
    if max_panels is not None:
        max_panels = check_integer("max_panels", max_panels)
    if max_panels is not None and n_panels > max_panels:
        raise ValueError(
            f"locations={locations!r} asks for {n_panels} panels of the {out[0]}x{out[1]} "
            f"output grid, more than max_panels={max_panels}: pick fewer cells (e.g. "
            "locations=(8, 8), evenly spaced) or pass max_panels=None."
        )
    centres = output_centres(grid, out).numpy()
    shown = [weights[component, u * out[1] + v] for row in layout for (u, v) in row]
    limit = max(float(np.abs(np.stack(shown)).max()), np.finfo(float).tiny)

    n_rows, n_cols = len(layout), max(len(row) for row in layout)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(panel_size * n_cols + (1.0 if colorbar else 0.2), panel_size * n_rows + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for r, row in enumerate(layout):
        for c in range(n_cols):
            ax = axes[r, c]
            if c >= len(row):
                ax.set_axis_off()
                continue
            u, v = row[c]
            m = u * out[1] + v
            image = ax.imshow(
                weights[component, m].reshape(grid),
                cmap=cmap,
                vmin=-limit,
                vmax=limit,
                interpolation="nearest",
            )
            ax.plot(centres[m, 1], centres[m, 0], marker="+", color="black", markersize=9,
                    markeredgewidth=1.6)
            ax.set_title(f"cell ({u}, {v})", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if colorbar:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="weight")
    if title is None:
        title = (
            f"Separability pooling operator, component {component}: "
            f"{grid[0]}x{grid[1]} input -> {out[0]}x{out[1]} output"
        )
    fig.suptitle(title, fontsize=10)
    return fig


def plot_gmp_weights(
    image,
    feature_map,
    lam,
    *,
    overlay: bool = False,
    image_cmap: str = "gray_r",
    cmap: str = "RdBu_r",
    colorbar: bool = True,
    panel_size: float = 2.2,
    title: str | None = None,
    max_images: int | None = _MAX_IMAGES,
):
    r"""The weight of every location in generalized max pooling, next to the image.

    GMP's pooled vector is a weighted sum of the local descriptors, :math:`\xi = \sum_i w_i
    \phi_i` with :math:`w = (\Phi\Phi^\top + \lambda I)^{-1} 1_N` (Murray & Perronnin 2014):
    frequent descriptors get small weights, rare distinctive ones large weights, and with a
    large λ all weights become equal (sum pooling). Each weight map is drawn over the image's
    extent (the feature map's cells cover the image), in a signed colour map centred at 0.
    Locations whose descriptor is all zero (e.g. dead ReLU cells) are drawn grey: they add
    nothing to the pooled vector whatever their weight, and are left out of the colour scale.

    Parameters
    ----------
    image : array of shape (h, w) or (h, w, 3|4), or a batch (n, h, w[, 3|4])
        What the feature map was computed from (any resolution).
    feature_map : array or tensor of shape (H, W, C), or a batch (n, H, W, C)
        Channels last. One image per feature map.
    lam : float or sequence of floats
        The ridge λ > 0; one weight panel per value.
    overlay : bool, default=False
        Draw each weight map semi-transparently over the (grey) image instead of alone.
    image_cmap, cmap : str
        Colour maps of a single-channel image and of the weights (diverging).
    colorbar : bool, default=True
        A colorbar next to every weight panel.
    panel_size : float, default=2.2
        Size of one panel in inches.
    title : str, optional
    max_images : int or None, default=8
        Most images (rows) to draw: of a larger batch only the first ``max_images`` are drawn
        (and their weights computed), with a warning, so a batch of 200 does not become a
        440-inch figure. None draws every image.

    Returns
    -------
    matplotlib.figure.Figure
        One row per drawn image: the image, then one weight panel per λ (then the colorbars'
        axes).
    """
    plt = _pyplot()
    if torch.is_tensor(feature_map):
        feature_map = feature_map.detach().cpu().numpy()
    maps = torch.from_numpy(np.array(feature_map, dtype=np.float64))
    single = maps.ndim == 3
    if single:
        maps = maps[None]
    if maps.ndim != 4:
        raise ValueError(
            f"feature_map must have shape (H, W, C) or (n, H, W, C), got {tuple(maps.shape)}."
        )
    images = np.asarray(image)
    if single:
        images = images[None]
    if len(images) != len(maps) or images.ndim not in (3, 4):
        raise ValueError(
            f"image {np.asarray(image).shape} does not match feature_map "
            f"{np.shape(feature_map)}: give one (h, w) or (h, w, 3) image per map."
        )
    lams = [float(v) for v in np.atleast_1d(lam)]
    if min(lams) <= 0:
        raise ValueError(f"lam must be > 0, got {lam!r}.")
    if max_images is not None:
        max_images = check_integer("max_images", max_images)
        if len(maps) > max_images:
            warnings.warn(
                f"plot_gmp_weights draws the first {max_images} of {len(maps)} images "
                "(max_images); pass max_images=None to draw them all, or a slice.",
                UserWarning,
                stacklevel=2,
            )
            maps, images = maps[:max_images], images[:max_images]
    n, height, width, channels = maps.shape
    stacks = maps.reshape(n, height * width, channels)
    weights = [
        generalized_max_pool_weights(stacks, value).reshape(n, height, width).numpy()
        for value in lams
    ]
    # A zero descriptor contributes nothing to xi whatever its weight (it is 1/lam there):
    # grey it out, and leave it out of the colour scale.
    empty = (maps == 0).all(dim=-1).numpy()
    palette = plt.get_cmap(cmap).with_extremes(bad="0.8")

    n_cols = 1 + len(lams)
    fig, axes = plt.subplots(
        n,
        n_cols,
        figsize=(panel_size * n_cols * (1.25 if colorbar else 1.0), panel_size * n + 0.5),
        squeeze=False,
        layout="constrained",
    )
    for row in range(n):
        picture = images[row]
        extent = (-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5)
        grey = picture.ndim == 2
        axes[row, 0].imshow(picture, cmap=image_cmap if grey else None, interpolation="nearest")
        axes[row, 0].set_title("image" if row == 0 else "", fontsize=9)
        for col, value in enumerate(lams, start=1):
            ax = axes[row, col]
            w = np.ma.masked_array(weights[col - 1][row], mask=empty[row])
            limit = float(np.abs(w).max()) if w.count() else 0.0
            limit = max(limit, np.finfo(float).tiny)
            if overlay:
                ax.imshow(picture, cmap=image_cmap if grey else None, interpolation="nearest")
            shown = ax.imshow(
                w,
                cmap=palette,
                vmin=-limit,
                vmax=limit,
                extent=extent,
                alpha=0.6 if overlay else 1.0,
                interpolation="nearest",
            )
            if colorbar:
                fig.colorbar(shown, ax=ax, shrink=0.8, format="%.2g")
            if row == 0:
                ax.set_title(f"GMP weights, λ = {value:g}", fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or "Generalized max pooling: weight of each location", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "skpool.plotting needs matplotlib: pip install 'skpool[plot]' "
            "(or pip install matplotlib)."
        ) from exc
    return plt


def _operator_and_grids(operator, grid_shape, output_shape):
    """(k, M, N) numpy weights, input grid (H, W) and output grid (H', W') of any operator."""
    if hasattr(operator, "operator_"):  # fitted SeparabilityPooling
        operator = operator.fitted_operator_
    if hasattr(operator, "operator") and hasattr(operator, "output_shape"):
        # FittedOperator or SeparabilityPool2d
        weights, grid, out = operator.operator, operator.grid_shape, operator.output_shape
        grid = grid if grid is not None else grid_shape
    else:
        weights, grid, out = operator, grid_shape, output_shape
    if torch.is_tensor(weights):
        weights = weights.detach().cpu().numpy()
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim == 2:
        weights = weights[None]
    if weights.ndim != 3:
        raise ValueError(f"operator must have shape (k, M, N) or (M, N), got {weights.shape}.")
    grid = _grid_or_square("grid_shape", grid, weights.shape[2])
    out = _grid_or_square("output_shape", out, weights.shape[1])
    return weights, grid, out


def _grid_or_square(name: str, shape, size: int) -> tuple[int, int]:
    """``shape`` checked to hold ``size`` cells; None: the square grid of ``size`` cells."""
    if shape is None:
        side = int(round(size**0.5))
        if side * side != size:
            raise ValueError(f"give {name}: {size} cells do not make a square grid.")
        return side, side
    return check_grid(shape, name, n_locations=size)


def _cell_layout(locations, out: tuple[int, int]) -> list[list[tuple[int, int]]]:
    """Rows of output cells (u, v) to draw, as they lie on the output grid."""
    if locations is None:
        if max(out) <= _ALL_CELLS_UP_TO:
            locations = "all"
        else:
            locations = (min(4, out[0]), min(4, out[1]))
    if isinstance(locations, str):
        if locations != "all":
            raise ValueError(f"locations must be 'all', a count or cells, got {locations!r}.")
        locations = out
    if isinstance(locations, (int, np.integer)):
        locations = (int(locations), int(locations))
    if (
        isinstance(locations, tuple)
        and len(locations) == 2
        and all(isinstance(v, (int, np.integer)) for v in locations)
    ):
        if min(locations) < 1:
            raise ValueError(f"locations={locations} must be positive counts.")
        rows = _evenly_spaced(out[0], locations[0])
        cols = _evenly_spaced(out[1], locations[1])
        return [[(u, v) for v in cols] for u in rows]
    if isinstance(locations, Sequence):
        cells = [tuple(int(x) for x in cell) for cell in locations]
        for u, v in cells:
            if not (0 <= u < out[0] and 0 <= v < out[1]):
                raise ValueError(f"cell ({u}, {v}) lies outside the {out[0]}x{out[1]} grid.")
        return [cells]
    raise TypeError(f"locations must be None, 'all', a count or a list of cells, got "
                    f"{type(locations).__name__}.")


def _evenly_spaced(size: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``range(size)``, ends included, no repeats."""
    count = min(count, size)
    if count == 1:
        return [(size - 1) // 2]
    return sorted({int(round(i * (size - 1) / (count - 1))) for i in range(count)})


def __dir__():
    """Only the public API (not the modules this one imports) for ``dir()`` and completion."""
    return sorted(__all__)
