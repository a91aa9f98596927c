"""The README's section on the SVHN-like data and the robustness metrics runs as written."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## SVHN-like digits and robustness metrics"


@pytest.mark.slow  # fits an SVC and predicts 31 corrupted or perturbed test sets (~10 s)
def test_section_code_runs_and_its_pictures_exist():
    text = README.read_text(encoding="utf-8")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["X_train"].shape == (1000, 1, 32, 32)
    assert namespace["y_train"].dtype == np.int64
    assert set(namespace["errors"]) == {"rotate", "gaussian_noise", "contrast"}
    assert np.isfinite(namespace["mce"]) and np.isfinite(namespace["fr"])
    for picture in re.findall(r"\]\((docs/[\w.]+\.png)\)", section):
        assert (README.parent / picture).read_bytes().startswith(b"\x89PNG")
