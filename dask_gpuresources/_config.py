"""Dask config defaults for dask_gpuresources (``gpuresources.yaml`` beside this file).

Read config at call time with :func:`get` (``dask.config.get`` with this package's default
as the fallback); importing this module only registers the defaults and writes nothing to the
home directory.
"""

from __future__ import annotations

import copy
import os

import dask.config
import yaml

__all__ = ["CONFIG_PATH", "SCHEMA_PATH", "defaults", "get"]

CONFIG_PATH = os.path.join(os.path.dirname(__file__), "gpuresources.yaml")
SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "gpuresources-schema.yaml")


def defaults() -> dict:
    """The package's default configuration, as loaded from ``gpuresources.yaml``."""
    with open(CONFIG_PATH) as f:
        return yaml.safe_load(f)


def _default(key: str) -> object:
    value: object = _DEFAULTS
    for part in key.split("."):
        value = value[part]  # type: ignore[index]
    return value


_DEFAULTS = defaults()


def get(key: str) -> object:
    """``dask.config.get(key)``, falling back to this package's default for ``key``.

    Code that resets Dask's config to an earlier snapshot (distributed's test utilities do,
    before every test) can remove the defaults registered on import; reading through here
    keeps working then.

    Examples
    --------
    >>> get("gpuresources.isolation.mode")
    'thread'
    """
    return dask.config.get(key, default=_default(key))


# A copy: Dask merges into what it is given.
dask.config.update_defaults(copy.deepcopy(_DEFAULTS))
