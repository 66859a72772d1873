"""Dask config defaults for dask_gpuresources (``gpuresources.yaml`` beside this file).

Read config at call time with ``dask.config.get("gpuresources....")``; importing this module
only registers the defaults and writes nothing to the home directory.
"""

from __future__ import annotations

import os

import dask.config
import yaml

__all__ = ["CONFIG_PATH", "SCHEMA_PATH", "defaults"]

CONFIG_PATH = os.path.join(os.path.dirname(__file__), "gpuresources.yaml")
SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "gpuresources-schema.yaml")


def defaults() -> dict:
    """The package's default configuration, as loaded from ``gpuresources.yaml``."""
    with open(CONFIG_PATH) as f:
        return yaml.safe_load(f)


dask.config.update_defaults(defaults())
