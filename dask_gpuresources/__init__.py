"""Ray-style GPU scheduling for Dask: declared GPU counts become concrete device ids.

Start the scheduler with ``--preload dask_gpuresources`` (or call :func:`install` on a
running cluster), give workers ``--resources GPU=N``, submit with
``resources={"GPU": n}``, and inside the task :func:`get_gpu_ids` names the devices it owns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _config  # noqa: F401  (registers the config defaults)
from ._context import get_gpu_ids
from ._version import __version__
from .exceptions import (
    ActorDiedError,
    DeviceCountError,
    GetTimeoutError,
    InfeasibleRequestError,
    InvalidRequestError,
    IsolatedTaskError,
    NoLeaseError,
    TaskCancelledError,
)

if TYPE_CHECKING:
    from .api import (
        ActorHandle,
        ObjectRef,
        available_resources,
        cancel,
        cluster_resources,
        get,
        get_runtime_context,
        init,
        is_initialized,
        kill,
        put,
        remote,
        shutdown,
        wait,
    )
    from .scheduler import GPUSchedulerPlugin
    from .worker import GPUWorkerPlugin

# The plugins load ``distributed`` on first use, not on ``import dask_gpuresources``: an
# isolated child process imports this package to answer get_gpu_ids() and stays small.
_LAZY = {
    "GPUSchedulerPlugin": ".scheduler",
    "GPUWorkerPlugin": ".worker",
    # the Ray-style facade
    "ActorHandle": ".api",
    "ObjectRef": ".api",
    "available_resources": ".api",
    "cancel": ".api",
    "cluster_resources": ".api",
    "get": ".api",
    "get_runtime_context": ".api",
    "init": ".api",
    "is_initialized": ".api",
    "kill": ".api",
    "put": ".api",
    "remote": ".api",
    "shutdown": ".api",
    "wait": ".api",
}


def __dir__() -> list[str]:
    # the lazily loaded names too, for dir(), help() and tab completion
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ActorDiedError",
    "ActorHandle",
    "DeviceCountError",
    "GetTimeoutError",
    "ObjectRef",
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
    "GPUSchedulerPlugin",
    "GPUWorkerPlugin",
    "InfeasibleRequestError",
    "InvalidRequestError",
    "IsolatedTaskError",
    "NoLeaseError",
    "TaskCancelledError",
    "__version__",
    "allocations",
    "dask_setup",
    "get_gpu_ids",
    "install",
]


def install(client: Any) -> Any:
    """Equip a running cluster with dask_gpuresources, without restarting it.

    Registers :class:`GPUSchedulerPlugin`, which registers :class:`GPUWorkerPlugin` on every
    present and future worker. Tasks already running with a GPU restriction are given leases.
    Installing twice is harmless.

    Parameters
    ----------
    client : distributed.Client
        Sync or async client; with an async client, await the result.

    Examples
    --------
    >>> import dask_gpuresources as gr
    >>> gr.install(client)  # doctest: +SKIP
    """
    from .scheduler import GPUSchedulerPlugin

    return client.register_plugin(GPUSchedulerPlugin())


def allocations(client: Any, *, refresh: bool = True) -> Any:
    """The cluster's GPU allocation table: worker -> device id -> {holder key: share}.

    Parameters
    ----------
    client : distributed.Client
        Sync or async client; with an async client, await the result.
    refresh
        Ask the workers now (default); ``False`` returns what their last heartbeats carried.

    Examples
    --------
    >>> gr.allocations(client)  # doctest: +SKIP
    {'tcp://127.0.0.1:40331': {0: {'train-6d1c...': 1.0}, 1: {}}}
    """
    return client.sync(_allocations, client, refresh=refresh)


async def _allocations(client: Any, *, refresh: bool) -> dict:
    from .scheduler import HANDLER

    handler = getattr(client.scheduler, HANDLER)
    table = await handler(refresh=refresh)
    return {
        worker: {int(d): dict(h) for d, h in devices.items()} for worker, devices in table.items()
    }


async def dask_setup(server: Any) -> None:
    """Preload hook: ``dask scheduler|worker --preload dask_gpuresources``.

    On a scheduler it installs :class:`GPUSchedulerPlugin`; on a worker it installs
    :class:`GPUWorkerPlugin` with GPU detection (NVML, honouring ``CUDA_VISIBLE_DEVICES``)
    before the worker registers, so an undeclared worker offers the GPUs it has.
    """
    from distributed import Scheduler, Worker

    from .scheduler import GPUSchedulerPlugin
    from .worker import GPUWorkerPlugin

    if isinstance(server, Scheduler):
        server.add_plugin(GPUSchedulerPlugin())
    elif isinstance(server, Worker):
        await server.plugin_add(GPUWorkerPlugin(detect=True), catch_errors=False)
