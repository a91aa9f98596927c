r"""The two baselines of the Deep GMP paper as layers: global mixed max/average pooling with a
learnable mix, and log-sum-exp pooling with a learnable sharpness (split from
:mod:`skpool.nn.modules`, which re-exports them)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._device import CheckedMoves
from . import functional as F
from .._parameters import check_bool, check_real
from ._layer_parameters import _check_float_dtype, _check_positive, _register_scalar

__all__ = ["MixedMaxAvgPool2d", "LogSumExpPool2d"]


class MixedMaxAvgPool2d(CheckedMoves, nn.Module):
    r"""Global mixed max/average pooling with a learnable mix (Lee et al. 2016; a baseline of
    Deep GMP).

    .. math::

        \text{out}_c = a \max_{i} x_{c,i} + (1 - a) \frac{1}{N}\sum_{i} x_{c,i},
        \qquad a = \operatorname{sigmoid}(\omega) \in (0, 1) .

    Args:
        mix: initial weight a of max pooling, in (0, 1). Default: 0.5.
        learnable: learn ω (an ``nn.Parameter``); otherwise a buffer. Default: True.
        flatten: return :math:`(B, C)`; with False, :math:`(B, C, 1, 1)`. Default: True.

    Shape:
        - Input: :math:`(B, C, H, W)`, optional ``mask`` :math:`(B, H, W)` bool.
        - Output: :math:`(B, C)`, or :math:`(B, C, 1, 1)` with ``flatten=False``.

    Examples::

        >>> import torch
        >>> from skpool.nn import MixedMaxAvgPool2d
        >>> MixedMaxAvgPool2d(mix=0.3)(torch.randn(8, 64, 7, 7)).shape
        torch.Size([8, 64])
    """

    def __init__(
        self,
        mix: float = 0.5,
        learnable: bool = True,
        flatten: bool = True,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        mix = check_real("mix", mix, 0.0, 1.0, closed="neither")
        self.learnable = check_bool("learnable", learnable)
        self.flatten = check_bool("flatten", flatten)
        _register_scalar(self, "mix_logit", math.log(mix) - math.log1p(-mix), learnable,
                         device, dtype)

    @property
    def mix(self) -> torch.Tensor:
        """The current weight of max pooling, sigmoid(ω)."""
        return torch.sigmoid(self.mix_logit)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F._mixed_max_avg_pool2d(x, self.mix, mask, not self.flatten)

    def extra_repr(self) -> str:
        mix = float(self.mix.detach())
        return f"mix={mix:.4g}, learnable={self.learnable}, flatten={self.flatten}"


class LogSumExpPool2d(CheckedMoves, nn.Module):
    r"""Global log-sum-exp pooling with a learnable sharpness r (Pinheiro & Collobert 2015;
    a baseline of Deep GMP).

    .. math::

        \text{out}_c = \frac{1}{r} \log \Big( \frac{1}{N} \sum_{i} e^{r x_{c,i}} \Big),
        \qquad r = r_{\min} + \operatorname{softplus}(\rho) ,

    average pooling as :math:`r \to 0`, max pooling as :math:`r \to \infty`. The floor
    :math:`r_{\min} > 0` keeps r away from 0 (where the raw formula divides 0 by 0), and the
    evaluation (see :func:`skpool.nn.functional.log_sum_exp_pool2d`) is accurate for every r,
    however small or large (an r whose products with the input underflow gives the average,
    its limit to working precision). ``r_min`` must be a normal number of the parameters'
    dtype (at least 1.2e-38 in float32), or the floor would round to 0.

    Args:
        r: initial sharpness, greater than ``r_min``. Default: 1.0.
        learnable: learn ρ (an ``nn.Parameter``); otherwise a buffer. Default: True.
        r_min: the floor of r. Default: 1e-3.
        flatten: return :math:`(B, C)`; with False, :math:`(B, C, 1, 1)`. Default: True.

    Shape:
        - Input: :math:`(B, C, H, W)`, optional ``mask`` :math:`(B, H, W)` bool.
        - Output: :math:`(B, C)`, or :math:`(B, C, 1, 1)` with ``flatten=False``.

    Examples::

        >>> import torch
        >>> from skpool.nn import LogSumExpPool2d
        >>> LogSumExpPool2d(r=5.0)(torch.randn(8, 64, 7, 7)).shape
        torch.Size([8, 64])
    """

    def __init__(
        self,
        r: float = 1.0,
        learnable: bool = True,
        r_min: float = 1e-3,
        flatten: bool = True,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_float_dtype(dtype)
        r_min = _check_positive("r_min", r_min)
        r = _check_positive("r", r)
        if not r > r_min:
            raise ValueError(f"r must be greater than r_min={r_min!r}, got {r!r}.")
        parameter_dtype = dtype or torch.get_default_dtype()
        smallest = torch.finfo(parameter_dtype).tiny
        if r_min < smallest:
            raise ValueError(
                f"r_min={r_min!r} underflows in {parameter_dtype} (smallest normal number "
                f"{smallest:.3g}): the floor of r would be 0. Give r_min >= {smallest:.3g}, or "
                "dtype=torch.float64."
            )
        self.learnable = check_bool("learnable", learnable)
        self.r_min = r_min
        self.flatten = check_bool("flatten", flatten)
        excess = r - r_min  # ρ = softplus⁻¹(excess), written to avoid overflow of expm1
        _register_scalar(self, "r_raw", excess + math.log(-math.expm1(-excess)), learnable,
                         device, dtype)

    @property
    def r(self) -> torch.Tensor:
        """The current sharpness r = r_min + softplus(ρ)."""
        return self.r_min + torch.nn.functional.softplus(self.r_raw)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F._log_sum_exp_pool2d(x, self.r, mask, not self.flatten)

    def extra_repr(self) -> str:
        return (
            f"r={float(self.r.detach()):.4g}, learnable={self.learnable}, r_min={self.r_min:g}, "
            f"flatten={self.flatten}"
        )
