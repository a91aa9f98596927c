"""The separability solve: top-k generalised eigenvectors for every output cell.

- :mod:`.generalized` — :func:`top_generalized_eigenvectors`: check, set up, pick the route,
  solve in chunks, evaluate the ratios;
- :mod:`.problem` — the per-cell systems: scaling, truncated supports, the ridge;
- :mod:`.routes` — the route interface, each route's memory per cell, the one table that
  picks a route;
- :mod:`.cholesky` — batched and fused blocked Cholesky factorisations;
- :mod:`.eigen` — the top-k eigensolver (Chebyshev-filtered subspace iteration);
- :mod:`.ratios` — the sign and norm of the rows, separability ratios, rows without class
  information and their fallback.
"""

from .eigen import top_eigenpairs
from .cholesky import batched_cholesky
from .generalized import top_generalized_eigenvectors
from .ratios import (
    fill_empty_rows,
    no_class_information,
    rayleigh_ratios,
    rows_without_class_information,
)

__all__ = [
    "top_generalized_eigenvectors",
    "rayleigh_ratios",
    "rows_without_class_information",
    "no_class_information",
    "fill_empty_rows",
    "top_eigenpairs",
    "batched_cholesky",
]
