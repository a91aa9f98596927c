r"""Pooling at the deep models' downsampling points, and their global poolings.

Both networks (:class:`~skpool.models.PoolingCNN`, :class:`~skpool.models.ResNet18`) halve the
grid at a few *downsampling points* (H → ⌈H/2⌉, as a stride-2 convolution with padding 1
does). Each point takes one of :data:`STAGE_POOLINGS`:

- ``"strided"`` — the convolution itself has stride 2 (the original networks);
- ``"avg"`` / ``"max"`` — a stride-1 convolution, then 2×2 average / max pooling (ceil mode);
- ``"separability"`` — a stride-1 convolution, then a fitted separability operator
  (:class:`~skpool.nn.SeparabilityPool2d`, Birodkar et al. 2019), filled in after the network
  is built (``set_separability_pool``);
- ``"sgd"`` — a stride-1 convolution, then :class:`LearnedPool2d`: the operator is a trainable
  parameter learned with the network (the paper's Table 4 comparison).

**Width-true components.** A pooling with k components (``"separability"``, ``"sgd"``) turns C
channels into k·C. So that every network has its strided baseline's widths, the convolution
before such a point gives ``out/k`` channels and the pooled maps have ``out``, the width a
strided stage has (the paper keeps k = 2 eigenvectors for this reason). ``out`` must be
divisible by k. The other poolings have k = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import torch
from torch import nn

from .._core.grid import average_pooling_operator, output_grid_shape
from .._device import CheckedMoves, check_device
from .._grid import check_grid
from .._parameters import MAX_COUNT
from ..nn import (
    GeneralizedMaxPool2d,
    LogSumExpPool2d,
    MixedMaxAvgPool2d,
    SeparabilityPool2d,
    functional,
)

__all__ = [
    "LearnedPool2d", "STAGE_POOLINGS", "GLOBAL_POOLINGS", "STAGE_STRIDE", "standardize_images",
]

STAGE_POOLINGS = ("strided", "avg", "max", "separability", "sgd")
GLOBAL_POOLINGS = ("avg", "max", "gmp", "mixed", "lse")
#: Poolings with k components (k·C output channels for C input channels).
WITH_COMPONENTS = ("separability", "sgd")
#: Every downsampling point halves the grid (ceil), whatever its pooling.
STAGE_STRIDE = 2


class LearnedPool2d(CheckedMoves, nn.Module):
    r"""A spatial pooling operator learned by SGD with the network (Birodkar et al. 2019,
    Table 4: the learned-by-gradient alternative to the closed-form separability operator).

    The operator :math:`P \in \mathbb{R}^{k \times M \times N}` maps the :math:`N = H W` input
    locations to the :math:`M = H' W'` output cells, the same for every channel, with k
    components per cell (k·C output channels, component-major: channel ``j * C + c``):

    .. math::

        \text{out}_{j C + c,\, m} = \sum_{n=1}^{N} P_{j, m, n}\, x_{c, n} .

    P is an ``nn.Parameter`` trained with the network's loss and nothing else (no locality
    term, no normalisation of its rows); every component starts as ``stride``×``stride``
    average pooling (ceil mode). Weight decay, if the optimiser applies one, applies to P as to
    every parameter; exclude it with skorch's ``optimizer__param_groups`` (e.g.
    ``[("*pool*.operator", {"weight_decay": 0})]``) to keep it unregularised.

    Args:
        grid_shape: the input grid :math:`(H, W)` (an operator is learned for one grid).
        stride: the output grid is :math:`(\lceil H/s \rceil, \lceil W/s \rceil)`. Default: 2.
        n_components: k. Default: 1.

    Shape:
        - Input: :math:`(B, C, H, W)`.
        - Output: :math:`(B, k C, H', W')`.

    Examples::

        >>> import torch
        >>> from skpool.models import LearnedPool2d
        >>> pool = LearnedPool2d((8, 8), n_components=2)
        >>> pool(torch.randn(4, 16, 8, 8)).shape
        torch.Size([4, 32, 4, 4])
        >>> pool.operator.shape, pool.operator.requires_grad
        (torch.Size([2, 16, 64]), True)
    """

    def __init__(
        self,
        grid_shape: tuple[int, int],
        *,
        stride: int = STAGE_STRIDE,
        n_components: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_device(device)
        grid_shape = check_grid(grid_shape, "grid_shape")
        n_components = _check_count("n_components", n_components)
        stride = _check_count("stride", stride)
        self.grid_shape = grid_shape
        self.output_shape = output_grid_shape(grid_shape, stride)
        average = average_pooling_operator(
            grid_shape, self.output_shape, stride=stride, dtype=torch.float64
        )
        operator = average.expand(n_components, -1, -1).to(
            device=device, dtype=dtype or torch.get_default_dtype()
        )
        self.operator = nn.Parameter(operator.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.separability_pool2d(
            x, self.operator, self.output_shape, grid_shape=self.grid_shape
        )

    def extra_repr(self) -> str:
        grid = "x".join(map(str, self.grid_shape))
        out = "x".join(map(str, self.output_shape))
        return f"n_components={self.operator.shape[0]}, grid_shape={grid}, output_shape={out}"


class _Unfitted(nn.Module):
    """Placeholder for a separability point whose operator is not fitted yet."""

    def forward(self, x):
        raise RuntimeError(
            "This separability stage has no fitted operator yet: call "
            "set_separability_pool(stage, layer) first."
        )


def spatial_pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a point's pooling to maps ``x`` with its spatial operator alone.

    For a :class:`~skpool.nn.SeparabilityPool2d` that carries channel statistics (they describe
    the channels it was fitted on), the operator P is applied without them; any other pooling
    is applied as it is. ResNet-18's shortcut uses this so that it pools with the same P as the
    main path whatever its channels.
    """
    if isinstance(pool, SeparabilityPool2d) and pool.channel_mean is not None:
        return functional.separability_pool2d(
            x, pool.operator, pool.output_shape, grid_shape=pool.grid_shape
        )
    return pool(x)


