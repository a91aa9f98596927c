"""The README runs as written, each block as it stands: every ```python block in a fresh
namespace and an empty scratch directory, every ```bash block either run (the command-line
block, by bash, in an empty scratch directory: it makes its own input files) or, where running
it means installing packages or a nine-minute experiment, checked for what it says (the two
install-and-run commands verbatim, the experiment's options by its own parser)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: The two commands of the README's first screen, verbatim (CI runs the second one).
DEMO_COMMAND = "pip install torch==2.13.0 && pip install . && python examples/demo.py"
TEST_COMMAND = 'pip install torch==2.13.0 && pip install ".[test]" && python -m pytest'


def readme_blocks() -> list[tuple[str, str]]:
    """Every fenced block of the README as (language, code), in document order."""
    text = README.read_text(encoding="utf-8")
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.DOTALL)


def python_blocks() -> list[str]:
    return [code for language, code in readme_blocks() if language == "python"]


def bash_blocks() -> list[str]:
    return [code for language, code in readme_blocks() if language == "bash"]


def cli_lines(code: str) -> list[list[str]]:
    """The argv of every ``skpool`` command line in a bash block (comments dropped)."""
    commands = []
    for line in re.sub(r"\\\n", " ", code).splitlines():  # join "\" line continuations
        if line.startswith("skpool "):  # other lines may be parts of a quoted program
            commands.append(shlex.split(line, comments=True)[1:])
    return commands


def kind_of_bash_block(code: str) -> str:
    """"install" (the first screen's two commands), "cli" (runs ``skpool``) or "experiment"
    (a long ``python examples/...`` run); anything else is "unknown", and a test fails."""
    if code.strip() in (DEMO_COMMAND, TEST_COMMAND):
        return "install"
    if cli_lines(code):
        return "cli"
    if code.strip().startswith("python examples/paper_tables.py "):
        return "experiment"
    return "unknown"


def trains_a_network(code: str) -> bool:
    return "skpool.models" in code


def run_python_blocks(folder: Path, *, training: bool) -> list[dict]:
    """Run each python block on its own (a fresh namespace, in ``folder``), the block that
    trains networks only with ``training``; returns the namespaces, one per block run."""
    import matplotlib

    matplotlib.use("Agg")
    namespaces = []
    for index, code in enumerate(python_blocks()):
        if trains_a_network(code) != training:
            continue
        scratch = folder / f"block{index}"
        scratch.mkdir()
        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            namespace: dict = {"__name__": f"readme_block_{index}"}
            exec(compile(code, f"{README}:python block {index}", "exec"), namespace)  # noqa: S102
        finally:
            os.chdir(cwd)
        namespace["__folder__"] = scratch
        namespaces.append(namespace)
    return namespaces


def test_readme_has_the_two_commands_first():
    head = README.read_text(encoding="utf-8").split("\n---\n", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", head, flags=re.DOTALL)
    assert commands == [DEMO_COMMAND, TEST_COMMAND]


def test_every_bash_block_is_one_this_file_tests():
    kinds = [kind_of_bash_block(code) for code in bash_blocks()]
    assert "unknown" not in kinds, [c for c in bash_blocks() if kind_of_bash_block(c) == "unknown"]
    assert sorted(kinds) == ["cli", "experiment", "install", "install"]


def test_python_blocks_run_as_they_stand_except_network_training(tmp_path):
    """Every block but the skorch one (it trains networks: the slow test below runs it),
    each in a fresh namespace: none relies on another's variables or files."""
    namespaces = run_python_blocks(tmp_path, training=False)
    assert len(namespaces) == len(python_blocks()) - 1

    def find(name):
        return next(ns for ns in namespaces if name in ns)

    assert find("pooled")["pooled"].shape == (200, 16)
    assert find("search")["sep"].operator_.shape == (1, 16, 64)
    io_block = find("layer")
    assert tuple(io_block["layer"].output_shape) == (4, 4)  # digits 8x8 -> 4x4
    assert (io_block["__folder__"] / "model.npz").stat().st_size > 0
    pictures = find("plot_operator")["__folder__"]
    for name in ("operator.png", "gmp_weights.png"):
        assert (pictures / name).read_bytes().startswith(b"\x89PNG"), name


@pytest.mark.slow
def test_the_network_training_block_runs_as_it_stands(tmp_path):
    """The skorch block (it trains small networks), on its own."""
    assert sum(trains_a_network(code) for code in python_blocks()) == 1
    (namespace,) = run_python_blocks(tmp_path, training=True)
    assert len(namespace["names"]) == 200


@pytest.mark.slow  # five processes that import torch: about 10-20 s on 2 loaded cores
def test_the_command_line_block_runs_in_an_empty_directory(tmp_path):
    """By bash, as a reader pastes it: ``python`` is this interpreter and ``skpool`` this
    checkout's command line (``python -m skpool.cli``, what the installed script runs)."""
    (code,) = [c for c in bash_blocks() if kind_of_bash_block(c) == "cli"]
    assert len(cli_lines(code)) == 4
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    for name, command in (("python", ""), ("skpool", "-m skpool.cli ")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {command}"$@"\n')
        script.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(work / "test_pooled.npz") as pooled:
        assert pooled["X"].shape == (597, 4, 4, 1)  # digits 1200: onwards, 8x8 -> 4x4
    assert np.load(work / "pooled.npy").shape == (20, 512)
    assert "grid" in done.stdout  # skpool info printed the model's grids


def test_the_experiment_block_is_accepted_by_its_script():
    """The hour-long experiment is not run here (tests/test_paper_tables.py runs its quick
    mode); its options are parsed by the script's own parser, and the files it writes (the
    results and the report beside them) are not tracked files: a fresh clone stays clean."""
    (code,) = [c for c in bash_blocks() if kind_of_bash_block(c) == "experiment"]
    words = shlex.split(code)
    spec = importlib.util.spec_from_file_location("paper_tables", ROOT / words[1])
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    args = tables.parse(words[2:])
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    written = {str(args.out), str(args.out.with_suffix(".md"))}
    assert tracked and not written & set(tracked), written


def test_readme_cli_claims_match_the_cli(capsys):
    """What the Command line section says about options and exit statuses holds."""
    from skpool.cli import main

    section = README.read_text(encoding="utf-8").split("## Command line", 1)[1].split("\n## ")[0]
    assert "`gmp`, `fit` and `transform` take `--device" in section
    for command in ("gmp", "fit", "transform"):
        assert main([command, "--help"]) == 0
        assert "--device" in capsys.readouterr().out
    assert main(["info", "--help"]) == 0
    assert "--device" not in capsys.readouterr().out
    assert "2 for usage errors" in section
    assert main(["gmp", "features.npy"]) == 2  # no -o: argparse's usage error
    assert "usage: skpool gmp" in capsys.readouterr().err
    assert "--support-radius" in section
    assert main(["fit", "--help"]) == 0
    assert "--support-radius" in capsys.readouterr().out


def test_cli_lines_join_line_continuations():
    """A README command broken over lines with a trailing backslash is one command."""
    code = "skpool fit a.npz \\\n    -o b.npz --alpha 2  # fit\nskpool info b.npz\n"
    assert cli_lines(code) == [["fit", "a.npz", "-o", "b.npz", "--alpha", "2"], ["info", "b.npz"]]
