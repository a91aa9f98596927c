"""scikit-learn faces of skpool: thin estimators over the numerical core."""

from .gmp import GeneralizedMaxPooling
from .separability import SeparabilityPooling

__all__ = ["GeneralizedMaxPooling", "SeparabilityPooling"]
