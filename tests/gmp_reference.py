"""A slow float64 reference for generalized max pooling and the error bound its float32 solves
must meet (shared by the core, estimator and layer tests; importable as ``gmp_reference``).

The bound, for one sample Phi (N x C, float32 values) and ridge lam, on the max-abs error of the
normalised pooled vector against the exact solution for the *same* float32 values:

- kappa = cond_2(G + lam I), G the smaller Gram matrix (n x n, n = min(N, C)), from eigvalsh;
- a float32 Cholesky solve errs by about q = eps32 * kappa (normwise, relative; the rigorous
  bound carries a factor ~3n/2 that is not attained in practice: Higham, *Accuracy and
  Stability of Numerical Algorithms*, 2nd ed., Sec. 10.1). ``refine_steps="auto"`` leaves a
  solve unrefined only where its own (larger) bound on q is <= AUTO_REFINE_TOLERANCE; otherwise
  it refines to an estimated REFINE_TARGET, or solves in float64, which errs by at most about
  n * eps64 * kappa;
- normalising at most doubles a relative error, and the float32 output adds eps32.

So ``tolerance = 2 * max(q if q <= AUTO_REFINE_TOLERANCE else REFINE_TARGET, n eps64 kappa)
+ 2 eps32``.
"""

from __future__ import annotations

import numpy as np

from skpool._core.gmp import AUTO_REFINE_TOLERANCE, REFINE_TARGET

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


def gmp_solve(phi: np.ndarray, lam: float, normalize: bool = True) -> np.ndarray:
    """float64 GMP of one stack (N, C) as the least-squares problem
    ``min ||[Phi; sqrt(lam) I] xi - [1; 0]||``, solved by SVD (condition sqrt(kappa))."""
    phi = np.asarray(phi, dtype=np.float64)
    n_locations, n_channels = phi.shape
    system = np.vstack([phi, np.sqrt(lam) * np.eye(n_channels)])
    target = np.concatenate([np.ones(n_locations), np.zeros(n_channels)])
    xi = np.linalg.lstsq(system, target, rcond=None)[0]
    norm = np.linalg.norm(xi)
    return xi / norm if normalize and norm > 0 else xi


def gmp_batch(stacks, lams, normalize: bool = True) -> np.ndarray:
    """:func:`gmp_solve` over (B, N, C) stacks with one lam or one per sample."""
    lams = np.broadcast_to(np.asarray(lams, dtype=np.float64), (len(stacks),))
    return np.stack([gmp_solve(phi, lam, normalize) for phi, lam in zip(stacks, lams)])


def ridge_condition(phi: np.ndarray, lam: float) -> float:
    """cond_2(G + lam I) of the smaller Gram matrix of one stack, in float64."""
    phi = np.asarray(phi, dtype=np.float64)
    gram = phi @ phi.T if phi.shape[0] <= phi.shape[1] else phi.T @ phi
    eigenvalues = np.linalg.eigvalsh(gram)
    return float((eigenvalues[-1] + lam) / (max(eigenvalues[0], 0.0) + lam))


def float32_tolerance(phi: np.ndarray, lam: float) -> float:
    """The bound of the module docstring for ``refine_steps="auto"`` float32 solves."""
    kappa = ridge_condition(phi, lam)
    n = min(np.shape(phi))
    q = EPS32 * kappa
    solve = q if q <= AUTO_REFINE_TOLERANCE else REFINE_TARGET
    return 2 * max(solve, n * EPS64 * kappa) + 2 * EPS32


def mean_squared_norm(phi: np.ndarray) -> float:
    """trace(Phi^T Phi) / N of one stack: the unit of a relative lam."""
    phi = np.asarray(phi, dtype=np.float64)
    return float(np.sum(phi**2) / phi.shape[0])


def uneven(rng, shape, axis: str, ratio: float, kind: str = "uniform") -> np.ndarray:
    """float32 stacks (B, N, C) with one channel (``axis="channel"``) or one location
    (``"location"``) ``ratio`` times the others (the issue's cases), or every channel and
    location scaled by a log-uniform factor in [1, ratio] (``"random"``). ``kind``: "uniform"
    (positive, like ReLU features), "normal" or "relu"."""
    if kind == "uniform":
        phi = rng.random(shape)
    elif kind == "normal":
        phi = rng.standard_normal(shape)
    else:
        phi = np.maximum(rng.standard_normal(shape), 0.0)
    if axis == "channel":
        phi[..., 0] *= ratio
    elif axis == "location":
        phi[:, 0, :] *= ratio
    else:
        phi *= ratio ** rng.random((shape[0], 1, shape[2]))
        phi *= ratio ** rng.random((shape[0], shape[1], 1))
    return phi.astype(np.float32)
