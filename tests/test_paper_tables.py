"""examples/paper_tables.py: the cells, the resumable results file, the report, the quick mode."""

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
    NON_GEOMETRIC_PERTURBATIONS,
    PERTURBATIONS,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "paper_tables.py"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("paper_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ fast tests


def test_cells_cover_every_table_and_come_seed_by_seed(tables):
    cells = tables.planned_cells(3)
    assert len(cells) == len(set(cells))
    assert [c for c in cells if c[0] == "cv"] == [("cv", "cnn", 0), ("cv", "resnet", 0)]
    seeds = [seed for table, _, seed in cells if table != "cv"]
    assert seeds == sorted(seeds)  # an interrupted run holds whole seeds first
    per_seed = [c for c in cells if c[2] == 1]
    # 2 networks x 2 training sets x (strided, separability, sgd) + 7 retrieval + 4 classifiers
    assert len(per_seed) == 2 * 2 * 3 + 7 + 4
    assert {m for t, m, _ in per_seed if t == "christlein12"} == {
        "avg", "max", "mixed", "lse", "dgmp-lam1", "dgmp-lam1e3", "dgmp-lam1e5"}


def test_parse_fills_the_mode_and_keeps_overrides(tables, tmp_path):
    quick = tables.parse(["--quick", "--out", str(tmp_path / "r.json"), "--epochs", "3"])
    assert quick.epochs == 3 and quick.seeds == tables.QUICK["seeds"]
    assert quick.train_size == tables.QUICK["train_size"] and quick.channels == 1
    full = tables.parse(["--out", str(tmp_path / "r.json"), "--alpha-grid", "2,30"])
    assert full.alpha_grid == [2.0, 30.0] and full.width == tables.FULL["width"]
    with pytest.raises(SystemExit):
        tables.parse(["--quick", "--out", str(tmp_path / "r.json"), "--cv", "1"])


def test_results_file_refuses_other_settings_and_foreign_files(tables, tmp_path):
    path = tmp_path / "r.json"
    results = tables.ResultsFile(path, {"epochs": 2, "width": 4})
    results.add_cell({"table": "cv", "model": "cnn", "seed": 0, "seconds": 1.0})
    again = tables.ResultsFile(path, {"epochs": 2, "width": 4})
    assert set(again.done) == {("cv", "cnn", 0)}
    with pytest.raises(ValueError, match="epochs"):
        tables.ResultsFile(path, {"epochs": 3, "width": 4})
    for text in ("not json", "[1, 2]", '{"format": "other", "cells": []}'):
        path.write_text(text)
        with pytest.raises(ValueError, match="not a results file"):
            tables.ResultsFile(path, {"epochs": 2, "width": 4})


def test_a_failed_save_leaves_the_previous_file(tables, tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    results = tables.ResultsFile(path, {"epochs": 2})
    results.add_cell({"table": "cv", "model": "cnn", "seed": 0, "seconds": 1.0})
    before = path.read_text()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tables.os, "replace", fail)  # interrupted between write and rename
    with pytest.raises(KeyboardInterrupt):
        results.add_cell({"table": "cv", "model": "resnet", "seed": 0, "seconds": 1.0})
    assert path.read_text() == before


def _robustness(rng, flips_never=()):
    return {
        "corruption_errors": {c: rng.uniform(0.1, 0.9, 5).tolist() for c in CORRUPTIONS},
        "flip_probability": {
            p: 0.0 if p in flips_never else float(rng.uniform(0.05, 0.5)) for p in PERTURBATIONS
        },
        "flips_per_step": {p: rng.uniform(0, 0.5, 30).tolist() for p in PERTURBATIONS},
    }


def test_report_computes_ce_and_fr_as_hendrycks_and_dietterich(tables, rng):
    never = GEOMETRIC_PERTURBATIONS[0]  # the baseline never flips there: FR undefined
    cells = []
    for seed in (0, 1):
        for pooling, error in (("strided", 0.3), ("separability", 0.2)):
            cells.append({
                "table": "birodkar1", "model": f"cnn/full/{pooling}", "seed": seed,
                "test_error": error + 0.01 * seed,
                "robustness": _robustness(rng, flips_never=(never,) if pooling == "strided"
                                          else ()),
            })
    text = tables.report({"cells": cells})
    row = next(line for line in text.splitlines() if line.startswith("| cnn | 30.50"))

    # Reference: CE_c = sum_s E(model) / sum_s E(baseline); FR_p = FP(model) / FP(baseline);
    # means over the geometric group, then over seeds (written out here independently).
    ce, fr = [], []
    for seed in (0, 1):
        base, model = (cells[2 * seed]["robustness"], cells[2 * seed + 1]["robustness"])
        ce.append(np.mean([np.sum(model["corruption_errors"][c])
                           / np.sum(base["corruption_errors"][c])
                           for c in GEOMETRIC_CORRUPTIONS]))
        fr.append(np.mean([model["flip_probability"][p] / base["flip_probability"][p]
                           for p in GEOMETRIC_PERTURBATIONS if p != never]))
    fields = [field.strip() for field in row.strip("|").split("|")]
    assert fields[1] == "30.50 ± 0.50 → 20.50 ± 0.50"
    for field, reference in ((fields[2], ce), (fields[4], fr)):
        mean, std = (float(v) for v in field.split(" ± "))
        # printed to 0.1 (x100): half a unit of the last digit, plus float64 roundoff
        assert abs(mean - 100 * np.mean(reference)) <= 0.05 + 1e-9
        assert abs(std - 100 * np.std(reference)) <= 0.05 + 1e-9
    # "rotate" names a corruption and a perturbation: each row must show its own ratio.
    for kind, key in (("CE", "corruption_errors"), ("FR", "flip_probability")):
        ratios = [np.sum(cells[2 * s + 1]["robustness"][key]["rotate"])
                  / np.sum(cells[2 * s]["robustness"][key]["rotate"]) for s in (0, 1)]
        row = next(line for line in text.splitlines() if line.startswith(f"| {kind} rotate |"))
        mean = float(row.split("|")[3].split(" ± ")[0])
        assert abs(mean - 100 * np.mean(ratios)) <= 0.05 + 1e-9  # printed to 0.1
    assert "32.53 → 21.56" in text and "54.8" in text and "85.9" in text
    assert "| resnet | n/a → n/a |" in text  # not run: said so, not invented


# ------------------------------------------------------------------------------ the quick mode


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=400, check=False,
    )


