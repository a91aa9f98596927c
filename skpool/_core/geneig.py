"""Kept for imports: the separability solve now lives in :mod:`skpool._core.solve`.

The names below are re-exported unchanged; new code imports them from
:mod:`skpool._core.solve`.
"""

from .solve import (
    batched_cholesky,
    fill_empty_rows,
    no_class_information,
    rayleigh_ratios,
    rows_without_class_information,
    top_eigenpairs,
    top_generalized_eigenvectors,
)

__all__ = [
    "fill_empty_rows",
    "rows_without_class_information",
    "no_class_information",
    "top_eigenpairs",
    "top_generalized_eigenvectors",
    "rayleigh_ratios",
    "batched_cholesky",
]
