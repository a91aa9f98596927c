"""Bad input at every public entry point: each case names the exception type and a fragment of
the message that names the problem (never a traceback from deep inside, never a silent result).

Faces: the estimators' ``fit``/``transform`` (``GeneralizedMaxPooling``,
``SeparabilityPooling``), the layers and their functional forms (``skpool.nn``), the skorch
classifiers' ``fit``/``predict`` (``skpool.models``), ``skpool.io.load_operator``
and the command line (``skpool.cli.main``).

Dtype policy (asserted here and in :func:`test_accepted_dtypes_are_converted`):

- estimators: float32 and float64 keep their dtype; integers, booleans, numpy float16 and
  numeric object arrays become float64; torch float16/bfloat16 become float32; complex data is
  refused with ``ValueError("Complex data not supported")``; non-numeric data (strings) with
  ``ValueError``;
- layers and functional forms: floating-point tensors only (``TypeError`` otherwise, complex
  included), like torch's own pooling layers; a numpy array is a ``TypeError``;
- skorch classifiers: real numbers (float, int, bool) become float32; complex, strings and
  objects are a ``TypeError``;
- the CLI: features must be numeric non-complex arrays (exit status 1).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from skorch.exceptions import NotInitializedError

import separability_reference as ref
from gmp_reference import EPS64, auto_unit_bound, unit_error_bound
from reliability.helpers import TINY_NET, digits_like, labelled_maps
from skpool import GeneralizedMaxPooling, SeparabilityPooling, resolve_device
from skpool.cli import main
from skpool.io import FORMAT_VERSION, OperatorFileError, load_operator, save_operator
from skpool.models import (
    DGMPClassifier,
    PoolingCNNClassifier,
    SeparabilityPoolingClassifier,
)
from skpool.nn import GeneralizedMaxPool2d, LogSumExpPool2d, MixedMaxAvgPool2d, SeparabilityPool2d
from skpool.nn import functional as F
from testing_utils import CUDA_AVAILABLE

NO_CUDA_ONLY = pytest.mark.skipif(CUDA_AVAILABLE, reason="checks the error raised without CUDA")
MAPS, LABELS = labelled_maps(n_samples=6, grid=(3, 3), n_channels=2)  # (6, 3, 3, 2), 2 classes


# ============================================================================================
# Estimators: one table of bad X, run against the four estimator faces
def _with_nan(X):
    X = np.array(X, dtype=np.float64)
    X.flat[-1] = np.nan
    return X


def _with_inf(X):
    X = np.array(X, dtype=np.float64)
    X.flat[0] = -np.inf
    return X


#: id -> (X maker, {face: (exception, message fragment)}, with "*" the default for all faces).
BAD_X = {
    "nan-4d": (lambda: _with_nan(MAPS), {"*": (ValueError, "NaN or infinity")}),
    "inf-4d": (lambda: _with_inf(MAPS), {"*": (ValueError, "NaN or infinity")}),
    "nan-2d": (lambda: _with_nan(MAPS.reshape(6, 18)), {"*": (ValueError, "contains NaN")}),
    "inf-2d": (lambda: _with_inf(MAPS.reshape(6, 18)), {"*": (ValueError, "infinity")}),
    "nan-tensor": (
        lambda: torch.from_numpy(_with_nan(MAPS)),
        {"*": (ValueError, "NaN or infinity")},
    ),
    "empty-4d": (lambda: MAPS[:0], {"*": (ValueError, "0 sample")}),
    "empty-2d": (lambda: MAPS.reshape(6, 18)[:0], {"*": (ValueError, "0 sample")}),
    "empty-tensor": (lambda: torch.zeros(0, 3, 3, 2), {"*": (ValueError, "0 sample")}),
    "no-channels": (lambda: np.zeros((6, 3, 3, 0)), {"*": (ValueError, "empty sample shape")}),
    "no-locations": (lambda: np.zeros((6, 0, 2)), {"*": (ValueError, "empty sample shape")}),
    "no-features-2d": (lambda: np.zeros((6, 0)), {"*": (ValueError, "0 feature")}),
    "1d": (lambda: MAPS.reshape(-1)[:6], {"*": (ValueError, "Expected 2D array, got 1D")}),
    "scalar": (lambda: np.float64(1.0), {"*": (ValueError, "got scalar array")}),
    "5d": (lambda: MAPS[..., None], {"*": (ValueError, "got a 5-D array")}),
    "5d-tensor": (lambda: torch.zeros(6, 3, 3, 2, 1), {"*": (ValueError, "got a 5-D array")}),
    "1d-tensor": (lambda: torch.zeros(6), {"*": (ValueError, "got a 1-D array")}),
    "complex": (lambda: MAPS.astype(complex), {"*": (ValueError, "Complex data not supported")}),
    "complex-2d": (
        lambda: MAPS.reshape(6, 18).astype(np.complex64),
        {"*": (ValueError, "Complex data not supported")},
    ),
    "complex-tensor": (
        lambda: torch.zeros(6, 3, 3, 2, dtype=torch.complex64),
        {"*": (ValueError, "Complex data not supported")},
    ),
    "strings": (
        lambda: np.full((6, 3, 3, 2), "a"),
        {"*": (ValueError, "could not convert string to float")},
    ),
    "object-strings": (
        lambda: np.full((6, 3, 3, 2), "a", dtype=object),
        {"*": (ValueError, "could not convert string to float")},
    ),
    "nested-lists-ragged": (
        lambda: [[[1.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]]],
        {"*": (ValueError, "inhomogeneous")},
    ),
    "ragged-channels": (
        lambda: [np.zeros((3, 2)), np.zeros((4, 3))],
        {
            "*": (ValueError, "needs samples of one shape"),
            "gmp.fit": (ValueError, "same number of channels"),
            "gmp.transform": (ValueError, "same number of channels"),
        },
    ),
    "ragged-1d-stack": (
        lambda: [np.zeros((3, 2)), np.zeros(4)],
        {
            "*": (ValueError, "needs samples of one shape"),
            "gmp.fit": (ValueError, r"Stack 1 must be a 2-D \(N_i, C\) array, got \(4,\)"),
            "gmp.transform": (ValueError, r"Stack 1 must be a 2-D \(N_i, C\) array"),
        },
    ),
    "ragged-object-stack": (
        lambda: [np.zeros((3, 2), dtype=object), np.zeros((4, 2))],
        {
            "*": (ValueError, "needs samples of one shape"),
            "gmp.fit": (ValueError, "Stack 0 has unsupported dtype object"),
            "gmp.transform": (ValueError, "Stack 0 has unsupported dtype object"),
        },
    ),
    "ragged-complex-stack": (
        lambda: [torch.zeros(3, 2), torch.zeros(4, 2, dtype=torch.complex64)],
        {
            "*": (ValueError, "needs samples of one shape"),
            "gmp.fit": (ValueError, "Complex data not supported"),
            "gmp.transform": (ValueError, "Complex data not supported"),
        },
    ),
    "ragged-nan-stack": (
        lambda: [np.zeros((3, 2)), np.full((4, 2), np.nan)],
        {
            "*": (ValueError, "needs samples of one shape"),
            "gmp.fit": (ValueError, "NaN or infinity"),
            "gmp.transform": (ValueError, "NaN or infinity"),
        },
    ),
}

ESTIMATOR_FACES = ["gmp.fit", "gmp.transform", "separability.fit", "separability.transform"]


def _call_face(face, X):
    if face == "gmp.fit":
        return GeneralizedMaxPooling(device="cpu").fit(X)
    if face == "gmp.transform":  # GMP is stateless: an unfitted instance transforms
        return GeneralizedMaxPooling(device="cpu").transform(X)
    y = np.arange(len(X)) % 2 if hasattr(X, "__len__") else None
    if face == "separability.fit":
        return SeparabilityPooling(device="cpu").fit(X, y)
    fitted = SeparabilityPooling(device="cpu").fit(MAPS, LABELS)
    return fitted.transform(X)


@pytest.mark.parametrize("face", ESTIMATOR_FACES)
@pytest.mark.parametrize("case", list(BAD_X))
def test_estimators_refuse_bad_X(face, case):
    make, expected = BAD_X[case]
    error, message = expected.get(face, expected["*"])
    with pytest.raises(error, match=message):
        _call_face(face, make())


@pytest.mark.parametrize(
    "X, out_dtype",
    [
        pytest.param(MAPS.astype(np.float32), np.float32, id="float32"),
        pytest.param(MAPS, np.float64, id="float64"),
        pytest.param(np.round(MAPS * 10).astype(np.int64), np.float64, id="int64"),
        pytest.param(np.round(MAPS * 10).astype(np.int8), np.float64, id="int8"),
        pytest.param(np.abs(np.round(MAPS * 10)).astype(np.uint8), np.float64, id="uint8"),
        pytest.param(MAPS > 0, np.float64, id="bool"),
        pytest.param(MAPS.astype(np.float16), np.float32, id="numpy-float16"),  # as torch's
        pytest.param(MAPS.astype(object), np.float64, id="numeric-object"),
        pytest.param(torch.from_numpy(np.round(MAPS * 10)).long(), np.float64, id="torch-int64"),
        pytest.param(torch.from_numpy(MAPS > 0), np.float64, id="torch-bool"),
        pytest.param(torch.from_numpy(MAPS).half(), np.float32, id="torch-float16"),
        pytest.param(torch.from_numpy(MAPS).bfloat16(), np.float32, id="torch-bfloat16"),
    ],
)
def test_accepted_dtypes_are_converted(X, out_dtype):
    """Decision (the dtype policy of the module docstring): numeric non-complex input is
    accepted and computed in float64, except float32 input (and numpy's and torch's half
    floats, issue 28), which is computed and returned in float32. The numbers equal those of
    the float64 conversion."""
    as_float64 = (
        X.double().numpy() if isinstance(X, torch.Tensor) else np.asarray(X, dtype=np.float64)
    )
    gmp = GeneralizedMaxPooling(lam=0.5, device="cpu")
    pooled = gmp.fit_transform(X)
    assert pooled.dtype == out_dtype
    # Two computations of the same values (the conversion is exact): each within its bound
    # (float32 "auto" or float64), at the default relative ridge 0.5 x mean squared norm
    stacks = as_float64.reshape(6, 9, 2)
    bounds = []
    for phi in stacks:
        ridge = 0.5 * np.sum(phi**2) / len(phi)
        own = (unit_error_bound(phi, ridge, EPS64) if out_dtype == np.float64
               else auto_unit_bound(phi, ridge))
        bounds.append(own + unit_error_bound(phi, ridge, EPS64))
    errors = np.abs(pooled - gmp.fit_transform(as_float64)).max(axis=1)
    assert np.all(errors <= np.array(bounds)), (errors / np.array(bounds)).max()
    # the solve in float64 for both (dtype="auto" would solve float32 input in float32): what
    # is checked here is the conversion of the input, not the solve's precision
    separability = SeparabilityPooling(device="cpu", dtype="float64").fit(X, LABELS)
    reference = SeparabilityPooling(device="cpu", dtype="float64").fit(as_float64, LABELS)
    # Two float64 fits of the same values (statistics in float64 for every input dtype)
    vectors, _ = ref.fit_row_bounds(stacks, LABELS, (3, 3), (2, 2), 1.0, 1, EPS64)
    ref.assert_same_rows(separability.operator_, reference.operator_, 2 * vectors)
    out = separability.transform(X)
    assert out.dtype == out_dtype
    # One operator each, applied in the output dtype and in float64: the pooling bounds,
    # and the two operators' difference (2 row bounds) times the pooled magnitudes
    bound = (ref.pooling_bound(stacks, reference.operator_, reference.channel_mean_,
                               reference.channel_scale_, np.finfo(out_dtype).eps)
             + ref.pooling_bound(stacks, reference.operator_, reference.channel_mean_,
                                 reference.channel_scale_, EPS64)
             + 2 * vectors.max() * np.abs(stacks - reference.channel_mean_).sum(axis=1).max())
    np.testing.assert_allclose(out, reference.transform(as_float64), rtol=0, atol=bound)


# --------------------------------------------------------------------------------------------
# Estimators: labels, parameters, fit -> transform mismatches, transform before fit
def _separability_fit(y=None, X=MAPS, **params):
    return lambda: SeparabilityPooling(**{"device": "cpu", **params}).fit(
        X, LABELS if y is None else y
    )


def _gmp_fit(X=MAPS, **params):
    return lambda: GeneralizedMaxPooling(**{"device": "cpu", **params}).fit(X)


def _gmp_transform(**params):
    return lambda: GeneralizedMaxPooling(**{"device": "cpu", **params}).transform(MAPS)


def _fitted_transform(estimator, fit_X, X):
    def call():
        if isinstance(estimator, SeparabilityPooling):
            estimator.fit(fit_X, np.arange(len(fit_X)) % 2)
        else:
            estimator.fit(fit_X)
        return estimator.transform(X)

    return call


RNG = np.random.default_rng(1)
ESTIMATOR_CASES = [
    # ---- labels (SeparabilityPooling.fit)
    ("y-wrong-length", _separability_fit(np.arange(5) % 2), ValueError,
     "5 labels but X has 6 samples"),
    ("y-one-class", _separability_fit(np.zeros(6)), ValueError,
     r"at least two classes.*got 1 class"),
    ("y-none", lambda: SeparabilityPooling(device="cpu").fit(MAPS, None), ValueError,
     "SeparabilityPooling requires y to be passed"),
    ("y-continuous", _separability_fit(np.linspace(0, 1, 6)), ValueError,
     "Unknown label type: continuous"),
    pytest.param("y-nan", _separability_fit(np.array([0, 1, np.nan, 0, 1, 0])), ValueError,
                 "Input y contains NaN",
                 marks=pytest.mark.filterwarnings("ignore:invalid value encountered in cast")),
    ("y-2d", _separability_fit(np.stack([LABELS, LABELS], axis=1)), ValueError,
     "y should be a 1d array"),
    # ---- parameters
    ("gmp-lam-zero", _gmp_fit(lam=0.0), ValueError, "'lam' parameter"),
    ("gmp-lam-negative", _gmp_fit(lam=-1.0), ValueError, "'lam' parameter"),
    ("gmp-lam-nan", _gmp_fit(lam=math.nan), ValueError, "'lam' parameter"),
    ("gmp-lam-inf", _gmp_fit(lam=math.inf), ValueError, "'lam' parameter"),
    ("gmp-lam-string", _gmp_fit(lam="1"), ValueError, "'lam' parameter"),
    ("gmp-transform-lam-zero", _gmp_transform(lam=0.0), ValueError, "'lam' parameter"),
    ("gmp-batch-size-zero", _gmp_fit(batch_size=0), ValueError, "'batch_size' parameter"),
    ("gmp-normalize-string", _gmp_fit(normalize="yes"), ValueError, "'normalize' parameter"),
    ("gmp-grid-shape-one", _gmp_fit(grid_shape=(3,)), ValueError, "grid_shape must be"),
    ("gmp-grid-shape-wrong", _gmp_fit(grid_shape=(2, 2)), ValueError,
     r"3x3 grid but grid_shape=\(2, 2\)"),
    ("gmp-device-unknown", _gmp_fit(device="tpu"), ValueError, "Unknown device 'tpu'"),
    ("gmp-device-none", _gmp_fit(device=None), ValueError, "'device' parameter"),
    ("gmp-transform-device-unknown", _gmp_transform(device="tpu"), ValueError,
     "Unknown device 'tpu'"),
    ("sep-alpha-negative", _separability_fit(alpha=-1.0), ValueError, "'alpha' parameter"),
    ("sep-alpha-nan", _separability_fit(alpha=math.nan), ValueError, "'alpha' parameter"),
    ("sep-alpha-inf", _separability_fit(alpha=math.inf), ValueError, "'alpha' parameter"),
    ("sep-stride-zero", _separability_fit(stride=0), ValueError, "'stride' parameter"),
    ("sep-stride-float", _separability_fit(stride=1.5), ValueError, "'stride' parameter"),
    ("sep-n-components-zero", _separability_fit(n_components=0), ValueError,
     "'n_components' parameter"),
    ("sep-n-components-above-N", _separability_fit(n_components=10), ValueError,
     "n_components=10 exceeds the 9 input locations"),
    ("sep-n-components-above-rank-low-rank",
     _separability_fit(X=MAPS[..., :1], n_components=2, solver="low_rank"), ValueError,
     "solver=.low_rank. gives at most r=1 components .* needs solver=.full."),
    ("sep-norm-unknown", _separability_fit(norm="max"), ValueError, "'norm' parameter"),
    ("sep-solver-unknown", _separability_fit(solver="lanczos"), ValueError,
     "'solver' parameter"),
    ("sep-dtype-float16", _separability_fit(dtype="float16"), ValueError, "'dtype' parameter"),
    ("sep-output-shape-too-big", _separability_fit(output_shape=(4, 4)), ValueError,
     r"output_shape=\(4, 4\) must have 1 <= H' <= 3"),
    ("sep-output-shape-not-pair", _separability_fit(output_shape=(1,)), ValueError,
     "output_shape must be None or a pair"),
    ("sep-batch-size-zero", _separability_fit(batch_size=0), ValueError,
     "'batch_size' parameter"),
    ("sep-max-memory-zero", _separability_fit(max_memory_mb=0), ValueError,
     "'max_memory_mb' parameter"),
    ("sep-device-unknown", _separability_fit(device="tpu"), ValueError, "Unknown device 'tpu'"),
    ("sep-device-int", _separability_fit(device=3), ValueError, "'device' parameter"),
    pytest.param("gmp-cuda-without-cuda", _gmp_fit(device="cuda"), ValueError,
                 "CUDA is not available", marks=NO_CUDA_ONLY),
    pytest.param("gmp-transform-cuda-without-cuda", _gmp_transform(device="cuda:0"), ValueError,
                 "CUDA is not available", marks=NO_CUDA_ONLY),
    pytest.param("sep-cuda-without-cuda", _separability_fit(device="cuda"), ValueError,
                 "CUDA is not available", marks=NO_CUDA_ONLY),
    # ---- skpool.resolve_device, behind every device parameter
    ("resolve-device-unknown", lambda: resolve_device("tpu"), ValueError,
     "Unknown device 'tpu': expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'"),
    ("resolve-device-int", lambda: resolve_device(0), TypeError,
     "device must be a string or a torch.device, got int"),
    ("resolve-device-unsupported", lambda: resolve_device("meta"), ValueError,
     "Unsupported device 'meta'"),
    pytest.param("resolve-device-cuda-without-cuda", lambda: resolve_device(torch.device("cuda")),
                 ValueError, "CUDA is not available", marks=NO_CUDA_ONLY),
    # ---- fit -> transform mismatches
    ("gmp-other-channels", _fitted_transform(GeneralizedMaxPooling(device="cpu"), MAPS,
                                             RNG.random((2, 3, 3, 3))), ValueError,
     "X has 3 channels per location, but GeneralizedMaxPooling was fitted with 2"),
    ("gmp-2d-other-features", _fitted_transform(GeneralizedMaxPooling(device="cpu"),
                                                MAPS.reshape(6, 18), RNG.random((2, 17))),
     ValueError, "X has 17 features, but GeneralizedMaxPooling is expecting 18"),
    ("gmp-ragged-other-channels", _fitted_transform(GeneralizedMaxPooling(device="cpu"), MAPS,
                                                    [RNG.random((4, 3))]), ValueError,
     "3 channels per location"),
    ("sep-other-grid", _fitted_transform(SeparabilityPooling(device="cpu"), MAPS,
                                         RNG.random((2, 3, 4, 2))), ValueError,
     r"3x4 grid \(12 locations\), but SeparabilityPooling was fitted on a 3x3 grid"),
    ("sep-other-locations-3d", _fitted_transform(SeparabilityPooling(device="cpu"), MAPS,
                                                 RNG.random((2, 8, 2))), ValueError,
     "was fitted on a 3x3 grid"),
    ("sep-other-channels", _fitted_transform(SeparabilityPooling(device="cpu"), MAPS,
                                             RNG.random((2, 3, 3, 3))), ValueError,
     "X has 3 channels per location, but SeparabilityPooling was fitted with 2"),
    ("sep-2d-other-features", _fitted_transform(SeparabilityPooling(device="cpu"),
                                                MAPS.reshape(6, 18), RNG.random((2, 17))),
     ValueError, "X has 17 features, but SeparabilityPooling is expecting 18"),
    ("sep-ratios-wrong-labels", lambda: SeparabilityPooling(device="cpu").fit(MAPS, LABELS)
     .separability_ratios(MAPS, LABELS[:4]), ValueError, "4 labels but X has 6 samples"),
    # ---- transform before fit (GMP is stateless: see test_gmp_transform_needs_no_fit)
    ("sep-transform-unfitted", lambda: SeparabilityPooling(device="cpu").transform(MAPS),
     NotFittedError, "SeparabilityPooling instance is not fitted yet"),
    ("sep-ratios-unfitted",
     lambda: SeparabilityPooling(device="cpu").separability_ratios(MAPS, LABELS),
     NotFittedError, "not fitted yet"),
    ("sep-feature-names-unfitted",
     lambda: SeparabilityPooling(device="cpu").get_feature_names_out(), NotFittedError,
     "not fitted yet"),
    ("gmp-feature-names-unfitted",
     lambda: GeneralizedMaxPooling(device="cpu").get_feature_names_out(), NotFittedError,
     "not fitted yet"),
]


def _unpack(cases):
    """pytest.param(id, call, error, message) and plain tuples -> params with ids."""
    params = []
    for case in cases:
        if not hasattr(case, "marks"):  # a plain tuple, not a pytest.param
            case = pytest.param(*case)
        case_id, *rest = case.values
        params.append(pytest.param(*rest, id=case_id, marks=case.marks))
    return params


@pytest.mark.parametrize("call, error, message", _unpack(ESTIMATOR_CASES))
def test_estimators_refuse_bad_labels_parameters_and_shapes(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_gmp_transform_needs_no_fit():
    """Decision: GMP learns nothing, so ``transform`` works unfitted (tag requires_fit=False);
    only a fitted instance checks the channel count."""
    pooled = GeneralizedMaxPooling(lam=0.5, device="cpu").transform(MAPS)
    # Exact: fit learns nothing, so both run the same code on the same data
    np.testing.assert_array_equal(
        pooled, GeneralizedMaxPooling(lam=0.5, device="cpu").fit(MAPS).transform(MAPS)
    )


def test_a_class_with_one_sample_is_allowed():
    """Decision: a class with a single sample is allowed. It contributes its mean to A and no
    within-class scatter to B (its own scatter is zero); the operator is finite and unit-norm.
    Only fewer than two classes is an error. Every class a singleton (B = 0) is allowed too:
    the documented ridge keeps the solve finite."""
    singleton = np.array([0, 0, 0, 0, 0, 1])
    for labels in (singleton, np.arange(6)):
        pool = SeparabilityPooling(device="cpu").fit(MAPS, labels)
        assert np.all(np.isfinite(pool.operator_))
        # unit rows to the rounding of two 9-term norms and a division, (2 N + 4) eps64
        np.testing.assert_allclose(np.linalg.norm(pool.operator_, axis=-1), 1.0,
                                   rtol=(2 * 9 + 4) * EPS64)
        assert not np.any(np.isnan(pool.eigenvalues_))
        assert np.all(np.isfinite(pool.transform(MAPS)))


@pytest.mark.parametrize("batch_size", [1, 2, 256])
@pytest.mark.parametrize("face", ["fit", "transform"])
def test_ragged_stack_without_locations_is_an_error(face, batch_size):
    """Decision (issue 14): a stack with no locations in a GMP list input has nothing to pool;
    it is refused with a ValueError naming its index, for every batch_size (it was zeros with
    the default batch size and an IndexError with batch_size=1). 3-D/4-D arrays with N = 0 are
    refused too."""
    stacks = [RNG.random((5, 3)), RNG.random((2, 3)), np.zeros((0, 3)), RNG.random((4, 3))]
    pool = GeneralizedMaxPooling(device="cpu", batch_size=batch_size)
    call = pool.fit if face == "fit" else pool.transform
    with pytest.raises(ValueError, match=r"Stack 2 has no locations"):
        call(stacks)


# ============================================================================================
# Layers and functional forms
X_NCHW = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
OPERATOR = torch.full((1, 4, 16), 1 / 16)  # 4x4 -> 2x2, a global mean
LAYERS = {
    "GeneralizedMaxPool2d": lambda: GeneralizedMaxPool2d(lam=1.0),
    "SeparabilityPool2d": lambda: SeparabilityPool2d(
        OPERATOR, torch.zeros(3), torch.ones(3), output_shape=(2, 2), grid_shape=(4, 4)
    ),
    "MixedMaxAvgPool2d": lambda: MixedMaxAvgPool2d(),
    "LogSumExpPool2d": lambda: LogSumExpPool2d(),
}
BAD_MAPS = {
    "3d": (torch.zeros(3, 4, 4), ValueError, r"x must have shape \(B, C, H, W\), got a 3-D"),
    "5d": (torch.zeros(2, 3, 4, 4, 1), ValueError, r"x must have shape \(B, C, H, W\)"),
    "int": (torch.zeros(2, 3, 4, 4, dtype=torch.int64), TypeError,
            "x must be a floating-point tensor, got torch.int64"),
    "bool": (torch.zeros(2, 3, 4, 4, dtype=torch.bool), TypeError, "floating-point tensor"),
    "complex": (torch.zeros(2, 3, 4, 4, dtype=torch.complex64), TypeError,
                "floating-point tensor, got torch.complex64"),
    "numpy": (np.zeros((2, 3, 4, 4), dtype=np.float32), TypeError,
              "x must be a torch.Tensor, got ndarray"),
    "no-locations": (torch.zeros(2, 3, 0, 4), ValueError,
                     "no locations to pool: its spatial size is 0x4"),
}


@pytest.mark.parametrize("case", list(BAD_MAPS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layers_refuse_bad_maps(layer, case):
    x, error, message = BAD_MAPS[case]
    with pytest.raises(error, match=message):
        LAYERS[layer]()(x)


def _grid_error():
    return SeparabilityPool2d(OPERATOR, output_shape=(2, 2), grid_shape=(4, 4))(
        torch.zeros(2, 3, 2, 8)
    )


LAYER_CASES = [
    # ---- masks
    ("gmp-mask-float", lambda: GeneralizedMaxPool2d()(X_NCHW, torch.ones(2, 4, 4)), ValueError,
     r"mask must be a bool tensor of shape \(2, 4, 4\), got torch.float32"),
    ("gmp-mask-shape", lambda: GeneralizedMaxPool2d()(X_NCHW, torch.ones(2, 16).bool()),
     ValueError, "mask must be a bool tensor"),
    ("mixed-mask-shape", lambda: MixedMaxAvgPool2d()(X_NCHW, torch.ones(2, 4, 5).bool()),
     ValueError, "mask must be a bool tensor"),
    ("lse-mask-float", lambda: F.log_sum_exp_pool2d(X_NCHW, 1.0, torch.ones(2, 4, 4)),
     ValueError, "mask must be a bool tensor"),
    # ---- GeneralizedMaxPool2d / generalized_max_pool2d: lambda
    ("gmp-lam-zero", lambda: GeneralizedMaxPool2d(lam=0.0), ValueError,
     "lam must be a finite number > 0"),
    ("gmp-lam-negative", lambda: GeneralizedMaxPool2d(lam=-1.0), ValueError,
     "lam must be a finite number > 0"),
    ("gmp-lam-nan", lambda: GeneralizedMaxPool2d(lam=math.nan), ValueError,
     "lam must be a finite number > 0"),
    ("gmp-lam-inf", lambda: GeneralizedMaxPool2d(lam=math.inf), ValueError,
     "lam must be a finite number > 0"),
    ("gmp-lam-below-range", lambda: GeneralizedMaxPool2d(lam=1e-40), ValueError,
     r"lam must lie in \[exp\(-80\), exp\(80\)\]"),
    ("gmp-lam-string", lambda: GeneralizedMaxPool2d(lam="a"), TypeError,
     "lam must be a real number, got 'a'"),
    ("f-gmp-lam-zero", lambda: F.generalized_max_pool2d(X_NCHW, 0.0), ValueError,
     "lam must be a finite number > 0"),
    ("f-gmp-lam-inf", lambda: F.generalized_max_pool2d(X_NCHW, math.inf), ValueError,
     "lam must be a finite number > 0"),
    ("f-gmp-lam-tensor-negative", lambda: F.generalized_max_pool2d(X_NCHW, torch.tensor(-1.0)),
     ValueError, "lam must be finite and > 0"),
    ("f-gmp-lam-tensor-zero-for-one-sample",
     lambda: F.generalized_max_pool2d(X_NCHW, torch.tensor([1.0, 0.0])), ValueError,
     r"lam must be finite and > 0; got a tensor lam with values \[0.0\]"),
    ("f-gmp-lam-tensor-nan", lambda: F.generalized_max_pool2d(X_NCHW, torch.tensor(math.nan)),
     ValueError, "lam must be finite and > 0"),
    ("f-gmp-lam-tensor-shape", lambda: F.generalized_max_pool2d(X_NCHW, torch.ones(3)),
     ValueError, r"lam must be a float or a tensor of shape \(\) or \(2,\), got shape \(3,\)"),
    # ---- MixedMaxAvgPool2d / LogSumExpPool2d parameters
    ("mixed-mix-zero", lambda: MixedMaxAvgPool2d(mix=0.0), ValueError,
     r"mix must lie in \(0, 1\)"),
    ("mixed-mix-one", lambda: MixedMaxAvgPool2d(mix=1.0), ValueError, r"mix must lie in \(0, 1\)"),
    ("mixed-mix-nan", lambda: MixedMaxAvgPool2d(mix=math.nan), ValueError, "mix must lie in"),
    ("f-mixed-mix-above-one", lambda: F.mixed_max_avg_pool2d(X_NCHW, 1.5), ValueError,
     r"mix must lie in \[0, 1\], got 1.5"),
    ("f-mixed-mix-negative", lambda: F.mixed_max_avg_pool2d(X_NCHW, -0.1), ValueError,
     r"mix must lie in \[0, 1\]"),
    ("lse-r-zero", lambda: LogSumExpPool2d(r=0.0), ValueError, "r must be a finite number > 0"),
    ("lse-r-nan", lambda: LogSumExpPool2d(r=math.nan), ValueError, "r must be a finite number"),
    ("lse-r-min-zero", lambda: LogSumExpPool2d(r_min=0.0), ValueError,
     "r_min must be a finite number > 0"),
    ("lse-r-below-r-min", lambda: LogSumExpPool2d(r=5e-4), ValueError,
     "r must be greater than r_min=0.001"),
    ("f-lse-r-zero", lambda: F.log_sum_exp_pool2d(X_NCHW, 0.0), ValueError,
     "r must be a finite number > 0"),
    ("f-lse-r-inf", lambda: F.log_sum_exp_pool2d(X_NCHW, math.inf), ValueError,
     "r must be a finite number > 0"),
    # ---- SeparabilityPool2d construction and use
    ("sep-operator-2d", lambda: SeparabilityPool2d(torch.zeros(4, 16), output_shape=(2, 2)),
     ValueError, r"operator must have shape \(k, M, N\), got \(4, 16\)"),
    ("sep-output-shape-mismatch", lambda: SeparabilityPool2d(OPERATOR, output_shape=(3, 2)),
     ValueError, r"output_shape must be \(rows, cols\) with 4 locations in all"),
    ("sep-grid-shape-mismatch",
     lambda: SeparabilityPool2d(OPERATOR, output_shape=(2, 2), grid_shape=(4, 5)), ValueError,
     r"grid_shape must be \(rows, cols\) with 16 locations"),
    ("sep-missing-output-shape", lambda: SeparabilityPool2d(OPERATOR), TypeError,
     "output_shape"),
    ("sep-mean-without-scale",
     lambda: SeparabilityPool2d(OPERATOR, torch.zeros(3), output_shape=(2, 2)), ValueError,
     "Give both channel_mean and channel_scale, or neither"),
    ("sep-statistics-shapes",
     lambda: SeparabilityPool2d(OPERATOR, torch.zeros(3), torch.ones(2), output_shape=(2, 2)),
     ValueError, r"must both have shape \(C,\), got \(3,\) and \(2,\)"),
    ("sep-complex-operator",
     lambda: SeparabilityPool2d(OPERATOR.to(torch.complex64), output_shape=(2, 2)), TypeError,
     "operator must be real, got torch.complex64"),
    ("sep-nan-operator",
     lambda: SeparabilityPool2d(torch.full((1, 4, 16), math.nan), output_shape=(2, 2)),
     ValueError, "operator contains NaN or infinity"),
    ("sep-inf-mean",
     lambda: SeparabilityPool2d(OPERATOR, torch.tensor([0.0, math.inf, 0.0]), torch.ones(3),
                                output_shape=(2, 2)),
     ValueError, "channel_mean contains NaN or infinity"),
    ("sep-zero-scale",
     lambda: SeparabilityPool2d(OPERATOR, torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]),
                                output_shape=(2, 2)),
     ValueError, "channel_scale must be > 0"),
    ("sep-object-operator", lambda: SeparabilityPool2d(np.array([[[None]]]), output_shape=(1, 1)),
     TypeError, "numpy.object_"),
    ("sep-other-grid", _grid_error, ValueError,
     "The operator was fitted on a 4x4 grid; got input of spatial size 2x8"),
    ("sep-other-channels",
     lambda: LAYERS["SeparabilityPool2d"]()(torch.zeros(2, 5, 4, 4)), ValueError,
     re.escape("channel_mean has shape (3,): the operator was fitted on 3 channels, but the "
               "input has 5 channels")),
    ("sep-from-unfitted-estimator",
     lambda: SeparabilityPool2d.from_estimator(SeparabilityPooling()), NotFittedError,
     "call fit before SeparabilityPool2d.from_estimator"),
    ("f-sep-operator-locations",
     lambda: F.separability_pool2d(X_NCHW, torch.zeros(1, 4, 15), (2, 2)), ValueError,
     "The operator pools a grid of 15 locations but the input is 4x4 = 16 locations"),
    ("f-sep-output-shape", lambda: F.separability_pool2d(X_NCHW, OPERATOR, (3, 3)), ValueError,
     r"output_shape \(3, 3\) does not have the operator's 4 output locations"),
    ("f-sep-grid-shape",
     lambda: F.separability_pool2d(X_NCHW, OPERATOR, (2, 2), grid_shape=(2, 8)), ValueError,
     "fitted on a 2x8 grid; got input of spatial size 4x4"),
]


@pytest.mark.parametrize("call, error, message", _unpack(LAYER_CASES))
def test_layers_refuse_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("layer", list(LAYERS))
def test_non_finite_maps_are_never_hidden_by_the_layers(layer):
    """Decision: like torch's own pooling layers, the layers do not scan their input for NaN
    (that would cost a device synchronisation per call). A non-finite sample never turns into a
    finite, wrong result: GeneralizedMaxPool2d in eval mode raises FloatingPointError naming
    finiteness (its solve fails), and in a training step (no host decision, issue 27) gives
    NaN for that sample like the linear and order-statistic layers, which propagate NaN/inf
    to that sample's output only, leaving the other samples exact."""
    x = X_NCHW.clone()
    x[1, 0, 2, 2] = math.nan
    pool = LAYERS[layer]()
    if layer == "GeneralizedMaxPool2d":
        with pytest.raises(FloatingPointError, match="non-finite descriptors"):
            pool.eval()(x)
        pool.train()
        x.requires_grad_(True)
    out = pool(x)
    assert not torch.isfinite(out[1]).all()
    # Exact: sample 0 has the same values in batches of the same shape, and no kernel mixes
    # samples (the same code on the same data for it)
    torch.testing.assert_close(out[0], pool(X_NCHW)[0], rtol=0, atol=0)


