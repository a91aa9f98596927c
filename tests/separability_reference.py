"""A slow float64 reference of separability pooling, straight from Algorithm 1 of Birodkar et al.

Per-sample Python loops for A and B, explicit dense C_m matrices and one
``scipy.linalg.eigh(A, B + alpha*C_m)`` per output location: independent of skpool's torch code
(shared by the core and the estimator tests; importable because pyproject sets
``pythonpath = ["tests"]``).
"""

import math

import numpy as np
import scipy.linalg


def normalise_channels(features):
    """(K, N, C) -> (G, mean, scale): per-channel standardisation over samples and locations."""
    mean = features.mean(axis=(0, 1))
    scale = features.std(axis=(0, 1))
    scale[scale == 0] = 1.0
    return (features - mean) / scale, mean, scale


def scatter_matrices(stacks, labels):
    """A and B (N, N) of normalised stacks (K, N, C), one sample at a time."""
    classes = np.unique(labels)
    class_means = [stacks[labels == q].mean(axis=0) for q in classes]
    grand_mean = sum(class_means) / len(classes)
    n_locations = stacks.shape[1]
    between = np.zeros((n_locations, n_locations))
    within = np.zeros((n_locations, n_locations))
    for q, class_mean in zip(classes, class_means):
        between += (class_mean - grand_mean) @ (class_mean - grand_mean).T
        members = np.flatnonzero(labels == q)
        class_scatter = np.zeros((n_locations, n_locations))
        for k in members:
            centred = stacks[k] - class_mean
            class_scatter += centred @ centred.T
        within += class_scatter / len(members)
    return between, within


def locality_cost_matrix(grid_shape, output_shape, u, v):
    """Dense C_m (N, N) for output cell (u, v): squared distances to its centre on the diagonal."""
    height, width = grid_shape
    centre_row = (u + 0.5) * height / output_shape[0] - 0.5
    centre_col = (v + 0.5) * width / output_shape[1] - 0.5
    distances = [
        (i - centre_row) ** 2 + (j - centre_col) ** 2 for i in range(height) for j in range(width)
    ]
    return np.diag(distances)


def output_shape_for(grid_shape, stride):
    return math.ceil(grid_shape[0] / stride), math.ceil(grid_shape[1] / stride)


