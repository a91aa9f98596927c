"""PyTorch layers of skpool: channels-first ``(B, C, H, W)`` pooling modules and their
functional forms (:mod:`skpool.nn.functional`).

- :class:`GeneralizedMaxPool2d` — global generalized max pooling with a learnable λ (Deep GMP).
- :class:`SeparabilityPool2d` — a fitted separability pooling operator as a layer.
- :class:`MixedMaxAvgPool2d`, :class:`LogSumExpPool2d` — the Deep GMP paper's baselines, with a
  learnable mix and a learnable sharpness.
- :class:`SequenceGeneralizedMaxPool` — GMP over ``(B, N, D)`` token sequences with a padding
  mask, in place of mean or [CLS] pooling.
- :func:`fit_pooling` — fit separability pooling at named points (pooling modules, strided
  convolutions) of any network and swap it in; :class:`PooledConv2d` is a strided
  convolution's replacement.
"""

from . import functional
from ._fit_pooling import PooledConv2d, fit_pooling
from .baselines import LogSumExpPool2d, MixedMaxAvgPool2d
from .modules import GeneralizedMaxPool2d, SeparabilityPool2d
from .sequence import SequenceGeneralizedMaxPool, generalized_max_pool_sequence

__all__ = [
    "GeneralizedMaxPool2d",
    "SeparabilityPool2d",
    "MixedMaxAvgPool2d",
    "LogSumExpPool2d",
    "SequenceGeneralizedMaxPool",
    "generalized_max_pool_sequence",
    "fit_pooling",
    "PooledConv2d",
    "functional",
]