def test_functional_forms_accept_empty_batches_and_channels():
    """Decision: an empty batch (B = 0) or no channels (C = 0) is a valid, empty result, as in
    torch (a DataLoader's last batch can be empty); no locations (H·W = 0) is an error."""
    assert F.generalized_max_pool2d(torch.zeros(0, 3, 4, 4), 1.0).shape == (0, 3)
    assert F.mixed_max_avg_pool2d(torch.zeros(2, 0, 4, 4), 0.5).shape == (2, 0)
    assert F.log_sum_exp_pool2d(torch.zeros(0, 3, 4, 4), 1.0).shape == (0, 3)
    assert F.separability_pool2d(torch.zeros(0, 3, 4, 4), OPERATOR, (2, 2)).shape == (0, 3, 2, 2)


# ============================================================================================
# skorch classifiers
IMAGES, DIGITS = digits_like(n_samples=20)
CLASSIFIERS = {
    "PoolingCNNClassifier": PoolingCNNClassifier,
    "DGMPClassifier": DGMPClassifier,
    "SeparabilityPoolingClassifier": SeparabilityPoolingClassifier,
}
#: id -> (X, y, error, message); X and y replace the good IMAGES and DIGITS.
BAD_TRAINING_DATA = {
    "nan": (np.full((20, 8, 8), np.nan), None, ValueError, "Input images contain NaN or infinity"),
    "inf-tensor": (torch.full((20, 8, 8), math.inf), None, ValueError, "NaN or infinity"),
    "empty": (IMAGES[:0], DIGITS[:0], ValueError, "Found 0 images"),
    "flat-2d": (IMAGES.reshape(20, 64), None, ValueError, "Reshape flat digits"),
    "5d": (IMAGES[:, None, None], None, ValueError, r"got 5-D input of shape \(20, 1, 1, 8, 8\)"),
    "complex": (IMAGES.astype(complex), None, TypeError,
                "Images must be real numbers .* got dtype complex128"),
    "complex-tensor": (torch.zeros(20, 8, 8, dtype=torch.complex64), None, TypeError,
                       "Images must be real numbers .* got dtype torch.complex64"),
    "strings": (np.full((20, 8, 8), "a"), None, TypeError, "got dtype <U1"),
    "objects": (IMAGES.astype(object), None, TypeError, "got dtype object"),
    "ragged-list": ([np.zeros((8, 8)), np.zeros((7, 8))], DIGITS[:2], ValueError, "inhomogeneous"),
    "y-wrong-length": (None, DIGITS[:19], ValueError,
                       r"y must be 1-D with one label per image: got shape \(19,\) for 20"),
    "y-2d": (None, np.stack([DIGITS, DIGITS], 1), ValueError, "y must be 1-D"),
    # labels are anything scikit-learn classifiers take (strings, any integers); not these:
    "y-continuous": (None, DIGITS + 0.5, ValueError, "Unknown label type: continuous"),
    "y-nan": (None, np.where(DIGITS == 3, np.nan, DIGITS), ValueError, "Input y contains NaN"),
}


