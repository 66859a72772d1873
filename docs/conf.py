"""Sphinx configuration: Markdown pages (MyST), the API from docstrings, the CLI from click."""

from __future__ import annotations

import dask_gpuresources

project = "dask_gpuresources"
author = "the dask_gpuresources authors"
release = dask_gpuresources.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx_click",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
napoleon_numpy_docstring = True
napoleon_google_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
html_static_path: list[str] = []
