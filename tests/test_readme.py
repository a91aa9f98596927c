"""The README's tour runs as written (its Python blocks, in order, in one namespace)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    tour = text.split("## A 30-second tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", tour, flags=re.DOTALL)


def test_readme_has_the_two_commands_first():
    head = README.read_text(encoding="utf-8").split("---", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", head, flags=re.DOTALL)
    assert commands == [
        "pip install torch==2.13.0 && pip install . && python examples/demo.py",
        'pip install torch==2.13.0 && pip install ".[test]" && python -m pytest',
    ]


@pytest.mark.slow
def test_tour_runs():
    blocks = tour_blocks()
    assert len(blocks) == 3  # scikit-learn, PyTorch, skorch
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["pooled"].shape == (200, 16)
    assert namespace["sep"].operator_.shape == (1, 16, 64)
