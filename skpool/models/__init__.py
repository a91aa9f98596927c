"""Deep models: the Birodkar et al. CNN and skorch classifiers running the papers' procedures."""

from .cnn import GLOBAL_POOLINGS, STAGE_POOLINGS, PoolingCNN

__all__ = ["PoolingCNN", "STAGE_POOLINGS", "GLOBAL_POOLINGS"]
