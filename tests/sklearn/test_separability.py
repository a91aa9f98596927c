"""SeparabilityPooling as a scikit-learn transformer: against the float64 reference of Algorithm 1,
layouts, the paper's properties, errors, pipelines."""

import pickle

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import separability_reference as ref
from skpool import SeparabilityPooling
from testing_utils import CUDA_AVAILABLE, DEVICES


def make_maps(rng, n_samples=36, grid=(5, 5), n_channels=2, n_classes=3):
    """Feature maps (n, H, W, C) whose class means differ, and their labels."""
    labels = np.arange(n_samples) % n_classes
    class_means = rng.normal(size=(n_classes, *grid, n_channels))
    maps = class_means[labels] + rng.normal(size=(n_samples, *grid, n_channels))
    return 3.0 * maps + 1.5, labels  # not already standardised


def reference_fit(maps, labels, stride, alpha, n_components, norm, normalize=True):
    grid = maps.shape[1:3]
    stacks = maps.reshape(len(maps), grid[0] * grid[1], -1).astype(np.float64)
    if normalize:
        stacks, mean, scale = ref.normalise_channels(stacks)
    else:
        mean, scale = np.zeros(stacks.shape[2]), np.ones(stacks.shape[2])
    between, within = ref.scatter_matrices(stacks, labels)
    out = ref.output_shape_for(grid, stride)
    operator, values = ref.operator(between, within, grid, out, alpha, n_components, norm)
    return operator, values, mean, scale


# ------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("grid", [(5, 5), (6, 5)])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("solver", ["low_rank", "full"])
@pytest.mark.parametrize("n_components,norm", [(1, "l2"), (2, "l1")])
@pytest.mark.parametrize("dtype,atol", [("float64", 1e-8), ("float32", 1e-4)])
def test_fit_matches_reference(grid, stride, solver, n_components, norm, dtype, atol):
    rng = np.random.default_rng(stride + 10 * grid[1])
    maps, labels = make_maps(rng, grid=grid)
    expected, values, mean, scale = reference_fit(maps, labels, stride, 0.7, n_components, norm)
    pool = SeparabilityPooling(
        alpha=0.7, stride=stride, n_components=n_components, norm=norm, solver=solver,
        dtype=dtype, device="cpu", batch_size=7,
    ).fit(maps, labels)
    ref.assert_same_rows(pool.operator_, expected, atol)
    np.testing.assert_allclose(pool.eigenvalues_, values, rtol=10 * atol)
    np.testing.assert_allclose(pool.channel_mean_, mean, rtol=1e-6)
    np.testing.assert_allclose(pool.channel_scale_, scale, rtol=1e-6)
    assert pool.output_shape_ == ref.output_shape_for(grid, stride) and pool.grid_shape_ == grid


def test_without_channel_normalisation_matches_reference(rng):
    maps, labels = make_maps(rng, grid=(5, 5))
    expected, _, _, _ = reference_fit(maps, labels, 2, 0.7, 1, "l2", normalize=False)
    pool = SeparabilityPooling(alpha=0.7, normalize_channels=False, device="cpu").fit(maps, labels)
    ref.assert_same_rows(pool.operator_, expected, 1e-8)
    np.testing.assert_array_equal(pool.channel_mean_, [0.0, 0.0])
    np.testing.assert_array_equal(pool.channel_scale_, [1.0, 1.0])


def test_transform_pools_normalised_maps_and_restores_scale(rng):
    maps, labels = make_maps(rng, grid=(5, 5))
    pool = SeparabilityPooling(alpha=0.7, n_components=2, device="cpu").fit(maps, labels)
    out = pool.transform(maps)
    assert out.shape == (36, 3, 3, 4)
    stacks = (maps.reshape(36, 25, 2) - pool.channel_mean_) / pool.channel_scale_
    for j in range(2):  # component-major channels: j*C + c
        pooled = np.einsum("mn,knc->kmc", pool.operator_[j], stacks)
        expected = pooled * pool.channel_scale_ + pool.channel_mean_
        np.testing.assert_allclose(out[..., 2 * j : 2 * j + 2].reshape(36, 9, 2), expected, rtol=1e-10)


