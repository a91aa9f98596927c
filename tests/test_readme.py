"""The README runs as written: every ```python block, in order, in one namespace, and every
``skpool ...`` line of its ```bash blocks through the CLI, in a scratch directory holding small
input files of the names the README uses (train.npz, test.npz, feats.dat)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks() -> list[tuple[str, str]]:
    """Every fenced block of the README as (language, code), in document order."""
    text = README.read_text(encoding="utf-8")
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.DOTALL)


def cli_lines(code: str) -> list[list[str]]:
    """The argv of every ``skpool`` command in a bash block (comments dropped)."""
    commands = []
    for line in re.sub(r"\\\n", " ", code).splitlines():  # join "\" line continuations
        words = shlex.split(line, comments=True)
        if words and words[0] == "skpool":
            commands.append(words[1:])
    return commands


def trains_a_network(code: str) -> bool:
    return "skpool.models" in code


def write_readme_inputs(folder: Path) -> None:
    """Small files with the names the README's commands read."""
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    maps = rng.random((60, 8, 8, 4), dtype=np.float32)
    for code in range(3):
        maps[labels == code, 2 * code : 2 * code + 2] += 1.0
    np.savez(folder / "train.npz", X=maps, y=labels)
    np.savez(folder / "test.npz", X=maps[:10], y=labels[:10])
    rng.random((3, 7, 7, 512), dtype=np.float32).tofile(folder / "feats.dat")


def run_readme(folder: Path, capsys, *, training: str) -> dict:
    """Run the README's blocks in order. ``training``: "skip" the block that trains networks,
    or run blocks "until" it (included) and stop there."""
    import matplotlib

    matplotlib.use("Agg")
    from skpool.cli import main

    write_readme_inputs(folder)
    namespace: dict = {}
    ran = {"python": 0, "skpool": 0}
    for language, code in readme_blocks():
        if language == "python":
            if training == "skip" and trains_a_network(code):
                continue
            exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our README
            ran["python"] += 1
            if training == "until" and trains_a_network(code):
                break
        elif language == "bash":
            for argv in cli_lines(code):
                status = main(argv)
                captured = capsys.readouterr()
                assert status == 0, (argv, captured.err)
                ran["skpool"] += 1
    return {"namespace": namespace, "ran": ran}


def test_readme_has_the_two_commands_first():
    head = README.read_text(encoding="utf-8").split("---", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", head, flags=re.DOTALL)
    assert commands == [
        "pip install torch==2.13.0 && pip install . && python examples/demo.py",
        'pip install torch==2.13.0 && pip install ".[test]" && python -m pytest',
    ]


def test_readme_blocks_run_except_network_training(tmp_path, monkeypatch, capsys):
    """Every block but the skorch one (it trains networks: the slow test below runs it)."""
    monkeypatch.chdir(tmp_path)
    result = run_readme(tmp_path, capsys, training="skip")
    namespace = result["namespace"]
    n_python = sum(language == "python" for language, _ in readme_blocks())
    assert result["ran"] == {"python": n_python - 1, "skpool": 4}
    assert namespace["pooled"].shape == (200, 16)
    assert namespace["sep"].operator_.shape == (1, 16, 64)
    assert tuple(namespace["layer"].output_shape) == (4, 4)  # from the CLI's model.npz
    for name in ("operator.png", "gmp_weights.png", "test_pooled.npz", "pooled.npy"):
        assert (tmp_path / name).stat().st_size > 0, name
    with np.load(tmp_path / "test_pooled.npz") as pooled:
        assert pooled["X"].shape == (10, 4, 4, 4)
    assert np.load(tmp_path / "pooled.npy").shape == (3, 512)


@pytest.mark.slow
def test_the_network_training_block_runs(tmp_path, monkeypatch, capsys):
    """The skorch block (it trains small networks), after the blocks it builds on."""
    assert sum(trains_a_network(code) for _, code in readme_blocks()) == 1
    monkeypatch.chdir(tmp_path)
    result = run_readme(tmp_path, capsys, training="until")
    assert result["ran"]["python"] >= 2


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
