"""Faults: a fit that fails half-way (bad batch in a memmap, out-of-memory in a chunk,
KeyboardInterrupt) leaves the estimator exactly as it was; fitted estimators survive pickling
(also from a GPU fit to a CPU-only process); operator files of an incompatible format version
are refused clearly everywhere they can be loaded.

Out-of-memory and interrupts are injected with ``unittest.mock.patch`` on the function that
moves each batch to the device (``skpool._sklearn._validation._to_tensor``) or on a core
function, raising on its second call: the fit is then past validation and half-way through
its data.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

import separability_reference as ref
import skpool._core.apply as apply_module
import skpool._core.fit as fit_protocol
import skpool._sklearn._validation as validation
from gmp_reference import EPS64, unit_error_bound
import skpool._sklearn.gmp as gmp_module
from reliability.helpers import TINY_NET, assert_same_state, digits_like, labelled_maps, snapshot
from skpool import GeneralizedMaxPooling, SeparabilityPooling
from skpool.cli import main
from skpool.io import (
    FORMAT_VERSION,
    OperatorFileError,
    estimator_from_arrays,
    load_estimator,
    load_operator,
    save_estimator,
    save_operator,
)
from skpool.models import PoolingCNNClassifier
from testing_utils import requires_cuda

MAPS, LABELS = labelled_maps(seed=0, n_samples=24, grid=(4, 4), n_channels=3, n_classes=3)
OTHER, OTHER_LABELS = labelled_maps(seed=1, n_samples=20, grid=(5, 3), n_channels=2,
                                    n_classes=2)


def fitted(kind):
    if kind == "gmp":
        return GeneralizedMaxPooling(lam=0.3, batch_size=5, device="cpu").fit(MAPS)
    return SeparabilityPooling(alpha=0.5, n_components=2, batch_size=5, device="cpu").fit(
        MAPS, LABELS
    )


def refit(estimator, X, y):
    if isinstance(estimator, GeneralizedMaxPooling):
        return estimator.fit(X)
    return estimator.fit(X, y)


def fail_on_call(function, call_number, error):
    """A stand-in for ``function`` that raises ``error`` on its ``call_number``-th call."""
    calls = {"count": 0}

    def flaky(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == call_number:
            raise error
        return function(*args, **kwargs)

    flaky.calls = calls
    return flaky


@pytest.fixture
def nan_in_last_batch(tmp_path):
    """A float32 memmap (20, 5, 3, 2) on disk whose last sample holds a NaN."""
    path = tmp_path / "maps.dat"
    data = np.memmap(path, dtype=np.float32, mode="w+", shape=OTHER.shape)
    data[:] = OTHER
    data[-1, 4, 2, 1] = np.nan
    data.flush()
    del data
    return np.memmap(path, dtype=np.float32, mode="r", shape=OTHER.shape)


# ============================================================================================
# A failed fit leaves the estimator untouched
@pytest.mark.parametrize("kind", ["gmp", "separability"])
def test_nan_in_the_last_batch_of_a_memmap_leaves_the_previous_fit(kind, nan_in_last_batch):
    estimator = fitted(kind)
    before, output = snapshot(estimator), estimator.transform(MAPS)
    with pytest.raises(ValueError, match="NaN or infinity .*batch starting at sample 16"):
        refit(estimator.set_params(batch_size=4), nan_in_last_batch, OTHER_LABELS)
    estimator.set_params(batch_size=5)
    assert_same_state(estimator, before)
    # exact: the same fitted state and batch size, the same code on the same data
    np.testing.assert_array_equal(estimator.transform(MAPS), output)


FAULTS = {
    "out-of-memory": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "runtime-out-of-memory": RuntimeError("CUDA error: out of memory"),
    "keyboard-interrupt": KeyboardInterrupt(),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("kind", ["gmp", "separability"])
def test_fault_while_reading_a_chunk_leaves_the_previous_fit(kind, fault):
    """The second batch cannot be moved to the device."""
    estimator = fitted(kind)
    before, output = snapshot(estimator), estimator.transform(MAPS)
    flaky = fail_on_call(validation._to_tensor, 2, FAULTS[fault])
    with mock.patch.object(validation, "_to_tensor", side_effect=flaky):
        with pytest.raises(type(FAULTS[fault])):
            refit(estimator, OTHER, OTHER_LABELS)
    assert flaky.calls["count"] == 2
    assert_same_state(estimator, before)
    np.testing.assert_array_equal(estimator.transform(MAPS), output)  # same state: exact


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_in_the_solve_leaves_the_previous_fit(fault):
    """The eigen-solve of a second fit runs out of memory (or is interrupted) after the
    statistics of every batch were accumulated."""
    estimator = fitted("separability")
    before, output = snapshot(estimator), estimator.transform(MAPS)
    solve = fit_protocol.top_generalized_eigenvectors  # the fit protocol calls the solve
    flaky = fail_on_call(solve, 1, FAULTS[fault])
    with mock.patch.object(fit_protocol, "top_generalized_eigenvectors", side_effect=flaky):
        with pytest.raises(type(FAULTS[fault])):
            estimator.fit(OTHER, OTHER_LABELS)
    assert flaky.calls["count"] == 1
    assert_same_state(estimator, before)
    np.testing.assert_array_equal(estimator.transform(MAPS), output)  # same state: exact


def test_failed_first_fit_leaves_no_fitted_attributes():
    """An estimator that was never fitted stays unfitted (no half-fitted state)."""
    estimator = SeparabilityPooling(batch_size=5, device="cpu")
    before = snapshot(estimator)
    flaky = fail_on_call(validation._to_tensor, 3, FAULTS["out-of-memory"])
    with mock.patch.object(validation, "_to_tensor", side_effect=flaky):
        with pytest.raises(torch.OutOfMemoryError):
            estimator.fit(MAPS, LABELS)
    assert_same_state(estimator, before)
    with pytest.raises(NotFittedError):
        check_is_fitted(estimator)
    with pytest.raises(NotFittedError):
        estimator.transform(MAPS)


def test_fault_during_transform_changes_nothing():
    """transform is read-only: a fault in its second batch leaves the estimator as it was and
    the next call gives the same result."""
    for estimator, module, name in [
        (fitted("gmp"), gmp_module, "generalized_max_pool"),
        (fitted("separability"), apply_module, "apply_pooling_operator"),
    ]:
        before, output = snapshot(estimator), estimator.transform(MAPS)
        flaky = fail_on_call(getattr(module, name), 2, FAULTS["out-of-memory"])
        with mock.patch.object(module, name, side_effect=flaky):
            with pytest.raises(torch.OutOfMemoryError):
                estimator.transform(MAPS)
        assert_same_state(estimator, before)
        np.testing.assert_array_equal(estimator.transform(MAPS), output)  # same state: exact


# ============================================================================================
# Pickling
@pytest.mark.parametrize("kind", ["gmp", "separability"])
def test_fitted_estimators_pickle_with_identical_transform(kind, tmp_path):
    """pickle (every protocol) and joblib through skpool.io give bit-identical transforms;
    the fitted state holds no torch tensor (numpy only: loadable anywhere)."""
    estimator = fitted(kind)
    expected = estimator.transform(MAPS)
    for name, value in vars(estimator).items():
        assert not isinstance(value, torch.Tensor), name
    copies = [pickle.loads(pickle.dumps(estimator, protocol=protocol))
              for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1)]
    copies.append(load_estimator(save_estimator(estimator, tmp_path / "model.joblib")))
    for copy in copies:
        assert type(copy) is type(estimator)
        # exact: a round trip keeps every array bit for bit; the same code on the same data
        np.testing.assert_array_equal(copy.transform(MAPS), expected)
        np.testing.assert_array_equal(copy.transform(MAPS.astype(np.float32)),
                                      estimator.transform(MAPS.astype(np.float32)))


def test_fitted_classifier_pickles_with_identical_predictions():
    images, labels = digits_like(n_samples=30)
    net = PoolingCNNClassifier(**TINY_NET, random_state=0, module__global_pool="gmp")
    net.fit(images, labels)
    restored = pickle.loads(pickle.dumps(net))
    # exact: the same weights, the same code on the same data
    np.testing.assert_array_equal(restored.predict_proba(images), net.predict_proba(images))


_LOAD_ON_CPU = textwrap.dedent(
    """
    import pickle, sys
    import numpy as np
    import torch
    assert not torch.cuda.is_available()
    with open(sys.argv[1], "rb") as handle:
        estimators = pickle.load(handle)
    maps = np.load(sys.argv[2])
    outputs = {}
    for name, estimator in estimators.items():
        if estimator.device != "auto":
            estimator.set_params(device="cpu")
        outputs[name] = estimator.transform(maps)
    np.savez(sys.argv[3], **outputs)
    """
)


@requires_cuda
@pytest.mark.gpu
def test_gpu_fit_loads_and_transforms_on_a_cpu_only_machine(tmp_path):
    """Fit on CUDA (device="cuda" and device="auto"), pickle, load in a process that sees no
    GPU: the "auto" estimator transforms as is, the "cuda" one after set_params(device="cpu").
    The results equal this process's CPU transform bitwise (the same code on the same data)
    and the GPU transform (other kernels) within two first-order bounds: GMP per sample
    (gmp_reference.unit_error_bound at the relative ridge 0.3 x mean squared norm; MAPS are
    float64, so every transform is float64), separability's pooling product
    (separability_reference.pooling_bound) with the estimator's own operator."""
    estimators = {
        "gmp-auto": GeneralizedMaxPooling(lam=0.3, device="auto").fit(MAPS),
        "gmp-cuda": GeneralizedMaxPooling(lam=0.3, device="cuda").fit(MAPS),
        "sep-auto": SeparabilityPooling(alpha=0.5, device="auto").fit(MAPS, LABELS),
        "sep-cuda-f32": SeparabilityPooling(alpha=0.5, dtype="float32", device="cuda")
        .fit(MAPS, LABELS),
    }
    gpu = {name: estimator.transform(MAPS) for name, estimator in estimators.items()}
    (tmp_path / "models.pkl").write_bytes(pickle.dumps(estimators))
    np.save(tmp_path / "maps.npy", MAPS)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_ON_CPU, str(tmp_path / "models.pkl"),
         str(tmp_path / "maps.npy"), str(tmp_path / "out.npz")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    stacks = MAPS.reshape(len(MAPS), -1, MAPS.shape[-1])
    with np.load(tmp_path / "out.npz") as cpu:
        for name, estimator in estimators.items():
            cpu_here = pickle.loads(pickle.dumps(estimator)).set_params(device="cpu")
            np.testing.assert_array_equal(cpu[name], cpu_here.transform(MAPS))
            if name.startswith("gmp"):
                bounds = np.array([2 * unit_error_bound(phi, 0.3 * np.sum(phi**2) / len(phi),
                                                        EPS64) for phi in stacks])
                errors = np.abs(cpu[name] - gpu[name]).max(axis=1)
                assert np.all(errors <= bounds), (name, (errors / bounds).max())
            else:
                bound = 2 * ref.pooling_bound(stacks, estimator.operator_,
                                              estimator.channel_mean_, estimator.channel_scale_,
                                              EPS64)
                np.testing.assert_allclose(cpu[name], gpu[name], rtol=0, atol=bound)


