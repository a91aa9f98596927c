"""Properties over random shapes, dtypes and parameters (hypothesis; profile in conftest.py).

Data are drawn from a seeded numpy generator (hypothesis draws the seed, the shapes and the
parameters). Every tolerance is computed for the drawn problem from a first-order bound:

- GMP: per sample, ``gmp_reference.unit_error_bound`` (float64) or ``auto_unit_bound``
  (float32, refine_steps="auto"), from cond(G + lam I) and the problem's sizes; two code paths
  (batch sizes, padding, permuted locations) differ by at most the sum of their bounds;
- separability operators: per row, ``separability_reference.fit_row_bounds`` (the solve's
  n eps kappa_s / gap and the statistics' K-term rounding); two fits (batching, sample order,
  class names, float32 vs float64 solves) differ by at most the sum of their bounds, and a row
  that the data do not determine (bound >= 2) is not compared;
- separability transforms: ``separability_reference.pooling_bound`` (N-term products).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import separability_reference as ref
from gmp_reference import EPS32, EPS64, auto_unit_bound, solve_error_bound, unit_error_bound
from rounding import assert_rows_within
from skpool import GeneralizedMaxPooling, SeparabilityPooling
from skpool.nn.functional import generalized_max_pool2d

seeds = st.integers(0, 2**32 - 1)
float_dtypes = st.sampled_from([np.float32, np.float64])
relative_lams = st.sampled_from([1e-3, 1e-1, 1.0, 10.0, 1e3])


def gmp_data(seed, n_samples, n_locations, n_channels, relu, dtype):
    rng = np.random.default_rng(seed)
    stacks = rng.normal(size=(n_samples, n_locations, n_channels))
    if relu:
        stacks = np.maximum(stacks, 0.0)
    stacks = stacks.astype(dtype)
    mean_squared = float(np.mean(np.sum(stacks.astype(np.float64) ** 2, axis=-1)))
    return stacks, max(mean_squared, 1e-3)


gmp_shapes = st.tuples(st.integers(1, 9), st.integers(1, 24), st.integers(1, 24))


def gmp_bounds(stacks, lams, dtype, normalize=True):
    """Per-sample max-abs bound of one computation against the exact GMP of ``stacks``
    (float64 values) at ridges ``lams``: normalised, unit_error_bound (float64) or
    auto_unit_bound (float32 "auto"); un-normalised, the relative bound times ||xi|| (float32:
    REFINE_TARGET-level, 2e-6 relative, or the plain solve's where it is left unrefined)."""
    bounds = []
    for phi, lam in zip(np.asarray(stacks, dtype=np.float64), lams):
        if normalize:
            bound = (unit_error_bound(phi, lam, EPS64) if dtype == np.float64
                     else auto_unit_bound(phi, lam))
        else:
            relative = (solve_error_bound(phi, lam, EPS64) if dtype == np.float64
                        else auto_unit_bound(phi, lam) / 2)
            xi = np.linalg.lstsq(np.vstack([phi, np.sqrt(lam) * np.eye(phi.shape[1])]),
                                 np.concatenate([np.ones(len(phi)), np.zeros(phi.shape[1])]),
                                 rcond=None)[0]
            bound = relative * np.linalg.norm(xi)
        bounds.append(bound)
    return np.array(bounds)


def relative_ridges(stacks, lam):
    """The estimator's ridge per sample with lam_scale="relative": lam x mean squared norm."""
    stacks = np.asarray(stacks, dtype=np.float64)
    return lam * np.sum(stacks**2, axis=(1, 2)) / stacks.shape[1]


# ============================================================================================
# Generalized max pooling
@given(seed=seeds, shape=gmp_shapes, relu=st.booleans(), dtype=float_dtypes,
       relative_lam=relative_lams, batch_size=st.integers(1, 10), normalize=st.booleans())
def test_gmp_batched_equals_looped(seed, shape, relu, dtype, relative_lam, batch_size,
                                   normalize):
    """Any batch_size gives each sample's result alone (float32: within the refinement
    tolerance, since the number of refinement steps is chosen per batch)."""
    stacks, mean_squared = gmp_data(seed, *shape, relu, dtype)
    gmp = GeneralizedMaxPooling(lam=relative_lam * mean_squared, normalize=normalize,
                                batch_size=batch_size, device="cpu")
    batched = gmp.fit_transform(stacks)
    looped = np.concatenate([gmp.transform(sample[None]) for sample in stacks])
    assert batched.dtype == dtype and np.all(np.isfinite(batched))
    lams = relative_ridges(stacks, relative_lam * mean_squared)  # the default relative scale
    assert_rows_within(batched, looped, 2 * gmp_bounds(stacks, lams, dtype, normalize))


@given(seed=seeds, shape=gmp_shapes, relu=st.booleans(), dtype=float_dtypes,
       relative_lam=relative_lams)
def test_gmp_ragged_batches_equal_each_sample_alone(seed, shape, relu, dtype, relative_lam):
    """A list of stacks with different numbers of locations (padded and masked in batches)
    gives each stack's own result."""
    stacks, mean_squared = gmp_data(seed, *shape, relu, dtype)
    rng = np.random.default_rng(seed + 1)
    ragged = [sample[: rng.integers(1, len(sample) + 1)] for sample in stacks]
    gmp = GeneralizedMaxPooling(lam=relative_lam * mean_squared, batch_size=3, device="cpu")
    pooled = gmp.fit_transform(ragged)
    alone = np.concatenate([gmp.transform(sample[None]) for sample in ragged])
    # Padded to the batch's longest stack (at most N locations, zeros) vs alone
    bounds = []
    for sample in ragged:
        padded = np.zeros(stacks.shape[1:])
        padded[: len(sample)] = sample
        lam = relative_ridges(sample[None], relative_lam * mean_squared)
        bounds.append(gmp_bounds(sample[None], lam, dtype)[0]
                      + gmp_bounds(padded[None], lam, dtype)[0])
    assert_rows_within(pooled, alone, np.array(bounds))


@given(seed=seeds, shape=gmp_shapes, relu=st.booleans(), dtype=float_dtypes,
       relative_lam=relative_lams)
def test_gmp_is_invariant_to_permuting_locations(seed, shape, relu, dtype, relative_lam):
    """GMP pools a set of descriptors: their order does not matter (estimator and layer)."""
    stacks, mean_squared = gmp_data(seed, *shape, relu, dtype)
    order = np.random.default_rng(seed + 2).permutation(stacks.shape[1])
    gmp = GeneralizedMaxPooling(lam=relative_lam * mean_squared, device="cpu")
    # Permuted sums round differently: two computations, each within its bound
    lams = relative_ridges(stacks, relative_lam * mean_squared)  # the default relative scale
    assert_rows_within(gmp.fit_transform(stacks[:, order]), gmp.transform(stacks),
                       2 * gmp_bounds(stacks, lams, dtype))
    maps = torch.from_numpy(stacks).transpose(1, 2)[..., None]  # (B, C, N, 1)
    layer_out = generalized_max_pool2d(maps, relative_lam * mean_squared)
    layer_permuted = generalized_max_pool2d(maps[:, :, order], relative_lam * mean_squared)
    # the functional form: absolute lam, refine_steps="auto"
    lams = np.full(len(stacks), relative_lam * mean_squared)
    assert_rows_within(layer_permuted.numpy(), layer_out.numpy().astype(np.float64),
                       2 * gmp_bounds(stacks, lams, dtype))


@given(seed=seeds, shape=gmp_shapes, relu=st.booleans(), relative_lam=relative_lams)
def test_gmp_float32_agrees_with_float64(seed, shape, relu, relative_lam):
    """float32 input is computed in float32 (refined) and agrees with the float64 computation
    on the same float32-rounded data to 1e-5 (unit vectors)."""
    stacks, mean_squared = gmp_data(seed, *shape, relu, np.float32)
    gmp = GeneralizedMaxPooling(lam=relative_lam * mean_squared, device="cpu")
    single = gmp.fit_transform(stacks)
    double = gmp.fit_transform(stacks.astype(np.float64))
    assert single.dtype == np.float32 and double.dtype == np.float64
    lams = relative_ridges(stacks, relative_lam * mean_squared)
    bounds = gmp_bounds(stacks, lams, np.float32) + gmp_bounds(stacks, lams, np.float64)
    assert_rows_within(single, double, bounds)


# ============================================================================================
# Separability pooling
@st.composite
def separability_problems(draw):
    """Labelled maps (K, H, W, C) with planted class means, K·C >= 2N (B well conditioned)."""
    seed = draw(seeds)
    height, width = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    n_channels, n_classes = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    n_locations = height * width
    n_samples = max(2 * n_classes, -(-2 * n_locations // n_channels) + n_classes)
    n_samples += draw(st.integers(0, 6))
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_samples) % n_classes)
    class_means = 1.5 * rng.normal(size=(n_classes, height, width, n_channels))
    maps = class_means[labels] + rng.normal(size=(n_samples, height, width, n_channels))
    maps = 2.0 * maps + 0.5  # not already standardised
    params = {
        "alpha": draw(st.sampled_from([0.1, 1.0, 10.0])),
        "stride": draw(st.integers(1, 3)),
        # beyond the rank ·C of A the extra components are arbitrary (eigenvalue 0)
        "n_components": draw(st.integers(1, min(2, n_locations, (n_classes - 1) * n_channels))),
        "norm": draw(st.sampled_from(["l1", "l2"])),
        "solver": draw(st.sampled_from(["auto", "full"])),
    }
    return maps, labels, params


def _fit(maps, labels, **params):
    # float64 solves (explicitly: dtype="auto" would follow float32 maps), so that batching
    # is the only difference between the fits compared below
    return SeparabilityPooling(device="cpu", **{"dtype": "float64", **params}).fit(maps, labels)


def _row_bounds(maps, labels, params, solve_eps=EPS64):
    """Per-row (vector, value) bounds of one fit of the problem (fit_row_bounds; l1 rows
    v / ||v||_1 move by at most 2 sqrt(N) times the unit vector's error)."""
    grid = maps.shape[1:3]
    stride = params.get("stride", 1)
    out = ref.output_shape_for(grid, stride)
    stacks = maps.reshape(len(maps), -1, maps.shape[-1]).astype(np.float64)
    vectors, values = ref.fit_row_bounds(stacks, labels, grid, out, params["alpha"],
                                         params["n_components"], solve_eps)
    if params["norm"] == "l1":
        vectors = 2 * np.sqrt(stacks.shape[1]) * vectors
    return vectors, values


def _transform_bound(pool, maps, unit):
    """pooling_bound of the fitted operator on these maps in a precision ``unit``."""
    stacks = maps.reshape(len(maps), -1, maps.shape[-1])
    return ref.pooling_bound(stacks, pool.operator_, pool.channel_mean_, pool.channel_scale_,
                             unit)


@given(problem=separability_problems(), batch_size=st.integers(1, 12), dtype=float_dtypes)
def test_separability_batched_equals_looped(problem, batch_size, dtype):
    """Statistics accumulated batch by batch and merged equal one batch (fit), and transform
    in batches equals transforming each sample alone."""
    maps, labels, params = problem
    maps = maps.astype(dtype)
    whole = _fit(maps, labels, batch_size=len(maps), **params)
    batched = _fit(maps, labels, batch_size=batch_size, **params)
    vectors, _ = _row_bounds(maps, labels, params)
    ref.assert_same_rows(batched.operator_, whole.operator_, 2 * vectors)
    out = batched.transform(maps)
    alone = np.concatenate([batched.transform(sample[None]) for sample in maps])
    assert out.dtype == dtype
    bound = 2 * _transform_bound(batched, maps, np.finfo(dtype).eps)
    np.testing.assert_allclose(out, alone, rtol=0, atol=bound)


@given(problem=separability_problems())
def test_separability_fit_is_invariant_to_permuting_samples(problem):
    maps, labels, params = problem
    order = np.random.default_rng(len(maps)).permutation(len(maps))
    assume(not np.array_equal(order, np.arange(len(maps))))
    reference = _fit(maps, labels, **params)
    permuted = _fit(maps[order], labels[order], **params)
    vectors, values = _row_bounds(maps, labels, params)
    ref.assert_same_rows(permuted.operator_, reference.operator_, 2 * vectors)
    np.testing.assert_array_less(np.abs(permuted.eigenvalues_ - reference.eigenvalues_),
                                 2 * values)


@given(problem=separability_problems(), as_strings=st.booleans())
def test_separability_fit_is_invariant_to_relabelling_classes(problem, as_strings):
    """Renaming the classes (a permutation of the codes, or strings) changes nothing: A uses
    the unweighted mean of the class means and the sign convention is fixed, so the operator
    is equal, not only equal up to sign."""
    maps, labels, params = problem
    n_classes = labels.max() + 1
    renaming = np.random.default_rng(n_classes).permutation(n_classes)[::-1]
    renamed = renaming[labels]
    if as_strings:
        renamed = np.array([f"class-{code}" for code in renamed])
    reference = _fit(maps, labels, **params)
    relabelled = _fit(maps, renamed, **params)
    vectors, values = _row_bounds(maps, labels, params)
    ref.assert_same_rows(relabelled.operator_, reference.operator_, 2 * vectors)
    np.testing.assert_array_less(np.abs(relabelled.eigenvalues_ - reference.eigenvalues_),
                                 2 * values)


@given(problem=separability_problems())
def test_separability_float32_agrees_with_float64(problem):
    """(a) One fitted operator applied to float32 and float64 copies of the same maps: within
    the pooling product's float32 and float64 bounds. (b) An operator solved in float32
    (dtype="float32") vs float64: within the two fits' row bounds."""
    maps, labels, params = problem
    maps32 = maps.astype(np.float32)
    values64 = maps32.astype(np.float64)
    pool = _fit(values64, labels, **params)
    single, double = pool.transform(maps32), pool.transform(values64)
    assert single.dtype == np.float32 and double.dtype == np.float64
    bound = _transform_bound(pool, values64, EPS32) + _transform_bound(pool, values64, EPS64)
    np.testing.assert_allclose(single, double, rtol=0, atol=bound)
    solved32 = _fit(maps32, labels, dtype="float32", **params)
    assert solved32.operator_.dtype == np.float32
    vectors32, _ = _row_bounds(values64, labels, params, EPS32)
    vectors64, _ = _row_bounds(values64, labels, params)
    ref.assert_same_rows(solved32.operator_, pool.operator_, vectors32 + vectors64)
