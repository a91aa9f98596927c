r"""CIFAR-style ResNet-18 (He et al. 2016) with a pooling choice at each downsampling point.

Architecture (widths for ``width_multiplier = 1``; every width is multiplied by it)::

    input    each image standardised: zero mean, unit variance (``standardize=True``)
    stem     conv3x3(in_channels -> 64) + BN + ReLU                       (full resolution)
    layer1   2 basic blocks, 64 channels
    layer2   2 basic blocks, 128 channels; the first downsamples (point 0)
    layer3   2 basic blocks, 256 channels; the first downsamples (point 1)
    layer4   2 basic blocks, 512 channels; the first downsamples (point 2)
    global   "avg" | "max" | "gmp" | "mixed" | "lse"
    head     linear(512 -> n_classes)

A basic block computes ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``. At a
downsampling point with pooling ``p`` (one of :data:`~skpool.models.pooling.STAGE_POOLINGS`, k
its components):

- ``"strided"`` (the original): conv1 has stride 2 and gives ``out`` channels; the shortcut is
  a 1×1 convolution with stride 2 and batch norm (projection shortcut).
- any other pooling: conv1 has stride 1 and gives ``out/k`` channels; the main path is
  ``pool(relu(bn1(conv1(x))))`` (``out`` channels on the halved grid), then conv2 and bn2.
  **The shortcut applies the same pooling**: ``bn_s(pool(conv_s(x)))`` with a 1×1 convolution
  ``conv_s`` (stride 1, ``in -> out/k`` channels). Both paths therefore reach the same grid
  through the same operator: one fitted separability operator P (M×N) or one learned
  :class:`~skpool.models.LearnedPool2d` parameter (which then receives gradients through both
  paths), or the same average / max pooling. A separability layer's channel statistics belong
  to the main path's maps; the shortcut applies P alone
  (:func:`~skpool.models.pooling.spatial_pool`).

The separability operator is fitted on the main path's maps before pooling
(:meth:`ResNet18.stage_maps`) and installed with :meth:`ResNet18.set_separability_pool`.
Training recipe of the paper (not the skorch classifiers' default): SGD, momentum 0.9, lr 0.1
with step decay.
"""

from __future__ import annotations

import torch
from torch import nn

from .._parameters import MAX_COUNT, check_real
from .pooling import StagedPoolingMixin, check_network_sizes, make_global_pool, spatial_pool

__all__ = ["ResNet18"]

