"""The process of a local worker's Nanny that :func:`dask_gpuresources.init` starts.

``python -m dask_gpuresources._local_worker`` is started before the scheduler exists, so
that its imports (Dask and the worker plugin: about half a second) run on another core while
the scheduler starts. The scheduler address and the worker spec then arrive as one JSON line
on stdin, ``{"address": ..., "spec": {...}}`` (with the cluster's TLS configuration under
``"tls"`` when ``init`` was given a ``security``), and the process runs Dask's own
``dask spec`` with them: a ``Nanny``, which spawns the worker process and starts it again
when it dies. End of input before that line (the driver gave up) ends the process.
"""

from __future__ import annotations

import gc
import json
import sys

# Imported now, while the scheduler starts: this is what the early start is for.
from distributed.cli.dask_spec import main as dask_spec

import dask_gpuresources.worker  # noqa: F401


def run() -> None:
    # Everything imported so far lives as long as the process: move it out of the garbage
    # collector's sight, so that full collections walk only what is created from now on.
    gc.freeze()
    line = sys.stdin.readline()
    if not line.strip():
        return
    message = json.loads(line)
    if message.get("tls"):
        # The cluster's TLS (init(security=...)): the worker's Security() reads it from here.
        import dask.config

        dask.config.set(message["tls"])
    dask_spec([message["address"], "--spec", json.dumps(message["spec"])])


if __name__ == "__mp_main__":
    # The worker the Nanny spawned imports this module under that name before it starts: the
    # same freeze there, where a stream of small tasks makes full collections frequent.
    gc.freeze()

if __name__ == "__main__":
    run()
