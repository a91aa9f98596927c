"""examples/robustness_digits.py runs end to end in miniature and records what it prints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "robustness_digits.py"


@pytest.mark.slow  # trains two small CNNs for one epoch and predicts ~100 test sets (~30 s)
def test_robustness_example_runs_in_miniature(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--train-size", "200", "--test-size", "40",
         "--sequences", "8", "--epochs", "1", "--width", "4", "--frames", "3",
         "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    # each table has a header and a separator row; clean: 2 models; corruptions: 13 + 2
    # group means; perturbations: 10 + 2 group means
    assert len(rows) == (2 + 2) + (2 + 13 + 2) + (2 + 10 + 2)
    record = json.loads(out.read_text())
    assert record["settings"]["seeds"] == 1 and len(record["runs"]) == 1
    run = record["runs"][0]
    assert set(run["results"]) == {"strided", "avg"}
    assert all(len(errors) == 5 for errors in run["results"]["avg"]["errors"].values())
    assert set(run["ratios"]["avg"]["FR"]) == set(run["results"]["avg"]["flip_probability"])
    assert not (tmp_path / "results.json.partial").exists()


def test_bad_model_lists_are_refused():
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--models", "separability,avg"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2 and "--models" in done.stderr
