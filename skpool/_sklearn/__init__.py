"""scikit-learn faces of skpool: thin estimators over the numerical core."""

from .gmp import GeneralizedMaxPooling

__all__ = ["GeneralizedMaxPooling"]
