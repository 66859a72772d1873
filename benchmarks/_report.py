"""What every benchmark script records and prints about the run (imported as a sibling)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any


def environment() -> dict[str, Any]:
    """When and where the run happened: versions, platform, CPU count."""
    import dask
    import distributed

    import dask_gpuresources

    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "python": platform.python_version(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "dask_gpuresources": dask_gpuresources.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def footer(quick: bool, total: float, **sizes: Any) -> str:
    """The line printed under each table: mode, sizes, duration, versions."""
    env = environment()
    parts = [f"mode={'quick' if quick else 'full'}"]
    parts += [f"{k}={v}" for k, v in sizes.items()]
    parts += [
        f"total={total:.1f}s",
        f"python={env['python']}",
        f"distributed={env['distributed']}",
        f"cpus={env['cpu_count']}",
    ]
    return "\n" + " ".join(parts)


def write(path: Path, quick: bool, total: float, **doc: Any) -> None:
    """Write ``doc`` as JSON at ``path``, with the run's environment, and say where."""
    document = {**environment(), "mode": "quick" if quick else "full", "total_seconds": total}
    document.update(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"wrote {path}")
