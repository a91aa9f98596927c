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
    FittedOperator,
    OperatorFileError,
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


def test_fitted_operator_is_a_plain_record():
    saved = FittedOperator(np.zeros((2, 4, 9)), np.zeros(3), np.ones(3), (3, 3), (2, 2))
    assert (saved.n_components, saved.n_channels, saved.n_cells, saved.n_locations) == (
        2, 3, 4, 9
    )
    assert saved.problems() == [] and saved.format_version == FORMAT_VERSION
    with pytest.raises(dataclasses.FrozenInstanceError):
        saved.operator = None  # frozen


def test_saved_operator_is_a_deprecated_name_of_fitted_operator():
    import skpool.io as io

    with pytest.warns(FutureWarning, match="SavedOperator is deprecated; use .*FittedOperator"):
        assert io.SavedOperator is FittedOperator
    assert "SavedOperator" not in io.__all__
    with pytest.raises(AttributeError, match="no attribute 'Saved'"):
        io.Saved  # noqa: B018 - a missing name is still an AttributeError


def write_format_1_file(path, estimator):
    """An operator file laid out as format version 1 documents it (and as skpool 0.1 wrote it,
    before the fitted-operator object and the ``verbose`` parameter existed), built here with
    numpy alone."""
    params = {name: value for name, value in estimator.get_params().items() if name != "verbose"}
    np.savez(
        path,
        format_version=np.asarray(1, dtype=np.int64),
        kind=np.asarray("skpool.SeparabilityPooling"),
        skpool_version=np.asarray("0.1.0"),
        operator=estimator.operator_,
        channel_mean=estimator.channel_mean_,
        channel_scale=estimator.channel_scale_,
        grid_shape=np.asarray(estimator.grid_shape_, dtype=np.int64),
        output_shape=np.asarray(estimator.output_shape_, dtype=np.int64),
        params=np.asarray(json.dumps(params, sort_keys=True)),
        classes=np.asarray(estimator.classes_),
        eigenvalues=estimator.eigenvalues_,
    )
    return path


def test_a_format_1_file_written_before_the_fitted_operator_still_loads(fitted, tmp_path):
    estimator, maps = fitted
    path = write_format_1_file(tmp_path / "old.npz", estimator)
    saved = load_operator(path)
    assert isinstance(saved, FittedOperator) and saved.format_version == 1
    assert "verbose" not in saved.params and saved.params["alpha"] == 0.5
    with np.load(path) as arrays:
        expected = reference_transform(arrays, maps)
    rebuilt = estimator_from_arrays(path)
    assert rebuilt.verbose == 0  # the default of the parameter the file predates
    # float64 maps, N = 30 terms per output value: rounding far below 1e-12
    np.testing.assert_allclose(rebuilt.transform(maps), expected, rtol=1e-12, atol=1e-12)
    out = saved.to_module(dtype=torch.float64)(torch.from_numpy(maps).permute(0, 3, 1, 2))
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), expected, rtol=1e-12, atol=1e-12)
    # only the required arrays, as the format allows
    bare = rewrite(path, tmp_path / "bare.npz", params=None, classes=None, eigenvalues=None,
                   skpool_version=None)
    assert load_operator(bare).params == {} and load_operator(bare).classes is None
    np.testing.assert_allclose(estimator_from_arrays(bare).transform(maps), expected,
                               rtol=1e-12, atol=1e-12)


def test_torch_only_program_does_not_import_sklearn(tmp_path):
    """skpool.nn and skpool.io load without scikit-learn (the estimators are imported lazily)."""
    import subprocess
    import sys

    code = "import sys, skpool.nn, skpool.io; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------
