"""The skpool command line: results equal the estimators', files in every accepted format, and
bad input gets one line on stderr, a non-zero exit and no output file (old ones untouched)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from skpool import GeneralizedMaxPooling, SeparabilityPooling
from skpool.cli import CommandError, main
from skpool.io import FORMAT_VERSION, load_operator
from solve_progress import solve_with_progress  # noqa: F401 - a fixture

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


# --------------------------------------------------------------------------------------------
# The output is never one of the inputs: refused before anything is read, input untouched
def same_file_cases(tmp: Path) -> dict[str, tuple[list, str]]:
    """argv (without -o) and the input it names, for every subcommand and every input."""
    return {
        "gmp features": (["gmp", tmp / "X.npy"], "X.npy"),
        "gmp npz features": (["gmp", tmp / "train.npz"], "train.npz"),
        "gmp raw features": (["gmp", tmp / "X.f32", "--shape", "6,4,3"], "X.f32"),
        "fit features": (["fit", tmp / "train.npz"], "train.npz"),
        "fit labels": (["fit", tmp / "X.npy", "--labels", tmp / "y.npy"], "y.npy"),
        "fit npz labels": (["fit", tmp / "X.npy", "--labels", tmp / "train.npz"], "train.npz"),
        "transform model": (["transform", tmp / "model.npz", tmp / "X.npy"], "model.npz"),
        "transform features": (["transform", tmp / "model.npz", tmp / "X.npy"], "X.npy"),
    }


def output_spellings(tmp: Path, name: str) -> dict[str, Path | str]:
    """Ways to name the file ``tmp/name`` (or a file that is it) as the output."""
    os.makedirs(tmp / "sub", exist_ok=True)
    stem, suffix = os.path.splitext(name)
    os.symlink(tmp / name, tmp / f"sym_{stem}{suffix}")
    os.link(tmp / name, tmp / f"hard_{stem}{suffix}")
    return {
        "same path": tmp / name,
        "relative": Path(name),
        "dot-dot": Path("sub") / ".." / name,
        "symlink": tmp / f"sym_{stem}{suffix}",
        "hard link": tmp / f"hard_{stem}{suffix}",
    }


@pytest.mark.parametrize("case", list(same_file_cases(Path("."))))
def test_output_naming_an_input_is_refused(files, capsys, monkeypatch, case):
    tmp, _, _ = files
    assert run(capsys, "fit", tmp / "train.npz", "-o", tmp / "model.npz", "-q")[0] == 0
    argv, name = same_file_cases(tmp)[case]
    monkeypatch.chdir(tmp)
    spellings = output_spellings(tmp, name)
    contents = {path.name: path.read_bytes() for path in tmp.iterdir() if path.is_file()}
    listing = sorted(os.listdir(tmp))
    for spelling, output in spellings.items():
        code, out, err = run(capsys, *argv, "-o", output)
        assert code == 1, (spelling, err)
        assert out == "" and err.count("\n") == 1, (spelling, err)
        if str(output).endswith(_allowed_suffixes(argv[0])):
            assert "never writes over its inputs" in err, (spelling, err)
        else:  # e.g. a raw .f32 input: refused by the output suffix rule first
            assert "the output must end in" in err, (spelling, err)
        assert sorted(os.listdir(tmp)) == listing
        for path in tmp.iterdir():
            if path.is_file():
                assert path.read_bytes() == contents[path.name], (spelling, path.name)


def _allowed_suffixes(command: str) -> tuple[str, ...]:
    return (".npz", ".joblib", ".pkl") if command == "fit" else (".npy", ".npz")


def test_an_output_that_is_not_an_input_is_fine_next_to_links(files, capsys, monkeypatch):
    """The check compares files, not names: a new file beside the inputs, or one whose name
    resembles an input's, is written."""
    tmp, maps, _ = files
    monkeypatch.chdir(tmp)
    os.symlink(tmp / "X.npy", tmp / "alias.npy")
    code, _, err = run(capsys, "gmp", "alias.npy", "-o", "sub_X.npy", "-q")
    assert (code, err) == (0, "")
    code, _, err = run(capsys, "gmp", "X.npy", "-o", tmp / "X.npy.npz", "-q")
    assert (code, err) == (0, "")
    np.testing.assert_array_equal(np.load("sub_X.npy"), np.load("X.npy.npz")["X"])
    assert np.load("X.npy").tobytes() == maps.tobytes()


