"""Smoke tests of the examples that make pictures and drive the command line."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (its sibling imports resolved)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def test_plots_example_saves_three_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    load_example("plots").main(out=tmp_path / "pictures", device="cpu")
    names = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert names == ["gmp_weights_bursty.png", "gmp_weights_digits.png", "operator.png"]
    for name in names:
        data = (tmp_path / "pictures" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    assert capsys.readouterr().out.count(".png") == 3


@pytest.mark.slow
def test_cli_demo_runs(tmp_path):
    # The demo calls `python` and the `skpool` script: take those of the interpreter running
    # the tests (its environment's scripts folder first on PATH), so that the test also runs
    # from `.venv/bin/python -m pytest` without an activated environment.
    folders = dict.fromkeys([sysconfig.get_path("scripts"), str(Path(sys.executable).parent)])
    path = os.pathsep.join([*folders, os.environ.get("PATH", "")])
    if shutil.which("bash") is None or shutil.which("skpool", path=path) is None:
        pytest.fail("the CLI demo needs bash and the installed 'skpool' script (pip install .)")
    done = subprocess.run(
        ["bash", str(EXAMPLES / "cli_demo.sh"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": path},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "separability pooling" in done.stdout and "3-fold CV accuracy" in done.stdout
    for name in ("model.npz", "train_pooled.npz", "test_pooled.npz", "gmp.npy"):
        assert (tmp_path / name).exists()


def _run_example(*args: str, timeout: int = 300) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=EXAMPLES,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},  # as in conftest.py: tiny BLAS work
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_main_demo_runs():
    out = _run_example("demo.py", "--device", "cpu")
    assert "generalized max pooling" in out and "separability" in out.lower()
    assert out.count("accuracy") >= 4


@pytest.mark.slow
def test_table1_protocol_runs_in_miniature():
    out = _run_example(
        "table1_digits.py", "--seeds", "1", "--epochs", "1", "--train-size", "100", "--device", "cpu"
    )
    rows = [line for line in out.splitlines() if line.startswith("| ") and "±" in line]
    assert len(rows) == 9
    assert "machine:" in out and "threads" in out
    # A rerun on the same machine with the same (fixed) threads runs the same code on the
    # same data with deterministic algorithms: the table must be identical (issue 13).
    again = _run_example(
        "table1_digits.py", "--seeds", "1", "--epochs", "1", "--train-size", "100", "--device", "cpu"
    )
    assert [line for line in again.splitlines() if line.startswith("| ") and "±" in line] == rows