# Damaged files: whatever is wrong with the archive, one OperatorFileError naming the file
def patch_central_directory(data: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite bytes at ``offset`` of every central-directory record (signature PK\\1\\2)."""
    out = bytearray(data)
    start = out.find(b"PK\x01\x02")
    assert start >= 0, "no central directory: not a zip"
    while start >= 0:
        out[start + offset : start + offset + len(value)] = value
        start = out.find(b"PK\x01\x02", start + 4)
    return bytes(out)


def patch_local_headers(data: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite bytes at ``offset`` of every local file header (signature PK\\3\\4)."""
    out = bytearray(data)
    start = out.find(b"PK\x03\x04")
    while start >= 0:
        out[start + offset : start + offset + len(value)] = value
        start = out.find(b"PK\x03\x04", start + 4)
    return bytes(out)


def first_member_data(data: bytes) -> int:
    """Offset of the first member's data (after its local header, name and extra field)."""
    start = data.find(b"PK\x03\x04")
    name_length, extra_length = np.frombuffer(data[start + 26 : start + 30], dtype="<u2")
    return start + 30 + int(name_length) + int(extra_length)


def damaged_versions(good: bytes, compressed: bytes) -> dict[str, bytes]:
    """One file per way an npz can be damaged (central-directory offsets from the zip spec,
    APPNOTE 4.3.12: version needed at 6, flags at 8, method at 10, CRC-32 at 16)."""
    data_at = first_member_data(good)
    deflate_at = first_member_data(compressed)
    return {
        # zipfile raises NotImplementedError for these two (the reviewed failure)
        "flag bit 5 (patched data)": patch_central_directory(good, 8, b"\x20\x00"),
        "version needed 255": patch_central_directory(good, 6, b"\xff\x00"),
        "unknown compression method": patch_central_directory(good, 10, b"\x63\x00"),
        "encrypted flag (bit 0)": patch_central_directory(good, 8, b"\x01\x00"),
        "wrong CRC-32": patch_central_directory(good, 16, b"\x00\x00\x00\x00"),
        "local header signature": patch_local_headers(good, 0, b"PK\x09\x09"),
        "member is not .npy": good[:data_at] + b"\x00" * 6 + good[data_at + 6 :],
        "deflate stream": compressed[:deflate_at] + b"\xff" * 12 + compressed[deflate_at + 12 :],
        "no end of central directory": good[: good.rfind(b"PK\x05\x06")],
        "PK then random bytes": b"PK" + np.random.default_rng(1).bytes(3000),
        "cut in the member data": good[: data_at + 40],
        "cut in the central directory": good[: good.find(b"PK\x01\x02") + 30],
        "one byte short": good[:-1],
    }


@pytest.fixture(scope="module")
def operator_bytes(fitted, tmp_path_factory):
    """A valid operator file's bytes, stored and compressed."""
    folder = tmp_path_factory.mktemp("damaged")
    good = save_operator(fitted[0], folder / "good.npz").read_bytes()
    saved = load_operator(folder / "good.npz")
    with np.load(folder / "good.npz") as archive:
        np.savez_compressed(folder / "compressed.npz", **{k: archive[k] for k in archive.files})
    assert load_operator(folder / "compressed.npz").operator.shape == saved.operator.shape
    return good, (folder / "compressed.npz").read_bytes()


def damaged_cases():
    return list(damaged_versions(b"PK\x03\x04" + bytes(40) + b"PK\x01\x02" + bytes(60)
                                 + b"PK\x05\x06" + bytes(18),
                                 b"PK\x03\x04" + bytes(60)))


@pytest.mark.parametrize("damage", damaged_cases())
def test_damaged_archives_are_one_file_error(operator_bytes, tmp_path, damage):
    path = tmp_path / "damaged.npz"
    path.write_bytes(damaged_versions(*operator_bytes)[damage])
    with pytest.raises(OperatorFileError, match="damaged.npz") as info:
        load_operator(path)
    assert "\n" not in str(info.value)
    with pytest.raises(OperatorFileError, match="damaged.npz"):
        estimator_from_arrays(path)


def test_any_flipped_or_cut_byte_loads_or_is_a_file_error(operator_bytes, tmp_path):
    """Every single-byte change and every cut of a valid file either still loads (a byte the
    reader does not use, e.g. a timestamp) or is an OperatorFileError: never another
    exception. Positions: a random sample of the zip structures' bytes and of all bytes (all of
    them take ~16 s)."""
    for good in operator_bytes:
        rng = np.random.default_rng(len(good))
        structure = [i for i in range(len(good)) if _in_zip_structure(good, i)]
        positions = sorted(
            set(rng.choice(structure, 80, replace=False)) | set(rng.choice(len(good), 40))
        )
        path = tmp_path / "changed.npz"
        outcomes = {"loaded": 0, "refused": 0}
        for position in positions:
            changed = bytearray(good)
            changed[position] ^= 0xFF
            for data in (bytes(changed), good[:position]):
                path.write_bytes(data)
                try:
                    load_operator(path)
                    outcomes["loaded"] += 1
                except OperatorFileError:
                    outcomes["refused"] += 1
        assert outcomes["refused"] > len(positions)  # most changes are caught (CRC, headers)


def _in_zip_structure(data: bytes, index: int) -> bool:
    """Whether byte ``index`` lies in a local header, the central directory or its end."""
    for signature, length in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46), (b"PK\x05\x06", 22)):
        start = data.find(signature)
        while start >= 0:
            if start <= index < start + length:
                return True
            start = data.find(signature, start + 4)
    return False


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not an .npz archive"),
        (b"\x93NUMPY\x01\x00", "not an .npz archive"),
        (np.random.default_rng(0).bytes(5000), "not an .npz archive"),
        (b"PK", "damaged or unreadable"),
        (b"PK\x03\x04", "damaged or unreadable"),
    ],
    ids=["empty", "npy magic", "random bytes", "PK only", "local signature only"],
)
def test_wrong_magic_and_tiny_files(tmp_path, content, message):
    path = tmp_path / "odd.npz"
    path.write_bytes(content)
    with pytest.raises(OperatorFileError, match=f"odd.npz.*{message}"):
        load_operator(path)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_operator(tmp_path / "missing.npz")
    with pytest.raises(IsADirectoryError):
        load_operator(tmp_path)


