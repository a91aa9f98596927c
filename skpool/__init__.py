"""skpool: learned pooling operators for scikit-learn and PyTorch.

- :class:`GeneralizedMaxPooling` — per-sample ridge-weighted global pooling
  (Murray & Perronnin 2014).
"""

from ._device import resolve_device
from ._sklearn import GeneralizedMaxPooling

__version__ = "0.1.0"

__all__ = ["GeneralizedMaxPooling", "resolve_device", "__version__"]