def test_layouts_agree_and_mirror_the_input(rng):
    maps, labels = make_maps(rng, grid=(5, 5))
    four_d = SeparabilityPooling(device="cpu").fit(maps, labels)
    expected = four_d.transform(maps)
    three_d = SeparabilityPooling(grid_shape=(5, 5), device="cpu").fit(maps.reshape(36, 25, 2), labels)
    np.testing.assert_allclose(three_d.operator_, four_d.operator_, atol=1e-12)
    np.testing.assert_allclose(three_d.transform(maps.reshape(36, 25, 2)), expected.reshape(36, 9, 2))
    flat = SeparabilityPooling(grid_shape=(5, 5), device="cpu").fit(maps.reshape(36, 50), labels)
    np.testing.assert_allclose(flat.transform(maps.reshape(36, 50)), expected.reshape(36, 18))
    assert flat.n_features_in_ == 50 and flat.n_channels_in_ == 2
    names = flat.get_feature_names_out()
    assert len(names) == 18 and names[0] == "separabilitypooling_m0_j0_c0"
    assert names[3] == "separabilitypooling_m1_j0_c1"


def test_two_d_input_without_grid_is_one_dimensional_pooling(rng):
    X, y = rng.normal(size=(30, 9)), np.arange(30) % 2
    X[y == 1, 4] += 2.0
    pool = SeparabilityPooling(device="cpu").fit(X, y)
    assert pool.grid_shape_ == (9, 1) and pool.output_shape_ == (5, 1)
    assert pool.transform(X).shape == (30, 5)
    expected, _, _, _ = reference_fit(X[:, :, None, None], y, 2, 1.0, 1, "l2")
    ref.assert_same_rows(pool.operator_, expected, 1e-8)


