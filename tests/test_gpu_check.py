"""``benchmarks/gpu_check.py``, the first GPU run's one command, run here on the CPU with tiny
sizes (``--device cpu --quick``): its JSON names the device, holds every section's figures
as finite numbers beside their targets, counts the tests it ran, and records (does not
raise) a failing section or a section past the time budget."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from skpool import describe_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (it puts benchmarks/ and the tree's root on sys.path for its
    helpers; the path is restored afterwards, the helper modules stay imported)."""
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


@pytest.fixture
def gpu_tests(tmp_path):
    """A test file for the script's pytest run: gpu-marked tests that pass, fail, error,
    skip, and one without the mark (not selected)."""
    path = tmp_path / "test_tiny_gpu.py"
    path.write_text(textwrap.dedent("""
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture fails")

        @pytest.mark.gpu
        def test_passes():
            assert True

        @pytest.mark.gpu
        def test_fails():
            assert 1 == 2

        @pytest.mark.gpu
        def test_errors(broken):
            pass

        @pytest.mark.gpu
        @pytest.mark.skip(reason="no CUDA")
        def test_skipped():
            pass

        def test_not_selected():
            raise AssertionError("only gpu-marked tests run")
        """))
    return path


def numbers(value):
    """Every number inside a JSON value (bools excluded)."""
    if isinstance(value, dict):
        return [n for item in value.values() for n in numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in numbers(item)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.mark.slow  # ~10 s: the first TorchDispatchMode (CPU peak memory) imports a lot
def test_the_quick_cpu_run_writes_every_figure(gpu_check, gpu_tests, tmp_path, capsys):
    out = tmp_path / "check.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out),
                           "--tests", str(gpu_tests)])
    report = json.loads(out.read_text())
    assert code == 1  # the failing and erroring tests
    assert report["device"] == describe_device("cpu") and report["device_type"] == "cpu"
    assert report["quick"] is True and report["torch"] == torch.__version__
    assert report["errors"] == [] and report["skipped"] == []
    assert report["memory"]["budget_bytes"] > 0 and report["memory"]["free_bytes"] > 0
    tests = report["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (1, 1, 1, 1)
    assert sorted(name.rsplit("::", 1)[1] for name in tests["failures"]) == [
        "test_errors", "test_fails"]
    assert not tests["timed_out"] and tests["returncode"] == 1

    figures = report["figures"]
    assert {figure["section"] for figure in figures} == {name for name, _ in gpu_check.SECTIONS}
    for figure in figures:
        for value in numbers(figure):
            assert math.isfinite(value), figure
        assert figure["unit"] in ("s", "ratio", "calls") and figure["size"], figure
        assert (figure["target"] is None) == (figure["met"] is None), figure
    named = {figure["name"]: figure for figure in figures}
    targets = {
        "fit seconds": "< 0.5",
        "exact solve seconds": "< 2",
        **{f"GMP / Gram at ({n}, {c})": "<= 1.5" for n, c in gpu_check.SIZES[True]["gmp_shapes"]},
        **{f"forward+backward / forward at ({h}x{w}, {c})": "<= 2.5"
           for h, w, c in gpu_check.SIZES[True]["layer_shapes"]},
        "gmp step / avg step": "<= 1.15",
        **{f"syncs per {head} step": "== 0" for head in ("avg", "max", "mixed", "lse", "gmp")},
    }
    for name, target in targets.items():
        assert named[name]["target"] == target, name
    for name, figure in named.items():  # timed figures carry their peak memory
        if figure["unit"] != "calls":
            assert figure["peak_bytes"] > 0, name
        else:
            assert figure["value"] == sum(figure["calls"].values()), name
    assert named["avg step / avg step"]["value"] == 1.0  # exact: the same number divided
    printed = capsys.readouterr().out
    assert "fit seconds" in printed and "tests: 1 passed, 1 failed, 1 errors" in printed


def test_a_failing_section_is_recorded_and_the_others_run(gpu_check, tmp_path):
    args = gpu_check.argparse.Namespace(quick=True)
    report = gpu_check.Report(tmp_path / "check.json", torch.device("cpu"), args)

    def broken(report):
        raise RuntimeError("CUDA error: an illegal memory access")

    def working(report):
        report.figure("working", "one", 1.0, "s", ("<", 2.0), size="tiny")

    gpu_check.run_section(report, "broken", 60.0, broken)
    gpu_check.run_section(report, "working", 60.0, working)
    written = json.loads((tmp_path / "check.json").read_text())
    assert [error["section"] for error in written["errors"]] == ["broken"]
    assert "illegal memory access" in written["errors"][0]["error"]
    assert written["figures"] == [{"section": "working", "name": "one", "value": 1.0,
                                   "unit": "s", "target": "< 2", "met": True, "size": "tiny"}]


def test_sections_past_the_budget_are_skipped_saying_so(gpu_check, tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--budget-s", "0",
                           "--tests", "tests"]) == 0
    report = json.loads(out.read_text())
    assert [skip["section"] for skip in report["skipped"]] == [
        "tests", *(name for name, _ in gpu_check.SECTIONS)]
    assert report["figures"] == [] and report["tests"] is None


def test_the_cuda_peak_memory_is_the_allocators_peak_above_the_start(gpu_check, monkeypatch):
    """The CUDA branch of ``peak_bytes`` with torch.cuda's counters patched (no GPU here)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 350)
    peak = gpu_check.peak_bytes(lambda: calls.append("run"), torch.device("cuda"))
    assert peak == 250 and calls == ["sync", "reset", "run", "sync"]
