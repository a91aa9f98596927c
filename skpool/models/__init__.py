"""Deep models: the Birodkar et al. CNN, a CIFAR-style ResNet-18, the SGD-learned pooling layer,
skorch classifiers running the papers' procedures, and the retrieval embedders (triplet loss).

The classifiers and embedders import skorch, so they load on first use (the triplet loss and
its batch sampler need only torch):
``from skpool.models import DGMPClassifier`` works, and ``import skpool.models`` alone does not
import skorch.
"""

from __future__ import annotations

import importlib

from .cnn import PoolingCNN
from .pooling import GLOBAL_POOLINGS, STAGE_POOLINGS, LearnedPool2d
from .resnet import ResNet18

_CLASSIFIERS = ("PoolingCNNClassifier", "DGMPClassifier", "SeparabilityPoolingClassifier")
_RETRIEVAL = ("PoolingEmbedder", "DGMPEmbedder", "PoolingEmbeddingNet")
_TRIPLET = ("HardBatchTripletLoss", "PKBatchSampler")  # also in retrieval; torch only
_LAZY = {"PoolingCNNClassifier": "skpool.models._skorch", "DGMPClassifier": "skpool.models._skorch",
         "SeparabilityPoolingClassifier": "skpool.models._procedure",
         **dict.fromkeys(_RETRIEVAL, "skpool.models.retrieval"),
         **dict.fromkeys(_TRIPLET, "skpool.models._triplet")}

__all__ = [
    "PoolingCNN",
    "ResNet18",
    "LearnedPool2d",
    "STAGE_POOLINGS",
    "GLOBAL_POOLINGS",
    *_CLASSIFIERS,
    *_RETRIEVAL,
    *_TRIPLET,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skpool.models' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
