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


# --------------------------------------------------------------------------------------------
# A first-order rounding-error bound of the solve itself (any precision, no refinement), for
# float64 results, plain float32 solves and comparisons of two code paths.
def solve_error_bound(phi: np.ndarray, lam: float, eps: float) -> float:
    """Bound on the relative 2-norm error of the un-normalised xi that skpool's solve computes
    in a precision of unit ``eps`` (machine epsilon, twice the unit roundoff u: Higham's
    gamma_k ~ k u is taken as k eps, a factor 2 of slack) from these values of one stack
    ``phi`` (N, C), without refinement. First order, from the algorithm's steps, with
    n = min(N, C) and m = max(N, C):

    - the Gram matrix G (n x n, m-term inner products): ``|dG| <= m eps |Phi|^T|Phi|``;
    - the ridge lam (rounded, or a relative one computed from G's trace): ``(m + 2) eps lam``;
    - Cholesky and its triangular solves: ``(n + 2) eps ||A||`` (the diagonal floor included),
      A = G + lam I; the rigorous constant ~3n^2 u (Higham, *Accuracy and Stability*, Thm 10.3)
      is never attained: errors grow like sqrt(n), so n is already generous;
    - primal (N > C): the right-hand side Phi^T 1, ``|db| <= N eps |Phi|^T 1``, and
      ``||dxi|| <= ||A^-1|| (||db|| + ||dA|| ||xi||)``;
    - dual (N <= C): alpha = A^-1 1, xi = Phi^T alpha: ``||dxi|| <= ||Phi^T A^-1|| ||dA||
      ||alpha|| + N eps || |Phi|^T |alpha| ||``.

    Both terms are computed from ``phi`` in float64 (an SVD-free inverse of A, cheap for the
    tests' sizes). The float64 reference :func:`gmp_solve` (SVD least squares, backward stable
    on the better conditioned augmented problem) errs by at most this bound at ``EPS64``.
    """
    phi = np.asarray(phi, dtype=np.float64)
    if not np.any(phi):
        return 0.0  # all-zero descriptors pool to exactly zero
    n_locations, n_channels = phi.shape
    dual = n_locations <= n_channels
    n, m = min(phi.shape), max(phi.shape)
    magnitude = np.abs(phi)
    gram = phi @ phi.T if dual else phi.T @ phi
    gram_abs = magnitude @ magnitude.T if dual else magnitude.T @ magnitude
    system = gram + lam * np.eye(n)
    inverse = np.linalg.inv(system)
    perturbation = eps * (
        m * np.linalg.norm(gram_abs, 2) + (m + 2) * lam + (n + 2) * np.linalg.norm(system, 2)
    )
    if dual:
        alpha = inverse @ np.ones(n_locations)
        xi = phi.T @ alpha
        error = np.linalg.norm(phi.T @ inverse, 2) * perturbation * np.linalg.norm(alpha)
        error += n_locations * eps * np.linalg.norm(magnitude.T @ np.abs(alpha))
    else:
        rhs = phi.sum(axis=0)
        xi = inverse @ rhs
        rhs_error = n_locations * eps * np.linalg.norm(magnitude.sum(axis=0))
        error = np.linalg.norm(inverse, 2) * (rhs_error + perturbation * np.linalg.norm(xi))
    size = np.linalg.norm(xi)
    return float(error / size) if size > 0 else 0.0


def unit_error_bound(phi: np.ndarray, lam: float, eps: float, eps_out: float | None = None
                     ) -> float:
    """Max-abs error bound of the normalised output xi / ||xi||: normalising at most doubles
    the relative error of :func:`solve_error_bound`; the norm (C terms) and the division add
    (C + 2) eps, and rounding the result to an output dtype ``eps_out`` (default ``eps``)."""
    eps_out = eps if eps_out is None else eps_out
    n_channels = np.shape(phi)[1]
    return 2 * solve_error_bound(phi, lam, eps) + (n_channels + 2) * eps + eps_out


def batch_bounds(bound, stacks, lams, *args) -> np.ndarray:
    """``bound(phi, lam, *args)`` for every stack of (B, N, C) ``stacks`` (one lam or one per
    sample), as a (B,) array."""
    lams = np.broadcast_to(np.asarray(lams, dtype=np.float64), (len(stacks),))
    return np.array([bound(phi, lam, *args) for phi, lam in zip(stacks, lams)])


def auto_solve_bound(phi: np.ndarray, lam: float) -> float:
    """Relative 2-norm error bound of the un-normalised xi of a float32 solve with
    ``refine_steps="auto"``: a sample is left unrefined only where skpool's own bound
    ``q >= eps32 * cond(G + lam I)`` is <= AUTO_REFINE_TOLERANCE, and is then within the plain
    float32 :func:`solve_error_bound`; otherwise it is refined to an estimated REFINE_TARGET,
    or solved in float64 (within :func:`solve_error_bound` at eps64). The result's rounding to
    float32 adds eps32."""
    if not np.any(phi):
        return 0.0  # all-zero descriptors pool to exactly zero
    unrefined = EPS32 * ridge_condition(phi, lam) <= AUTO_REFINE_TOLERANCE
    plain = solve_error_bound(phi, lam, EPS32) if unrefined else 0.0
    return max(plain, REFINE_TARGET, solve_error_bound(phi, lam, EPS64)) + EPS32


def reference_error_bound(phi: np.ndarray, lam: float) -> float:
    """Relative 2-norm error bound of :func:`gmp_solve` itself (un-normalised): a backward
    stable least-squares solve of ``[Phi; sqrt(lam) I] xi ~ [1; 0]`` (columnwise backward
    error ~ (N + C) eps64, practical constant) errs by
    ``(N + C) eps64 kappa (2 + (kappa + 1) ||r|| / (||A|| ||xi||))`` (Wedin; Higham,
    *Accuracy and Stability*, Thm 20.1), kappa = cond_2 of the augmented matrix A and r its
    residual. The second term grows like sqrt(lam) for a large lam (the residual ~ sqrt(N)
    while ||xi|| ~ 1/lam): there the reference, not skpool's normal equations, is the less
    accurate of the two."""
    phi = np.asarray(phi, dtype=np.float64)
    if not np.any(phi):
        return 0.0  # all-zero descriptors: the reference gives exactly zero too
    n_locations, n_channels = phi.shape
    system = np.vstack([phi, np.sqrt(lam) * np.eye(n_channels)])
    target = np.concatenate([np.ones(n_locations), np.zeros(n_channels)])
    singular = np.linalg.svd(system, compute_uv=False)
    kappa = singular[0] / singular[-1]
    xi = np.linalg.lstsq(system, target, rcond=None)[0]
    size = np.linalg.norm(xi)
    if size == 0:
        return 0.0
    residual = np.linalg.norm(target - system @ xi)
    return float((n_locations + n_channels) * EPS64 * kappa
                 * (2 + (kappa + 1) * residual / (singular[0] * size)))


def auto_unit_bound(phi: np.ndarray, lam: float) -> float:
    """Max-abs error bound of the normalised output of a float32 ``refine_steps="auto"``
    solve: twice :func:`auto_solve_bound` (normalising) plus the norm's and division's
    (C + 2) eps32. Like :func:`float32_tolerance`, with the first-order size factors of the
    unrefined solve (its Gram, right-hand side and Cholesky terms) kept."""
    return 2 * auto_solve_bound(phi, lam) + (np.shape(phi)[1] + 2) * EPS32
