"""Deep models: the Birodkar et al. CNN, a CIFAR-style ResNet-18, the SGD-learned pooling layer,
and skorch classifiers running the papers' procedures.

The classifiers import skorch, so they load on first use:
``from skpool.models import DGMPClassifier`` works, and ``import skpool.models`` alone does not
import skorch.
"""

from __future__ import annotations

import importlib

from .cnn import PoolingCNN
from .pooling import GLOBAL_POOLINGS, STAGE_POOLINGS, LearnedPool2d
from .resnet import ResNet18

_CLASSIFIERS = ("PoolingCNNClassifier", "DGMPClassifier", "SeparabilityPoolingClassifier")

__all__ = [
    "PoolingCNN",
    "ResNet18",
    "LearnedPool2d",
    "STAGE_POOLINGS",
    "GLOBAL_POOLINGS",
    *_CLASSIFIERS,
]


def __getattr__(name: str):
    if name in _CLASSIFIERS:
        value = getattr(importlib.import_module("skpool.models.classifiers"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skpool.models' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
