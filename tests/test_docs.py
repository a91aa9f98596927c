"""The documentation builds with warnings as errors (Sphinx ``-W``), so a docstring that
numpydoc or docutils cannot read, a broken cross-reference or a README section that moved
fails the suite; and every README section is a page of the user guide."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def include_options(page: Path) -> list[tuple[str, str]]:
    """The (option, value) pairs of the ``{include} ../README.md`` directives of a page."""
    text = page.read_text(encoding="utf-8")
    blocks = re.findall(r"```\{include\} \.\./README\.md\n(.*?)```", text, flags=re.DOTALL)
    return [(name, value.strip().strip('"')) for block in blocks
            for name, value in re.findall(r"^:([\w-]+):(.*)$", block, flags=re.MULTILINE)]


def test_every_readme_section_is_a_user_guide_page():
    readme = README.read_text(encoding="utf-8")
    starts = set()
    for page in sorted(DOCS.glob("*.md")):
        for name, value in include_options(page):
            if name in ("start-after", "end-before"):
                # a renamed heading would make the include silently take the whole README
                assert readme.count(value) == 1, (page.name, name, value)
                if name == "start-after":
                    starts.add(value)
    sections = re.findall(r"^(#{2,3} .+)$", readme, flags=re.MULTILINE)
    assert sections and set(sections) <= starts, set(sections) - starts
    assert "# skpool" in starts  # the first screen is the index page


def test_the_pictures_stay_where_the_readme_shows_them():
    for picture in re.findall(r"\]\((docs/[\w.]+\.png)\)", README.read_text(encoding="utf-8")):
        assert (ROOT / picture).read_bytes().startswith(b"\x89PNG"), picture


@pytest.mark.slow  # autodoc imports torch, scikit-learn and skorch: 35-110 s on 2 loaded cores
def test_sphinx_build_has_no_warning(tmp_path):
    """A fresh build (-E) of a copy of the sources (autosummary and sphinx-gallery write
    generated pages beside them), documenting this checkout's skpool."""
    source = tmp_path / "src"
    shutil.copytree(DOCS, source / "docs", ignore=shutil.ignore_patterns(
        "_build", "generated", "auto_examples", "sg_execution_times.rst"))
    shutil.copytree(ROOT / "examples", source / "examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (source / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "README.md", source / "benchmarks" / "README.md")
    for name in ("README.md", "CHANGELOG.md"):
        shutil.copy(ROOT / name, source / name)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         str(source / "docs"), str(out)],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    assert "WARNING" not in done.stderr and "ERROR" not in done.stderr, done.stderr[-5000:]
    # the parts a reader looks for are there
    estimator = (out / "generated" / "skpool.SeparabilityPooling.html").read_text()
    assert "flatten" in estimator and "get_feature_names_out" in estimator
    layer = (out / "generated" / "skpool.nn.SeparabilityPool2d.html").read_text()
    assert "channels first" in layer
    assert "Which torch" in (out / "index.html").read_text()  # the first screen
    gallery = (out / "auto_examples" / "index.html").read_text()
    assert all(f"{script.stem}.html" in gallery for script in (ROOT / "examples").glob("*.py"))
    assert "_images/svhn_like.png" in (out / "robustness.html").read_text()
    assert (out / "benchmarks" / "README.html").is_file()


def test_every_public_function_and_class_has_an_api_page():
    """A name added to a public module's ``__all__`` (a function or a class: constants and
    submodules are described in their module's text) is listed in ``docs/api.rst``."""
    import importlib
    import inspect

    listed = set(re.findall(r"^   ([\w.]+)$", (DOCS / "api.rst").read_text(encoding="utf-8"),
                            flags=re.MULTILINE))
    missing = []
    for module_name in ("skpool", "skpool.nn", "skpool.models", "skpool.io", "skpool.evaluation",
                        "skpool.plotting", "skpool.datasets"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.ismodule(value) or not (inspect.isclass(value) or callable(value)):
                continue
            if name not in listed and f"{module_name.split('.')[-1]}.{name}" not in listed:
                missing.append(f"{module_name}.{name}")
    assert not missing, missing
