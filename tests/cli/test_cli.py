"""The skpool command line: results equal the estimators', files in every accepted format, and
bad input gets one line on stderr, a non-zero exit and no output file (old ones untouched)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skpool import GeneralizedMaxPooling, SeparabilityPooling
from skpool.cli import CommandError, main
from skpool.io import FORMAT_VERSION, load_operator

N_SAMPLES, GRID, CHANNELS = 45, (6, 4), 3


@pytest.fixture
def files(tmp_path):
    """Labelled maps (45, 6, 4, 3) float32 as .npz (X, y), .npy pairs and a raw memmap."""
    rng = np.random.default_rng(0)
    labels = np.arange(N_SAMPLES) % 3
    maps = rng.normal(size=(N_SAMPLES, *GRID, CHANNELS)).astype(np.float32)
    for code in range(3):
        maps[labels == code, code + 1, 1:3] += 2.0
    np.savez(tmp_path / "train.npz", X=maps, y=labels)
    np.savez(tmp_path / "named.npz", feats=maps, target=labels)
    np.save(tmp_path / "X.npy", maps)
    np.save(tmp_path / "y.npy", labels)
    (tmp_path / "y.txt").write_text("\n".join(map(str, labels)) + "\n")
    maps.tofile(tmp_path / "X.f32")
    return tmp_path, maps, labels


def run(capsys, *argv):
    """``skpool *argv`` in this process: (exit status, stdout, stderr)."""
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fit_reference(maps, labels, **params):
    return SeparabilityPooling(device="cpu", **params).fit(maps, labels)


# --------------------------------------------------------------------------------------------
# Results
def test_fit_then_transform_equals_the_estimator(files, capsys):
    tmp, maps, labels = files
    code, out, err = run(capsys, "fit", tmp / "train.npz", "-o", tmp / "model.npz",
                         "--alpha", "0.5", "--n-components", "2", "--device", "cpu")
    assert (code, err) == (0, "")
    assert "45 samples" in out and "6x4 -> 3x2 grid" in out
    reference = fit_reference(maps, labels, alpha=0.5, n_components=2)
    saved = load_operator(tmp / "model.npz")
    np.testing.assert_allclose(saved.operator, reference.operator_, rtol=0, atol=1e-12)

    code, out, err = run(capsys, "transform", tmp / "model.npz", tmp / "train.npz",
                         "-o", tmp / "pooled.npz", "--batch-size", "7", "--device", "cpu")
    assert (code, err) == (0, "")
    with np.load(tmp / "pooled.npz") as pooled:
        np.testing.assert_allclose(pooled["X"], reference.transform(maps), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(pooled["y"], labels)  # labels travel with the features
        assert pooled["X"].dtype == np.float32


@pytest.mark.parametrize(
    "inputs",
    [
        ["X.npy", "--labels", "y.npy"],
        ["X.npy", "--labels", "y.txt"],
        ["named.npz", "--features-key", "feats", "--labels-key", "target"],
        ["X.f32", "--shape", "6,4,3", "--labels", "train.npz"],
    ],
    ids=["npy", "txt-labels", "npz-keys", "raw-memmap"],
)
def test_fit_reads_every_input_format(files, capsys, inputs):
    tmp, maps, labels = files
    argv = [tmp / inputs[0], *[tmp / v if v.endswith((".npy", ".npz", ".txt")) else v
                               for v in inputs[1:]]]
    code, _, err = run(capsys, "fit", *argv, "-o", tmp / "model.npz", "--device", "cpu", "-q")
    assert (code, err) == (0, "")
    np.testing.assert_allclose(
        load_operator(tmp / "model.npz").operator, fit_reference(maps, labels).operator_,
        atol=1e-12,
    )


def test_gmp_equals_the_estimator_for_npy_npz_and_memmap(files, capsys):
    tmp, maps, _ = files
    expected = GeneralizedMaxPooling(lam=0.3, device="cpu").transform(maps)
    for source, extra in [("X.npy", []), ("train.npz", []), ("X.f32", ["--shape", "6x4x3"])]:
        code, out, err = run(capsys, "gmp", tmp / source, *extra, "-o", tmp / "gmp.npy",
                             "--lam", "0.3", "--batch-size", "8", "--device", "cpu")
        assert (code, err) == (0, ""), source
        assert "-> (45, 3)" in out
        np.testing.assert_allclose(np.load(tmp / "gmp.npy"), expected, rtol=1e-6, atol=1e-6)
    code, _, _ = run(capsys, "gmp", tmp / "X.npy", "-o", tmp / "raw.npz", "--no-normalize",
                     "--grid-shape", "6,4", "-q")
    with np.load(tmp / "raw.npz") as pooled:
        assert pooled.files == ["X"]  # no labels in an .npy input
        np.testing.assert_allclose(
            pooled["X"], GeneralizedMaxPooling(normalize=False).transform(maps), rtol=1e-5
        )


def test_transform_of_stacks_with_a_grid_shape(files, capsys):
    tmp, maps, labels = files
    np.save(tmp / "stacks.npy", maps.reshape(N_SAMPLES, -1, CHANNELS))  # (n, N, C)
    assert run(capsys, "fit", tmp / "train.npz", "-o", tmp / "model.npz", "-q")[0] == 0
    code, _, err = run(capsys, "transform", tmp / "model.npz", tmp / "stacks.npy",
                       "-o", tmp / "out.npy", "--grid-shape", "6,4", "-q")
    assert (code, err) == (0, "")
    expected = fit_reference(maps, labels).transform(maps).reshape(N_SAMPLES, 6, CHANNELS)
    np.testing.assert_allclose(np.load(tmp / "out.npy"), expected, rtol=1e-6, atol=1e-6)
    code, _, err = run(capsys, "transform", tmp / "model.npz", tmp / "stacks.npy",
                       "-o", tmp / "out2.npy", "--grid-shape", "4,6")
    assert code == 1 and "fitted on a 6x4 grid" in err and not (tmp / "out2.npy").exists()


def test_joblib_model_and_info(files, capsys):
    tmp, maps, labels = files
    code, _, _ = run(capsys, "fit", tmp / "train.npz", "-o", tmp / "model.joblib", "-q",
                     "--precision", "float32", "--stride", "3")
    assert code == 0
    code, _, err = run(capsys, "transform", tmp / "model.joblib", tmp / "X.npy",
                       "-o", tmp / "out.npy", "-q")
    assert (code, err) == (0, "")
    reference = fit_reference(maps, labels, dtype="float32", stride=3)
    np.testing.assert_allclose(np.load(tmp / "out.npy"), reference.transform(maps), atol=1e-5)

    code, out, _ = run(capsys, "info", tmp / "model.joblib")
    assert code == 0 and "2x2 (4 cells)" in out and "SeparabilityPooling (pickled)" in out
    run(capsys, "fit", tmp / "train.npz", "-o", tmp / "model.npz", "-q")
    code, out, _ = run(capsys, "info", tmp / "model.npz", "--json")
    description = json.loads(out)
    assert description["format_version"] == FORMAT_VERSION
    assert description["input_grid"] == "6x4 (24 locations)"
    assert description["classes"] == "3: 0, 1, 2"


def test_help_texts(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "examples:" in out and "skpool fit train.npz" in out
    for command in ("gmp", "fit", "transform", "info"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "example" in out and f"usage: skpool {command}" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("skpool ")


# --------------------------------------------------------------------------------------------
# Errors: one line, exit 1, no output left behind
def write_bad_files(tmp: Path, maps: np.ndarray) -> None:
    (tmp / "junk.npy").write_bytes(b"garbage, not numpy")
    (tmp / "junk.npz").write_bytes(b"garbage, not a zip")
    (tmp / "cut.npy").write_bytes((tmp / "X.npy").read_bytes()[:500])
    np.save(tmp / "y_short.npy", np.arange(10) % 3)
    np.save(tmp / "y_2d.npy", np.zeros((N_SAMPLES, 2)))
    np.savez(tmp / "short_y.npz", X=maps, y=np.arange(10))
    np.save(tmp / "words.npy", np.zeros((4, 3), dtype="U2"))
    np.save(tmp / "flat.npy", np.zeros(12, dtype=np.float32))
    late_nan = maps.copy()
    late_nan[-1, 0, 0, 0] = np.nan  # only the last batch is bad: output was half written
    np.save(tmp / "late_nan.npy", late_nan)
    np.save(tmp / "other_grid.npy", maps[:, :5])
    np.save(tmp / "other_channels.npy", maps[..., :2])
    with np.load(tmp / "model.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["format_version"] = np.asarray(FORMAT_VERSION + 1)
    np.savez(tmp / "future_model.npz", **arrays)


def in_dir(tmp: Path, arg: str):
    """File names of the error cases live in ``tmp``; other arguments stay as they are."""
    if "{tmp}" in arg:
        return arg.format(tmp=tmp)
    return tmp / arg if arg.endswith((".npy", ".npz", ".f32")) else arg


ERROR_CASES = {
    "missing file": (["gmp", "nothere.npy"], "nothere.npy: no such file"),
    "corrupt npy": (["gmp", "junk.npy"], "not a .npy file"),
    "truncated npy": (["gmp", "cut.npy"], "not a valid .npy file"),
    "corrupt npz": (["fit", "junk.npz"], "not a .npz file"),
    "unknown key": (["gmp", "train.npz", "--features-key", "Z"], "no array 'Z'.*holds X, y"),
    "labels wrong length": (["fit", "X.npy", "--labels", "y_short.npy"],
                            "y_short.npy has 10 labels but .*X.npy has 45 samples"),
    "npz labels wrong length": (["gmp", "short_y.npz", "-o", "{tmp}/out.npz"],
                                r"short_y.npz\[y\] has 10 labels"),
    "labels 2-D": (["fit", "X.npy", "--labels", "y_2d.npy"], "labels must be 1-D"),
    "no labels": (["fit", "X.npy"], "no labels: pass --labels"),
    "text features": (["gmp", "words.npy"], "not numeric"),
    "1-D features": (["gmp", "flat.npy"], "got shape \\(12,\\)"),
    "raw size mismatch": (["gmp", "X.f32", "--shape", "7,4,3"], "not a whole number of samples"),
    "raw without shape": (["gmp", "X.f32"], "give --shape"),
    "NaN in last batch": (["gmp", "late_nan.npy", "--batch-size", "8"], "NaN or infinity"),
    "NaN in last batch, npz": (["transform", "model.npz", "late_nan.npy", "--batch-size", "8"],
                               "NaN or infinity"),
    "other grid": (["transform", "model.npz", "other_grid.npy"], "fitted on a 6x4 grid"),
    "other channels": (["transform", "model.npz", "other_channels.npy"], "2 channels"),
    "model is not a model": (["transform", "train.npz", "X.npy"], "not an skpool operator file"),
    "corrupt model": (["transform", "junk.npz", "X.npy"], "not an .npz archive"),
    "newer model format": (["transform", "future_model.npz", "X.npy"],
                           f"version {FORMAT_VERSION + 1}.*upgrade skpool"),
    "output suffix": (["gmp", "X.npy", "-o", "{tmp}/out.csv"], "must end in .npy or .npz"),
    "output directory": (["gmp", "X.npy", "-o", "{tmp}/no/out.npy"], "no such directory"),
    "model suffix": (["fit", "train.npz", "-o", "{tmp}/model.txt"], "must end in .npz"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_gives_one_line_and_no_output(files, capsys, case):
    tmp, maps, _ = files
    assert run(capsys, "fit", tmp / "train.npz", "-o", tmp / "model.npz", "-q")[0] == 0
    write_bad_files(tmp, maps)
    argv, message = ERROR_CASES[case]
    command = argv[0]
    argv = [in_dir(tmp, arg) for arg in argv]
    if "-o" not in argv:
        output = tmp / ("model.joblib" if command == "fit" else "out.npy")
        output.write_bytes(b"previous result")  # a failed run must leave it as it was
        argv += ["-o", output]
    before = sorted(os.listdir(tmp))

    code, out, err = run(capsys, *argv)

    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"skpool {command}: error: ")
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert sorted(os.listdir(tmp)) == before  # no temporary or partial files
    if (tmp / "out.npy").exists():
        assert (tmp / "out.npy").read_bytes() == b"previous result"


def test_cuda_without_cuda_is_one_line(files, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    tmp, _, _ = files
    code, _, err = run(capsys, "gmp", tmp / "X.npy", "-o", tmp / "o.npy", "--device", "cuda")
    assert code == 1 and err.count("\n") == 1 and "CUDA is not available" in err
    assert not (tmp / "o.npy").exists()


def test_usage_errors_exit_2(files, capsys):
    tmp, _, _ = files
    for argv in (["gmp", tmp / "X.npy", "-o", tmp / "o.npy", "--lam", "-1"],
                 ["fit", tmp / "X.npy", "-o", tmp / "m.npz", "--alpha", "nan"],
                 ["gmp", tmp / "X.npy", "-o", tmp / "o.npy", "--shape", "a,b"],
                 ["gmp", tmp / "X.npy"],
                 ["frobnicate"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "error:" in err and "Traceback" not in err


def test_traceback_flag_reraises(files, capsys):
    tmp, _, _ = files
    with pytest.raises(CommandError, match="no labels"):
        main(["fit", str(tmp / "X.npy"), "-o", str(tmp / "m.npz"), "--traceback"])


# --------------------------------------------------------------------------------------------
# The installed console script, in a real process
def console_script() -> list[str]:
    script = Path(sys.executable).with_name("skpool")
    found = str(script) if script.exists() else shutil.which("skpool")
    if found is None:
        pytest.fail("the 'skpool' console script is not installed: pip install -e .")
    return [found]


def test_console_script_in_a_real_process(files):
    """One process (start-up costs seconds): the script's exit status and a bare stderr line."""
    tmp, _, _ = files
    done = subprocess.run(
        [*console_script(), "fit", "X.npy", "--labels", "missing.npy", "-o", "model.npz"],
        cwd=tmp, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr == "skpool fit: error: missing.npy: no such file.\n"
    assert done.stdout == ""
    assert not (tmp / "model.npz").exists()
