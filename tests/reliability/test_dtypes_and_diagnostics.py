"""Issue 28, classes 2 and 11.

Class 11: the output dtype follows one documented rule, "float32 for floating input of at most
32 bits (numpy float16/float32, torch float16/bfloat16/float32, lists of float32 rows),
float64 otherwise"; ``fit([])`` names the empty input.

Class 2: fitted diagnostics use the fitted values only: ``set_params`` after ``fit`` (without a
refit) does not change ``separability_ratios`` nor ``fitted_operator_.params``."""

import numpy as np
import pytest
import torch

from skpool import GeneralizedMaxPooling, SeparabilityPooling

from .helpers import labelled_maps

MAPS, LABELS = labelled_maps(seed=3, n_samples=16, grid=(5, 5), n_channels=2)

NARROW_INPUTS = {
    "numpy-float16": lambda m: m.astype(np.float16),
    "numpy-float32": lambda m: m.astype(np.float32),
    "torch-float16": lambda m: torch.tensor(m, dtype=torch.float16),
    "torch-bfloat16": lambda m: torch.tensor(m, dtype=torch.bfloat16),
    "list-of-float32-rows": lambda m: list(m.reshape(len(m), -1).astype(np.float32)),
}
WIDE_INPUTS = {
    "numpy-float64": lambda m: m,
    "numpy-int": lambda m: np.round(m * 10).astype(np.int64),
    "torch-float64": lambda m: torch.tensor(m),
    "python-lists": lambda m: m.reshape(len(m), -1).tolist(),
}


def _expected(case):
    return np.float32 if case in NARROW_INPUTS else np.float64


@pytest.mark.parametrize("case", [*NARROW_INPUTS, *WIDE_INPUTS])
def test_gmp_output_dtype_rule(case):
    X = {**NARROW_INPUTS, **WIDE_INPUTS}[case](MAPS)
    assert GeneralizedMaxPooling(device="cpu").fit_transform(X).dtype == _expected(case)


@pytest.mark.parametrize("case", [*NARROW_INPUTS, *WIDE_INPUTS])
def test_separability_output_dtype_rule(case):
    X = {**NARROW_INPUTS, **WIDE_INPUTS}[case](MAPS)
    grid = {"grid_shape": (5, 5)} if "list" in case else {}
    pool = SeparabilityPooling(device="cpu", **grid).fit(X, LABELS)
    assert pool.transform(X).dtype == _expected(case)
    assert pool.operator_.dtype == _expected(case)  # dtype="auto" follows the same rule


def test_float16_output_matches_float64_of_the_same_values():
    # float16 values are exact in float32: the float32 result of those values, to the
    # float32 solve's accuracy (the auto refinement's target 1e-6, x10 for the margin).
    half = MAPS.astype(np.float16)
    got = GeneralizedMaxPooling(device="cpu").fit_transform(half)
    reference = GeneralizedMaxPooling(device="cpu").fit_transform(half.astype(np.float64))
    np.testing.assert_allclose(got, reference, atol=1e-5)


@pytest.mark.parametrize("empty", [[], (), np.empty((0,)), np.empty((0, 3)), torch.empty(0, 4)])
@pytest.mark.parametrize("estimator", ["gmp", "separability"])
def test_empty_input_is_named(estimator, empty):
    with pytest.raises(ValueError, match="0 sample"):
        if estimator == "gmp":
            GeneralizedMaxPooling(device="cpu").fit(empty)
        else:
            SeparabilityPooling(device="cpu").fit(empty, [])


def test_empty_list_message_says_empty():
    with pytest.raises(ValueError, match="X is empty"):
        GeneralizedMaxPooling(device="cpu").fit([])


# --------------------------------------------------------------------------- class 2
def test_ratios_after_set_params_use_the_fitted_grid():
    pool = SeparabilityPooling(stride=2, device="cpu").fit(MAPS, LABELS)
    before = pool.separability_ratios(MAPS, LABELS)
    assert pool.output_shape_ == (3, 3)
    pool.set_params(stride=3)  # no refit: the fitted operator still has a 3x3 grid
    after = pool.separability_ratios(MAPS, LABELS)
    # same fitted state, same data, same code: identical
    np.testing.assert_array_equal(after.average, before.average)
    np.testing.assert_array_equal(after.learned, before.learned)
    assert (before.average > 0).all()  # the 2x2 blocks of a planted class difference
    pool.set_params(output_shape=(2, 2))
    np.testing.assert_array_equal(pool.separability_ratios(MAPS, LABELS).average,
                                  before.average)


def test_fitted_operator_params_are_those_of_the_fit():
    pool = SeparabilityPooling(stride=2, alpha=0.5, device="cpu").fit(MAPS, LABELS)
    pool.set_params(stride=3, alpha=7.0)
    params = pool.fitted_operator_.params
    assert params["stride"] == 2 and params["alpha"] == 0.5


def test_saved_and_reloaded_operator_keeps_the_fit_params(tmp_path):
    from skpool.io import estimator_from_arrays, load_operator, save_operator

    pool = SeparabilityPooling(stride=2, device="cpu").fit(MAPS, LABELS)
    expected = pool.separability_ratios(MAPS, LABELS)
    pool.set_params(stride=3)
    save_operator(pool, tmp_path / "op.npz")
    loaded = estimator_from_arrays(load_operator(tmp_path / "op.npz"))
    assert loaded.stride == 2
    np.testing.assert_array_equal(loaded.separability_ratios(MAPS, LABELS).average,
                                  expected.average)


def test_estimator_pickled_before_fit_params_were_kept_asks_for_a_refit():
    """An estimator without the fit's parameters (pickled by an older skpool) reads the
    current ones, and refuses, asking for a refit, where they no longer give its grid."""
    pool = SeparabilityPooling(stride=2, device="cpu").fit(MAPS, LABELS)
    expected = pool.separability_ratios(MAPS, LABELS)
    del pool.__dict__["_fit_params"]
    np.testing.assert_array_equal(pool.separability_ratios(MAPS, LABELS).average,
                                  expected.average)  # same parameters: same answer
    pool.set_params(stride=3)
    with pytest.raises(ValueError, match="refit"):
        pool.separability_ratios(MAPS, LABELS)