@pytest.mark.slow
def test_quick_mode_writes_every_cell_and_resumes(tables, tmp_path):
    out, plot = tmp_path / "results.json", tmp_path / "flips.png"
    command = ["--quick", "--device", "cpu", "--no-progress", "--out", str(out)]
    first = _run(*command, "--plot", str(plot))
    assert first.returncode == 0, first.stderr[-3000:]

    record = json.loads(out.read_text())
    planned = tables.planned_cells(1)
    assert sorted((c["table"], c["model"], c["seed"]) for c in record["cells"]) == sorted(planned)
    assert record["settings"] == {k: tables.QUICK[k] for k in tables.SETTINGS}
    session = record["sessions"][0]
    assert session["computed"] == len(planned) and session["resumed"] == 0
    assert session["machine"]["threads"] == 1 and session["machine"]["simd"]
    for cell in record["cells"]:
        if "test_error" in cell:
            assert 0.0 <= cell["test_error"] <= 1.0
        if cell["table"] == "christlein12":
            assert 0.0 < cell["mAP"] <= 1.0 and 0.0 <= cell["top1"] <= 1.0
        if cell["model"].startswith("dgmp"):
            assert cell["learned_lambda"] > 0
        if cell["table"] == "cv":
            assert cell["best_params"] in cell["candidates"]
            assert len(cell["mean_accuracy"]) == len(tables.QUICK["alpha_grid"]) * len(
                tables.QUICK["norm_grid"])
        if "robustness" in cell:
            assert cell["model"].split("/")[1] == "full"
            robustness = cell["robustness"]
            assert sorted(robustness["corruption_errors"]) == sorted(CORRUPTIONS)
            assert all(len(v) == 5 for v in robustness["corruption_errors"].values())
            assert sorted(robustness["flip_probability"]) == sorted(PERTURBATIONS)
            assert len(robustness["flips_per_step"]["translate"]) == 15  # 16 frames
    assert sum("robustness" in c for c in record["cells"]) == 4

    for heading in ("Table 1", "Tables 2–3", "Table 4", "Tables I–II", "Table III"):
        assert heading in first.stdout
    assert "32.53 → 21.56" in first.stdout and "Session 1 (" in first.stdout
    assert "ATen" in first.stdout and "torch thread" in first.stdout  # the machine
    assert out.with_suffix(".md").read_text().strip() in first.stdout
    assert plot.read_bytes().startswith(PNG)
    assert set(GEOMETRIC_PERTURBATIONS) | set(NON_GEOMETRIC_PERTURBATIONS) == set(PERTURBATIONS)

    # A rerun finds every cell done, trains nothing and leaves the file as it was.
    written = out.read_text()
    again = _run(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"0 cells to compute, {len(planned)} already" in again.stdout
    assert out.read_text() == written
    rerun = json.loads(written)

    # A lost cell is recomputed alone; the same code, threads and seeds on the same machine
    # with deterministic algorithms give the same network, hence the same error.
    lost = next(c for c in record["cells"] if (c["table"], c["model"]) == ("christlein3", "max"))
    rerun["cells"].remove(lost)
    out.write_text(json.dumps(rerun))
    resumed = _run(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 cells to compute" in resumed.stdout
    final = json.loads(out.read_text())
    assert [s["computed"] for s in final["sessions"]] == [len(planned), 1]
    assert final["sessions"][-1]["resumed"] == len(planned) - 1
    assert final["cells"][-1]["test_error"] == lost["test_error"]

    # Other settings are refused before any training, and the file is left as it was.
    refused = _run(*command, "--epochs", "3")
    assert refused.returncode != 0 and "epochs" in refused.stderr
    assert json.loads(out.read_text()) == final
