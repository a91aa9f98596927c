"""The fast paths of the separability solve against float64 numpy/scipy references:
the subspace top-k eigensolver (:func:`skpool._core.solve.eigen.top_eigenpairs`) and the fused
CPU factorisation (blocked Cholesky of [B_m; D^T], tile-inverse back substitution), on shapes
where they differ from a plain ``eigh`` / LAPACK solve: several tiles, a partial last tile,
close and repeated top eigenvalues, slow convergence (the ``eigh`` fallback), failed pivots."""

import numpy as np
import pytest
import scipy.linalg
import torch

import separability_reference as ref
from skpool._core.grid import locality_costs, output_grid_shape
from skpool._core.solve import cholesky, eigen, problem, routes
from skpool._core.solve import top_eigenpairs, top_generalized_eigenvectors


def psd_with_spectrum(rng, spectrum):
    """Q diag(spectrum) Q^T with a random orthogonal Q, float64 numpy."""
    q, _ = np.linalg.qr(rng.normal(size=(len(spectrum), len(spectrum))))
    return (q * spectrum) @ q.T


def angles(actual, expected):
    """Angles (radians) between matching columns (b, r, k), up to sign."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected)
    actual = actual / np.linalg.norm(actual, axis=-2, keepdims=True)
    expected = expected / np.linalg.norm(expected, axis=-2, keepdims=True)
    actual = actual * np.where((actual * expected).sum(axis=-2, keepdims=True) < 0, -1.0, 1.0)
    return 2 * np.arcsin(np.linalg.norm(actual - expected, axis=-2) / 2)  # exact near 0


def spectra(rng, size):
    """Named spectra: separated, close top pair, slow decay, repeated top, low rank."""
    tail = np.sort(rng.uniform(0, 0.3, size))[::-1]
    close = tail.copy()
    close[:3] = [1.0, 0.999, 0.99]
    slow = np.linspace(1.0, 0.6, size)
    repeated = tail.copy()
    repeated[:2] = 1.0
    low_rank = np.where(np.arange(size) < 5, np.linspace(1, 0.5, size), 0.0)
    separated = tail.copy()
    separated[:3] = [1.0, 0.7, 0.5]
    return {"separated": separated, "close": close, "slow": slow, "repeated": repeated,
            "low_rank": low_rank}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_subspace_top_eigenpairs_match_eigh(rng, dtype, k):
    size = 120  # above 3 (k + 12): the subspace iteration runs
    named = spectra(rng, size)
    matrices = np.stack([psd_with_spectrum(rng, 7.0 * s) for s in named.values()])
    values, vectors = top_eigenpairs(torch.as_tensor(matrices, dtype=dtype), k)
    exact_values, exact_vectors = np.linalg.eigh(matrices)
    exact_values, exact_vectors = exact_values[:, ::-1][:, :k], exact_vectors[:, :, ::-1][..., :k]
    eps = torch.finfo(dtype).eps
    np.testing.assert_allclose(values.numpy(), exact_values, rtol=0, atol=300 * eps * 7.0)
    got = vectors.numpy().astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-2), 1.0, atol=100 * eps)
    # each vector is an eigenvector to within the backward error the method promises
    residual = np.linalg.norm(matrices @ got - got * exact_values[:, None, :], axis=-2)
    assert residual.max() <= 300 * eps * 7.0, residual.max()
    for index, name in enumerate(named):
        spectrum = np.sort(7.0 * named[name])[::-1]
        for j in range(k):
            gaps = np.abs(np.delete(spectrum, j) - spectrum[j])
            if gaps.min() > 1e-3 * spectrum[0]:  # well determined: the angle is bounded
                bound = 300 * eps * spectrum[0] / gaps.min()
                column = slice(j, j + 1)
                assert angles(got[index, :, column], exact_vectors[index, :, column]) <= bound
    # the repeated top pair: the top-2 vectors span the same plane as eigh's
    if k >= 2:
        plane = list(named).index("repeated")
        sines = scipy.linalg.subspace_angles(got[plane, :, :2], exact_vectors[plane, :, :2])
        assert sines.max() < 1e3 * eps


def test_slow_spectra_fall_back_to_eigh(rng, monkeypatch):
    """With no rounds left the subspace iteration hands every matrix to eigh: same result."""
    matrices = torch.as_tensor(np.stack([psd_with_spectrum(rng, np.linspace(1, 0.9, 80))
                                         for _ in range(3)]))
    calls = []
    original = torch.linalg.eigh

    def counting_eigh(matrix, *args, **kwargs):
        calls.append(tuple(matrix.shape))
        return original(matrix, *args, **kwargs)

    monkeypatch.setattr(eigen, "_SUBSPACE_ROUNDS", 1)
    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    values, vectors = top_eigenpairs(matrices, 1)
    assert (3, 80, 80) in calls  # the fallback ran on the unconverged matrices
    exact_values, exact_vectors = np.linalg.eigh(matrices.numpy())
    np.testing.assert_allclose(values[:, 0].numpy(), exact_values[:, -1], rtol=1e-12)
    assert angles(vectors.numpy(), exact_vectors[..., -1:]).max() < 1e-8


def test_zero_and_identity_matrices_are_handled():
    """S = 0 (no class information) and S = cI (every vector optimal): finite unit vectors."""
    matrices = torch.stack([torch.zeros(60, 60), 3.0 * torch.eye(60)]).double()
    values, vectors = top_eigenpairs(matrices, 2)
    assert torch.isfinite(vectors).all() and torch.isfinite(values).all()
    torch.testing.assert_close(values, torch.tensor([[0.0, 0.0], [3.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(vectors[1].mT @ vectors[1], torch.eye(2, dtype=torch.float64))


def test_subspace_solver_is_deterministic(rng):
    matrices = torch.as_tensor(np.stack([psd_with_spectrum(rng, np.linspace(1, 0, 90))]))
    first = top_eigenpairs(matrices, 2)
    second = top_eigenpairs(matrices, 2)
    assert torch.equal(first[1], second[1])


# ------------------------------------------------------------------- fused CPU factorisation
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-3)])
@pytest.mark.parametrize("n,block", [(50, 16), (48, 16), (20, 32)])
def test_fused_cholesky_gives_factor_whitened_factor_and_gram(rng, dtype, rtol, n, block):
    count, rank = 3, 7
    x = rng.normal(size=(count, n, n + 5))
    systems = x @ x.transpose(0, 2, 1) + n * np.eye(n)
    factor = rng.normal(size=(n, rank))
    tiles = -(-n // block)
    work = torch.full((count, n + rank, n), float("nan"), dtype=dtype)  # upper tiles unread
    for start in range(0, n, block):
        columns = slice(start, start + block)
        work[:, start:n, columns] = torch.as_tensor(systems[:, start:, columns])
    work[:, n:] = torch.as_tensor(factor.T)
    inverses = torch.empty((count, tiles, block, block), dtype=dtype)
    gram = torch.empty((count, rank, rank), dtype=dtype)
    info = cholesky.fused_cholesky(work, inverses, gram, n)
    assert not info.any()
    lower = np.linalg.cholesky(systems)
    whitened_t = np.linalg.solve(lower, factor[None]).transpose(0, 2, 1)  # D^T L^-T
    expected_gram = factor.T @ np.linalg.solve(systems, factor[None])
    got = work[:, :n].double().numpy()
    for tile, start in enumerate(range(0, n, block)):  # L's tiles below the diagonal, and
        stop = min(start + block, n)  # the inverses of its diagonal tiles
        expected_tiles = lower[:, stop:, start:stop]
        np.testing.assert_allclose(got[:, stop:, start:stop], expected_tiles, rtol=rtol, atol=rtol)
        width = stop - start
        expected_inverse = np.linalg.inv(lower[:, start:stop, start:stop])
        scale = np.abs(expected_inverse).max()
        np.testing.assert_allclose(inverses[:, tile, :width, :width].double().numpy(),
                                   expected_inverse, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(work[:, n:].double().numpy(), whitened_t, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(gram.double().numpy(), expected_gram, rtol=rtol, atol=rtol)
    rhs = rng.normal(size=(count, n, 2))
    solved = cholesky.back_substitute(work, inverses, torch.as_tensor(rhs, dtype=dtype))
    expected = np.linalg.solve(lower.transpose(0, 2, 1), rhs)
    np.testing.assert_allclose(solved.double().numpy(), expected, rtol=rtol, atol=rtol)


def test_fused_cholesky_reports_the_first_failed_pivot(rng):
    n, block = 40, 16
    x = rng.normal(size=(2, n, 2 * n))
    systems = torch.as_tensor(x @ x.transpose(0, 2, 1))
    systems[1, 20, 20] = -1.0  # in the second tile
    expected_info = torch.linalg.cholesky_ex(systems).info
    work = torch.zeros((2, n + 3, n), dtype=torch.float64)
    work[:, :n] = systems
    info = cholesky.fused_cholesky(
        work, torch.empty((2, 3, block, block), dtype=torch.float64),
        torch.empty((2, 3, 3), dtype=torch.float64), n,
    )
    assert int(info[0]) == 0 and int(info[1]) == int(expected_info[1]) == 21


@pytest.mark.parametrize("n_samples", [40, 6])  # 6 samples on 144 locations: B singular
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fused", [True, False])
def test_low_rank_routes_match_scipy_on_a_large_rank(rng, monkeypatch, n_samples, dtype, fused):
    """12x12 grid, C=10, Q=6: r = 50, above 3 (k + 12), so top_eigenpairs iterates; tiles of
    32 over N = 144 (a partial last tile); chunks of 3 locations (a partial last chunk).
    ``fused=False`` runs the low-rank route that GPUs take (batched cholesky_ex and
    solve_triangular) on the CPU.

    Each row is compared within its own first-order error bound
    (:func:`separability_reference.row_error_bounds`: n eps kappa_s / gap). With 6 samples
    (one per class) B = 0: the ridge makes the top ratio about 1/eps, and the second
    component's gap is about eps times it, so that component is only determined to about
    0.1 by the data; it is compared against that bound, not against a fixed number (an
    earlier fixed 1e-9 failed at two threads on an AVX2 machine, 5e-5 apart)."""
    route = (routes.LowRankFused(block=32, cache_cells=3, cache_bytes=0) if fused
             else routes.LowRankBatched(cholesky=cholesky.batched_cholesky))
    monkeypatch.setitem(routes.ROUTES, ("cpu", "low_rank"), route)
    grid, n_classes, n_channels = (12, 12), 6, 10
    labels = np.arange(n_samples) % n_classes
    means = rng.normal(size=(n_classes, 144, n_channels))
    stacks = means[labels] + rng.normal(size=(len(labels), 144, n_channels))
    stacks, _, _ = ref.normalise_channels(stacks)
    between, within = ref.scatter_matrices(stacks, labels)
    out = output_grid_shape(grid, 3)
    from skpool._core.scatter import ScatterStatistics, class_weights_from_labels

    codes = torch.as_tensor(labels)
    weights = class_weights_from_labels(codes, n_classes, dtype=torch.float64)
    stats = ScatterStatistics.from_batch(torch.as_tensor(stacks), codes, weights)
    factor = stats.between_factor()
    assert factor.shape[1] == 50
    costs = locality_costs(grid, out)
    vectors, values = top_generalized_eigenvectors(
        factor.to(dtype), stats.within.to(dtype), costs.to(dtype), 2.0, 2, method="low_rank"
    )
    assert torch.isfinite(vectors).all() and torch.isfinite(values).all()
    eps = torch.finfo(dtype).eps
    row_bounds, value_bounds = ref.row_error_bounds(between, within, costs, 2.0, 2, eps)
    if n_samples == 40:  # against scipy on the unridged problem
        rows, expected_values = ref.operator(between, within, grid, out, 2.0, 2, "l2")
        ref.assert_same_rows(vectors.numpy(), rows, row_bounds)
        np.testing.assert_array_less(np.abs(values.numpy() - expected_values), value_bounds)
    else:  # singular B (ridged): the same whatever the chunking, within each row's bound
        assert (row_bounds[0] < 1e-2).all() and (row_bounds[1] > 1e-3).all()  # top determined
        one_by_one, _ = top_generalized_eigenvectors(
            factor.to(dtype), stats.within.to(dtype), costs.to(dtype), 2.0,
            2, method="low_rank", max_memory_bytes=1,  # one location at a time, still fused
        )
        # two computations, each within its bound of the exact rows
        ref.assert_same_rows(vectors.numpy(), one_by_one.double().numpy(), 2 * row_bounds)


def test_fused_route_retries_only_the_failed_locations(rng, monkeypatch):
    """A dead centre location (zero row and column in B) and no ridge (``ridge=0``):
    B + alpha C_m is singular only where C_m is zero there too (on a 9x9 grid pooled to 5x5,
    the centre cell alone), so that location, and only it, is factored again with a larger
    ridge; the result is the one of solving every location on its own."""
    monkeypatch.setitem(routes.ROUTES, ("cpu", "low_rank"),
                        routes.LowRankFused(block=16, cache_cells=9, cache_bytes=0))
    factor = torch.as_tensor(rng.normal(size=(81, 45)))
    half = torch.as_tensor(rng.normal(size=(81, 12)))
    within = half @ half.T + 0.1 * torch.eye(81, dtype=torch.float64)
    within[40], within[:, 40] = 0.0, 0.0  # the centre of the grid is constant
    costs = locality_costs((9, 9), (5, 5))
    assert int((costs == 0).any(dim=1).sum()) == 1
    attempts = []
    original = problem.LocalProblems.fill_augmented

    def spy(self, rows, relative, out, block):
        attempts.append((rows.numel(), float(relative.max())))
        return original(self, rows, relative, out, block)

    monkeypatch.setattr(problem.LocalProblems, "fill_augmented", spy)
    vectors, values = top_generalized_eigenvectors(
        factor, within, costs, 1.0, 1, method="low_rank", ridge=0.0
    )
    retries = [ridge for rows, ridge in attempts if rows == 1]
    assert len(retries) == 1 and retries[0] > 0
    assert all(rows in (9, 7, 1) for rows, _ in attempts)  # chunks of 9, 9, 7; retries of 1
    assert torch.isfinite(vectors).all()
    attempts.clear()
    one_by_one = top_generalized_eigenvectors(
        factor, within, costs, 1.0, 1, method="low_rank", ridge=0.0, max_memory_bytes=1
    )
    assert attempts[0][0] == 1
    torch.testing.assert_close(vectors, one_by_one[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(values, one_by_one[1], rtol=1e-12, atol=0)