def operator(between, within, grid_shape, output_shape, alpha, n_components, norm):
    """(k, M, N) operator and (k, M) eigenvalues, one scipy generalised eigh per location."""
    rows, values = [], []
    for u in range(output_shape[0]):
        for v in range(output_shape[1]):
            system = within + alpha * locality_cost_matrix(grid_shape, output_shape, u, v)
            eigenvalues, eigenvectors = scipy.linalg.eigh(between, system)
            top = eigenvectors[:, ::-1][:, :n_components].T  # (k, N)
            top = top * np.where(top.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
            order = 1 if norm == "l1" else 2
            rows.append(top / np.linalg.norm(top, ord=order, axis=1, keepdims=True))
            values.append(eigenvalues[::-1][:n_components])
    return np.stack(rows, axis=1), np.stack(values, axis=1)


def assert_same_rows(actual, expected, atol):
    """Rows agree to ``atol`` (a number, or one bound per row of shape (k, M)), up to a sign
    per row only where the row sums to about zero (there the sign convention sum(p) >= 0
    cannot be resolved by the two computations)."""
    actual = np.asarray(actual, dtype=np.float64)
    direct = np.abs(actual - expected).max(axis=-1)
    flipped = np.abs(actual + expected).max(axis=-1)
    ambiguous = np.abs(expected.sum(axis=-1)) < 1e-6
    error = np.where(ambiguous, np.minimum(direct, flipped), direct)
    excess = error / np.broadcast_to(atol, error.shape)
    worst = np.unravel_index(np.argmax(excess), error.shape)
    assert excess.max() < 1, (
        f"row {worst}: error {error[worst]:.3g} >= {np.broadcast_to(atol, error.shape)[worst]:.3g}"
    )


def row_error_bounds(between, within, costs, alpha, n_components, eps):
    """First-order error bounds of a computed operator's rows and ratios, per location.

    Returns ``(vector_bounds, value_bounds)``, each of shape (k, M). The solve whitens A by a
    Cholesky factor of :math:`B_m = B + \\alpha C_m + \\delta_m I` (the solver's default ridge
    :math:`\\delta_m = \\epsilon\\,\\mathrm{tr}(B_m)`), so the whitened matrix S carries an
    error :math:`\\|E\\| \\lesssim n\\,\\epsilon\\,\\kappa_s(B_m)\\,\\mu_1`, with
    :math:`\\kappa_s` the condition number of :math:`B_m` scaled to a unit diagonal (Cholesky's
    error depends on that one, not on :math:`\\kappa(B_m)`: van der Sluis; Demmel 1989).
    Weyl's theorem bounds each ratio's error by :math:`\\|E\\|`, and Davis–Kahan the angle of
    component j by :math:`\\|E\\| / \\mathrm{gap}_j`, the gap to the nearest other eigenvalue;
    mapping the whitened vector back (:math:`p = L^{-\\top} z`) can stretch that angle by up to
    :math:`\\kappa(L) = \\sqrt{\\kappa_s}` (in the scaled coordinates).
    A vector bound of 2 or more means the row is not determined by the data at that precision
    (any unit vector is within it). ``costs`` is (M, N), the diagonals of the :math:`C_m`.
    """
    n = within.shape[0]
    vector_bounds, value_bounds = [], []
    for cost in np.asarray(costs, dtype=np.float64):
        system = within + alpha * np.diag(cost)
        system = system + eps * np.trace(system) * np.eye(n)
        scale = np.sqrt(np.diag(system))
        scaled_condition = np.linalg.cond(system / np.outer(scale, scale))
        values = scipy.linalg.eigh(between, system, eigvals_only=True)[::-1]
        error = n * eps * scaled_condition * max(values[0], 0.0)
        gaps = [np.abs(np.delete(values, j) - values[j]).min() for j in range(n_components)]
        # back in the original coordinates the unit-diagonal scaling itself can stretch angles
        # by up to sqrt(max/min diagonal) (uneven where alpha C_m dominates B)
        stretch = np.sqrt(scaled_condition) * np.sqrt(scale.max() / scale.min())
        vector_bounds.append(
            np.minimum(2.0, stretch * error / np.maximum(gaps, np.finfo(float).tiny))
        )
        value_bounds.append(np.full(n_components, error))
    return np.array(vector_bounds).T, np.array(value_bounds).T


def locality_costs(grid_shape, output_shape):
    """(M, N) diagonals of the C_m of every output cell, in the operator's row order."""
    return np.stack([
        np.diag(locality_cost_matrix(grid_shape, output_shape, u, v))
        for u in range(output_shape[0]) for v in range(output_shape[1])
    ])


def fit_row_bounds(stacks, labels, grid_shape, output_shape, alpha, n_components, eps,
                   statistics_eps=float(np.finfo(np.float64).eps)):
    """Per-row ``(vector_bounds, value_bounds)`` (each (k, M)) of an estimator's fit from raw
    stacks (K, N, C): :func:`row_error_bounds` of the solve in precision ``eps``, widened by
    the rounding of the statistics, which skpool accumulates centred in float64 for every
    solve dtype (``statistics_eps``), and by the rounding of the rows themselves.

    - A = D D^T with D's columns d_q = X_q - X (class mean minus the mean of class means):
      each entry rounds by (K_q + Q + 2) eps |G|max (a K_q-term mean, a Q-term mean, the
      difference), so ||dA|| / ||A|| <= 2 ||dD|| / ||D||, large where the class means nearly
      coincide (their difference cancels);
    - B (centred, Chan-style merges): (K + 2) eps || sum_q (1/K_q) sum |G - X_q| |G - X_q|^T ||
      relative to ||B||;
    - the solve perturbs the whitened problem S by (4 n + 4) eps kappa_s mu_1, counting its
      steps: the Cholesky factor of B_m (n), whitening A by two triangular solves (2 n), the
      symmetric eigensolver (backward stable, n eps ||S||) and forming B_m and A's factor
      (4); :func:`row_error_bounds` counts n, so it is given (4 n + 4) / n times ``eps``;
    - A's and B's rounding perturb the whitened problem by at most their relative size
      times kappa_s mu_1: they enter as an extra eps of (rel_A + rel_B) / n;
    - :func:`row_error_bounds` bounds the row's angle in the coordinates scaled to
      B_m's unit diagonal; the rows live in the original ones, where the scaling
      diag(B_m)^(-1/2) stretches an angle by up to sqrt(max_i b_ii / min_i b_ii), which
      alpha C_m makes large (a float32 row of a hypothesis example was off by 1.5 times the
      unstretched bound);
    - the row's normalisation (an N-term norm and a division), its rounding to the output
      dtype and the rounding of A and B to the solve's dtype add (N + 4) eps to each row.
    """
    stacks = np.asarray(stacks, dtype=np.float64)
    labels = np.asarray(labels)
    normalised, _, _ = normalise_channels(stacks)
    between, within = scatter_matrices(normalised, labels)
    n_samples, n_locations = stacks.shape[:2]
    classes = np.unique(labels)
    largest = np.abs(normalised).max(axis=(0, 2))  # (N,) |G|max per location
    class_means = np.stack([normalised[labels == q].mean(axis=0) for q in classes])
    differences = class_means - class_means.mean(axis=0)  # (Q, N, C)
    counts = np.array([np.sum(labels == q) for q in classes])
    mean_errors = (counts + len(classes) + 2)[:, None] * statistics_eps * largest[None, :]
    size_d = np.sqrt(np.sum(differences**2))
    error_d = np.sqrt(np.sum(mean_errors**2) * stacks.shape[-1])
    relative_a = 2 * error_d / size_d if size_d > 0 else 0.0
    spread = np.zeros((n_locations, n_locations))
    for q, count in zip(classes, counts):
        centred = np.abs(normalised[labels == q] - normalised[labels == q].mean(axis=0))
        spread += np.einsum("knc,kmc->nm", centred, centred) / count
    size_b = np.linalg.norm(within, 2)
    relative_b = ((n_samples + 2) * statistics_eps * np.linalg.norm(spread, 2) / size_b
                  if size_b > 0 else 0.0)
    effective = (eps * (4 * n_locations + 4) + relative_a + relative_b) / n_locations
    costs = locality_costs(grid_shape, output_shape)
    if n_locations == 1:  # 1 x 1 problems: the row is [1]; the ratio a / (b + alpha c + delta)
        ratio = between[0, 0] / (within[0, 0] + alpha * costs[:, 0] + eps * within[0, 0])
        vectors = np.full((n_components, len(costs)), 3 * eps)  # the norm and the division
        values = (4 * eps + relative_a + relative_b) * np.abs(ratio)[None, :]
        return vectors, np.broadcast_to(values, vectors.shape).copy()
    vectors, values = row_error_bounds(between, within, costs, alpha, n_components, effective)
    diagonals = np.diag(within)[None, :] + alpha * costs  # (M, N)
    diagonals = diagonals + eps * diagonals.sum(axis=1, keepdims=True)  # the ridge
    stretch = np.sqrt(diagonals.max(axis=1) / diagonals.min(axis=1))  # (M,)
    return np.minimum(2.0, vectors * stretch[None, :] + (n_locations + 4) * eps), values


def pooling_bound(stacks, operator, mean=None, scale=None, eps=float(np.finfo(np.float64).eps),
                  accumulation_eps=None):
    """Max-abs rounding bound of ``apply_pooling_operator`` (the transform and the layer) in
    precision ``eps``: ((F - mu) / sigma) then the N-term products with the rows, then
    * sigma + mu. The products err by N eps |P| |G| (Higham's gamma_N, taken as N eps), or
    by N ``accumulation_eps`` where the sums accumulate in a wider type (bfloat16 matrix
    products on CPU accumulate in float32: oneDNN's and ATen's cpublas's f32 accumulator);
    the subtraction, division, multiplication, the operator's cast to the dtype and the
    rounding of the products' result add 5 eps of the same size; rounding mu (cast to the
    dtype) moves the output by (1 + sum|p|) eps |mu|, since the division and the
    multiplication by the same sigma cancel to first order.
    ``stacks`` (B, N, C) raw values, ``operator`` (k, M, N), ``mean``/``scale`` (C,) or None."""
    stacks = np.asarray(stacks, dtype=np.float64)
    operator = np.abs(np.asarray(operator, dtype=np.float64))
    n_locations = stacks.shape[1]
    accumulation_eps = eps if accumulation_eps is None else accumulation_eps
    mean = np.zeros(stacks.shape[-1]) if mean is None else np.asarray(mean, dtype=np.float64)
    centred = np.abs(stacks - mean)  # |F - mu|; |P| |G| sigma = |P| |F - mu|
    products = np.einsum("kmn,bnc->bkmc", operator, centred).max()
    row_sums = operator.sum(axis=-1).max()
    return float((n_locations * accumulation_eps + 5 * eps) * products
                 + (1 + row_sums) * eps * np.abs(mean).max())
