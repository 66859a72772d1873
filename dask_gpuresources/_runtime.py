"""The facade's session: the connection :func:`init` makes, and what hangs off it.

One :class:`Runtime` per process at a time (``current``): the client, the local cluster
when :func:`init` started one, the one ordered sender, the session's actor handles. Inside a
task on a worker process, the first nested ``.remote()`` makes one on the worker's own
client. :func:`shutdown` ends all of it, so that a later :func:`init` starts from nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import distributed
from distributed import Client, SpecCluster

from . import _context, _local_cluster

if TYPE_CHECKING:
    from ._refs import Batcher

__all__ = [
    "InitInfo",
    "Runtime",
    "available_resources",
    "client",
    "cluster_resources",
    "current",
    "flush",
    "init",
    "is_initialized",
    "shutdown",
]


@dataclass
class Runtime:
    client: Client
    cluster: SpecCluster | None
    handles: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # this session's actors
    cpu_declared: bool = False  # whether CPU is a Dask resource here, or worker threads
    feasible: set = field(default_factory=set)  # request shapes some worker can hold
    dashboard: bool = True
    #: the one ordered sender of .remote() calls, made on first use (_refs.sender)
    batcher: Batcher | None = None
    #: started by the first .remote() or put(), not by init()
    implicit: bool = False


#: This process's session, or None before init() and after shutdown().
current: Runtime | None = None


@dataclass(frozen=True)
class InitInfo:
    """What :func:`init` started or connected to.

    Attributes
    ----------
    address
        The scheduler's address (pass it to ``init(address=...)`` or ``Client(...)``).
    dashboard_url
        The Dask dashboard, or ``None`` when it is off.
    num_gpus
        GPUs in the cluster when ``init`` returned.
    """

    address: str
    dashboard_url: str | None
    num_gpus: float

    def __getitem__(self, key: str) -> Any:  # Ray returns a dict-like context
        return getattr(self, key)


_CLUSTER_OPTIONS = {"n_workers", "scheduler_options", "worker_options"}


def init(
    num_gpus: int | None = None,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    ignore_reinit_error: bool = False,
    dashboard: bool = True,
    security: Any = None,
    **cluster_options: Any,
) -> InitInfo:
    """Start a local cluster standing for this machine, or connect to a running one.

    Parameters
    ----------
    num_gpus
        With no ``address``: the GPUs this machine offers (``None``: detect them with NVML,
        0 without it). The local worker hands out exactly these device ids. Not allowed with
        ``address`` (as in Ray).
    address
        A running scheduler (``tcp://host:8786``); the plugins are installed if missing.
    num_cpus
        Threads of the local worker (default: the machine's cores, at least ``num_gpus`` so
        that every device can be busy at once).
    ignore_reinit_error
        Return the current connection instead of raising when already initialised.
    dashboard
        Serve Dask's dashboard (on a free port) for the local cluster.
    security
        A ``distributed.security.Security`` (TLS), passed to the cluster and the client.
    **cluster_options
        For the local cluster: ``n_workers`` (default 1) splits the devices over that many
        worker processes, each with its own ``CUDA_VISIBLE_DEVICES`` (a task then gets at
        most ``num_gpus / n_workers`` GPUs); ``scheduler_options`` and ``worker_options``
        are passed to Dask's ``Scheduler`` and ``Worker``.

    Examples
    --------
    >>> import dask_gpuresources as ray
    >>> info = ray.init(num_gpus=4)  # doctest: +SKIP
    >>> info.address, info.num_gpus  # doctest: +SKIP
    ('tcp://127.0.0.1:41231', 4)
    """
    global current
    unknown = set(cluster_options) - _CLUSTER_OPTIONS
    if unknown:
        raise TypeError(
            f"init() got unknown option(s) {sorted(unknown)}; the options are num_gpus, "
            f"address, num_cpus, ignore_reinit_error, dashboard, security and, for the local "
            f"cluster, {', '.join(sorted(_CLUSTER_OPTIONS))}; e.g. init(num_gpus=4, n_workers=2)"
        )
    if address is not None and cluster_options:
        raise TypeError(
            f"{sorted(cluster_options)} configure the local cluster; with address= the "
            "cluster is already running: use init(address=...) alone"
        )
    if current is not None:
        if ignore_reinit_error:
            return _info(current)
        if current.implicit:
            raise RuntimeError(
                "a cluster is already running: the first .remote() or put() started one "
                f"(at {current.client.scheduler.address}) because init() had not been called; "
                "call init() before anything else, call shutdown() first, or pass "
                "ignore_reinit_error=True to reuse it"
            )
        raise RuntimeError(
            "init() was already called in this process; call shutdown() first, or pass "
            "ignore_reinit_error=True to reuse the current cluster"
        )
    if address is not None:
        if num_gpus is not None or num_cpus is not None:
            raise ValueError(
                "When connecting to an existing cluster, num_gpus and num_cpus must not be "
                f"provided (got num_gpus={num_gpus!r}, num_cpus={num_cpus!r}); each worker "
                f"declares its own: dask worker {address} --resources GPU=4; then call "
                f"init(address={address!r})"
            )
        client = Client(address, security=security, set_as_default=True)
        cluster = None
    else:
        cluster = _local_cluster.start(
            num_gpus, num_cpus, dashboard=dashboard, security=security, options=cluster_options
        )
        # Actor calls go straight to the worker, not through the scheduler (one machine).
        client = Client(cluster, security=security, set_as_default=True, direct_to_workers=True)
    try:
        if cluster is not None:
            _local_cluster.wait_for_workers(client, cluster, _local_cluster.START_TIMEOUT)
        from . import install

        install(client)
        runtime = Runtime(client, cluster, dashboard=dashboard or cluster is None)
        capacities(runtime)
    except BaseException:
        client.close()
        if cluster is not None:
            cluster.close()
        raise
    current = runtime
    return _info(runtime)


def _info(runtime: Runtime) -> InitInfo:
    link = None
    if runtime.dashboard:
        try:
            link = runtime.client.dashboard_link
        except Exception:  # the scheduler serves no dashboard
            link = None
    gpus = sum(
        w.get("resources", {}).get("GPU", 0)
        for w in runtime.client.scheduler_info(n_workers=-1)["workers"].values()
    )
    return InitInfo(address=runtime.client.scheduler.address, dashboard_url=link, num_gpus=gpus)


def shutdown() -> None:
    """End what :func:`init` and this session made: the sender, actor calls still waiting to
    be sent, the connection, and the local cluster if :func:`init` started one.

    A later :func:`init` in the same process starts from nothing, as the first did.
    """
    global current
    runtime, current = current, None
    if runtime is None:
        return
    if runtime.batcher is not None:
        runtime.batcher.close()
    for handle in list(runtime.handles):
        handle._stop()
    runtime.handles.clear()
    runtime.feasible.clear()
    runtime.client.close()
    if runtime.cluster is not None:
        runtime.cluster.close()


def _shutdown_at_exit() -> None:
    # Runs before Dask's own exit hooks (registered at its import, before ours): the client
    # lets go of its data before the cluster closes, so the scheduler logs no lost data.
    with contextlib.suppress(Exception):
        shutdown()


atexit.register(_shutdown_at_exit)


def is_initialized() -> bool:
    """Whether :func:`init` has been called (and not shut down) in this process."""
    return current is not None


def client(*, implicit: bool = False) -> Client:
    """The session's client. With ``implicit`` (the first ``.remote()`` or ``put()``), a
    driver that never called :func:`init` gets ``init()``'s local cluster, as Ray does."""
    if current is None and _worker_runtime() is not None:
        return current.client
    if current is None and implicit and not _context.in_child():
        _init_implicitly()
    if current is None:
        raise RuntimeError(
            "dask_gpuresources is not initialised: call init(num_gpus=4) for a local cluster "
            "or init(address='tcp://scheduler:8786') first"
        )
    return current.client


_implicit_lock = threading.Lock()


def _init_implicitly() -> None:
    with _implicit_lock:
        if current is not None:
            return
        info = init()
        current.implicit = True
        # A warning, not info: the local cluster silences the driver's Dask logs below it,
        # and this line is the only sign that a cluster was chosen for the script.
        logging.getLogger("distributed.gpuresources").warning(
            "Started a local cluster with %g GPU(s) at %s (init() was not called; call it "
            "first to choose: init(num_gpus=4) or init(address='tcp://scheduler:8786'))",
            info.num_gpus,
            info.address,
        )


def _worker_runtime() -> Runtime | None:
    """Inside a task or actor on a worker process: a runtime on the worker's own client.

    Nested ``.remote()`` calls then work on any cluster, not only where the workers share
    the driver's process. Made once per worker process, on first use.
    """
    global current
    try:
        distributed.get_worker()
    except ValueError:
        return _child_runtime()
    with _worker_runtime_lock:
        if current is None:
            client = distributed.get_client()  # the worker's own client
            runtime = Runtime(client, None)
            capacities(runtime)
            current = runtime
    return current


_worker_runtime_lock = threading.Lock()


def _child_runtime() -> Runtime | None:
    """Inside an isolated task's or actor's child process: a runtime on a client of its own,
    connected to the worker's scheduler with the worker's TLS settings. Made once per child,
    on first use (a child that never calls ``.remote()`` never imports a client)."""
    global current
    from . import _context

    info = _context.cluster()
    if info is None:
        return None
    with _worker_runtime_lock:
        if current is None:
            from distributed.security import Security

            client = Client(
                info["scheduler"],
                security=Security(**info["security"]),
                # the child's only client: Dask's wait() and gather() look for a default
                set_as_default=True,
                name="dask_gpuresources-isolated-child",
            )
            runtime = Runtime(client, None)
            capacities(runtime)
            current = runtime
            atexit.register(_close_child_runtime)
    return current


def _close_child_runtime() -> None:
    global current
    runtime, current = current, None
    if runtime is not None:
        with contextlib.suppress(Exception):
            runtime.batcher.close()
        with contextlib.suppress(Exception):
            runtime.client.close(timeout=2)


def capacities(runtime: Runtime) -> list[tuple[str, dict[str, float]]]:
    """Each worker's schedulable resources; ``CPU`` is its thread count unless declared."""
    out = []
    declared = False
    for address, w in runtime.client.scheduler_info(n_workers=-1)["workers"].items():
        caps = {k: float(v) for k, v in w.get("resources", {}).items()}
        declared = declared or "CPU" in caps
        caps.setdefault("CPU", float(w.get("nthreads", 0)))
        out.append((address, caps))
    runtime.cpu_declared = declared
    return out


# -- resources -----------------------------------------------------------------------------


def _table() -> dict[str, dict]:
    from .scheduler import HANDLER

    c = client()
    return c.sync(getattr(c.scheduler, f"{HANDLER}_table"), refresh=True)


def cluster_resources() -> dict[str, float]:
    """Total resources of the cluster: ``{"CPU": threads, "GPU": devices, ...}``.

    What calls can ask for: ``CPU`` is each worker's declared CPU, or its thread count where
    it declares none (``num_cpus`` then maps onto threads).
    """
    client()
    totals: dict[str, float] = {"CPU": 0.0, "GPU": 0.0}
    for _, caps in capacities(current):
        for name, amount in caps.items():
            totals[name] = totals.get(name, 0.0) + amount
    return totals


def available_resources() -> dict[str, float]:
    """Resources not held right now: net of running tasks and live actors."""
    totals = cluster_resources()
    held_gpu = 0.0
    busy = 0
    for worker in _table().values():
        busy += worker["executing"]
        held_gpu += sum(h["amount"] for d in worker["devices"].values() for h in d["holders"])
    free = dict(totals)
    free["GPU"] = max(totals.get("GPU", 0.0) - held_gpu, 0.0)
    free["CPU"] = max(totals["CPU"] - busy, 0.0)
    return free


def flush() -> None:
    """Send the calls the sender still holds (before anything waits on a result)."""
    runtime = current
    if runtime is not None and runtime.batcher is not None:
        runtime.batcher.flush()
