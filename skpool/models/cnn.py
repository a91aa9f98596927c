r"""The CNN of Birodkar et al. (2019), with a choice of pooling per stage and of global pooling.

Architecture (for an input of ``in_channels`` × H × W)::

    stem     conv3x3(in_channels -> width) + ReLU
    stage s  conv3x3(c -> 2c) + batch-norm + ReLU, then a 2x downsampling:   (s < n_stages)
               "strided"       the conv itself has stride 2
               "avg" / "max"   2x2 average / max pooling (ceil mode)
               "separability"  a fitted SeparabilityPool2d (k components -> k*2c channels)
    global   "avg" | "max" | "gmp" | "mixed" | "lse"  over the remaining grid
    head     linear(channels -> n_classes)

The separability stage is filled in after the fact (:meth:`PoolingCNN.set_separability_pool`):
the paper's procedure trains with a default pooling, fits the operator on that stage's feature
maps (:meth:`PoolingCNN.stage_maps`), swaps the layer in and retrains.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import GeneralizedMaxPool2d, LogSumExpPool2d, MixedMaxAvgPool2d, SeparabilityPool2d

__all__ = ["PoolingCNN", "STAGE_POOLINGS", "GLOBAL_POOLINGS"]

STAGE_POOLINGS = ("strided", "avg", "max", "separability")
GLOBAL_POOLINGS = ("avg", "max", "gmp", "mixed", "lse")
N_STAGES = 3


class _Unfitted(nn.Module):
    """Placeholder for a separability stage whose operator is not fitted yet."""

    def forward(self, x):
        raise RuntimeError(
            "This separability stage has no fitted operator yet: call "
            "PoolingCNN.set_separability_pool(stage, layer) first."
        )


class PoolingCNN(nn.Module):
    """Birodkar et al.'s classification CNN with configurable pooling.

    Args:
        in_channels: channels of the input images. Default: 1.
        n_classes: outputs of the linear head. Default: 10.
        width: channels of the stem; stage s has ``width * 2**(s+1)``. The paper uses 64.
        n_stages: stride-2 stages (the paper has 3; on 8×8 digits that leaves a 1×1 grid, so
            use 1 or 2 there to keep something for the global pooling to pool). Default: 3.
        stage_pooling: one of :data:`STAGE_POOLINGS` per stage (a string applies to all).
            Default: "strided".
        global_pool: one of :data:`GLOBAL_POOLINGS`. Default: "avg".
        lam: initial λ of the "gmp" global pooling. Default: 1e3.
        n_components: components k of the separability stages (their output has k times the
            channels). Default: 1.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`, or :math:`(B, H, W)` when ``in_channels == 1``.
        - Output: :math:`(B, n\\_classes)` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 10,
        width: int = 64,
        n_stages: int = N_STAGES,
        stage_pooling: str | tuple[str, ...] = "strided",
        global_pool: str = "avg",
        lam: float = 1e3,
        n_components: int = 1,
    ) -> None:
        super().__init__()
        if int(n_stages) < 1:
            raise ValueError(f"n_stages must be >= 1, got {n_stages}.")
        if isinstance(stage_pooling, str):
            stage_pooling = (stage_pooling,) * int(n_stages)
        stage_pooling = tuple(stage_pooling)
        if len(stage_pooling) != n_stages or any(p not in STAGE_POOLINGS for p in stage_pooling):
            raise ValueError(
                f"stage_pooling must be one of {STAGE_POOLINGS} or {n_stages} of them, "
                f"got {stage_pooling!r}."
            )
        if global_pool not in GLOBAL_POOLINGS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLINGS}, got {global_pool!r}.")
        if int(n_components) < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}.")
        self.in_channels = in_channels
        self.stage_pooling = stage_pooling
        self.n_components = int(n_components)

        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.convs = nn.ModuleList()
        self.pools = nn.ModuleList()
        in_channels_s, conv_width = width, width
        for pooling in stage_pooling:
            conv_width *= 2  # conv widths double per stage whatever the pooling
            stride = 2 if pooling == "strided" else 1
            self.convs.append(
                nn.Sequential(
                    nn.Conv2d(in_channels_s, conv_width, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(conv_width),
                    nn.ReLU(),
                )
            )
            self.pools.append(_stage_pool(pooling))
            # a separability stage with k components hands k*C channels to the next stage
            in_channels_s = conv_width * (self.n_components if pooling == "separability" else 1)
        self.global_pool = _global_pool(global_pool, lam)
        self.head = nn.Linear(in_channels_s, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._as_images(x)
        x = self.stem(x)
        for conv, pool in zip(self.convs, self.pools):
            x = pool(conv(x))
        return self.head(self.global_pool(x).flatten(1))

    def stage_maps(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """The feature maps that stage ``stage``'s pooling receives: (B, C_s, H_s, W_s)."""
        x = self.stem(self._as_images(x))
        for index, (conv, pool) in enumerate(zip(self.convs, self.pools)):
            x = conv(x)
            if index == stage:
                return x
            x = pool(x)
        raise IndexError(f"stage must be in 0..{len(self.convs) - 1}, got {stage}.")

    def set_separability_pool(self, stage: int, layer: SeparabilityPool2d) -> None:
        """Put a fitted :class:`~skpool.nn.SeparabilityPool2d` into a "separability" stage."""
        if self.stage_pooling[stage] != "separability":
            raise ValueError(f"stage {stage} pools with {self.stage_pooling[stage]!r}, not separability.")
        n_components = layer.operator.shape[0]
        if n_components != self.n_components:
            raise ValueError(
                f"The layer has {n_components} components; this network was built for "
                f"{self.n_components}."
            )
        self.pools[stage] = layer

    def _as_images(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3 and self.in_channels == 1:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PoolingCNN expects images (B, {self.in_channels}, H, W)"
                + (" or (B, H, W)" if self.in_channels == 1 else "")
                + f", got shape {tuple(x.shape)}."
            )
        return x


def _stage_pool(pooling: str) -> nn.Module:
    if pooling == "strided":
        return nn.Identity()
    if pooling == "avg":
        return nn.AvgPool2d(2, ceil_mode=True)
    if pooling == "max":
        return nn.MaxPool2d(2, ceil_mode=True)
    return _Unfitted()


def _global_pool(kind: str, lam: float) -> nn.Module:
    if kind == "avg":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "max":
        return nn.AdaptiveMaxPool2d(1)
    if kind == "gmp":
        return GeneralizedMaxPool2d(lam=lam)
    if kind == "mixed":
        return MixedMaxAvgPool2d()
    return LogSumExpPool2d()