class StagedPoolingMixin(CheckedMoves):
    """What the two networks share: their pooling points, components and input checks.

    A network sets ``stage_pooling`` (one per point), ``n_components`` (the components asked
    for, one per point) and ``input_size`` with :meth:`_configure_points`, builds each point's
    pooling with :meth:`_make_pool`, and keeps the poolings in ``self.pools`` (an
    ``nn.ModuleList``, or a property returning them in point order).
    """

    stage_stride = STAGE_STRIDE

    def _configure_points(self, stage_pooling, n_components, n_points, input_size) -> None:
        n_points = int(n_points)
        if isinstance(stage_pooling, str):
            stage_pooling = (stage_pooling,) * n_points
        stage_pooling = tuple(stage_pooling)
        if len(stage_pooling) != n_points or any(p not in STAGE_POOLINGS for p in stage_pooling):
            raise ValueError(
                f"stage_pooling must be one of {STAGE_POOLINGS} or {n_points} of them (one per "
                f"downsampling point), got {stage_pooling!r}."
            )
        components = _per_point("n_components", n_components, n_points)
        self.stage_pooling = stage_pooling
        self.n_components = tuple(_check_count("n_components", k) for k in components)
        self.input_size = check_grid(input_size, "input_size", optional=True)
        if "sgd" in stage_pooling and self.input_size is None:
            raise ValueError(
                "A 'sgd' pooling point learns an operator for one grid: give the input images' "
                "size as input_size=(H, W) (the skorch classifiers take it from the data)."
            )

    def components(self, point: int) -> int:
        """The components k of point ``point``'s pooling (1 unless separability or sgd)."""
        return self.n_components[point] if self.stage_pooling[point] in WITH_COMPONENTS else 1

    def reduced_width(self, point: int, width: int) -> int:
        """The channels the convolution before point ``point`` gives: ``width / k``."""
        k = self.components(point)
        if width % k:
            raise ValueError(
                f"Downsampling point {point} has {width} channels, not divisible by its "
                f"n_components={k}: with k components the convolution gives {width}/k channels "
                "so that the pooled maps keep the strided network's width."
            )
        return width // k

    def point_grid(self, point: int) -> tuple[int, int] | None:
        """The grid that point ``point``'s pooling receives, if ``input_size`` is known."""
        if self.input_size is None:
            return None
        height, width = self.input_size
        for _ in range(point):
            height, width = math.ceil(height / STAGE_STRIDE), math.ceil(width / STAGE_STRIDE)
        return height, width

    def _make_pool(self, point: int) -> nn.Module:
        pooling = self.stage_pooling[point]
        if pooling == "strided":
            return nn.Identity()
        if pooling == "avg":
            return nn.AvgPool2d(STAGE_STRIDE, ceil_mode=True)
        if pooling == "max":
            return nn.MaxPool2d(STAGE_STRIDE, ceil_mode=True)
        if pooling == "sgd":
            return LearnedPool2d(
                self.point_grid(point), stride=STAGE_STRIDE, n_components=self.components(point)
            )
        return _Unfitted()

    def set_separability_pool(self, stage: int, layer: SeparabilityPool2d) -> None:
        """Put a fitted :class:`~skpool.nn.SeparabilityPool2d` into a "separability" point.

        The layer's components must be the point's ``n_components``; channel statistics, if
        the layer has them, must have the channels of the maps it receives
        (:meth:`stage_maps`).
        """
        if not 0 <= stage < len(self.stage_pooling):
            raise IndexError(f"stage must be in 0..{len(self.stage_pooling) - 1}, got {stage}.")
        if self.stage_pooling[stage] != "separability":
            raise ValueError(
                f"stage {stage} pools with {self.stage_pooling[stage]!r}, not separability."
            )
        if not isinstance(layer, SeparabilityPool2d):
            raise TypeError(f"layer must be a SeparabilityPool2d, got {type(layer).__name__}.")
        n_components = layer.operator.shape[0]
        if n_components != self.n_components[stage]:
            raise ValueError(
                f"The layer has {n_components} components; stage {stage} was built for "
                f"{self.n_components[stage]}."
            )
        channels = self._stage_channels(stage)
        if layer.channel_mean is not None and layer.channel_mean.shape[0] != channels:
            raise ValueError(
                f"The layer's channel statistics are for {layer.channel_mean.shape[0]} channels; "
                f"stage {stage}'s maps have {channels}. Build the layer without them "
                "(SeparabilityPool2d(operator, output_shape=..., grid_shape=...))."
            )
        self._set_pool(stage, layer)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input: images checked, then standardised per image if
        ``self.standardize`` (:func:`standardize_images`)."""
        x = self._as_images(x)
        return standardize_images(x) if getattr(self, "standardize", False) else x

    def _as_images(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3 and self.in_channels == 1:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects images (B, {self.in_channels}, H, W)"
                + (" or (B, H, W)" if self.in_channels == 1 else "")
                + f", got shape {tuple(x.shape)}."
            )
        return x


#: Added to each image's variance before the division (images on a [0, 1] scale; a constant
#: image becomes zeros, never NaN).
STANDARDIZE_EPS = 1e-5


def standardize_images(x: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    r"""Per-image standardisation: :math:`(x - \mu) / \sqrt{\sigma^2 + \epsilon}` with
    :math:`\mu, \sigma^2` the mean and (biased) variance of each image over its channels and
    pixels, as Birodkar et al. normalise every SVHN image.

    It is the networks' first operation (``standardize=True``), so the estimators take raw
    images (e.g. in [0, 1]) and corruptions (:mod:`skpool.evaluation`) act on those. Measured
    on SVHN-like digits (random polarity, backgrounds from 0.05 to 0.95; 5,000 images, width 16,
    8 epochs): 33.6% test error raw, 18.2% standardised.
    """
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + eps)


def make_global_pool(
    kind: str, lam: float, options: dict | None, lam_scale: str = "relative"
) -> nn.Module:
    """The global pooling ``kind`` (one of :data:`GLOBAL_POOLINGS`).

    ``lam`` is the initial λ of "gmp" and ``lam_scale`` its scale; ``options`` are further keyword arguments of the layer
    (:class:`~skpool.nn.GeneralizedMaxPool2d`, :class:`~skpool.nn.MixedMaxAvgPool2d`,
    :class:`~skpool.nn.LogSumExpPool2d`), so a new keyword of a layer needs no change here.
    """
    if kind not in GLOBAL_POOLINGS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLINGS}, got {kind!r}.")
    options = dict(options or {})
    if kind in ("avg", "max"):
        if options:
            raise ValueError(f"global_pool={kind!r} takes no options, got {sorted(options)}.")
        return nn.AdaptiveAvgPool2d(1) if kind == "avg" else nn.AdaptiveMaxPool2d(1)
    if kind == "gmp":
        if {"lam", "lam_scale"} & options.keys():
            raise ValueError("Give λ as lam and lam_scale, not in global_pool_options.")
        return GeneralizedMaxPool2d(lam=lam, lam_scale=lam_scale, **options)
    return (MixedMaxAvgPool2d if kind == "mixed" else LogSumExpPool2d)(**options)


def _per_point(name: str, value, n_points: int) -> tuple:
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = tuple(value)
        if len(value) != n_points:
            raise ValueError(
                f"{name} must be one value or {n_points} (one per downsampling point), got "
                f"{value!r}."
            )
        return value
    return (value,) * n_points


def _check_count(name: str, value, high: int = MAX_COUNT) -> int:
    """An integer in [1, high] (a ValueError naming ``name`` otherwise, a bool included)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not 1 <= value <= high:
        raise ValueError(f"{name} must be an integer >= 1 and <= {high}, got {value!r}.")
    return int(value)


def check_network_sizes(in_channels, n_classes) -> None:
    """The sizes every network constructor takes: ``in_channels`` and ``n_classes``, integers
    in [1, :data:`~skpool._parameters.MAX_COUNT`] (checked before any layer is built, so that a
    bad value is named instead of failing inside ``Conv2d``)."""
    _check_count("in_channels", in_channels)
    _check_count("n_classes", n_classes)
