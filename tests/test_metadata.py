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


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split("."))


def test_the_documented_torch_and_torchvision_pins_are_consistent(pyproject):
    """README's install advice (issue 29): the CPU-index step pins the torch of the two
    commands, so they keep it; each torch + torchvision pair is one torchvision was built for
    (torchvision 0.(m+15) goes with torch 2.m); every pinned torch satisfies the package's
    torch requirement; and no requirement of the package names torchvision (no extra could
    keep it from bringing a CUDA torch into a CPU setup)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command_pin = re.search(r"pip install torch==([\d.]+) && pip install \. &&", readme).group(1)
    cpu_step = re.search(r"`pip install torch==([\d.]+) --index-url "
                         r"https://download\.pytorch\.org/whl/cpu`", readme)
    assert cpu_step and cpu_step.group(1) == command_pin
    pairs = re.findall(r"`pip install torch==([\d.]+) torchvision==([\d.]+)[^`]*`", readme)
    assert len(pairs) >= 3, pairs
    for torch_pin, vision_pin in pairs:
        (t_major, t_minor, _), (v_major, v_minor, _) = _version(torch_pin), _version(vision_pin)
        assert (t_major, v_major, v_minor) == (2, 0, t_minor + 15), (torch_pin, vision_pin)
    assert command_pin in {torch_pin for torch_pin, _ in pairs}  # the CPU row
    torch_floor = next(req for req in pyproject["project"]["dependencies"]
                       if req.startswith("torch"))
    floor_version = _version(re.fullmatch(r"torch>=([\d.]+)", torch_floor).group(1))
    for pin in [command_pin, *(torch_pin for torch_pin, _ in pairs)]:
        assert _version(pin) >= floor_version, pin
    requirements = [*pyproject["project"]["dependencies"],
                    *sum(pyproject["project"]["optional-dependencies"].values(), [])]
    assert not [req for req in requirements if req.lower().startswith("torchvision")]
    assert "vision" not in pyproject["project"]["optional-dependencies"]
