"""The separability solve, split by role (being moved here from :mod:`skpool._core.geneig`).

- :mod:`.cholesky` — batched and fused blocked Cholesky factorisations;
- :mod:`.eigen` — the top-k eigensolver (Chebyshev-filtered subspace iteration).
"""
