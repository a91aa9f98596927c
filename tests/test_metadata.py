"""The distribution's metadata: an SPDX licence with its text shipped, ``py.typed`` shipped,
trove classifiers that agree with ``requires-python``, which is the Python the suite runs on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def floor(requires_python: str) -> tuple[int, int]:
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", requires_python.strip())
    assert match, f"requires-python should be a plain floor, got {requires_python!r}"
    return int(match.group(1)), int(match.group(2))


def test_the_licence_is_an_spdx_expression_with_its_text(pyproject):
    project = pyproject["project"]
    assert project["license"] == "BSD-3-Clause"  # a string: the table form is deprecated
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "skpool developers" in text
    # a "License ::" classifier beside an SPDX expression is refused by setuptools >= 77
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    assert "setuptools>=77" in pyproject["build-system"]["requires"][0]


def test_the_python_classifiers_start_at_the_tested_floor(pyproject):
    project = pyproject["project"]
    oldest = floor(project["requires-python"])
    assert sys.version_info[:2] >= oldest
    versions = sorted(
        tuple(int(part) for part in c.rsplit(":: ", 1)[1].split("."))
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert versions and versions[0] == oldest, versions
    assert "Typing :: Typed" in project["classifiers"]


def test_py_typed_is_package_data(pyproject):
    assert (ROOT / "skpool" / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["skpool"]


def test_the_wheel_ships_the_licence_and_py_typed(tmp_path):
    """Build the wheel from a copy of the sources (the build writes into its source tree)."""
    setuptools = pytest.importorskip("setuptools", minversion="77")
    assert setuptools  # the PEP 517 backend pyproject names, in its declared version
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "skpool", source / "skpool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    script = (
        "import sys, setuptools.build_meta as b; "
        f"print(b.build_wheel({str(out)!r}))"
    )
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", script], cwd=source, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = out / done.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    assert "skpool/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: BSD-3-Clause" in metadata
    assert "Requires-Python: >=3.11" in metadata