# ============================================================================================
# Operator files of an incompatible format version
@pytest.fixture
def model_files(tmp_path):
    path = save_operator(fitted("separability"), tmp_path / "model.npz")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    files = {}
    for name, version in [("newer", FORMAT_VERSION + 1), ("zero", 0), ("negative", -3)]:
        files[name] = tmp_path / f"{name}.npz"
        np.savez(files[name], **{**arrays, "format_version": np.asarray(version)})
    files["extra-array"] = tmp_path / "extra.npz"
    np.savez(files["extra-array"], **arrays, note=np.asarray("written by a later skpool"))
    np.save(tmp_path / "maps.npy", MAPS)
    return path, files


@pytest.mark.parametrize("version_case", ["newer", "zero", "negative"])
def test_incompatible_format_version_is_refused_everywhere(model_files, capsys, tmp_path,
                                                           version_case):
    """load_operator, estimator_from_arrays and the CLI (transform, info) refuse the file with
    a message naming the version and what this skpool reads."""
    _, files = model_files
    path = files[version_case]
    message = f"format version -?\\d+, but this skpool reads versions 1 to {FORMAT_VERSION}"
    for load in (load_operator, estimator_from_arrays):
        with pytest.raises(OperatorFileError, match=message):
            load(path)
    for argv in (["transform", str(path), str(tmp_path / "maps.npy"), "-o",
                  str(tmp_path / "out.npy")], ["info", str(path)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "upgrade skpool" in err, err
    assert not (tmp_path / "out.npy").exists()


def test_unknown_extra_arrays_of_the_same_version_are_ignored(model_files):
    """Decision: a file of a readable version with arrays this skpool does not know (added by a
    later writer of the same format) loads, and transforms like the original."""
    path, files = model_files
    original = estimator_from_arrays(path)
    extended = estimator_from_arrays(files["extra-array"])
    # exact: the same arrays loaded, the same code on the same data
    np.testing.assert_array_equal(extended.transform(MAPS), original.transform(MAPS))
