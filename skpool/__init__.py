"""skpool: learned pooling operators for scikit-learn and PyTorch.

- :class:`GeneralizedMaxPooling` — per-sample ridge-weighted global pooling
  (Murray & Perronnin 2014).
- :class:`SeparabilityPooling` — closed-form learned spatial pooling that maximises class
  separability (Birodkar et al. 2019).
- :mod:`skpool.nn` — the same operators as PyTorch layers; :mod:`skpool.models` — the papers'
  CNNs as skorch classifiers; :mod:`skpool.io`, :mod:`skpool.plotting`, and the ``skpool``
  command line.

Every public name is imported lazily, on first use: ``import skpool.nn`` or ``skpool.io`` in a
torch-only program does not need scikit-learn, and ``import skpool`` itself (what the command
line's ``--help`` and ``skpool info`` pay for) imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import importlib as _importlib

__version__ = "0.1.0"

_LAZY = {
    "GeneralizedMaxPooling": "skpool._sklearn",
    "SeparabilityPooling": "skpool._sklearn",
    "resolve_device": "skpool._device",
    "describe_device": "skpool._device",
}
#: Subpackages shown by ``dir(skpool)`` (imported by ``import skpool.<name>``, not by ``*``).
_SUBMODULES = ("cli", "io", "models", "nn", "plotting")

__all__ = [
    "GeneralizedMaxPooling",
    "SeparabilityPooling",
    "describe_device",
    "resolve_device",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skpool' has no attribute {name!r}")


def __dir__():
    return sorted({*__all__, *_SUBMODULES})
