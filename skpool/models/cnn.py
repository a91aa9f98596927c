r"""The CNN of Birodkar et al. (2019), with a choice of pooling per stage and of global pooling.

Architecture (for an input of ``in_channels`` × H × W)::

    input    each image standardised: zero mean, unit variance (``standardize=True``)
    stem     conv3x3(in_channels -> width) + ReLU
    stage s  conv3x3(c -> 2c/k) + batch-norm + ReLU, then a 2x downsampling:   (s < n_stages)
               "strided"        the conv itself has stride 2 (k = 1)
               "avg" / "max"    2x2 average / max pooling, ceil mode (k = 1)
               "separability"   a fitted SeparabilityPool2d with k components -> 2c channels
               "sgd"            a LearnedPool2d (operator learned with the network), k components
    global   "avg" | "max" | "gmp" | "mixed" | "lse"  over the remaining grid
    head     linear(channels -> n_classes)

Every stage's output has 2c channels whatever its pooling (width-true components, see
:mod:`skpool.models.pooling`). The separability stage is filled in after the fact
(:meth:`PoolingCNN.set_separability_pool`): the paper's procedure trains with a default pooling,
fits the operator on that stage's feature maps (:meth:`PoolingCNN.stage_maps`), swaps the layer
in and retrains (:class:`~skpool.models.SeparabilityPoolingClassifier` runs it).
"""

from __future__ import annotations

import torch
from torch import nn

from .._parameters import MAX_COUNT
from .pooling import (
    GLOBAL_POOLINGS,
    STAGE_POOLINGS,
    StagedPoolingMixin,
    _check_count,
    check_network_sizes,
    make_global_pool,
)

__all__ = ["PoolingCNN", "STAGE_POOLINGS", "GLOBAL_POOLINGS"]

N_STAGES = 3


class PoolingCNN(StagedPoolingMixin, nn.Module):
    """Birodkar et al.'s classification CNN with configurable pooling.

    Args:
        in_channels: channels of the input images. Default: 1.
        n_classes: outputs of the linear head. Default: 10.
        width: channels of the stem; stage s outputs ``width * 2**(s+1)``. The paper uses 64.
        n_stages: downsampling stages (the paper has 3; on 8×8 digits that leaves a 1×1 grid,
            so use 1 or 2 there to keep something for the global pooling to pool). Default: 3.
        stage_pooling: one of :data:`STAGE_POOLINGS` per stage (a string applies to all).
            Default: "strided".
        global_pool: one of :data:`GLOBAL_POOLINGS`. Default: "avg".
        lam: initial λ of the "gmp" global pooling. Default: 1.0.
        lam_scale: "relative" (λ in units of the sample's mean squared descriptor norm,
            trace(ΦᵀΦ)/N: scale-free) or "absolute" (the papers' λ, e.g. λ₀ = 1e3).
            Default: "relative" (see :class:`~skpool.nn.GeneralizedMaxPool2d`).
        n_components: components k of the "separability" and "sgd" stages, one value or one
            per stage (ignored at the other stages). Their convolution gives ``2c/k``
            channels, so the pooled output has the strided stage's 2c. Default: 2 (the
            paper's choice).
        input_size: the input images' (H, W); needed by "sgd" stages (their operator is
            learned for one grid). Default: None.
        global_pool_options: further keyword arguments of the global pooling layer (e.g.
            ``{"learnable": False}`` for "gmp"). Default: None.
        standardize: standardise each input image to zero mean and unit variance (over its
            channels and pixels) before the first convolution, as Birodkar et al. do for SVHN
            (:func:`~skpool.models.pooling.standardize_images`); the model then takes raw
            images. ``False`` feeds the images as they are. Default: True.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`, or :math:`(B, H, W)` when ``in_channels == 1``.
        - Output: :math:`(B, n\\_classes)` logits.

    Examples::

        >>> import torch
        >>> from skpool.models import PoolingCNN
        >>> net = PoolingCNN(width=8, n_stages=2, stage_pooling=("sgd", "strided"),
        ...                  input_size=(8, 8), global_pool="gmp", lam=1.0)
        >>> net(torch.randn(4, 8, 8)).shape
        torch.Size([4, 10])
        >>> net.stage_maps(torch.randn(4, 8, 8), 0).shape  # 16 channels / k=2 before pooling
        torch.Size([4, 8, 8, 8])
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 10,
        width: int = 64,
        n_stages: int = N_STAGES,
        stage_pooling: str | tuple[str, ...] = "strided",
        global_pool: str = "avg",
        lam: float = 1.0,
        lam_scale: str = "relative",
        n_components: int | tuple[int, ...] = 2,
        input_size: tuple[int, int] | None = None,
        global_pool_options: dict | None = None,
        standardize: bool = True,
    ) -> None:
        super().__init__()
        check_network_sizes(in_channels, n_classes)
        width, n_stages = _check_count("width", width), _check_count("n_stages", n_stages)
        if n_stages >= MAX_COUNT.bit_length() or width << n_stages > MAX_COUNT:
            raise ValueError(
                f"width={width} and n_stages={n_stages} give width * 2**n_stages channels in "
                f"the last stage, more than {MAX_COUNT}; use fewer stages or a smaller width."
            )
        self._configure_points(stage_pooling, n_components, n_stages, input_size)
        self.in_channels = in_channels
        self.standardize = bool(standardize)

        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.convs = nn.ModuleList()
        self.pools = nn.ModuleList()
        channels, out_channels = width, width
        for stage, pooling in enumerate(self.stage_pooling):
            out_channels *= 2  # every stage doubles the channels, whatever its pooling
            conv_channels = self.reduced_width(stage, out_channels)
            stride = 2 if pooling == "strided" else 1
            self.convs.append(
                nn.Sequential(
                    nn.Conv2d(channels, conv_channels, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(conv_channels),
                    nn.ReLU(),
                )
            )
            self.pools.append(self._make_pool(stage))
            channels = out_channels
        self.global_pool = make_global_pool(global_pool, lam, global_pool_options, lam_scale)
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        x = self.stem(x)
        for conv, pool in zip(self.convs, self.pools):
            x = pool(conv(x))
        return self.head(self.global_pool(x).flatten(1))

    def stage_maps(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """The feature maps that stage ``stage``'s pooling receives: (B, C_s, H_s, W_s)."""
        if not 0 <= stage < len(self.convs):
            raise IndexError(f"stage must be in 0..{len(self.convs) - 1}, got {stage}.")
        x = self.stem(self._input(x))
        for conv, pool in zip(self.convs[:stage], self.pools[:stage]):
            x = pool(conv(x))
        return self.convs[stage](x)

    def _stage_channels(self, stage: int) -> int:
        return self.convs[stage][0].out_channels

    def _set_pool(self, stage: int, layer: nn.Module) -> None:
        self.pools[stage] = layer
