"""skpool.io: operator files (plain arrays, format version), whole-estimator files, and the
atomic writes behind both. Numbers are checked against a float64 numpy reference of the
transform written here and against SeparabilityPooling.transform."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from skpool import SeparabilityPooling
from skpool.io import (
    FORMAT_VERSION,
    OPERATOR_KIND,
    OperatorFileError,
    SavedOperator,
    atomic_output,
    estimator_from_arrays,
    load_estimator,
    load_operator,
    save_estimator,
    save_operator,
)
from skpool.nn import SeparabilityPool2d


def labelled_maps(n=48, grid=(6, 5), channels=3, seed=0):
    """Maps (n, H, W, C) whose classes differ in a planted blob, and string labels."""
    rng = np.random.default_rng(seed)
    labels = np.array(["cat", "dog", "emu"])[np.arange(n) % 3]
    maps = rng.normal(size=(n, *grid, channels))
    for code in range(3):
        maps[labels == labels[code], 1 + code, 1:3, :] += 2.0
    return maps, labels


@pytest.fixture(scope="module")
def fitted():
    maps, labels = labelled_maps()
    return SeparabilityPooling(alpha=0.5, n_components=2, device="cpu").fit(maps, labels), maps


def reference_transform(arrays, maps):
    """Float64 numpy reference of the transform from the raw file arrays: (n, H', W', k*C)."""
    operator, mean, scale = arrays["operator"], arrays["channel_mean"], arrays["channel_scale"]
    n, height, width, channels = maps.shape
    normalised = (maps.reshape(n, height * width, channels) - mean) / scale
    pooled = np.einsum("kmn,bnc->bmkc", operator, normalised) * scale[None, None, None] + mean
    out_h, out_w = arrays["output_shape"]
    return pooled.reshape(n, out_h, out_w, -1)


def rewrite(path, target, **changes):
    """Copy an operator file's arrays to ``target`` with some arrays replaced or (None) removed."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    for name, value in changes.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    np.savez(target, **arrays)
    return target


def test_operator_file_round_trip(fitted, tmp_path):
    estimator, _ = fitted
    path = save_operator(estimator, tmp_path / "model.npz")
    saved = load_operator(path)
    np.testing.assert_array_equal(saved.operator, estimator.operator_)
    np.testing.assert_array_equal(saved.channel_mean, estimator.channel_mean_)
    np.testing.assert_array_equal(saved.channel_scale, estimator.channel_scale_)
    np.testing.assert_array_equal(saved.eigenvalues, estimator.eigenvalues_)
    np.testing.assert_array_equal(saved.classes, estimator.classes_)
    assert saved.grid_shape == (6, 5) and saved.output_shape == (3, 3)
    assert saved.params == estimator.get_params()
    assert saved.format_version == FORMAT_VERSION


def test_operator_file_is_plain_arrays(fitted, tmp_path):
    """numpy alone reads it without pickle; the documented arrays are all there."""
    estimator, maps = fitted
    path = save_operator(estimator, tmp_path / "model.npz")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    assert {"operator", "channel_mean", "channel_scale", "grid_shape", "output_shape",
            "classes", "eigenvalues", "params", "kind", "format_version"} <= set(arrays)
    assert all(array.dtype != object for array in arrays.values())
    assert str(arrays["kind"]) == OPERATOR_KIND and int(arrays["format_version"]) == 1
    assert json.loads(str(arrays["params"]))["alpha"] == 0.5
    np.testing.assert_allclose(reference_transform(arrays, maps), estimator.transform(maps),
                               rtol=1e-12, atol=1e-12)


