"""examples/paper_tables.py: the cells, the gate, the verdicts, the results file, the report,
and the quick mode end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from skpool.evaluation import (
    CORRUPTIONS,
    GEOMETRIC_CORRUPTIONS,
    GEOMETRIC_PERTURBATIONS,
    PERTURBATIONS,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "paper_tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("paper_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ cells and options


def test_pilot_first_then_whole_claim_groups(tables):
    cells = tables.planned_cells(5)
    assert len(cells) == len(set(cells))
    pilot = tables.PILOT
    assert cells[: len(pilot)] == pilot and {seed for _, _, seed in pilot} == {0}
    assert {m for t, m, _ in pilot if t == "christlein12"} == set(tables.RETRIEVAL_HEADS)
    # every model has every seed, and a group's seeds are contiguous after the pilot
    models = {(t, m) for t, m, _ in cells}
    assert all(sorted(s for t2, m2, s in cells if (t2, m2) == tm) == [0, 1, 2, 3, 4]
               for tm in models)
    assert cells[-1][0] == "recipe"  # the costliest (ResNet-18) groups last
    assert cells.index(("recipe", "resnet/reduced/separability-2-then-0", 1)) < cells.index(
        ("birodkar1", "resnet/full/separability", 0))  # the recipe at least on two seeds early
    # every claim's cells are planned
    for claim in tables.claims():
        for key in ("baseline", "learned"):
            if key in claim:
                assert (*claim[key], 4) in cells, claim["id"]


def test_parse_fills_the_size_and_keeps_overrides(tables, tmp_path):
    quick = tables.parse(["--quick", "--out", str(tmp_path / "r.json"), "--epochs", "3"])
    assert quick.epochs == 3 and quick.seeds == 1 and quick.width == tables.SIZES["quick"]["width"]
    cpu = tables.parse(["--out", str(tmp_path / "r.json"), "--alpha", "2"])
    assert cpu.alpha == 2.0 and cpu.train_size == tables.SIZES["cpu"]["train_size"]
    full = tables.parse(["--size", "full", "--out", str(tmp_path / "r.json")])
    assert full.width == 64 and full.reduced_size == full.train_size // 20  # the paper's 5%
    default = tables.parse([])
    assert default.out.parent == Path(".") and not default.out.exists()  # never a tracked file
    for bad in (["--seeds", "0"], ["--reduced-size", "99999"], ["--jobs", "0"]):
        with pytest.raises(SystemExit):
            tables.parse(["--quick", *bad])


def test_results_file_refuses_other_settings_and_foreign_files(tables, tmp_path):
    path = tmp_path / "r.json"
    results = tables.ResultsFile(path, {"epochs": 2, "width": 4})
    results.add_cell({"table": "christlein12", "model": "avg", "seed": 0, "seconds": 1.0})
    again = tables.ResultsFile(path, {"epochs": 2, "width": 4})
    assert set(again.done) == {("christlein12", "avg", 0)}
    with pytest.raises(ValueError, match="epochs"):
        tables.ResultsFile(path, {"epochs": 3, "width": 4})
    for text in ("not json", "[1, 2]", '{"format": "other", "cells": []}'):
        path.write_text(text)
        with pytest.raises(ValueError, match="not a results file"):
            tables.ResultsFile(path, {"epochs": 2, "width": 4})


def test_a_failed_save_leaves_the_previous_file(tables, tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    results = tables.ResultsFile(path, {"epochs": 2})
    results.add_cell({"table": "christlein12", "model": "avg", "seed": 0, "seconds": 1.0})
    before = path.read_text()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tables.os, "replace", fail)  # interrupted between write and rename
    with pytest.raises(KeyboardInterrupt):
        results.add_cell({"table": "christlein12", "model": "max", "seed": 0, "seconds": 1.0})
    assert path.read_text() == before


# ------------------------------------------------------------------------------ statistics


def test_chance_map_is_the_mean_ap_of_random_rankings(tables):
    from skpool.evaluation import mean_average_precision

    labels = np.repeat([0, 1, 2, 3], [5, 7, 9, 1])  # a singleton: no relevant item, left out
    rng = np.random.default_rng(0)
    # random embeddings rank at random: the mean over many draws estimates the expectation
    draws = [mean_average_precision(rng.standard_normal((len(labels), 3)), labels)
             for _ in range(1000)]
    # Monte Carlo: the mean of 1000 draws is within 5 standard errors of the expectation
    # (a false alarm once in ~2 million runs)
    assert abs(np.mean(draws) - tables.chance_map(labels)) < 5 * np.std(draws) / np.sqrt(1000)
    # by hand: one relevant among S = 2 others: E[1/rank] = (1 + 1/2) / 2
    assert tables.chance_map([0, 0, 1]) == pytest.approx((2 * 0.75 + 0) / 2, rel=1e-15)


def test_t_quantiles_match_scipy(tables):
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 30):
        # tabulated to 3 decimals: half a unit of the last digit
        assert abs(tables.t975(df) - stats.t.ppf(0.975, df)) <= 5e-4
    assert tables.t975(27) >= stats.t.ppf(0.975, 27)  # between rows: the wider interval


@pytest.mark.parametrize("differences, sign, expected", [
    ([-5.0, -4.0, -6.0, -5.5, -4.5], -1, "confirmed"),
    ([-5.0, -4.0, -6.0, -5.5, -4.5], +1, "refuted"),
    ([3.0, 2.5, 3.5, 2.0, 4.0], +1, "confirmed"),
    ([-1.0, 2.0, -3.0, 1.5, 0.5], -1, "inconclusive at this size"),
    ([-1.0], -1, "inconclusive at this size (one seed)"),
    ([], -1, "not measured (its cells were not computed)"),
])
def test_verdict_on_synthetic_differences(tables, differences, sign, expected):
    result = tables.verdict(differences, sign)
    assert result["verdict"] == expected
    d = np.asarray(differences)
    if len(d) == 0:
        return
    assert result["mean"] == pytest.approx(d.mean(), rel=1e-12)
    if len(d) > 1:
        half = tables.t975(len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert result["low"] == pytest.approx(d.mean() - half, rel=1e-12)
        assert result["high"] == pytest.approx(d.mean() + half, rel=1e-12)


# ------------------------------------------------------------------------------ gate and report


def _robustness(rng, scale=1.0):
    return {
        "corruption_errors": {c: (scale * rng.uniform(0.1, 0.9, 5)).tolist() for c in CORRUPTIONS},
        "flip_probability": {p: float(scale * rng.uniform(0.05, 0.5)) for p in PERTURBATIONS},
    }


def _synthetic_cells(tables, seeds, strided_error=0.25, head_map=0.35, learned_gain=-0.05):
    """Cells for every planned model: strided errors, learned ones lower by ``learned_gain``
    plus seed noise; retrieval mAP ``head_map`` against chance 0.2."""
    rng = np.random.default_rng(1)
    cells = []
    for table, model, seed in tables.planned_cells(seeds):
        cell = {"table": table, "model": model, "seed": seed, "seconds": 1.0}
        noise = 0.01 * rng.standard_normal()
        if table == "christlein12":
            cell.update(mAP=head_map + (0.05 if model.startswith("dgmp") else 0.0) + noise,
                        top1=0.5, untrained_mAP=0.21, chance_mAP=0.2)
        else:
            base = strided_error if "reduced" not in model else strided_error + 0.2
            learned = model.split("/")[-1] != "strided" or table == "christlein3"
            cell.update(test_error=base + (learned_gain if learned else 0.0) + noise,
                        train_error=0.05)
            if table == "birodkar1" and "/full/" in model:
                cell["robustness"] = _robustness(rng, 0.8 if learned else 1.0)
        cells.append(cell)
    return cells


def test_gate_checks_every_baseline_and_head(tables):
    cells = {(c["table"], c["model"], c["seed"]): c for c in _synthetic_cells(tables, 1)}
    assert tables.gate(cells)["passed"]
    failing = dict(cells)
    failing[("birodkar1", "cnn/full/strided", 0)] = {**cells[("birodkar1", "cnn/full/strided",
                                                             0)], "test_error": 0.31}
    outcome = tables.gate(failing)
    assert not outcome["passed"]
    assert [c["check"] for c in outcome["checks"] if not c["passed"]] == [
        "cnn strided, full set: test error"]
    low_head = dict(cells)
    low_head[("christlein12", "lse", 0)] = {**cells[("christlein12", "lse", 0)], "mAP": 0.259}
    assert not tables.gate(low_head)["passed"]  # 0.259 / 0.2 < 1.3
    missing = {k: v for k, v in cells.items() if k != ("christlein12", "max", 0)}
    assert not tables.gate(missing)["passed"]  # a missing check never passes


def test_report_gives_no_comparison_when_the_gate_fails(tables):
    record = {"cells": _synthetic_cells(tables, 3, strided_error=0.45)}
    text = tables.report(record)
    assert "did not pass: no comparison is reported" in text
    assert "confirmed" not in text and "refuted" not in text and "verdict" not in text


def test_report_gives_one_verdict_per_claim_from_paired_seeds(tables):
    cells = _synthetic_cells(tables, 5)
    text = tables.report({"cells": cells})
    rows = [line for line in text.splitlines()
            if line.startswith("| ") and line.rstrip().endswith("** |")]
    assert len(rows) == len(tables.claims())
    # learned errors 5 points lower than strided with 1-point noise: confirmed
    row = next(r for r in rows if r.startswith("| separability < strided, test error (%), cnn, full"))
    assert "**confirmed**" in row and "| 5 |" in row
    # the reference paired difference, written out independently
    by_key = {(c["table"], c["model"], c["seed"]): c for c in cells}
    d = [100 * (by_key[("birodkar1", "cnn/full/separability", s)]["test_error"]
                - by_key[("birodkar1", "cnn/full/strided", s)]["test_error"]) for s in range(5)]
    assert f"{np.mean(d):+.1f} [" in row
    # DGMP +5 mAP points over every head: confirmed; CE ratios 0.8: confirmed
    assert all("**confirmed**" in r for r in rows if "DGMP (λ₀ = 1 relative) >" in r)
    assert "**confirmed**" in next(r for r in rows if "mean CE" in r and "cnn" in r)


def test_robustness_ratios_follow_hendrycks_and_dietterich(tables):
    rng = np.random.default_rng(3)
    base, learned = _robustness(rng), _robustness(rng)
    cells = {("birodkar1", "cnn/full/strided", 0): {"robustness": base},
             ("birodkar1", "cnn/full/separability", 0): {"robustness": learned}}
    ratios = tables.robustness_ratios(cells, "cnn", 0)
    ce = np.mean([np.sum(learned["corruption_errors"][c]) / np.sum(base["corruption_errors"][c])
                  for c in GEOMETRIC_CORRUPTIONS])
    fr = np.mean([learned["flip_probability"][p] / base["flip_probability"][p]
                  for p in GEOMETRIC_PERTURBATIONS])
    # the same float64 sums in another order: a few roundings of values ~1
    assert ratios["ce_geometric"] == pytest.approx(100 * ce, rel=1e-12)
    assert ratios["fr_geometric"] == pytest.approx(100 * fr, rel=1e-12)
    assert ratios["geometric_flipping_less"] == sum(
        learned["flip_probability"][p] < base["flip_probability"][p]
        for p in GEOMETRIC_PERTURBATIONS)
    assert tables.robustness_ratios(cells, "resnet", 0) is None


# ------------------------------------------------------------------------------ the quick mode


def _run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow  # 11 tiny trainings in a fresh interpreter: a minute or more when loaded
def test_quick_mode_stops_at_the_gate_and_resumes(tables, tmp_path):
    out = tmp_path / "results.json"
    command = ["--quick", "--device", "cpu", "--no-progress", "--out", str(out)]
    first = _run(*command)
    # width 4, one epoch on 200 images: nothing learns, so the gate fails (exit 3) and no
    # comparison is made; only the pilot's cells are computed
    assert first.returncode == 3, first.stderr[-3000:]
    record = json.loads(out.read_text())
    assert sorted((c["table"], c["model"], c["seed"]) for c in record["cells"]) == sorted(
        tables.PILOT)
    assert record["gate"]["passed"] is False
    assert "did not pass: no comparison is reported" in first.stdout
    assert out.with_suffix(".md").read_text().strip() in first.stdout
    for cell in record["cells"]:
        if cell["table"] == "christlein12":
            assert 0 < cell["chance_mAP"] < 1 and 0 < cell["mAP"] <= 1
    session = record["sessions"][0]
    assert session["computed"] == len(tables.PILOT) and session["load"]["start"]

    # A rerun computes nothing after a failed gate and leaves the file as it was.
    written = out.read_text()
    again = _run(*command)
    assert again.returncode == 3 and out.read_text() == written
    # Other settings are refused before any training.
    refused = _run(*command, "--epochs", "3")
    assert refused.returncode != 0 and "epochs" in refused.stderr
    assert out.read_text() == written
