"""Sphinx configuration of skpool's documentation.

Build (warnings are errors, as the test suite builds it: tests/test_docs.py)::

    pip install ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

The user guide is the README, section by section (docs/*.md include it, so the two
cannot drift apart); the API reference is generated from the docstrings by autosummary and
numpydoc; the examples gallery is made by sphinx-gallery from examples/*.py *without running
them* (``plot_gallery = False``): they train networks and take minutes, and the suite runs them
itself (tests/test_examples.py). Nothing is downloaded at build time.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "skpool").is_dir():
    sys.path.insert(0, str(ROOT))  # document this checkout's skpool (else: the installed one)

import skpool  # noqa: E402

project = "skpool"
author = "skpool developers"
copyright = "skpool developers"  # noqa: A001 - Sphinx's name
version = release = skpool.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",  # the torch layers' docstrings are PyTorch's (Google) style
    "numpydoc",  # the estimators' are numpydoc's
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path = ["_templates"]  # classes: their own documented members only

# -- the user guide: Markdown (the README's own) ------------------------------------------------
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# -- the API reference ---------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"inherited-members": False}
autodoc_typehints = "none"  # the docstrings state types and shapes (numpydoc)
numpydoc_show_class_members = False  # each class page lists its methods via autosummary
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False  # numpydoc renders those
napoleon_use_ivar = True  # "Attributes:" as fields: a property such as `lam` has its own entry
napoleon_custom_sections = [("Shape", "notes_style")]  # PyTorch's "Shape:" block


def _skip_generated_request_methods(app, what, name, obj, skip, options):
    """scikit-learn generates ``set_<method>_request`` (metadata routing) on every estimator
    class; they are scikit-learn's API, documented there, not skpool's."""
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_generated_request_methods)

# -- the examples gallery -------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "plot_gallery": False,  # not run at build time: minutes of training (see the docstring)
    "filename_pattern": r"^$",  # and none is run even if plot_gallery is switched on
    "download_all_examples": False,
    "line_numbers": False,
    "remove_config_comments": True,
}

# -- output ----------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"skpool {release}"
html_static_path: list[str] = []
