"""The numerical core: pure torch functions, batched and device-agnostic.

Nothing here imports scikit-learn or skorch; every formula of skpool lives here once.
"""

from .solve import rayleigh_ratios, top_generalized_eigenvectors
from .gmp import generalized_max_pool, lengths_to_mask
from .grid import average_pooling_operator, locality_costs, output_centres, output_grid_shape
from .operator import apply_pooling_operator
from .scatter import (
    ChannelStatistics,
    ScatterStatistics,
    between_class_factor,
    class_weights_from_labels,
)

__all__ = [
    "generalized_max_pool",
    "lengths_to_mask",
    "apply_pooling_operator",
    "ChannelStatistics",
    "ScatterStatistics",
    "between_class_factor",
    "class_weights_from_labels",
    "output_grid_shape",
    "output_centres",
    "locality_costs",
    "average_pooling_operator",
    "top_generalized_eigenvectors",
    "rayleigh_ratios",
]