def test_torch_only_load_matches_estimator(fitted, tmp_path):
    """The layer built from the file's arrays (numpy + torch only) reproduces transform."""
    estimator, maps = fitted
    path = save_operator(estimator, tmp_path / "model.npz")
    with np.load(path, allow_pickle=False) as arrays:
        layer = SeparabilityPool2d(
            arrays["operator"],
            arrays["channel_mean"],
            arrays["channel_scale"],
            output_shape=tuple(arrays["output_shape"]),
            grid_shape=tuple(arrays["grid_shape"]),
            dtype=torch.float64,
        )
    expected = estimator.transform(maps)  # (n, H', W', k*C)
    out = layer(torch.from_numpy(maps).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)

    module = load_operator(path).to_module(dtype=torch.float64)
    out = module(torch.from_numpy(maps).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert not any(p.requires_grad for p in module.parameters())


def test_estimator_from_arrays_transforms_like_the_original(fitted, tmp_path):
    estimator, maps = fitted
    path = save_operator(estimator, tmp_path / "model.npz")
    rebuilt = estimator_from_arrays(path, batch_size=7)
    assert rebuilt.batch_size == 7 and rebuilt.alpha == 0.5
    np.testing.assert_array_equal(rebuilt.transform(maps), estimator.transform(maps))
    np.testing.assert_array_equal(
        rebuilt.transform(maps.astype(np.float32)), estimator.transform(maps.astype(np.float32))
    )
    with pytest.raises(ValueError, match="grid"):
        rebuilt.transform(maps[:, :5])


def test_saving_a_saved_operator_and_object_labels(tmp_path):
    maps, labels = labelled_maps()
    estimator = SeparabilityPooling(device="cpu").fit(maps, labels.astype(object))
    saved = load_operator(save_operator(estimator, tmp_path / "a.npz"))
    assert saved.classes.dtype.kind == "U"
    again = load_operator(save_operator(saved, tmp_path / "b.npz"))
    np.testing.assert_array_equal(again.operator, saved.operator)
    np.testing.assert_array_equal(again.classes, ["cat", "dog", "emu"])


def test_newer_format_version_is_refused(fitted, tmp_path):
    path = save_operator(fitted[0], tmp_path / "model.npz")
    newer = rewrite(path, tmp_path / "newer.npz", format_version=np.asarray(FORMAT_VERSION + 1))
    with pytest.raises(OperatorFileError, match=f"version {FORMAT_VERSION + 1}.*upgrade skpool"):
        load_operator(newer)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"kind": np.asarray("something.else")}, "not a 'skpool.SeparabilityPooling'"),
        ({"format_version": None}, "not an skpool operator file"),
        ({"format_version": np.asarray(0)}, "version 0"),
        ({"operator": None}, "missing array.*operator"),
        ({"grid_shape": np.asarray([5, 5])}, "does not map"),
        ({"channel_scale": np.ones(2)}, "channel_scale"),
        ({"operator": np.zeros((2, 9))}, r"\(k, M, N\)"),
    ],
)
def test_bad_operator_files_get_clear_errors(fitted, tmp_path, changes, message):
    path = save_operator(fitted[0], tmp_path / "model.npz")
    bad = rewrite(path, tmp_path / "bad.npz", **changes)
    with pytest.raises(OperatorFileError, match=message):
        load_operator(bad)


def test_unreadable_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive at all")
    with pytest.raises(OperatorFileError, match="not an .npz archive"):
        load_operator(tmp_path / "junk.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(OperatorFileError, match="not an .npz archive"):
        load_operator(tmp_path / "array.npy")
    with pytest.raises(FileNotFoundError):
        load_operator(tmp_path / "missing.npz")
    path = save_operator(
        SeparabilityPooling(device="cpu").fit(*labelled_maps()), tmp_path / "model.npz"
    )
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OperatorFileError):
        load_operator(tmp_path / "cut.npz")


def test_unfitted_estimator_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="call fit first"):
        save_operator(SeparabilityPooling(), tmp_path / "model.npz")
    assert list(tmp_path.iterdir()) == []


def test_whole_estimator_round_trip(fitted, tmp_path):
    estimator, maps = fitted
    loaded = load_estimator(save_estimator(estimator, tmp_path / "model.joblib"))
    assert isinstance(loaded, SeparabilityPooling)
    np.testing.assert_array_equal(loaded.transform(maps), estimator.transform(maps))


def test_atomic_output_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []

    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as handle:
            handle.write(b"new but unfinished")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]

    with atomic_output(target) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        with atomic_output(tmp_path / "missing" / "out.bin"):
            pass


def test_saved_operator_is_a_plain_record():
    saved = SavedOperator(np.zeros((2, 4, 9)), np.zeros(3), np.ones(3), (3, 3), (2, 2))
    assert (saved.n_components, saved.n_channels) == (2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        saved.operator = None  # frozen


def test_torch_only_program_does_not_import_sklearn(tmp_path):
    """skpool.nn and skpool.io load without scikit-learn (the estimators are imported lazily)."""
    import subprocess
    import sys

    code = "import sys, skpool.nn, skpool.io; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
