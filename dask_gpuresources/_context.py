"""What the running task owns: the one place ``get_gpu_ids()`` reads.

Two ways a task body learns its devices:

- Code that runs a body outside the worker's thread pool (an isolated child process, an
  actor method) sets a :class:`TaskContext` around it with :func:`use`.
- A task in the worker's thread pool has no context set; its lease is looked up on the
  worker plugin by the key Dask records for the thread.

This module imports nothing from Dask at import time, so that an isolated child can answer
``get_gpu_ids()`` without loading ``distributed``.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RuntimeContext",
    "TaskContext",
    "current",
    "get_gpu_ids",
    "get_runtime_context",
    "set_process_context",
    "use",
]


@dataclass(frozen=True)
class TaskContext:
    """The running task as its body sees it.

    Attributes
    ----------
    key
        The Dask key of the task (or of the actor).
    gpu_ids
        Physical device ids of its lease, sorted.
    tokens
        The ``CUDA_VISIBLE_DEVICES`` entries of its lease, in device order.
    worker
        Address of the worker that leased the devices.
    actor
        The key of the actor whose constructor or method is running, if any.
    """

    key: Hashable
    gpu_ids: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()
    worker: str | None = None
    actor: Hashable | None = None


_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("dask_gpuresources.task")


# An isolated child runs one task at a time, and every thread the task starts belongs to it
# (ContextVars do not reach threads started by the task).
_process: TaskContext | None = None


def current() -> TaskContext | None:
    """The running task's context, or ``None`` in a plain thread-pool task."""
    context = _current.get(None)
    return context if context is not None else _process


_cluster: dict[str, Any] | None = None
_in_child = False


def set_cluster(info: dict[str, Any] | None) -> None:
    """In an isolated child: how to reach the worker's cluster (scheduler address, TLS)."""
    global _cluster, _in_child
    _cluster = info
    _in_child = True


def in_child() -> bool:
    """Whether this process is an isolated child of a worker."""
    return _in_child


def cluster() -> dict[str, Any] | None:
    """In an isolated child: ``{"scheduler": address, "security": {...}}``; else None."""
    return _cluster


def set_process_context(context: TaskContext | None) -> None:
    """In an isolated child: the task that owns the whole process, or ``None`` between tasks."""
    global _process
    _process = context


@contextlib.contextmanager
def use(context: TaskContext) -> Iterator[TaskContext]:
    """Make ``context`` the running task's for the duration of the block."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def get_gpu_ids() -> list[int]:
    """The GPU device ids the running task owns, sorted.

    Ids are physical indices, mapped through the worker's own ``CUDA_VISIBLE_DEVICES``: a
    worker started with ``CUDA_VISIBLE_DEVICES=2,3`` hands out 2 and 3. A task that requested
    no GPU gets ``[]``. Tasks sharing a device through fractional requests see the same id.
    The answer is the same in the worker's thread pool and in an isolated child process.

    Returns
    -------
    list of int

    Raises
    ------
    NoLeaseError
        Outside a Dask task, or on a worker without the plugin.

    Examples
    --------
    >>> import dask_gpuresources as gr
    >>> def train(x):
    ...     return gr.get_gpu_ids()
    >>> client.submit(train, 1, resources={"GPU": 1}).result()  # doctest: +SKIP
    [2]
    """
    context = _current.get(None) or _process
    if context is not None:
        return list(context.gpu_ids)
    global _lookup
    if _lookup is None:  # imported on first use: the worker module loads distributed
        from ._lease import lease_of_running_task as _lookup
    plugin, key = _lookup()
    return plugin.ids_for(key)


_lookup: Any = None


def invoke(function: Any, args: tuple, kwargs: dict) -> Any:
    """Call ``function(*args, **kwargs)``: the task the facade submits for a remote call.

    Kept here, in a module that loads no Dask, so that an isolated child unpickles it
    without importing ``distributed``. An ``async def`` function runs to completion on an
    event loop of its own (the task's thread, or the isolated child, runs none).

    In the worker's thread pool the task's lease is also set as the context variable
    ``get_gpu_ids()`` reads, so that a thread the function starts in a copy of its context
    (``threading.Thread(target=contextvars.copy_context().run, args=(work,))``) answers
    for the task. Python threads do not copy it by themselves.
    """
    if current() is None:
        context = _thread_task_context()
        if context is not None:
            with use(context):
                return _call(function, args, kwargs)
    return _call(function, args, kwargs)


def _thread_task_context() -> TaskContext | None:
    """The running thread-pool task as a TaskContext, or None where there is no lease to
    find (a worker without the plugin)."""
    global _lookup
    if _lookup is None:
        from ._lease import lease_of_running_task as _lookup
    from .exceptions import NoLeaseError

    try:
        plugin, key = _lookup()
    except NoLeaseError:
        return None
    address = plugin.worker.address
    ids, tokens = tuple(plugin.ids_for(key)), tuple(plugin.tokens_for(key))
    return TaskContext(key, ids, tokens, address)


def _call(function: Any, args: tuple, kwargs: dict) -> Any:
    result = function(*args, **kwargs)
    if inspect.iscoroutine(result):
        import asyncio

        result = asyncio.run(result)
    return result


# -- Ray's runtime context ---------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeContext:
    """Where the calling code runs (Ray's ``get_runtime_context()``)."""

    _task: TaskContext | None
    _node: str | None

    def get_node_id(self) -> str | None:
        """The address of the worker running this code; ``None`` in the driver."""
        return self._node

    def get_task_id(self) -> str | None:
        """The Dask key of the running task (or actor method call); ``None`` outside."""
        return None if self._task is None else str(self._task.key)

    def get_actor_id(self) -> str | None:
        """The key of the actor whose constructor or method runs here, if any."""
        if self._task is None or self._task.actor is None:
            return None
        return str(self._task.actor)

    def get_accelerator_ids(self) -> dict[str, list[str]]:
        """``{"GPU": [...]}``: the ids of the lease as strings (Ray's form)."""
        ids = [] if self._task is None else [str(i) for i in self._task.gpu_ids]
        return {"GPU": ids}


def get_runtime_context() -> RuntimeContext:
    """The running task's or actor's context; in the driver, an empty one."""
    task = current()
    if task is not None:
        return RuntimeContext(task, task.worker)
    from .exceptions import NoLeaseError

    try:
        from ._lease import lease_of_running_task

        plugin, key = lease_of_running_task()
    except NoLeaseError:
        return RuntimeContext(None, None)
    ids = tuple(plugin.ids_for(key))
    return RuntimeContext(
        TaskContext(key, ids, tuple(plugin.tokens_for(key)), plugin.worker.address),
        plugin.worker.address,
    )
