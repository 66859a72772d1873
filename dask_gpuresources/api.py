"""The Ray-style facade: ``init``, ``remote``, ``get``, ``wait``, actors, on Dask.

Everything here is public Dask: an object ref wraps a Dask future (or an actor call's
future), a remote function is ``client.submit`` with resources and annotations, an actor is a
Dask actor hosting the user's instance (:mod:`dask_gpuresources._actors`). The code of Ray's
GPU page runs with ``import dask_gpuresources as ray``.

Defaults that differ from plain Dask, as on Ray's page: a task or actor that asks for GPUs
runs isolated (a child process whose ``CUDA_VISIBLE_DEVICES`` is its lease), warm children
are reused (``max_calls=0``), and a request larger than any worker raises
:class:`~dask_gpuresources.InfeasibleRequestError` at ``.remote()``.

The code lives in small modules, re-exported here:

- :mod:`~dask_gpuresources._runtime`: the session (``init``, ``shutdown``, resources);
- :mod:`~dask_gpuresources._local_cluster`: the cluster ``init`` starts on this machine;
- :mod:`~dask_gpuresources._refs`: object refs, ``get``, ``wait``, ``put``, ``cancel``, and
  the one ordered sender of ``.remote()`` calls;
- :mod:`~dask_gpuresources._remote`: ``remote``, remote functions, actor classes, handles;
- :mod:`~dask_gpuresources._context`: what the running task owns, ``get_runtime_context``.
"""

from __future__ import annotations

from ._context import RuntimeContext, get_runtime_context
from ._refs import ObjectRef, cancel, get, put, wait
from ._remote import ActorClass, ActorHandle, RemoteFunction, kill, remote
from ._runtime import (
    InitInfo,
    available_resources,
    cluster_resources,
    init,
    is_initialized,
    shutdown,
)
from ._runtime import client as _client  # noqa: F401  (the session's client, for tests)

__all__ = [
    "ActorClass",
    "ActorHandle",
    "InitInfo",
    "ObjectRef",
    "RemoteFunction",
    "RuntimeContext",
    "available_resources",
    "cancel",
    "cluster_resources",
    "get",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "put",
    "remote",
    "shutdown",
    "wait",
]
