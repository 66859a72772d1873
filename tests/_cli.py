"""Running ``dask gpuresources ...`` as a user would: a real process, its own state directory."""

from __future__ import annotations

import os
import subprocess
import sys

ENV = "DASK_GPURESOURCES_STATE_DIR"


def cli(*args, state_dir, env=None, **kwargs):
    """``python -m dask gpuresources *args`` with ``state_dir`` as its state directory."""
    env = {**os.environ, ENV: str(state_dir), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dask", "gpuresources", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        **kwargs,
    )