# --------------------------------------------------------------------------------------------
# Parameters stored in an operator file are checked when an estimator is built from them
@pytest.mark.parametrize(
    "name, value",
    [
        ("batch_size", -1),
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("batch_size", "64"),
        ("alpha", -1.0),
        ("n_components", 0),
        ("norm", "l3"),
        ("dtype", "float16"),
        ("solver", "magic"),
        ("max_memory_mb", 0),
        ("support_radius", -2.0),
        ("normalize_channels", "yes"),
        ("device", 3),
        ("grid_shape", [0, 5]),
        ("grid_shape", "ab"),
        ("output_shape", [3, -3]),
    ],
)
def test_invalid_stored_parameters_are_refused_when_loading(fitted, tmp_path, name, value):
    path = save_operator(fitted[0], tmp_path / "model.npz")
    with np.load(path) as archive:
        params = json.loads(str(archive["params"]))
    bad = rewrite(path, tmp_path / "bad.npz",
                  params=np.asarray(json.dumps({**params, name: value})))
    with pytest.raises(OperatorFileError, match=f"bad.npz: invalid stored parameter.*{name}"):
        estimator_from_arrays(bad)
    # A parameter given by the caller replaces the stored one, and is checked as a parameter.
    rebuilt = estimator_from_arrays(bad, **{name: params[name]})
    np.testing.assert_array_equal(rebuilt.transform(fitted[1]), fitted[0].transform(fitted[1]))
    with pytest.raises(ValueError, match=name) as info:
        estimator_from_arrays(path, **{name: value})
    assert not isinstance(info.value, OperatorFileError)


def test_params_must_be_a_json_object(fitted, tmp_path):
    path = save_operator(fitted[0], tmp_path / "model.npz")
    for text in ("[1, 2]", "3", "not json"):
        bad = rewrite(path, tmp_path / "bad.npz", params=np.asarray(text))
        with pytest.raises(OperatorFileError, match="params"):
            load_operator(bad)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"grid_shape": np.asarray([-6, -5])}, "pairs of positive integers"),
        ({"grid_shape": np.asarray([6.0, 5.0])}, "pairs of positive integers"),
        ({"output_shape": np.asarray([9])}, "pairs of positive integers"),
        ({"eigenvalues": np.ones((2, 4))}, r"eigenvalues \(2, 4\) must be \(k, M\)"),
        ({"eigenvalues": np.asarray(["a"] * 18).reshape(2, 9)}, "eigenvalues must be numbers"),
        ({"classes": np.zeros((3, 2))}, "classes must be 1-D"),
    ],
)
def test_inconsistent_grids_and_records(fitted, tmp_path, changes, message):
    path = save_operator(fitted[0], tmp_path / "model.npz")
    with pytest.raises(OperatorFileError, match=message):
        load_operator(rewrite(path, tmp_path / "bad.npz", **changes))


# --------------------------------------------------------------------------------------------
# The public names
def test_io_shows_only_its_api():
    import skpool.io as io

    assert dir(io) == sorted(io.__all__)
    assert all(hasattr(io, name) for name in io.__all__)
    namespace: dict = {}
    exec("from skpool.io import *", namespace)  # noqa: S102 - the import under test
    assert sorted(set(namespace) - {"__builtins__"}) == sorted(io.__all__)