#: Widths of the four stages at ``width_multiplier = 1``.
BASE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """A basic residual block; with ``pool`` it is the first block of a downsampling stage.

    Args:
        in_channels, out_channels: widths of the block's input and output.
        pooling: None (no downsampling) or the point's pooling name.
        pool: the point's pooling module (``nn.Identity`` for "strided").
        conv_channels: conv1's (and the shortcut convolution's) output channels:
            ``out_channels / k``.
    """

    def __init__(self, in_channels, out_channels, pooling=None, pool=None, conv_channels=None):
        super().__init__()
        conv_channels = out_channels if conv_channels is None else conv_channels
        stride = 2 if pooling == "strided" else 1
        self.conv1 = nn.Conv2d(in_channels, conv_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(conv_channels)
        self.pool = nn.Identity() if pool is None else pool
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut_conv = self.shortcut_bn = None
        if pooling is not None or in_channels != out_channels:
            self.shortcut_conv = nn.Conv2d(in_channels, conv_channels, 1, stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(out_channels)

    def pool_input(self, x: torch.Tensor) -> torch.Tensor:
        """The main path's maps before pooling: ``relu(bn1(conv1(x)))``."""
        return torch.relu(self.bn1(self.conv1(x)))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut_conv is None:
            return x
        return self.shortcut_bn(spatial_pool(self.pool, self.shortcut_conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.bn2(self.conv2(self.pool(self.pool_input(x))))
        return torch.relu(main + self.shortcut(x))


class ResNet18(StagedPoolingMixin, nn.Module):
    """CIFAR-style ResNet-18 (He et al. 2016) with configurable pooling (Birodkar et al. 2019).

    Args:
        in_channels: channels of the input images. Default: 3.
        n_classes: outputs of the linear head. Default: 10.
        width_multiplier: the stage widths are ``round(64 * m) * (1, 2, 4, 8)`` (1 for the
            paper's 64–512; a fraction for small machines). Default: 1.0.
        stage_pooling: one of :data:`~skpool.models.pooling.STAGE_POOLINGS` per downsampling
            point (3 points: the first blocks of layer2–4; a string applies to all).
            Default: "strided".
        global_pool: one of :data:`~skpool.models.pooling.GLOBAL_POOLINGS`. Default: "avg".
        lam: initial λ of the "gmp" global pooling. Default: 1.0.
        lam_scale: "relative" (λ in units of the sample's mean squared descriptor norm,
            trace(ΦᵀΦ)/N: scale-free) or "absolute" (the papers' λ, e.g. λ₀ = 1e3).
            Default: "relative" (see :class:`~skpool.nn.GeneralizedMaxPool2d`).
        n_components: components k of the "separability" and "sgd" points, one value or one per
            point (ignored elsewhere). Their conv1 gives ``out/k`` channels, so the pooled maps
            have the strided block's ``out``. Default: 2 (the paper's choice).
        input_size: the input images' (H, W); needed by "sgd" points. Default: None.
        global_pool_options: further keyword arguments of the global pooling layer.
            Default: None.
        standardize: standardise each input image to zero mean and unit variance (over its
            channels and pixels) before the first convolution, as Birodkar et al. do for SVHN
            (:func:`~skpool.models.pooling.standardize_images`); the model then takes raw
            images. ``False`` feeds the images as they are. Default: True.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`, or :math:`(B, H, W)` when ``in_channels == 1``.
        - Output: :math:`(B, n\\_classes)` logits.

    Examples::

        >>> import torch
        >>> from skpool.models import ResNet18
        >>> net = ResNet18(in_channels=1, width_multiplier=1 / 16,
        ...                stage_pooling=("strided", "avg", "sgd"), input_size=(8, 8))
        >>> net(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> [net.stage_maps(torch.randn(2, 1, 8, 8), p).shape[1:] for p in range(3)]
        [torch.Size([8, 4, 4]), torch.Size([16, 4, 4]), torch.Size([16, 2, 2])]
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 10,
        width_multiplier: float = 1.0,
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
        multiplier = check_real("width_multiplier", width_multiplier, 0, None, closed="neither")
        if not 1 <= round(BASE_WIDTHS[0] * multiplier) * BASE_WIDTHS[-1] // BASE_WIDTHS[0] <= (
            MAX_COUNT
        ):
            raise ValueError(
                "width_multiplier must give round(64 * width_multiplier) >= 1 channels and at "
                f"most {MAX_COUNT} in the last stage, got {width_multiplier!r}."
            )
        self._configure_points(stage_pooling, n_components, len(BASE_WIDTHS) - 1, input_size)
        self.in_channels = in_channels
        self.standardize = bool(standardize)
        base = round(BASE_WIDTHS[0] * multiplier)
        widths = [base * (w // BASE_WIDTHS[0]) for w in BASE_WIDTHS]

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        layers = [nn.Sequential(BasicBlock(widths[0], widths[0]), BasicBlock(widths[0], widths[0]))]
        for point, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            first = BasicBlock(
                width_in,
                width_out,
                pooling=self.stage_pooling[point],
                pool=self._make_pool(point),
                conv_channels=self.reduced_width(point, width_out),
            )
            layers.append(nn.Sequential(first, BasicBlock(width_out, width_out)))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.global_pool = make_global_pool(global_pool, lam, global_pool_options, lam_scale)
        self.head = nn.Linear(widths[-1], n_classes)

    @property
    def pools(self) -> list[nn.Module]:
        """The poolings of the three downsampling points, in order."""
        return [block.pool for block in self._downsampling_blocks()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self._input(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(self.global_pool(x).flatten(1))

    def stage_maps(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """The maps that downsampling point ``stage``'s pooling receives on the main path:
        ``relu(bn1(conv1(.)))`` of that stage's first block, (B, out/k, H_s, W_s)."""
        if not 0 <= stage < len(self.stage_pooling):
            raise IndexError(f"stage must be in 0..{len(self.stage_pooling) - 1}, got {stage}.")
        x = self.layer1(self.stem(self._input(x)))
        for layer in (self.layer2, self.layer3, self.layer4)[:stage]:
            x = layer(x)
        return self._downsampling_blocks()[stage].pool_input(x)

    def _downsampling_blocks(self) -> list[BasicBlock]:
        return [self.layer2[0], self.layer3[0], self.layer4[0]]

    def _stage_channels(self, stage: int) -> int:
        return self._downsampling_blocks()[stage].conv1.out_channels

    def _set_pool(self, stage: int, layer: nn.Module) -> None:
        self._downsampling_blocks()[stage].pool = layer