def test_output_shape_overrides_stride(rng):
    maps, labels = make_maps(rng, grid=(6, 5))
    pool = SeparabilityPooling(stride=3, output_shape=(3, 2), device="cpu").fit(maps, labels)
    assert pool.output_shape_ == (3, 2) and pool.operator_.shape == (1, 6, 30)
    assert pool.transform(maps).shape == (36, 3, 2, 2)
    ratios = pool.separability_ratios(maps, labels)
    assert ratios.average.shape == (6,) and ratios.learned.shape == (1, 6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_dtype_follows_input(rng, dtype):
    maps, labels = make_maps(rng, grid=(5, 5))
    out = SeparabilityPooling(device="cpu").fit(maps.astype(dtype), labels).transform(maps.astype(dtype))
    assert out.dtype == dtype


def test_torch_input_and_string_labels(rng):
    maps, labels = make_maps(rng, grid=(5, 5))
    names = np.array(["cat", "dog", "eel"])[labels]
    expected = SeparabilityPooling(device="cpu").fit(maps, labels)
    pool = SeparabilityPooling(device="cpu").fit(torch.from_numpy(maps), names)
    np.testing.assert_array_equal(pool.classes_, ["cat", "dog", "eel"])
    np.testing.assert_allclose(pool.operator_, expected.operator_, atol=1e-12)
    np.testing.assert_allclose(pool.transform(torch.from_numpy(maps)), expected.transform(maps))


def test_batch_size_does_not_change_the_fit(rng):
    maps, labels = make_maps(rng, grid=(5, 5))
    one = SeparabilityPooling(device="cpu", batch_size=1).fit(maps, labels)
    many = SeparabilityPooling(device="cpu", batch_size=100, max_memory_mb=1e-3).fit(maps, labels)
    np.testing.assert_allclose(one.operator_, many.operator_, atol=1e-10)


# ------------------------------------------------------------------------ paper properties
def planted_maps(rng, n_samples=60, grid=(6, 6)):
    """Class information only at known pixels; everything else noise with the same statistics."""
    labels = np.arange(n_samples) % 2
    maps = rng.normal(size=(n_samples, *grid, 1))
    signal = np.zeros(grid)
    signal[1, 1] = signal[1, 4] = signal[4, 2] = signal[3, 5] = 2.0
    maps[labels == 1, :, :, 0] += signal
    return maps, labels


@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
def test_learned_operator_separates_better_than_average_pooling_everywhere(rng, alpha):
    maps, labels = planted_maps(rng)
    pool = SeparabilityPooling(alpha=alpha, device="cpu").fit(maps, labels)
    ratios = pool.separability_ratios(maps, labels)
    assert ratios.learned.shape == (1, 9) and ratios.average.shape == (9,)
    assert np.all(ratios.learned[0] > ratios.average)
    # ... and on data it was not fitted on (same distribution), at most cells.
    held_out, held_labels = planted_maps(np.random.default_rng(99))
    fresh = pool.separability_ratios(held_out, held_labels)
    assert np.mean(fresh.learned[0] > fresh.average) >= 0.75


def test_eigenvalues_are_the_achieved_penalised_ratios(rng):
    maps, labels = make_maps(rng, grid=(5, 5))
    pool = SeparabilityPooling(alpha=0.7, n_components=2, device="cpu").fit(maps, labels)
    stacks, _, _ = ref.normalise_channels(maps.reshape(36, 25, 2))
    between, within = ref.scatter_matrices(stacks, labels)
    for j in range(2):
        for m in range(9):
            p = pool.operator_[j, m]
            penalised = within + 0.7 * ref.locality_cost_matrix((5, 5), (3, 3), m // 3, m % 3)
            achieved = p @ between @ p / (p @ penalised @ p)
            np.testing.assert_allclose(pool.eigenvalues_[j, m], achieved, rtol=1e-10)
    assert np.all(pool.eigenvalues_[0] >= pool.eigenvalues_[1])


def test_too_few_samples_and_dead_pixels_give_a_finite_operator(rng):
    maps, labels = make_maps(rng, n_samples=4, grid=(7, 7), n_channels=1, n_classes=2)
    maps[:, 3, 3, 0] = 5.0  # dead pixel, the centre of a stride-1 cell
    for alpha in (0.0, 1.0):
        pool = SeparabilityPooling(alpha=alpha, stride=1, device="cpu").fit(maps, labels)
        assert np.all(np.isfinite(pool.operator_)) and not np.any(np.isnan(pool.eigenvalues_))
        assert np.all(np.isfinite(pool.transform(maps)))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.zeros((4, 3, 3, 2)), np.zeros(4), r"two classes.*got 1 class \(0.0\)"),
        (np.zeros((4, 3, 3, 2)), np.arange(5) % 2, "5 labels but X has 4 samples"),
        (np.zeros((4, 3, 3, 2)), None, "requires y"),
        (np.full((4, 3, 3, 2), np.nan), np.arange(4) % 2, "NaN"),
        (np.full((4, 3, 3, 2), np.inf), np.arange(4) % 2, "inf"),
        (np.zeros((4, 3, 3, 2, 1)), np.arange(4) % 2, "5-D"),
        (np.zeros(4), np.arange(4) % 2, "1D"),
        (np.zeros((4, 3, 3, 2)), np.linspace(0, 1, 4), "continuous"),
        ([np.zeros((3, 2)), np.zeros((4, 2))], np.arange(2), "one shape"),
    ],
)
def test_bad_input_is_rejected_clearly(X, y, match):
    with pytest.raises(ValueError, match=match):
        SeparabilityPooling(device="cpu").fit(X, y)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"alpha": -1.0}, "alpha"),
        ({"norm": "max"}, "norm"),
        ({"stride": 0}, "stride"),
        ({"n_components": 0}, "n_components"),
        ({"n_components": 10}, "n_components=10 exceeds the 9 input locations"),
        ({"dtype": "float16"}, "dtype"),
        ({"solver": "lanczos"}, "solver"),
        ({"output_shape": (4, 1)}, "output_shape"),
        ({"output_shape": (2, -1)}, "output_shape"),
        ({"device": "tpu"}, "device"),
        ({"max_memory_mb": 0}, "max_memory_mb"),
    ],
)
def test_bad_parameters_are_rejected(rng, params, match):
    maps, labels = make_maps(rng, n_samples=6, grid=(3, 3))
    with pytest.raises(ValueError, match=match):
        SeparabilityPooling(**{"device": "cpu", **params}).fit(maps, labels)


