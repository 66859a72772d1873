"""The documentation site builds with Sphinx, warnings as errors (broken references fail)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_parser")
pytest.importorskip("sphinx_click")

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_docs_build_without_warnings(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    cli = (tmp_path / "cli.html").read_text()
    assert "--num-gpus" in cli and "status" in cli  # generated from the click commands
    api = (tmp_path / "api.html").read_text()
    assert "InfeasibleRequestError" in api and "get_gpu_ids" in api


def test_every_config_key_is_in_the_configuration_page():
    from dask_gpuresources import _config

    def keys(tree, prefix):
        for name, value in tree.items():
            if isinstance(value, dict):
                yield from keys(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    page = (DOCS / "configuration.md").read_text()
    missing = [k for k in keys(_config.defaults(), "") if f"`{k}`" not in page]
    assert not missing, f"not in docs/configuration.md: {missing}"
