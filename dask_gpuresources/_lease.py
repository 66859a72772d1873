"""Which worker and task the calling thread serves: the lookup behind ``get_gpu_ids()``.

:mod:`._context` answers from a context it was given (an isolated child, an actor method, a
remote function's copied context); a task in the worker's thread pool has none, and its lease
is found here: the worker from Dask's ``get_worker()``, the task from the key Dask records for
the thread, the device state from the worker's extension. This module loads ``distributed``;
``_context`` imports it on first use, so that an isolated child never does, and it imports
nothing of the worker stack, so that the worker stack may import ``_context``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from distributed.worker import get_worker, thread_state

from . import _dask_internals
from ._names import PLUGIN_NAME
from .exceptions import NoLeaseError

__all__ = ["devices_of", "lease_of_running_task"]


def devices_of(worker: Any) -> Any | None:
    """The worker's device state (``worker.WorkerDevices``), or None on a worker without
    dask_gpuresources or whose device state has closed."""
    devices = _dask_internals.worker_extension(worker, PLUGIN_NAME)
    return devices if devices is not None and not getattr(devices, "closed", True) else None


def _running_task() -> tuple[Any, Hashable]:
    try:
        worker = get_worker()
    except ValueError:
        raise NoLeaseError(
            "get_gpu_ids() was called outside a Dask task; call it inside a function you "
            "submit, e.g. client.submit(train, resources={'GPU': 1}). In a thread that a "
            "task started (Python threads do not inherit the task's context), call it in "
            "the task and pass the ids on; a remote function's thread may instead start with "
            "contextvars.copy_context().run, e.g. threading.Thread(target="
            "contextvars.copy_context().run, args=(work,))"
        ) from None
    key = getattr(thread_state, "key", None)
    if key is not None and getattr(thread_state, "actor", False):
        # A plain Dask actor's method: Dask names the thread "Class.method"; the lease is
        # the actor's, under its own key.
        key = _dask_internals.running_actor_key(worker)
        if key is None:
            raise NoLeaseError(
                "get_gpu_ids() cannot tell which actor runs this method; call it in the "
                "actor's constructor and keep the ids (self.gpu_ids = get_gpu_ids())"
            )
    if key is None:
        raise NoLeaseError(
            "get_gpu_ids() was called on a worker thread that runs no Dask task: an async "
            "task or actor method (they run on the worker's event loop), or a thread that a "
            "task started (Python threads do not inherit the task's context). Call it in the "
            "task itself and pass the ids on; a remote function's thread may instead start "
            "with contextvars.copy_context().run, e.g. threading.Thread(target="
            "contextvars.copy_context().run, args=(work,))"
        )
    return worker, key


def lease_of_running_task() -> tuple[Any, Hashable]:
    """The device state of the worker running this thread's task, and that task's key."""
    worker, key = _running_task()
    devices = devices_of(worker)
    if devices is None:
        raise NoLeaseError(
            f"worker {worker.address} runs without dask_gpuresources; start the scheduler "
            "with `dask scheduler --preload dask_gpuresources` or call "
            "dask_gpuresources.install(client)"
        )
    return devices, key