@pytest.mark.parametrize("case", list(BAD_TRAINING_DATA))
@pytest.mark.parametrize("classifier", list(CLASSIFIERS))
def test_classifiers_refuse_bad_training_data(classifier, case):
    X, y, error, message = BAD_TRAINING_DATA[case]
    X = IMAGES if X is None else X
    y = DIGITS if y is None else y
    with pytest.raises(error, match=message):
        CLASSIFIERS[classifier](**TINY_NET, random_state=0).fit(X, y)


CLASSIFIER_CASES = [
    ("pooling-wrong-channels",
     lambda: PoolingCNNClassifier(**TINY_NET, module__in_channels=1)
     .fit(np.zeros((20, 3, 8, 8), np.float32), DIGITS),
     ValueError, r"expects images \(B, 1, H, W\) or \(B, H, W\), got shape \(\d+, 3, 8, 8\)"),
    ("pooling-y-none", lambda: PoolingCNNClassifier(**TINY_NET).fit(IMAGES, None), ValueError,
     r"No y-values are given \(y=None\)"),
    ("separability-y-none", lambda: SeparabilityPoolingClassifier(**TINY_NET).fit(IMAGES, None),
     ValueError, "y is required"),
    ("separability-one-class",
     lambda: SeparabilityPoolingClassifier(**TINY_NET).fit(IMAGES, np.zeros(20, dtype=int)),
     ValueError, "at least two classes"),
    pytest.param("pooling-cuda-without-cuda",
                 lambda: PoolingCNNClassifier(**{**TINY_NET, "device": "cuda"}).fit(IMAGES, DIGITS),
                 ValueError, "CUDA is not available", marks=NO_CUDA_ONLY),
    pytest.param("dgmp-cuda-without-cuda",
                 lambda: DGMPClassifier(**{**TINY_NET, "device": "cuda:1"}).fit(IMAGES, DIGITS),
                 ValueError, "CUDA is not available", marks=NO_CUDA_ONLY),
    ("pooling-device-unknown",
     lambda: PoolingCNNClassifier(**{**TINY_NET, "device": "tpu"}).fit(IMAGES, DIGITS),
     ValueError, "Unknown device 'tpu'"),
    ("pooling-global-pool-unknown",
     lambda: PoolingCNNClassifier(**TINY_NET, module__global_pool="median").fit(IMAGES, DIGITS),
     ValueError, "global_pool must be one of"),
    ("pooling-stage-pooling-unknown",
     lambda: PoolingCNNClassifier(**TINY_NET, module__stage_pooling="bogus").fit(IMAGES, DIGITS),
     ValueError, "stage_pooling must be one of"),
    ("pooling-n-stages-zero",
     lambda: PoolingCNNClassifier(**{**TINY_NET, "module__n_stages": 0}).fit(IMAGES, DIGITS),
     ValueError, "n_stages must be an integer >= 1 and <= 2147483647, got 0"),
    ("separability-n-stages-zero",
     lambda: SeparabilityPoolingClassifier(**{**TINY_NET, "module__n_stages": 0})
     .fit(IMAGES, DIGITS),
     ValueError, "n_stages must be an integer >= 1 and <= 2147483647, got 0"),
    ("dgmp-lam-zero", lambda: DGMPClassifier(**TINY_NET, module__lam=0.0).fit(IMAGES, DIGITS),
     ValueError, "lam must be a finite number > 0"),
    ("dgmp-lam-lr-factor-negative",
     lambda: DGMPClassifier(**TINY_NET, lam_lr_factor=-1.0).fit(IMAGES, DIGITS), ValueError,
     "lam_lr_factor must be a finite number >= 0, got -1.0"),
    ("dgmp-lam-lr-factor-nan",
     lambda: DGMPClassifier(**TINY_NET, lam_lr_factor=math.nan).fit(IMAGES, DIGITS), ValueError,
     "lam_lr_factor must be a finite number >= 0"),
    ("pooling-lr-negative", lambda: PoolingCNNClassifier(**TINY_NET, lr=-1.0).fit(IMAGES, DIGITS),
     ValueError, "Invalid learning rate"),
    ("separability-alpha-negative",
     lambda: SeparabilityPoolingClassifier(**TINY_NET, alpha=-1.0).fit(IMAGES, DIGITS),
     ValueError, "'alpha' parameter"),
    ("separability-norm-unknown",
     lambda: SeparabilityPoolingClassifier(**TINY_NET, norm="max").fit(IMAGES, DIGITS),
     ValueError, "'norm' parameter"),
    ("separability-n-components-zero",
     lambda: SeparabilityPoolingClassifier(**TINY_NET, n_components=0).fit(IMAGES, DIGITS),
     ValueError, "'n_components' parameter"),
    ("separability-stage-out-of-range",
     lambda: SeparabilityPoolingClassifier(**TINY_NET, stage=5).fit(IMAGES, DIGITS), ValueError,
     r"stage must be an integer in 0..1, got 5"),
    ("separability-baseline-unknown",
     lambda: SeparabilityPoolingClassifier(**TINY_NET, baseline_pooling="lse")
     .fit(IMAGES, DIGITS),
     ValueError, "baseline_pooling must be 'avg' or 'max'"),
    ("separability-retrain-unknown",
     lambda: SeparabilityPoolingClassifier(**TINY_NET, retrain="warm").fit(IMAGES, DIGITS),
     ValueError, "retrain must be 'scratch' or 'finetune'"),
    ("pooling-predict-before-fit", lambda: PoolingCNNClassifier(**TINY_NET).predict(IMAGES),
     NotInitializedError, "not initialized yet"),
    ("separability-predict-before-fit",
     lambda: SeparabilityPoolingClassifier(**TINY_NET).predict(IMAGES), NotInitializedError,
     "not initialized yet"),
]