@pytest.mark.skipif(CUDA_AVAILABLE, reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error(rng):
    maps, labels = make_maps(rng, n_samples=6, grid=(3, 3))
    with pytest.raises(ValueError, match="CUDA is not available"):
        SeparabilityPooling(device="cuda").fit(maps, labels)


def test_transform_refuses_another_grid_or_channel_count(rng):
    maps, labels = make_maps(rng, grid=(5, 5))
    pool = SeparabilityPooling(device="cpu").fit(maps, labels)
    with pytest.raises(ValueError, match="5x5 grid"):
        pool.transform(rng.normal(size=(2, 5, 4, 2)))
    with pytest.raises(ValueError, match="5x5 grid"):
        pool.transform(rng.normal(size=(2, 24, 2)))
    with pytest.raises(ValueError, match="channels"):
        pool.transform(rng.normal(size=(2, 5, 5, 3)))
    with pytest.raises(ValueError, match="5x5 grid"):
        pool.separability_ratios(rng.normal(size=(2, 4, 5, 2)), [0, 1])
    flat = SeparabilityPooling(device="cpu").fit(maps.reshape(36, 50), labels)
    with pytest.raises(ValueError, match="50 features"):
        flat.transform(rng.normal(size=(2, 49)))


def test_failed_fit_leaves_previous_fit_untouched(rng):
    maps, labels = make_maps(rng, grid=(5, 5))
    pool = SeparabilityPooling(device="cpu").fit(maps, labels)
    before = {
        key: np.copy(value) if isinstance(value, np.ndarray) else value
        for key, value in pool.__dict__.items()
    }
    other, other_labels = make_maps(rng, grid=(3, 4), n_channels=3)
    for bad_y in (np.zeros(36), other_labels[:5]):  # fails after validating X, before solving
        with pytest.raises(ValueError):
            pool.fit(other, bad_y)
    assert pool.__dict__.keys() == before.keys()
    for key, value in before.items():  # exact: the very arrays of the first fit, restored
        np.testing.assert_array_equal(pool.__dict__[key], value)


# ------------------------------------------------------------------ sklearn integration
def test_pickle_clone_feature_names_and_set_output(rng):
    pd = pytest.importorskip("pandas")
    maps, labels = make_maps(rng, grid=(3, 3), n_channels=1)
    X = maps.reshape(36, 9)
    pool = SeparabilityPooling(device="cpu").fit(X, labels)
    restored = pickle.loads(pickle.dumps(pool))
    # Exact: the same computation on the same arrays (a round trip, not another code path).
    np.testing.assert_array_equal(restored.transform(X), pool.transform(X))
    assert clone(pool).get_params() == pool.get_params()
    frame = pool.set_output(transform="pandas").transform(pd.DataFrame(X))
    assert list(frame.columns) == [f"separabilitypooling_m{m}_j0_c0" for m in range(5)]
    maps_pool = SeparabilityPooling(device="cpu").set_output(transform="pandas").fit(maps, labels)
    with pytest.raises(ValueError, match="needs 2-D output"):
        maps_pool.transform(maps)


def test_pipeline_and_grid_search_on_digits():
    X, y = load_digits(return_X_y=True)
    X, y = X[:300], y[:300]
    pipe = make_pipeline(
        SeparabilityPooling(grid_shape=(8, 8), device="cpu"),
        StandardScaler(),
        LogisticRegression(max_iter=300),
    )
    grid = {"separabilitypooling__alpha": [0.1, 10.0], "separabilitypooling__norm": ["l1", "l2"]}
    search = GridSearchCV(pipe, grid, cv=2).fit(X, y)
    assert search.best_score_ > 0.5  # chance is 0.1
    assert search.best_estimator_[0].operator_.shape == (1, 16, 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_device_parameter(rng, device, dtype):
    maps, labels = make_maps(rng, grid=(6, 5))
    expected, _, _, _ = reference_fit(maps, labels, 2, 1.0, 2, "l2")
    pool = SeparabilityPooling(n_components=2, device=device, dtype=dtype).fit(maps, labels)
    assert isinstance(pool.operator_, np.ndarray)
    ref.assert_same_rows(pool.operator_, expected, 1e-8 if dtype == "float64" else 1e-4)
    assert pool.transform(maps.astype(np.float32)).dtype == np.float32


# ------------------------------------------------- parameters checked where they are used
@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, "8", None])
def test_transform_checks_batch_size_set_after_fit(rng, batch_size):
    """transform and separability_ratios use batch_size: set_params after fit (or an
    estimator rebuilt from a file) must not reach range() or np.empty with it."""
    maps, labels = make_maps(rng, grid=(4, 4))
    pool = SeparabilityPooling(device="cpu").fit(maps, labels)
    pool.set_params(batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size"):
        pool.transform(maps)
    with pytest.raises(ValueError, match="batch_size"):
        pool.separability_ratios(maps, labels)


def test_transform_checks_device_and_grid_shape_set_after_fit(rng):
    maps, labels = make_maps(rng, grid=(4, 4))
    pool = SeparabilityPooling(device="cpu").fit(maps, labels)
    with pytest.raises(ValueError, match="device"):
        pool.set_params(device=3).transform(maps)
    with pytest.raises(ValueError, match="grid_shape"):
        pool.set_params(device="cpu", grid_shape=(4, 0)).transform(maps.reshape(36, 16, 2))
    # the diagnostics use the fit's stride (issue 28); the next fit checks the new one
    before = pool.set_params(grid_shape=None).separability_ratios(maps, labels)
    after = pool.set_params(stride=0).separability_ratios(maps, labels)
    np.testing.assert_array_equal(after.average, before.average)  # same state, same code
    with pytest.raises(ValueError, match="stride"):
        pool.fit(maps, labels)


def test_any_valid_batch_size_gives_the_same_transform(rng):
    """Each sample is pooled on its own (a product with the same operator): the batch only
    changes how BLAS blocks the products, so outputs agree to rounding (rtol 1e-12: a dot
    product of N = 16 terms of unit-norm rows, a few u)."""
    maps, labels = make_maps(rng, grid=(4, 4))
    pool = SeparabilityPooling(device="cpu").fit(maps, labels)
    expected = pool.transform(maps)
    for batch_size in (1, 7, 10_000):
        got = pool.set_params(batch_size=batch_size).transform(maps)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


# ---------------------------------------------------- magnitudes, precision and overflow
def _output_error_bound(pool, maps, row_error):
    """How far transform's outputs can move when every operator entry moves by at most
    ``row_error``: |delta z| <= row_error * sum_n |G_n| * sigma, G the normalised maps (the
    largest over samples and channels), plus float64 rounding of the output itself."""
    stacks = maps.reshape(len(maps), -1, maps.shape[-1])
    normalised = (stacks - pool.channel_mean_) / pool.channel_scale_
    spread = (np.abs(normalised).sum(axis=1) * pool.channel_scale_).max()
    return row_error * spread + 1e-14 * np.abs(maps).max()


@pytest.mark.parametrize("offset", [1e4, 1e8, 1e12])
def test_float32_solve_of_float64_data_with_large_means(rng, offset):
    """dtype="float32" normalises in float64 and only then rounds: channels with a mean of
    1e8 (1e12) used to lose their variation to the cast (operator 0.75 off). atol 1e-3: the
    README's float32 guarantee for an operator solved in float32."""
    maps, labels = make_maps(rng, grid=(5, 5))
    maps = maps + offset
    exact = SeparabilityPooling(device="cpu").fit(maps, labels)
    fast = SeparabilityPooling(device="cpu", dtype="float32").fit(maps, labels)
    ref.assert_same_rows(fast.operator_, exact.operator_, 1e-3)
    np.testing.assert_allclose(fast.channel_mean_, exact.channel_mean_, rtol=1e-15)
    # Float32 maps of such a channel, pooled in float32: the same as the float64 pooling of the
    # same values to float32's rounding of the terms involved, each a few u32 times |maps|
    # times the row's l1 norm (at most sqrt(N)), accumulated over N + 4 operations.
    maps32 = maps.astype(np.float32)
    out32 = fast.transform(maps32)
    expected = fast.transform(maps32.astype(np.float64))
    row_l1 = np.abs(fast.operator_).sum(axis=-1).max()
    bound = (25 + 4) * np.finfo(np.float32).eps / 2 * (row_l1 + 2) * np.abs(maps).max()
    np.testing.assert_allclose(out32, expected, rtol=0, atol=bound)


@pytest.mark.parametrize("magnitude", [1e-40, 1e40, 1e-300, 1e300])
def test_float32_solve_of_float64_data_beyond_float32_range(rng, magnitude):
    """float64 maps of magnitude 1e+-40 (beyond float32's normal range) and 1e+-300: the
    normalised features are O(1), so the float32 solve is as accurate as for unit data
    (README: 1e-3 for an operator solved in float32); 1e40 used to raise FloatingPointError."""
    maps, labels = make_maps(rng, grid=(5, 5))
    exact = SeparabilityPooling(device="cpu").fit(maps, labels)
    fast = SeparabilityPooling(device="cpu", dtype="float32").fit(maps * magnitude, labels)
    ref.assert_same_rows(fast.operator_, exact.operator_, 1e-3)
    pooled = fast.transform(maps * magnitude)
    assert np.all(np.isfinite(pooled))
    np.testing.assert_allclose(pooled / magnitude, exact.transform(maps),
                               atol=_output_error_bound(exact, maps, 1e-3))


@pytest.mark.parametrize("magnitude", [1e-300, 1e-200, 1e-100, 1e100, 1e160, 1e200, 1e300])
@pytest.mark.parametrize("solver", ["low_rank", "full"])
def test_float64_maps_of_any_finite_magnitude(rng, magnitude, solver):
    """Channel statistics scale before they square: maps of magnitude 1e-300..1e300 give
    finite channel_scale_ (magnitude times that of the unit maps), the unit maps' operator and
    a finite transform (1e160 used to give channel_scale_ = inf and NaN). The normalised
    features agree with the unit maps' to a few u (the maps are scaled by a power of ten:
    one rounding each), so everything agrees to the float64 accuracy of the references
    (1e-9 for rows; 1e-12 relative for the channel statistics, sums of 50 terms)."""
    maps, labels = make_maps(rng, grid=(5, 5))
    unit = SeparabilityPooling(device="cpu", solver=solver).fit(maps, labels)
    pool = SeparabilityPooling(device="cpu", solver=solver).fit(maps * magnitude, labels)
    np.testing.assert_allclose(pool.channel_scale_, unit.channel_scale_ * magnitude, rtol=1e-12)
    np.testing.assert_allclose(pool.channel_mean_, unit.channel_mean_ * magnitude, rtol=1e-12)
    ref.assert_same_rows(pool.operator_, unit.operator_, 1e-9)
    pooled = pool.transform(maps * magnitude)
    assert np.all(np.isfinite(pooled))
    np.testing.assert_allclose(pooled / magnitude, unit.transform(maps),
                               atol=_output_error_bound(unit, maps, 1e-9))


def test_features_whose_scatter_overflows_are_a_clear_error(rng):
    """Without channel normalisation the scatter of float32 maps of magnitude 1e20 (float64
    ones of 1e160) is beyond the dtype's range: a ValueError naming the remedy."""
    maps, labels = make_maps(rng, grid=(3, 3))
    pool = SeparabilityPooling(device="cpu", normalize_channels=False, dtype="float32")
    with pytest.raises(ValueError, match="overflows float32.*dtype='float64'"):
        pool.fit(maps * 1e20, labels)
    pool.set_params(dtype="float64")
    with pytest.raises(ValueError, match="overflows float64.*normalize_channels=True"):
        pool.fit(maps * 1e160, labels)
    assert np.all(np.isfinite(pool.set_params(normalize_channels=True).fit(
        maps * 1e160, labels).transform(maps * 1e160)))


def limit_operator(maps, labels, stride):
    """alpha -> inf: B vanishes against alpha C_m, so row m is the top eigenvector of
    (A, C_m) (scipy, float64, from the reference statistics; C_m is definite where no cell
    centre sits on a pixel)."""
    grid = maps.shape[1:3]
    stacks, _, _ = ref.normalise_channels(maps.reshape(len(maps), grid[0] * grid[1], -1))
    between, _ = ref.scatter_matrices(stacks, labels)
    out = ref.output_shape_for(grid, stride)
    rows = []
    for u in range(out[0]):
        for v in range(out[1]):
            top = scipy.linalg.eigh(between, ref.locality_cost_matrix(grid, out, u, v))[1][:, -1]
            rows.append(top * np.sign(top.sum()) / np.linalg.norm(top))
    return np.stack(rows)[None]


@pytest.mark.parametrize("dtype,alpha", [("float32", 1e39), ("float32", 3e38), ("float64", 1e39),
                                         ("float64", 1e300)])
def test_huge_alpha_gives_the_limit_operator(rng, dtype, alpha):
    """alpha C_m beyond the solve's range (alpha = 1e39 in float32) used to raise a
    FloatingPointError blaming the statistics: B is negligible against alpha C_m, and the
    operator is the alpha -> inf limit. atol: 1e-3 in float32 (README), 1e-9 in float64 (the
    references)."""
    maps, labels = make_maps(rng, grid=(6, 6))
    pool = SeparabilityPooling(device="cpu", alpha=alpha, dtype=dtype).fit(maps, labels)
    assert np.all(np.isfinite(pool.operator_)) and np.all(np.isfinite(pool.eigenvalues_))
    expected = limit_operator(maps, labels, 2)
    ref.assert_same_rows(pool.operator_, expected, 1e-3 if dtype == "float32" else 1e-9)
    assert np.all(np.isfinite(pool.transform(maps)))


@pytest.mark.parametrize("radius", [1e300, 1.7976931348623157e308])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_support_radius_covering_the_grid_is_the_exact_operator(rng, radius, dtype):
    """support_radius=1e300 used to overflow radius**2; a radius covering the grid solves
    exactly as support_radius=None, the same computation (hence equal bit for bit)."""
    maps, labels = make_maps(rng, grid=(5, 5))
    exact = SeparabilityPooling(device="cpu", dtype=dtype).fit(maps, labels)
    covering = SeparabilityPooling(device="cpu", dtype=dtype, support_radius=radius)
    covering.fit(maps, labels)
    np.testing.assert_array_equal(covering.operator_, exact.operator_)
    np.testing.assert_array_equal(covering.eigenvalues_, exact.eigenvalues_)


def test_transform_whose_output_leaves_the_float32_range_is_a_clear_error(rng):
    """float32 maps of magnitude 3e38 (near float32's largest, 3.4e38): l2 rows of average
    pooling sum four values of 0.5 each, so a block of +3e38 pools to 6e38, which float32
    cannot hold. A clear error, not inf; the same maps in float64 pool to finite values."""
    maps, labels = make_maps(rng, grid=(4, 4), n_channels=1)
    pool = SeparabilityPooling(device="cpu").fit(np.repeat(maps[:1], 36, axis=0), labels)
    huge = np.where(rng.random((2, 4, 4, 1)) < 0.5, -3e38, 3e38)
    huge[:, :2, :2] = 3e38  # the first cell's block: 4 * 0.5 * 3e38 (its mean is near 0)
    with pytest.raises(ValueError, match="exceed the range of float32"):
        pool.transform(huge.astype(np.float32))
    assert np.all(np.isfinite(pool.transform(huge)))


def test_default_precision_follows_the_data():
    """dtype="auto" (the default, issue 13): float32 maps are solved in float32, float64 maps in
    float64 (as scikit-learn's dtype-preserving transformers do); an explicit dtype wins. The
    float32 rows agree with the float64 ones within float32's error on this well-conditioned
    problem (angle <= 1e-3 rad: n eps32 kappa / gap with n = 36, kappa and gap O(1-10))."""
    rng = np.random.default_rng(3)
    labels = np.arange(60) % 3
    maps = rng.normal(size=(60, 6, 6, 2)) + labels[:, None, None, None] * 0.5
    auto64 = SeparabilityPooling(device="cpu").fit(maps, labels)
    auto32 = SeparabilityPooling(device="cpu").fit(maps.astype(np.float32), labels)
    forced = SeparabilityPooling(device="cpu", dtype="float64").fit(
        maps.astype(np.float32), labels
    )
    assert SeparabilityPooling().dtype == "auto"
    assert auto64.operator_.dtype == np.float64 and forced.operator_.dtype == np.float64
    assert auto32.operator_.dtype == np.float32
    cosine = np.abs((auto32.operator_ * auto64.operator_).sum(-1)) / (
        np.linalg.norm(auto32.operator_, axis=-1) * np.linalg.norm(auto64.operator_, axis=-1)
    )
    assert np.arccos(np.clip(cosine, -1, 1)).max() < 1e-3
