"""skpool: learned pooling operators for scikit-learn and PyTorch.

- :class:`GeneralizedMaxPooling` — per-sample ridge-weighted global pooling
  (Murray & Perronnin 2014).
- :class:`SeparabilityPooling` — closed-form learned spatial pooling that maximises class
  separability (Birodkar et al. 2019).
- :mod:`skpool.nn` — the same operators as PyTorch layers; :mod:`skpool.models` — the papers'
  CNNs as skorch classifiers; :mod:`skpool.io`, :mod:`skpool.plotting`, and the ``skpool``
  command line.

The estimators are imported lazily, so that ``import skpool.nn`` or ``skpool.io`` in a
torch-only program does not need scikit-learn.
"""

from __future__ import annotations

import importlib

from ._device import resolve_device

__version__ = "0.1.0"

_LAZY = {
    "GeneralizedMaxPooling": "skpool._sklearn",
    "SeparabilityPooling": "skpool._sklearn",
}

__all__ = ["GeneralizedMaxPooling", "SeparabilityPooling", "resolve_device", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skpool' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