@pytest.mark.parametrize("call, error, message", _unpack(CLASSIFIER_CASES))
def test_classifiers_refuse_bad_parameters(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.fixture(scope="module")
def fitted_classifier():
    return PoolingCNNClassifier(**TINY_NET, random_state=0).fit(IMAGES, DIGITS)


@pytest.mark.parametrize("method", ["predict", "predict_proba"])
@pytest.mark.parametrize(
    "X, error, message",
    [
        pytest.param(np.full((3, 8, 8), np.nan), ValueError, "NaN or infinity", id="nan"),
        pytest.param(IMAGES[:0], ValueError, "Found 0 images", id="empty"),
        pytest.param(IMAGES[:3].reshape(3, 64), ValueError, "Reshape flat digits", id="flat-2d"),
        pytest.param(IMAGES[:3].astype(np.complex64), TypeError, "real numbers", id="complex"),
        pytest.param(np.zeros((3, 2, 8, 8)), ValueError, r"expects images \(B, 1, H, W\)",
                     id="wrong-channels"),
    ],
)
def test_classifier_predict_refuses_bad_images(fitted_classifier, method, X, error, message):
    with pytest.raises(error, match=message):
        getattr(fitted_classifier, method)(X)


def test_one_class_training_set_is_refused_unless_classes_lists_more():
    """Decision (issue 28): every classifier refuses training labels of one class, as
    SeparabilityPoolingClassifier and scikit-learn's classifiers do (a one-class classifier
    learns nothing); ``classes=[...]`` listing two or more allows a fold or batch holding
    one of them."""
    for classifier in (PoolingCNNClassifier, DGMPClassifier):
        with pytest.raises(ValueError, match=r"at least two classes; got only \[3\]"):
            classifier(**TINY_NET, random_state=0).fit(IMAGES, np.full(20, 3))
        net = classifier(**TINY_NET, random_state=0, classes=[3, 4]).fit(IMAGES, np.full(20, 3))
        assert np.all(np.isfinite(net.predict_proba(IMAGES)))


# ============================================================================================
# skpool.io.load_operator
@pytest.fixture(scope="module")
def operator_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "model.npz"
    save_operator(SeparabilityPooling(device="cpu").fit(MAPS, LABELS), path)
    return path


def _rewritten(path, target, **changes):
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays.update(changes)
    np.savez(target, **arrays)
    return target


OPERATOR_FILE_CASES = {
    "missing": (None, FileNotFoundError, "nothere.npz"),
    "not-npz": (b"plain text, not an archive", OperatorFileError, "not an .npz archive"),
    "future-version": ({"format_version": np.asarray(FORMAT_VERSION + 1)}, OperatorFileError,
                       f"operator format version {FORMAT_VERSION + 1}.*upgrade skpool"),
    "unreadable-version": ({"format_version": np.asarray("one")}, OperatorFileError,
                           "unreadable format_version"),
    "other-kind": ({"kind": np.asarray("sklearn.PCA")}, OperatorFileError,
                   "holds a 'sklearn.PCA'"),
    "complex-operator": ({"operator": np.zeros((1, 4, 9), complex)}, OperatorFileError,
                         r"operator must be a float \(k, M, N\) array"),
    "nan-operator": ({"operator": np.full((1, 4, 9), np.nan)}, OperatorFileError,
                     "operator contains NaN or infinity"),
    "zero-scale": ({"channel_scale": np.zeros(2)}, OperatorFileError,
                   "channel_scale finite and > 0"),
    "nan-mean": ({"channel_mean": np.array([0.0, np.nan])}, OperatorFileError,
                 "channel_mean must be finite"),
    "object-array": ({"classes": np.array([None, 1], dtype=object)}, OperatorFileError,
                     "Object arrays cannot be loaded"),
}


@pytest.mark.parametrize("case", list(OPERATOR_FILE_CASES))
def test_load_operator_refuses_bad_files(operator_file, tmp_path, case):
    content, error, message = OPERATOR_FILE_CASES[case]
    target = tmp_path / ("nothere.npz" if content is None else "bad.npz")
    if isinstance(content, bytes):
        target.write_bytes(content)
    elif isinstance(content, dict):
        _rewritten(operator_file, target, **content)
    with pytest.raises(error, match=message):
        load_operator(target)


# ============================================================================================
# The command line: one line on stderr, exit status 1 (data) or 2 (usage)
@pytest.fixture
def cli_files(tmp_path, operator_file):
    maps = MAPS.astype(np.float32)
    np.save(tmp_path / "X.npy", maps)
    np.save(tmp_path / "y.npy", LABELS)
    np.save(tmp_path / "y_one_class.npy", np.zeros(6, dtype=int))
    np.save(tmp_path / "y_short.npy", LABELS[:4])
    np.save(tmp_path / "X_nan.npy", _with_nan(maps))
    np.save(tmp_path / "X_empty.npy", maps[:0])
    np.save(tmp_path / "X_5d.npy", maps[..., None])
    np.save(tmp_path / "X_complex.npy", maps.astype(np.complex64))
    np.save(tmp_path / "X_strings.npy", np.full((6, 3, 3, 2), "a"))
    np.save(tmp_path / "X_int.npy", np.round(maps * 10).astype(np.int32))
    np.save(tmp_path / "X_other_grid.npy", maps[:, :2])
    _rewritten(operator_file, tmp_path / "future.npz",
               format_version=np.asarray(FORMAT_VERSION + 1))
    return tmp_path


CLI_CASES = {
    "gmp-nan": (["gmp", "X_nan.npy", "-o", "out.npy"], 1, "NaN or infinity"),
    "fit-nan": (["fit", "X_nan.npy", "--labels", "y.npy", "-o", "m.npz"], 1, "NaN or infinity"),
    "gmp-empty": (["gmp", "X_empty.npy", "-o", "out.npy"], 1, "holds no samples"),
    "gmp-5d": (["gmp", "X_5d.npy", "-o", "out.npy"], 1,
               r"features must be 2-D \(n, F\), 3-D \(n, N, C\) or 4-D"),
    "gmp-complex": (["gmp", "X_complex.npy", "-o", "out.npy"], 1,
                    "features of dtype complex64 are not numeric"),
    "gmp-strings": (["gmp", "X_strings.npy", "-o", "out.npy"], 1, "not numeric"),
    "fit-one-class": (["fit", "X.npy", "--labels", "y_one_class.npy", "-o", "m.npz"], 1,
                      "at least two classes"),
    "fit-labels-wrong-length": (["fit", "X.npy", "--labels", "y_short.npy", "-o", "m.npz"], 1,
                                "has 4 labels but .*X.npy has 6 samples"),
    "fit-n-components-above-N": (["fit", "X.npy", "--labels", "y.npy", "-o", "m.npz",
                                  "--n-components", "10"], 1,
                                 "n_components=10 exceeds the 9 input locations"),
    "transform-other-grid": (["transform", "model.npz", "X_other_grid.npy", "-o", "out.npy"], 1,
                             "fitted on a 3x3 grid"),
    "info-future-version": (["info", "future.npz"], 1,
                            f"version {FORMAT_VERSION + 1}.*upgrade skpool"),
    "gmp-device-unknown": (["gmp", "X.npy", "-o", "out.npy", "--device", "tpu"], 1,
                           "Unknown device 'tpu'"),
    "gmp-lam-zero": (["gmp", "X.npy", "-o", "out.npy", "--lam", "0"], 2,
                     "argument --lam: expected a number > 0"),
    "gmp-lam-nan": (["gmp", "X.npy", "-o", "out.npy", "--lam", "nan"], 2,
                    "argument --lam: expected a finite number"),
    "fit-alpha-negative": (["fit", "X.npy", "--labels", "y.npy", "-o", "m.npz", "--alpha", "-1"],
                           2, "argument --alpha: expected a number >= 0"),
    "fit-stride-zero": (["fit", "X.npy", "--labels", "y.npy", "-o", "m.npz", "--stride", "0"], 2,
                        "argument --stride: expected a positive integer"),
    "fit-norm-unknown": (["fit", "X.npy", "--labels", "y.npy", "-o", "m.npz", "--norm", "max"], 2,
                         "argument --norm: invalid choice: 'max'"),
    "gmp-batch-size-zero": (["gmp", "X.npy", "-o", "out.npy", "--batch-size", "0"], 2,
                            "argument --batch-size: expected a positive integer"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_bad_input_in_one_line(cli_files, capsys, case):
    argv, status, message = CLI_CASES[case]
    argv = [str(cli_files / arg) if arg.endswith((".npy", ".npz")) else arg for arg in argv]
    if argv[0] == "transform" and argv[1].endswith("model.npz"):
        save_operator(SeparabilityPooling(device="cpu").fit(MAPS, LABELS), argv[1])
    before = sorted(path.name for path in cli_files.iterdir())
    assert main(argv) == status
    captured = capsys.readouterr()
    last_line = captured.err.strip().splitlines()[-1]
    assert "Traceback" not in captured.err and captured.out == ""
    assert re.search(message, last_line), last_line
    if status == 1:
        assert captured.err.count("\n") == 1
    assert sorted(path.name for path in cli_files.iterdir()) == before  # no output left


@pytest.mark.skipif(CUDA_AVAILABLE, reason="checks the error raised without CUDA")
def test_cli_cuda_without_cuda(cli_files, capsys):
    assert main(["fit", str(cli_files / "X.npy"), "--labels", str(cli_files / "y.npy"),
                 "-o", str(cli_files / "m.npz"), "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (cli_files / "m.npz").exists()


def test_cli_converts_integer_features(cli_files, capsys):
    """Decision: integer feature files are pooled like their float64 conversion (the estimators'
    dtype policy)."""
    out = cli_files / "pooled.npy"
    assert main(["gmp", str(cli_files / "X_int.npy"), "-o", str(out), "-q"]) == 0
    values = np.load(cli_files / "X_int.npy").astype(np.float64)
    expected = GeneralizedMaxPooling(device="cpu").fit_transform(values)
    # Two float64 computations of the same values (the CLI's batches may differ), each
    # within the solve's bound at the default relative ridge (1 x mean squared norm)
    bounds = np.array([2 * unit_error_bound(phi, np.sum(phi**2) / len(phi), EPS64)
                       for phi in values.reshape(len(values), -1, values.shape[-1])])
    errors = np.abs(np.load(out) - expected).max(axis=1)
    assert np.all(errors <= bounds), (errors / bounds).max()
