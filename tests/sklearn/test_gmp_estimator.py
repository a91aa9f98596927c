"""GeneralizedMaxPooling as a scikit-learn transformer: layouts, inputs, errors, pipelines."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from gmp_reference import EPS64, auto_unit_bound, batch_bounds, unit_error_bound
from rounding import assert_rows_within
from skpool import GeneralizedMaxPooling
from testing_utils import CUDA_AVAILABLE, DEVICES


def reference_gmp(phi, lam):
    """float64, one sample at a time, normalised."""
    out = []
    for p in np.asarray(phi, dtype=np.float64):
        xi = np.linalg.solve(p.T @ p + lam * np.eye(p.shape[1]), p.sum(axis=0))
        out.append(xi / np.linalg.norm(xi))
    return np.stack(out)


def float64_bounds(stacks, lam):
    """Max-abs bound between two float64 computations of the unit outputs (skpool's and the
    normal-equations reference, each within gmp_reference.unit_error_bound; an LU solve of
    these SPD systems has the backward error of Cholesky)."""
    return 2 * batch_bounds(unit_error_bound, np.asarray(stacks, dtype=np.float64), lam, EPS64)


def test_layouts_agree(rng):
    maps = rng.random((6, 4, 5, 3))
    gmp = GeneralizedMaxPooling(lam=0.2, lam_scale="absolute", device="cpu")
    expected = reference_gmp(maps.reshape(6, 20, 3), 0.2)
    bounds = float64_bounds(maps.reshape(6, 20, 3), 0.2)
    assert_rows_within(gmp.fit_transform(maps), expected, bounds)
    assert_rows_within(gmp.fit_transform(maps.reshape(6, 20, 3)), expected, bounds)
    flat = GeneralizedMaxPooling(lam=0.2, lam_scale="absolute", device="cpu", grid_shape=(4, 5))
    assert_rows_within(flat.fit_transform(maps.reshape(6, 60)), expected, bounds)
    assert flat.n_features_in_ == 60 and flat.n_channels_in_ == 3


def test_two_d_input_is_locations_with_one_channel(rng):
    X = rng.standard_normal((5, 9))
    out = GeneralizedMaxPooling(lam=0.5, lam_scale="absolute", device="cpu").fit_transform(X)
    assert out.shape == (5, 1)
    assert_rows_within(out, reference_gmp(X[:, :, None], 0.5), float64_bounds(X[:, :, None], 0.5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(rng, dtype):
    maps = rng.random((3, 4, 4, 6)).astype(dtype)
    assert GeneralizedMaxPooling(device="cpu").fit_transform(maps).dtype == dtype
    ints = (maps * 10).astype(np.int64)
    assert GeneralizedMaxPooling(device="cpu").fit_transform(ints).dtype == np.float64


def test_float32_small_lambda_matches_float64_reference(rng):
    maps = rng.standard_normal((4, 6, 6, 36)).astype(np.float32)  # N = C = 36
    lam = 1e-6 * float(np.mean(np.sum(maps.astype(np.float64) ** 2, axis=-1)))
    out = GeneralizedMaxPooling(lam=lam, lam_scale="absolute", device="cpu").fit_transform(maps)
    stacks = maps.reshape(4, 36, 36).astype(np.float64)
    expected = reference_gmp(stacks, lam)
    # float32 "auto" within gmp_reference.auto_unit_bound, the reference within its bound
    bounds = [auto_unit_bound(p, lam) + unit_error_bound(p, lam, EPS64) for p in stacks]
    assert_rows_within(out, expected, np.array(bounds))


def test_ragged_list_equals_each_sample_alone(rng):
    stacks = [rng.standard_normal((n, 5)) for n in (3, 17, 8, 1, 17, 30)]
    gmp = GeneralizedMaxPooling(lam=0.3, lam_scale="absolute", device="cpu", batch_size=4)
    gmp.fit(stacks)
    pooled = gmp.transform(stacks)
    for stack, row in zip(stacks, pooled):
        # Padded and masked in a batch (up to 30 locations: the primal system) vs alone (the
        # dual one for N <= 5): two code paths, each within its bound; the padded one's
        # longer sums are those of the zero-filled stack.
        padded = np.zeros((30, 5))
        padded[: len(stack)] = stack
        bound = unit_error_bound(stack, 0.3, EPS64) + unit_error_bound(padded, 0.3, EPS64)
        assert_rows_within(row[None], gmp.transform(stack[None]), np.array([bound]))
        assert_rows_within(row[None], reference_gmp(stack[None], 0.3),
                      float64_bounds(stack[None], 0.3))


def test_batched_equals_looped(rng):
    maps = rng.random((37, 3, 3, 4))
    batched = GeneralizedMaxPooling(device="cpu", batch_size=64).fit_transform(maps)
    looped = GeneralizedMaxPooling(device="cpu", batch_size=1).fit_transform(maps)
    # Batches of 37 and of 1 may take other BLAS kernels: each within its bound (the
    # default relative lam: 1.0 x the sample's mean squared norm).
    stacks = maps.reshape(37, 9, 4)
    lams = [np.sum(p**2) / len(p) for p in stacks]
    assert_rows_within(batched, looped, float64_bounds(stacks, lams))


def test_other_numbers_of_locations_are_pooled(rng):
    gmp = GeneralizedMaxPooling(device="cpu").fit(rng.random((3, 4, 4, 5)))
    assert gmp.transform(rng.random((2, 7, 3, 5))).shape == (2, 5)


def test_torch_and_memmap_inputs(rng, tmp_path):
    maps = rng.random((10, 3, 4, 6)).astype(np.float32)
    expected = GeneralizedMaxPooling(device="cpu").fit_transform(maps)
    got_tensor = GeneralizedMaxPooling(device="cpu").fit_transform(torch.from_numpy(maps))
    assert isinstance(got_tensor, np.ndarray)
    # Exact: the same values through the same code in the same batch shapes (deterministic).
    np.testing.assert_array_equal(got_tensor, expected)
    path = tmp_path / "maps.dat"
    memmap = np.memmap(path, dtype=np.float32, mode="w+", shape=maps.shape)
    memmap[:] = maps
    memmap.flush()
    readonly = np.memmap(path, dtype=np.float32, mode="r", shape=maps.shape)
    got_memmap = GeneralizedMaxPooling(device="cpu", batch_size=3).fit_transform(readonly)
    # Exact against the in-memory array in the same batches of 3 (same code, same data and
    # shapes); batches of 3 vs one batch of 10 would be two code paths.
    in_memory = GeneralizedMaxPooling(device="cpu", batch_size=3).fit_transform(maps)
    np.testing.assert_array_equal(got_memmap, in_memory)


def test_unfitted_transform_is_allowed_and_fitted_checks_channels(rng):
    gmp = GeneralizedMaxPooling(device="cpu")
    assert gmp.transform(rng.random((2, 3, 3, 4))).shape == (2, 4)
    gmp.fit(rng.random((2, 3, 3, 4)))
    with pytest.raises(ValueError, match="channels"):
        gmp.transform(rng.random((2, 3, 3, 5)))


@pytest.mark.parametrize(
    "X, match",
    [
        (np.full((2, 3, 3, 2), np.nan), "NaN"),
        (np.full((2, 3, 3, 2), np.inf), "inf"),
        (np.zeros((2, 3, 3, 2, 1)), "5-D"),
        (np.zeros(4), "1D"),
        (np.zeros((0, 3, 2)), "0 sample"),
        ([np.zeros((3, 2)), np.zeros((3, 4))], "same number of channels"),
        (np.zeros((2, 3, 3, 2), dtype=complex), "Complex"),
    ],
)
def test_bad_input_is_rejected_clearly(X, match):
    with pytest.raises(ValueError, match=match):
        GeneralizedMaxPooling(device="cpu").fit(X)


def test_nan_in_a_late_batch_of_a_transform(rng):
    maps = rng.random((20, 2, 2, 3))
    maps[17, 1, 1, 2] = np.nan
    gmp = GeneralizedMaxPooling(device="cpu", batch_size=4).fit(maps[:10])
    with pytest.raises(ValueError, match="NaN"):
        gmp.transform(maps)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"lam": 0.0}, "lam"),
        ({"lam": -1.0}, "lam"),
        ({"lam": np.inf}, "lam"),
        ({"batch_size": 0}, "batch_size"),
        ({"device": "tpu"}, "device"),
        ({"grid_shape": (2, 0)}, "grid_shape"),
    ],
)
def test_bad_parameters_are_rejected(rng, params, match):
    with pytest.raises(ValueError, match=match):
        GeneralizedMaxPooling(**params).fit(rng.random((2, 2, 2, 3)))


@pytest.mark.skipif(CUDA_AVAILABLE, reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error(rng):
    with pytest.raises(ValueError, match="CUDA is not available"):
        GeneralizedMaxPooling(device="cuda").fit(rng.random((2, 2, 2, 3)))


def test_failed_fit_leaves_previous_fit_untouched(rng):
    gmp = GeneralizedMaxPooling(device="cpu").fit(rng.random((2, 3, 3, 4)))
    before = dict(gmp.__dict__)
    with pytest.raises(ValueError):
        gmp.fit(np.full((2, 3, 3, 7), np.nan))
    assert gmp.__dict__.keys() == before.keys() and gmp.n_channels_in_ == 4


def test_pickle_clone_and_set_output(rng):
    pd = pytest.importorskip("pandas")
    X = rng.random((4, 12))
    gmp = GeneralizedMaxPooling(lam=0.4, device="cpu", grid_shape=(2, 2)).fit(X)
    restored = pickle.loads(pickle.dumps(gmp))
    # Exact: a pickle round trip runs the same code on the same data (deterministic).
    np.testing.assert_array_equal(restored.transform(X), gmp.transform(X))
    assert clone(gmp).get_params() == gmp.get_params()
    frame = gmp.set_output(transform="pandas").transform(pd.DataFrame(X))
    assert list(frame.columns) == [f"generalizedmaxpooling{i}" for i in range(3)]


def _patch_maps(images):
    """(n, 64) digits -> (n, 8, 8, 9) maps of 3x3 patches (zero padded): local descriptors."""
    padded = np.pad(images.reshape(-1, 8, 8), ((0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    return windows.reshape(len(images), 8, 8, 9) / 16.0


def test_pipeline_with_logistic_regression_on_digits():
    X, y = load_digits(return_X_y=True)
    X, y = X[:400], y[:400]
    pipe = make_pipeline(
        FunctionTransformer(_patch_maps),
        GeneralizedMaxPooling(device="cpu"),
        LogisticRegression(max_iter=500),
    )
    search = GridSearchCV(pipe, {"generalizedmaxpooling__lam": [0.1, 10.0]}, cv=2).fit(X, y)
    assert search.best_params_["generalizedmaxpooling__lam"] in (0.1, 10.0)
    assert cross_val_score(search.best_estimator_, X, y, cv=2).mean() > 0.3  # chance is 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_device_parameter(rng, device):
    maps = rng.random((5, 4, 4, 8)).astype(np.float32)
    out = GeneralizedMaxPooling(lam_scale="absolute", device=device).fit_transform(maps)
    stacks = maps.reshape(5, 16, 8).astype(np.float64)
    bounds = [auto_unit_bound(p, 1.0) + unit_error_bound(p, 1.0, EPS64) for p in stacks]
    assert_rows_within(out, reference_gmp(stacks, 1.0), np.array(bounds))
