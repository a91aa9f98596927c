"""The numerical core: pure torch functions, batched and device-agnostic.

Nothing here imports scikit-learn or skorch; every formula of skpool lives here once.
"""

from .gmp import generalized_max_pool, lengths_to_mask

__all__ = ["generalized_max_pool", "lengths_to_mask"]
