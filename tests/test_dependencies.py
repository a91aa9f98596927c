"""pyproject.toml declares exactly what is imported: the package's third-party imports are its
dependencies (matplotlib, only in skpool.plotting, is the ``plot`` extra), and what the tests
import beyond them (``pytest.importorskip`` included), with the ``docs`` extra that the suite's
documentation build needs, is the ``test`` extra."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
#: Distribution names whose import name differs.
IMPORT_NAMES = {"scikit-learn": "sklearn"}


def declared(requirements: list[str]) -> set[str]:
    """Import names of requirement strings such as ``"scikit-learn>=1.6"``."""
    names = {re.match(r"[A-Za-z0-9_.\-]+", text).group(0).lower() for text in requirements}
    return {IMPORT_NAMES.get(name, name) for name in names}


def third_party_imports(files, local: set[str]) -> dict[str, set[str]]:
    """Top-level modules imported by ``files`` that are neither the standard library nor
    ``local``, each with the files that import it."""
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            elif _is_importorskip(node):  # pytest.importorskip("pandas")
                names = [node.args[0].value]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _is_importorskip(node) -> bool:
    return (
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "importorskip"
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
    )


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_package_depends_on_exactly_what_it_imports(project):
    imports = third_party_imports(sorted((ROOT / "skpool").rglob("*.py")), {"skpool"})
    assert imports.pop("matplotlib", set()) == {"skpool/plotting.py"}
    assert declared(project["optional-dependencies"]["plot"]) == {"matplotlib"}
    assert set(imports) == declared(project["dependencies"]), imports


def test_the_test_extra_is_what_the_tests_import_beyond_the_package(project):
    tests = ROOT / "tests"
    local = {path.stem for path in tests.rglob("*.py")} | {
        path.name for path in tests.iterdir() if path.is_dir()
    } | {"skpool"}
    imports = third_party_imports(sorted(tests.rglob("*.py")), local)
    extra = declared(project["optional-dependencies"]["test"])
    # the suite builds the documentation (tests/test_docs.py runs sphinx-build in a subprocess)
    docs = declared(project["optional-dependencies"]["docs"])
    assert docs <= extra
    assert set(imports) - declared(project["dependencies"]) == extra - (docs - set(imports)), imports
