"""Properties over random shapes, dtypes and parameters (hypothesis; profile in conftest.py).

Data are drawn from a seeded numpy generator (hypothesis draws the seed, the shapes and the
parameters): random features keep every problem well posed, so the tolerances below are the
numerical ones. Stated tolerances:

- batched vs looped, permutations, relabelling, float64: 1e-10 (rounding of sums taken in
  another order; the top eigenvector amplifies it by 1/gap, and random data have gaps far above
  1e-6);
- float32 vs float64 of the same (float32-rounded) data: 1e-5 for GMP (the estimator refines
  float32 solves to about 1e-6), 1e-5 relative for separability ``transform`` with one fitted
  operator, 1e-3 for a separability operator solved in float32 (``dtype="float32"``; documented
  as about 1e-4 on well-conditioned data: here K·C >= 2N, alpha >= 0.1, planted class means).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

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
    scale = max(np.abs(looped).max(), 1e-30)
    tolerance = 1e-10 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(batched, looped, atol=tolerance * scale)


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
    tolerance = 1e-10 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(pooled, alone, atol=tolerance)


@given(seed=seeds, shape=gmp_shapes, relu=st.booleans(), dtype=float_dtypes,
       relative_lam=relative_lams)
def test_gmp_is_invariant_to_permuting_locations(seed, shape, relu, dtype, relative_lam):
    """GMP pools a set of descriptors: their order does not matter (estimator and layer)."""
    stacks, mean_squared = gmp_data(seed, *shape, relu, dtype)
    order = np.random.default_rng(seed + 2).permutation(stacks.shape[1])
    gmp = GeneralizedMaxPooling(lam=relative_lam * mean_squared, device="cpu")
    tolerance = 1e-10 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(gmp.fit_transform(stacks[:, order]), gmp.transform(stacks),
                               atol=tolerance)
    maps = torch.from_numpy(stacks).transpose(1, 2)[..., None]  # (B, C, N, 1)
    layer_out = generalized_max_pool2d(maps, relative_lam * mean_squared)
    layer_permuted = generalized_max_pool2d(maps[:, :, order], relative_lam * mean_squared)
    # the layer solves without refinement: float32 within eps32 * cond(G + lam)
    torch.testing.assert_close(layer_permuted, layer_out, rtol=0,
                               atol=tolerance if dtype == np.float64 else 1e-3)


@given(seed=seeds, shape=gmp_shapes, relu=st.booleans(), relative_lam=relative_lams)
def test_gmp_float32_agrees_with_float64(seed, shape, relu, relative_lam):
    """float32 input is computed in float32 (refined) and agrees with the float64 computation
    on the same float32-rounded data to 1e-5 (unit vectors)."""
    stacks, mean_squared = gmp_data(seed, *shape, relu, np.float32)
    gmp = GeneralizedMaxPooling(lam=relative_lam * mean_squared, device="cpu")
    single = gmp.fit_transform(stacks)
    double = gmp.fit_transform(stacks.astype(np.float64))
    assert single.dtype == np.float32 and double.dtype == np.float64
    np.testing.assert_allclose(single, double, atol=1e-5)


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


@given(problem=separability_problems(), batch_size=st.integers(1, 12), dtype=float_dtypes)
def test_separability_batched_equals_looped(problem, batch_size, dtype):
    """Statistics accumulated batch by batch and merged equal one batch (fit), and transform
    in batches equals transforming each sample alone."""
    maps, labels, params = problem
    maps = maps.astype(dtype)
    whole = _fit(maps, labels, batch_size=len(maps), **params)
    batched = _fit(maps, labels, batch_size=batch_size, **params)
    np.testing.assert_allclose(batched.operator_, whole.operator_, atol=1e-10)
    out = batched.transform(maps)
    alone = np.concatenate([batched.transform(sample[None]) for sample in maps])
    assert out.dtype == dtype
    tolerance = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(out, alone, rtol=tolerance, atol=tolerance * np.abs(alone).max())


@given(problem=separability_problems())
def test_separability_fit_is_invariant_to_permuting_samples(problem):
    maps, labels, params = problem
    order = np.random.default_rng(len(maps)).permutation(len(maps))
    assume(not np.array_equal(order, np.arange(len(maps))))
    reference = _fit(maps, labels, **params)
    permuted = _fit(maps[order], labels[order], **params)
    np.testing.assert_allclose(permuted.operator_, reference.operator_, atol=1e-10)
    np.testing.assert_allclose(permuted.eigenvalues_, reference.eigenvalues_, rtol=1e-8)


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
    np.testing.assert_allclose(relabelled.operator_, reference.operator_, atol=1e-10)
    np.testing.assert_allclose(relabelled.eigenvalues_, reference.eigenvalues_, rtol=1e-8)


@given(problem=separability_problems())
def test_separability_float32_agrees_with_float64(problem):
    """(a) One fitted operator applied to float32 and float64 copies of the same maps: 1e-5
    relative. (b) An operator solved in float32 (dtype="float32") vs float64: 1e-3."""
    maps, labels, params = problem
    maps32 = maps.astype(np.float32)
    pool = _fit(maps32.astype(np.float64), labels, **params)
    single, double = pool.transform(maps32), pool.transform(maps32.astype(np.float64))
    assert single.dtype == np.float32 and double.dtype == np.float64
    np.testing.assert_allclose(single, double, rtol=1e-5, atol=1e-5 * np.abs(double).max())
    solved32 = _fit(maps32, labels, dtype="float32", **params)
    assert solved32.operator_.dtype == np.float32
    np.testing.assert_allclose(solved32.operator_, pool.operator_, atol=1e-3)
