"""skpool: learned pooling operators for scikit-learn and PyTorch.

- :class:`GeneralizedMaxPooling` — per-sample ridge-weighted global pooling
  (Murray & Perronnin 2014).
- :class:`SeparabilityPooling` — closed-form learned spatial pooling that maximises class
  separability (Birodkar et al. 2019).
"""

from ._device import resolve_device
from ._sklearn import GeneralizedMaxPooling, SeparabilityPooling

__version__ = "0.1.0"

__all__ = ["GeneralizedMaxPooling", "SeparabilityPooling", "resolve_device", "__version__"]