def test_an_existing_directory_is_not_an_output(files, capsys):
    tmp, _, _ = files
    (tmp / "out.npy").mkdir()
    code, _, err = run(capsys, "gmp", tmp / "X.npy", "-o", tmp / "out.npy")
    assert code == 1 and "is a directory" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------
# Damaged feature and model files: one line, exit 1
def damage(data: bytes, kind: str) -> bytes:
    """A zip with a damaged central directory (APPNOTE 4.3.12 offsets), or a damaged .npy."""
    out = bytearray(data)
    offsets = {"flag bit 5": (8, b"\x20\x00"), "version 255": (6, b"\xff\x00"),
               "bad CRC": (16, b"\x00\x00\x00\x00")}
    if kind in offsets:
        offset, value = offsets[kind]
        start = out.find(b"PK\x01\x02")
        while start >= 0:
            out[start + offset : start + offset + len(value)] = value
            start = out.find(b"PK\x01\x02", start + 4)
        return bytes(out)
    if kind == "npy header text":  # numpy parses the header's dict with the tokenizer
        start = out.find(b"{")
        out[start + 40] = 0x82
        return bytes(out)
    if kind == "cut":
        return data[: len(data) // 3]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["flag bit 5", "version 255", "bad CRC", "cut"])
@pytest.mark.parametrize("target", ["features", "labels", "model", "info"])
def test_damaged_npz_files_are_one_line(files, capsys, kind, target):
    tmp, _, _ = files
    assert run(capsys, "fit", tmp / "train.npz", "-o", tmp / "model.npz", "-q")[0] == 0
    source = {"features": "train.npz", "labels": "train.npz", "model": "model.npz",
              "info": "model.npz"}[target]
    (tmp / "bad.npz").write_bytes(damage((tmp / source).read_bytes(), kind))
    argv = {
        "features": ["gmp", tmp / "bad.npz", "-o", tmp / "out.npy"],
        "labels": ["fit", tmp / "X.npy", "--labels", tmp / "bad.npz", "-o", tmp / "m.npz"],
        "model": ["transform", tmp / "bad.npz", tmp / "X.npy", "-o", tmp / "out.npy"],
        "info": ["info", tmp / "bad.npz"],
    }[target]
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == "", err
    assert err.count("\n") == 1 and "bad.npz" in err and "Traceback" not in err
    assert not (tmp / "out.npy").exists() and not (tmp / "m.npz").exists()


@pytest.mark.parametrize("kind", ["npy header text", "cut"])
def test_damaged_npy_files_are_one_line(files, capsys, kind):
    tmp, _, _ = files
    (tmp / "bad.npy").write_bytes(damage((tmp / "X.npy").read_bytes(), kind))
    code, _, err = run(capsys, "gmp", tmp / "bad.npy", "-o", tmp / "out.npy")
    assert code == 1 and err.count("\n") == 1 and "bad.npy: not a valid .npy file" in err


def test_stored_parameters_are_checked_unless_the_options_replace_them(files, capsys):
    tmp, maps, labels = files
    assert run(capsys, "fit", tmp / "train.npz", "-o", tmp / "model.npz", "-q")[0] == 0
    with np.load(tmp / "model.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    params = json.loads(str(arrays["params"]))
    for name, value, replaced in [("batch_size", -1, True), ("device", "tpu:9", True),
                                  ("alpha", -1.0, False), ("norm", "l7", False)]:
        changed = {**arrays, "params": np.asarray(json.dumps({**params, name: value}))}
        np.savez(tmp / "odd.npz", **changed)
        code, _, err = run(capsys, "transform", tmp / "odd.npz", tmp / "X.npy",
                           "-o", tmp / "out.npy", "-q", "--device", "cpu")
        if replaced:  # --batch-size and --device always replace the stored values
            assert (code, err) == (0, ""), name
            np.testing.assert_allclose(np.load(tmp / "out.npy"),
                                       fit_reference(maps, labels).transform(maps),
                                       rtol=1e-6, atol=1e-6)
        else:
            assert code == 1 and f"invalid stored parameter: The '{name}' parameter" in err


# --------------------------------------------------------------------------------------------
# Options: every estimator parameter, with the estimator's default
def subcommand_parser(name: str):
    from skpool.cli import build_parser

    parser = build_parser()
    subparsers = next(action for action in parser._actions
                      if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices[name]


@pytest.mark.parametrize("command, estimator",
                         [("gmp", GeneralizedMaxPooling), ("fit", SeparabilityPooling)])
def test_every_estimator_parameter_is_an_option_with_its_default(command, estimator):
    """Read from the estimator itself (not from the spec the options are generated from): every
    parameter is an option with the estimator's default and its constraint's choices, or the
    CLI states why it is none."""
    from sklearn.utils._param_validation import StrOptions

    from skpool.cli._options import ESTIMATORS, NotAnOption

    options = {action.dest: action for action in subcommand_parser(command)._actions}
    specs = ESTIMATORS[estimator.__name__][2]
    for name, default in estimator().get_params().items():
        spec = specs[name]
        if isinstance(spec, NotAnOption):
            assert spec.reason and name not in options, name
            continue
        dest = spec.dest or name
        assert dest in options, f"{estimator.__name__}({name}=...) has no option in '{command}'"
        assert options[dest].default == default, name
        strings = [c.options for c in estimator._parameter_constraints[name]
                   if isinstance(c, StrOptions)]
        assert (set(options[dest].choices) if options[dest].choices else None) == (
            strings[0] if strings else None), name
        # the shown default is the estimator's, or words for None (a flag shows none)
        assert "%(default)s" in options[dest].help or default is None or isinstance(
            default, bool), name


def test_renamed_and_negated_options_set_their_parameters(files, capsys):
    """--precision sets dtype (--dtype is a raw file's element type), --no-* flags turn a True
    default off: read back from the saved estimator."""
    from skpool.io import load_estimator

    tmp, _, _ = files
    code, _, err = run(capsys, "fit", tmp / "train.npz", "-o", tmp / "m.joblib", "-q",
                       "--precision", "float64", "--no-normalize-channels", "--norm", "l1",
                       "--device", "cpu")
    assert (code, err) == (0, "")
    params = load_estimator(tmp / "m.joblib").get_params()
    assert (params["dtype"], params["normalize_channels"], params["norm"]) == (
        "float64", False, "l1")
    assert run(capsys, "fit", tmp / "train.npz", "-o", tmp / "m.npz", "--precision",
               "float16")[0] == 2


def test_transform_takes_the_shared_options_with_both_estimators_defaults():
    """transform overrides a saved model's device, batch size and grid, whichever estimator
    saved it: their defaults must be the same in both."""
    from skpool.cli._options import COMPUTATION, FEATURE_FILES, estimator_options

    shared = {name: (default, option) for name, default, option
              in estimator_options("SeparabilityPooling")
              if option.group in (COMPUTATION, FEATURE_FILES)}
    assert set(shared) == {"device", "batch_size", "grid_shape"}
    for name, default, option in estimator_options("GeneralizedMaxPooling"):
        if option.group in (COMPUTATION, FEATURE_FILES):
            assert shared[name] == (default, option), name
    options = {action.dest: action for action in subcommand_parser("transform")._actions}
    assert {"device", "batch_size", "grid_shape"} <= set(options)
    assert not {"alpha", "lam", "precision"} & set(options)


def test_a_parameter_without_an_option_stops_the_parser_naming_it(monkeypatch):
    """A new estimator parameter gets no guessed option: the parser is not built until the CLI
    has an Option or a NotAnOption (with a reason) for it; a stale entry and a flag that says
    the opposite of its default stop it too."""
    import skpool.cli._options as options_module
    from skpool import _parameters
    from skpool.cli import build_parser

    defaults, choices, specs = options_module.ESTIMATORS["SeparabilityPooling"]
    grown = _parameters._defaults("SeparabilityPooling", **defaults._asdict(), tolerance=1e-6)
    monkeypatch.setitem(options_module.ESTIMATORS, "SeparabilityPooling",
                        (grown, choices, specs))
    with pytest.raises(LookupError, match=r"'tolerance' has no Option or NotAnOption"):
        build_parser()
    stale = {**specs, "old": options_module.NotAnOption("gone")}
    monkeypatch.setitem(options_module.ESTIMATORS, "SeparabilityPooling",
                        (defaults, choices, stale))
    with pytest.raises(LookupError, match=r"'old' has an entry but is no parameter"):
        build_parser()
    flipped = _parameters._defaults(
        "SeparabilityPooling", **{**defaults._asdict(), "normalize_channels": False})
    monkeypatch.setitem(options_module.ESTIMATORS, "SeparabilityPooling",
                        (flipped, choices, specs))
    with pytest.raises(ValueError, match="--no-normalize-channels cannot set"):
        build_parser()


def test_support_radius_and_memory_options_reach_the_estimator(files, capsys):
    tmp, maps, labels = files
    code, _, err = run(capsys, "fit", tmp / "train.npz", "-o", tmp / "model.npz", "-q",
                       "--support-radius", "1.5", "--max-memory-mb", "8", "--stride", "1",
                       "--device", "cpu")
    assert (code, err) == (0, "")
    saved = load_operator(tmp / "model.npz")
    assert saved.params["support_radius"] == 1.5 and saved.params["max_memory_mb"] == 8
    reference = fit_reference(maps, labels, support_radius=1.5, stride=1)
    np.testing.assert_allclose(saved.operator, reference.operator_, rtol=0, atol=1e-12)
    # rows are zero outside the radius: the option changed the fit
    assert (saved.operator == 0).any()
    assert run(capsys, "fit", tmp / "train.npz", "-o", tmp / "m.npz", "--support-radius",
               "0")[0] == 2


# --------------------------------------------------------------------------------------------
# Progress: fit shows it like gmp and transform, on a terminal and unless -q
def test_fit_shows_progress_on_a_terminal_like_gmp_and_transform(
    files, capsys, monkeypatch, solve_with_progress
):
    tmp, _, _ = files
    fit = ["fit", tmp / "train.npz", "-o", tmp / "model.npz", "--device", "cpu"]
    gmp = ["gmp", tmp / "train.npz", "-o", tmp / "gmp.npy", "--device", "cpu"]
    transform = ["transform", tmp / "model.npz", tmp / "train.npz", "-o", tmp / "t.npy",
                 "--device", "cpu"]
    for argv in (fit, gmp, transform):  # not a terminal: no bars
        code, _, err = run(capsys, *argv)
        assert (code, err) == (0, "")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = run(capsys, *fit)
    assert code == 0
    for bar in ("channel statistics", "scatter statistics", "solve"):
        assert f"SeparabilityPooling {bar}: 100%" in err
    assert "45/45" in err and "6/6" in err  # samples of each pass, the 3x2 output cells
    for argv in (gmp, transform):
        assert f"skpool {argv[0]}: 100%" in run(capsys, *argv)[2]
    for argv in (fit, gmp, transform):  # -q silences them all
        code, out, err = run(capsys, *argv, "-q")
        assert (code, out, err) == (0, "", "")


# --------------------------------------------------------------------------------------------
# info: the grid, and the eigenvalues named for what they are
def test_info_names_the_eigenvalues_and_flags_a_column_grid(files, capsys):
    tmp, maps, labels = files
    np.savez(tmp / "flat.npz", X=maps.reshape(N_SAMPLES, -1), y=labels)  # (n, F): a mistake
    with warnings.catch_warnings(record=True) as caught:  # the note says it, not a warning
        warnings.simplefilter("always")
        code, out, _ = run(capsys, "fit", tmp / "flat.npz", "-o", tmp / "flat_model.npz")
    assert code == 0 and "72x1 grid" in out and "--grid-shape H,W" in out
    assert not [w for w in caught if "grid" in str(w.message)]
    code, out, _ = run(capsys, "info", tmp / "flat_model.npz", "--json")
    description = json.loads(out)
    assert description["input_grid"] == "72x1 (72 locations)"
    assert description["note"].startswith("a 72x1 grid") and "--grid-shape H,W" in description["note"]
    assert description["channels"] == "1 in -> 1 out"
    assert "separability" not in description
    eigen = description["generalized_eigenvalues"]
    assert "B + alpha C_m" in eigen and "not separability_ratios" in eigen
    values = load_operator(tmp / "flat_model.npz").eigenvalues
    assert f"median {np.median(values):.4g}" in eigen

    code, out, _ = run(capsys, "fit", tmp / "flat.npz", "-o", tmp / "grid_model.npz",
                       "--grid-shape", "6,4")
    assert code == 0 and "note" not in out and "6x4 -> 3x2 grid" in out
    code, out, _ = run(capsys, "info", tmp / "grid_model.npz")
    assert "input_grid" in out and "6x4 (24 locations)\n" in out and "note" not in out


def test_info_rejects_computation_options_as_documented(files, capsys):
    tmp, _, _ = files
    run(capsys, "fit", tmp / "train.npz", "-o", tmp / "model.npz", "-q")
    code, _, err = run(capsys, "info", tmp / "model.npz", "--device", "cpu")
    assert code == 2 and "unrecognized arguments: --device" in err
    for command in ("gmp", "fit", "transform"):
        assert "--device" in run(capsys, command, "--help")[1]


def test_cli_shows_only_its_api():
    import skpool.cli as cli

    assert dir(cli) == sorted(cli.__all__)


# --------------------------------------------------------------------------------------------
# Start-up: help, usage errors and info import neither torch nor scikit-learn
_PROBE = """
import json, sys
from skpool.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as exc:
        codes.append(exc.code)
heavy = sorted(name for name in ("torch", "sklearn", "scipy", "skorch") if name in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_help_usage_errors_and_info_do_not_import_torch_or_sklearn(files, capsys):
    """Checked in a fresh process through sys.modules (not by timing): these answers must
    not pay the seconds torch and scikit-learn take to import."""
    tmp, _, _ = files
    assert run(capsys, "fit", tmp / "train.npz", "-o", tmp / "model.npz", "-q")[0] == 0
    (tmp / "junk.npz").write_bytes(b"PK not really")
    argvs = [["--help"], ["--version"], ["gmp", "--help"], ["fit", "--help"],
             ["transform", "--help"], ["info", "--help"], ["gmp"], ["fit", "X.npy", "-o"],
             ["frobnicate"], ["info", "model.npz"], ["info", "model.npz", "--json"],
             ["info", "junk.npz"], ["info", "missing.npz"],
             ["gmp", "X.npy", "-o", "X.npy"], ["gmp", "missing.npy", "-o", "out.npy"]]
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argvs)],
        cwd=tmp, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0, 0, 0, 0, 2, 2, 2, 0, 0, 1, 1, 1, 1]
    assert result["heavy"] == []
    assert "generalized_eigenvalues" in done.stdout


def test_package_shows_its_api_and_imports_lazily():
    import skpool

    assert set(skpool.__all__) <= set(dir(skpool))
    assert not [name for name in dir(skpool)
                if not name.startswith("__") and name not in skpool.__all__
                and name not in ("cli", "io", "models", "nn", "plotting")]
    assert skpool.resolve_device("cpu").type == "cpu"  # the lazy name resolves
    with pytest.raises(AttributeError, match="no attribute 'np'"):
        skpool.np  # noqa: B018 - the access under test
