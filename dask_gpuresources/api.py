"""The Ray-style facade: ``init``, ``remote``, ``get``, ``wait``, actors, on Dask.

Everything here is public Dask: an object ref wraps a Dask future (or an actor call's
future), a remote function is ``client.submit`` with resources and annotations, an actor is a
Dask actor hosting the user's instance (:mod:`dask_gpuresources._actors`). The code of Ray's
GPU page runs with ``import dask_gpuresources as ray``.

Defaults that differ from plain Dask, as on Ray's page: a task or actor that asks for GPUs
runs isolated (a child process whose ``CUDA_VISIBLE_DEVICES`` is its lease), warm children
are reused (``max_calls=0``), and a request larger than any worker raises
:class:`~dask_gpuresources.InfeasibleRequestError` at ``.remote()``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import json
import logging
import math
import numbers
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import dask
import dask.config
import distributed
import psutil
from distributed import Client, Future, Scheduler, SpecCluster
from distributed.deploy.spec import ProcessInterface
from distributed.deploy.subprocess import SubprocessWorker
from distributed.worker import thread_state

from . import _config, _context, _dask_internals
from ._allocator import parse_gpu_amount
from ._isolation import ISOLATION_MODES, parse_max_calls
from .exceptions import (
    ActorDiedError,
    GetTimeoutError,
    InfeasibleRequestError,
    InvalidRequestError,
    NoLeaseError,
    TaskCancelledError,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ActorClass",
    "ActorHandle",
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

# -- the connection ------------------------------------------------------------------------


@dataclass
class _Runtime:
    client: Client
    cluster: SpecCluster | None
    handles: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # this session's actors
    cpu_declared: bool = False  # whether CPU is a Dask resource here, or worker threads
    feasible: set = field(default_factory=set)  # request shapes some worker can hold
    dashboard: bool = True
    batcher: _Batcher | None = None


_runtime: _Runtime | None = None


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


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}; use {name}=4")
    if value != int(value):
        raise ValueError(
            f"{name} must be a whole number (a machine has whole devices), got {value!r}; "
            f"use {name}={math.floor(value)} or {name}={math.ceil(value)}"
        )
    return int(value)


def _detected_gpus() -> int:
    from ._devices import visible_devices
    from ._nvml import default_backend, detect

    return detect(default_backend(), visible_devices()).count


_CLUSTER_OPTIONS = {"n_workers", "scheduler_options", "worker_options"}

#: Seconds init() waits for its local workers to connect before it gives up.
START_TIMEOUT = 60.0


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
    global _runtime
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
    if _runtime is not None:
        if ignore_reinit_error:
            return _info(_runtime)
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
        gpus = _detected_gpus() if num_gpus is None else _check_count("num_gpus", num_gpus)
        cpus = os.cpu_count() or 1 if num_cpus is None else _check_count("num_cpus", num_cpus)
        cluster = _local_cluster(gpus, max(cpus, gpus, 1), dashboard, security, cluster_options)
        # Actor calls go straight to the worker, not through the scheduler (one machine).
        client = Client(cluster, security=security, set_as_default=True, direct_to_workers=True)
    try:
        if cluster is not None:
            _wait_for_local_workers(client, cluster, START_TIMEOUT)
        from . import install

        install(client)
        runtime = _Runtime(client, cluster, dashboard=dashboard or cluster is None)
        runtime.batcher = _Batcher(client)
        _capacities(runtime)
    except BaseException:
        client.close()
        if cluster is not None:
            cluster.close()
        raise
    _runtime = runtime
    return _info(runtime)


def _worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    # The driver's import path, as multiprocessing would hand it on: modules next to the
    # user's script (or added to sys.path at run time) import on the worker too.
    paths = [p for p in sys.path if p] + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra or {})
    return env


def _spawn_worker_process(env: dict[str, str] | None = None) -> subprocess.Popen:
    """A worker process that imports Dask now and waits for its scheduler on stdin.

    Its stderr goes on to ours, line by line, and the last lines are kept on the process
    (``stderr_tail``) for the error :func:`init` raises when the worker fails to start.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "dask_gpuresources._local_worker"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_worker_env(env),
    )
    process.stderr_tail = collections.deque(maxlen=20)
    threading.Thread(
        target=_tee, args=(process,), name=f"worker-stderr-{process.pid}", daemon=True
    ).start()
    return process


def _tee(process: subprocess.Popen) -> None:
    for raw in iter(process.stderr.readline, b""):
        line = raw.decode(errors="replace")
        process.stderr_tail.append(line.rstrip("\n"))
        with contextlib.suppress(Exception):
            sys.stderr.write(line)
            sys.stderr.flush()
    with contextlib.suppress(OSError):
        process.stderr.close()


def _wait_for_local_workers(client: Client, cluster: SpecCluster, timeout: float) -> None:
    """Wait until every local worker connected; raise if one ended or time ran out."""
    expected = len(cluster.worker_spec)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.wait_for_workers(expected, timeout=0.25)
            return
        except TimeoutError:
            pass
        for name, worker in cluster.workers.items():
            process = getattr(worker, "process", None)
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"the local worker {name} (pid {process.pid}) ended with exit code "
                    f"{process.returncode} before it connected to the scheduler; its last "
                    f"lines of stderr:\n{_tail(process)}"
                )
        if time.monotonic() > deadline:
            tails = "\n".join(
                _tail(w.process) for w in cluster.workers.values() if getattr(w, "process", None)
            )
            raise RuntimeError(
                f"the local workers did not connect to the scheduler within {timeout:g} s; "
                f"their last lines of stderr:\n{tails}"
            )


def _tail(process: subprocess.Popen) -> str:
    # the reader thread may still be taking the last lines out of the pipe
    deadline = time.monotonic() + 2
    while process.stderr is not None and not process.stderr.closed:
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    lines = list(getattr(process, "stderr_tail", ()))
    return "\n".join(f"    {line}" for line in lines) or "    (nothing)"


def _abandon(process: subprocess.Popen) -> None:
    """End a prestarted worker process that never got its scheduler."""
    with contextlib.suppress(OSError):
        process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class _WorkerProcess(SubprocessWorker):
    """A local worker in a process of its own (``dask spec``, run by ``_local_worker``).

    Not ``multiprocessing``: a spawned worker would re-import the user's script (Ray's
    page runs ``init()`` at module level, with no ``if __name__ == "__main__"`` guard).
    :func:`init` starts the process before the scheduler (``prestarted``), so that its
    imports overlap the scheduler's start; a worker the cluster adds later starts its own.
    """

    def __init__(
        self,
        *args: Any,
        env: dict[str, str] | None = None,
        prestarted: list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._env = env  # e.g. this worker's CUDA_VISIBLE_DEVICES
        self._prestarted = prestarted  # a one-element list, emptied when taken

    async def _start(self) -> None:
        if self._prestarted:
            process = self._prestarted.pop()
        else:
            process = _spawn_worker_process(self._env)
        self.process = process
        spec = {"cls": self.worker_class, "opts": self.worker_kwargs}
        line = json.dumps({"address": self.scheduler, "spec": spec}) + "\n"
        try:
            process.stdin.write(line.encode())
            process.stdin.close()
        except BrokenPipeError:
            raise RuntimeError(
                f"the local worker process (pid {process.pid}) ended before it started, "
                f"with exit code {process.poll()}"
            ) from None

    async def close(self) -> None:
        if self._prestarted:  # closed before it started: end its prestarted process
            self.process = self._prestarted.pop()
        # SIGTERM first: the worker closes cleanly, ending its isolated children itself.
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            deadline = time.monotonic() + 10
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if process.poll() is None:
                for child in psutil.Process(process.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                process.kill()
                process.wait()
        self.process = None
        await ProcessInterface.close(self)


def _local_cluster(
    gpus: int, threads: int, dashboard: bool, security: Any, options: dict
) -> SpecCluster:
    """One scheduler in this process and one worker process holding ``gpus`` devices."""
    n_workers = options.pop("n_workers", 1)
    if not isinstance(n_workers, int) or n_workers < 1 or (gpus and gpus % n_workers):
        raise ValueError(
            f"n_workers must be a whole number >= 1 that divides num_gpus={gpus} (each local "
            f"worker gets its own devices), got {n_workers!r}; use n_workers=1"
        )
    scheduler_options = {
        "port": 0,
        "dashboard_address": ":0" if dashboard else None,
        "dashboard": dashboard,
        **({"security": security} if security is not None else {}),
        **options.pop("scheduler_options", {}),
    }
    per = gpus // n_workers
    from ._devices import device_tokens, visible_devices

    # Checked here, before any process starts: a worker declaring more devices than its
    # CUDA_VISIBLE_DEVICES lists would come up without device state.
    machine = device_tokens(gpus, visible_devices())
    workers = {}
    for i in range(n_workers):
        nthreads = max(threads // n_workers, per, 1)
        kwargs: dict[str, Any] = {
            "nthreads": nthreads,
            # CPU slots are the worker's threads, declared so that num_cpus=n holds n of them
            "resources": {"GPU": per, "CPU": nthreads},
            **options.get("worker_options", {}),
        }
        env = None
        if n_workers > 1 and per:
            # distinct devices per worker: slots i*per .. (i+1)*per - 1 of this machine
            tokens = machine[i * per : (i + 1) * per]
            env = {"CUDA_VISIBLE_DEVICES": ",".join(tokens)}
        workers[f"gpu-worker-{i}"] = {
            "cls": _WorkerProcess,
            "options": {
                "worker_class": "distributed.Worker",
                "worker_kwargs": kwargs,
                "env": env,
                "prestarted": [_spawn_worker_process(env)],
            },
        }
    try:
        return SpecCluster(
            workers=workers,
            scheduler={"cls": Scheduler, "options": scheduler_options},
            security=security,
            silence_logs=logging.WARNING,
            name="dask_gpuresources",
        )
    except BaseException:
        for spec in workers.values():
            for process in spec["options"]["prestarted"]:
                _abandon(process)
        raise


def _info(runtime: _Runtime) -> InitInfo:
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
    global _runtime
    runtime, _runtime = _runtime, None
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
    return _runtime is not None


def _client() -> Client:
    if _runtime is None and _worker_runtime() is not None:
        return _runtime.client
    if _runtime is None:
        raise RuntimeError(
            "dask_gpuresources is not initialised: call init(num_gpus=4) for a local cluster "
            "or init(address='tcp://scheduler:8786') first"
        )
    return _runtime.client


def _worker_runtime() -> _Runtime | None:
    """Inside a task or actor on a worker process: a runtime on the worker's own client.

    Nested ``.remote()`` calls then work on any cluster, not only where the workers share
    the driver's process. Made once per worker process, on first use.
    """
    global _runtime
    try:
        distributed.get_worker()
    except ValueError:
        return None
    with _worker_runtime_lock:
        if _runtime is None:
            client = distributed.get_client()  # the worker's own client
            runtime = _Runtime(client, None)
            runtime.batcher = _Batcher(client)
            _capacities(runtime)
            _runtime = runtime
    return _runtime


_worker_runtime_lock = threading.Lock()


def _capacities(runtime: _Runtime) -> list[tuple[str, dict[str, float]]]:
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


def _request(opts: _Options) -> dict[str, float]:
    """What one call or actor needs of a single worker (GPUs rounded up to whole devices)."""
    need = {k: float(v) for k, v in opts.resources.items() if v}
    if opts.num_gpus:
        need["GPU"] = float(math.ceil(opts.num_gpus))
    if opts.num_cpus:
        need["CPU"] = float(opts.num_cpus)
    return need


def _check_feasible(key: str, opts: _Options) -> None:
    """Raise at ``.remote()`` for a request no worker can hold (unless clusters may grow).

    Every resource counts, not only GPUs: Dask would leave such a task waiting silently.
    """
    runtime = _runtime
    if runtime is None:
        return
    need = _request(opts)
    if not need:
        return
    shape = tuple(sorted(need.items()))
    if shape in runtime.feasible or _config.get("gpuresources.infeasible") == "wait":
        return
    workers = _capacities(runtime)  # asked each time a new shape is seen: workers come and go
    if any(all(caps.get(r, 0.0) >= a for r, a in need.items()) for _, caps in workers):
        runtime.feasible.add(shape)
        return
    # name the resource that the most capable worker for it still lacks
    for resource, amount in need.items():
        best, largest = None, 0.0
        for address, caps in workers:
            if caps.get(resource, 0.0) > largest:
                best, largest = address, caps[resource]
        if amount > largest or resource == list(need)[-1]:
            shown = _format(opts.num_gpus) if resource == "GPU" else _number(amount)
            raise InfeasibleRequestError(key, shown, _number(largest), best, resource=resource)


def _number(value: float) -> int | float:
    return int(value) if value == int(value) else value


def _format(amount: Any) -> str:
    from ._allocator import format_amount

    return format_amount(amount)


# -- object refs ---------------------------------------------------------------------------


class _Failed:
    """A future that already failed (an actor call that could not be sent)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def done(self) -> bool:
        return True

    def result(self, timeout: Any = None) -> Any:
        raise self.exc


class ObjectRef:
    """A reference to a remote value: what ``f.remote()`` and ``put`` return.

    Pass it to :func:`get`, :func:`wait`, or as an argument to other remote calls (it is
    resolved before the call runs, also inside lists and dicts).
    """

    __slots__ = ("_future", "_id")

    def __init__(self, future: Any, id: str) -> None:
        self._future = future
        self._id = id

    @property
    def future(self) -> Any:
        """The Dask future underneath (a ``distributed.Future`` for tasks and ``put``)."""
        return self._future

    def task_id(self) -> str:
        """The Dask key of the task that produces the value (or of the actor call)."""
        return self._id

    hex = task_id

    def done(self) -> bool:
        return self._future.done()

    def __await__(self):
        """``await ref`` in an async driver: the value, without blocking the event loop."""
        return asyncio.get_running_loop().run_in_executor(None, get, self).__await__()

    def __repr__(self) -> str:
        return f"ObjectRef({self._id})"

    def __reduce__(self):
        if isinstance(self._future, Future):
            return ObjectRef, (self._future, self._id)
        raise TypeError(
            "an actor call's ObjectRef cannot be sent to another task; pass its value "
            "(get(ref)) instead"
        )


def _unwrap(value: Any) -> Any:
    """Object refs to what Dask resolves before a task runs (futures), in any nesting."""
    if isinstance(value, ObjectRef):
        if isinstance(value._future, Future):
            return value._future
        return value._future.result()  # an actor call's value
    if isinstance(value, ActorHandle):
        return value
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(_unwrap(v) for v in value)
    if type(value) is dict:
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _has_refs(value: Any) -> bool:
    """Whether ``value`` holds an ObjectRef, in the nestings :func:`_unwrap` follows."""
    if isinstance(value, ObjectRef):
        return True
    if type(value) in (list, tuple, set, frozenset):
        return any(_has_refs(v) for v in value)
    if type(value) is dict:
        return any(_has_refs(v) for v in value.values())
    return False


def _dumps(value: Any) -> bytes:
    import cloudpickle

    return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _values(value: Any) -> Any:
    """Object refs replaced by their values, in any nesting (for actor calls)."""
    if isinstance(value, ObjectRef):
        return get(value)
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(_values(v) for v in value)
    if type(value) is dict:
        return {k: _values(v) for k, v in value.items()}
    return value


def _refs(refs: Any, what: str) -> tuple[list[ObjectRef], bool]:
    if isinstance(refs, ObjectRef):
        return [refs], True
    if isinstance(refs, Iterable) and not isinstance(refs, (str, bytes, dict)):
        refs = list(refs)
        bad = [r for r in refs if not isinstance(r, ObjectRef)]
        if not bad:
            return refs, False
        raise TypeError(
            f"{what}() takes ObjectRefs, got {type(bad[0]).__name__}: {bad[0]!r}; pass what "
            f"f.remote() returned, e.g. {what}([f.remote(1), f.remote(2)])"
        )
    raise TypeError(
        f"{what}() takes an ObjectRef or a list of them, got {type(refs).__name__}: {refs!r}; "
        f"use {what}(f.remote())"
    )


def get(refs: ObjectRef | list[ObjectRef], *, timeout: float | None = None) -> Any:
    """The value(s) of object refs, waiting for them.

    Parameters
    ----------
    refs
        One ``ObjectRef`` (returns its value) or a list (returns a list of values).
    timeout
        Seconds to wait at most; then :class:`GetTimeoutError` (a ``TimeoutError``).

    Raises
    ------
    Exception
        The task's own exception, with its type and remote traceback.

    Examples
    --------
    >>> get(f.remote(1))  # doctest: +SKIP
    2
    """
    items, single = _refs(refs, "get")
    if _in_event_loop():
        raise RuntimeError(
            "get() blocks, and it was called inside a running event loop (an async "
            "function); use 'await ref' (or 'await asyncio.gather(*refs)') there instead"
        )
    _flush()
    deadline = None if timeout is None else time.monotonic() + timeout
    futures = [r._future for r in items if isinstance(r._future, Future)]
    gathered: dict[str, Any] = {}
    if futures:
        # one wait and one gather for all task results, not a round trip per ref
        try:
            distributed.wait(futures, timeout=timeout)
        except concurrent.futures.CancelledError:
            pass  # named below, with the key
        except TimeoutError:
            pending = [f.key for f in futures if not f.done()]
            raise GetTimeoutError(
                f"get() timed out after {timeout} s: {len(pending)} of {len(items)} "
                f"object(s) not ready, e.g. {pending[0]!r}"
            ) from None
        for f in futures:
            if f.status == "cancelled":
                raise TaskCancelledError(f.key)
        try:
            values = futures[0].client.gather(futures)
        except concurrent.futures.CancelledError:
            cancelled = [f.key for f in futures if f.status == "cancelled"]
            raise TaskCancelledError(cancelled[0] if cancelled else futures[0].key) from None
        gathered = {f.key: v for f, v in zip(futures, values, strict=True)}
    values = []
    for ref in items:
        if isinstance(ref._future, Future):
            values.append(gathered[ref._future.key])
            continue
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
        try:
            values.append(ref._future.result(timeout=remaining))
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise GetTimeoutError(
                f"get() timed out after {timeout} s waiting for {ref._id!r}"
            ) from None
        except OSError as err:  # an actor call whose worker is gone
            actor = ref._id.split(".")[0]
            raise ActorDiedError(actor, None, f"its worker is gone: {err}") from None
    return values[0] if single else values


def wait(
    refs: list[ObjectRef],
    *,
    num_returns: int = 1,
    timeout: float | None = None,
    fetch_local: bool = True,
) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Wait until ``num_returns`` of ``refs`` are ready, or ``timeout`` seconds.

    Returns
    -------
    (ready, not_ready)
        Both in the order of ``refs``; ``ready`` has at most ``num_returns`` refs.
    """
    items, single = _refs(refs, "wait")
    _flush()
    if single:
        raise TypeError("wait() takes a list of ObjectRefs; use wait([ref])")
    if not isinstance(num_returns, int) or not 0 <= num_returns <= len(items):
        raise ValueError(
            f"num_returns must be between 0 and the number of refs ({len(items)}), got "
            f"{num_returns!r}; use wait(refs, num_returns={max(min(len(items), 1), 0)})"
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.001
    while True:
        ready = [r for r in items if r._future.done()]
        remaining = None if deadline is None else deadline - time.monotonic()
        if len(ready) >= num_returns or (remaining is not None and remaining <= 0):
            break
        pending = [r._future for r in items if not r._future.done()]
        if all(isinstance(f, Future) for f in pending):
            # Dask wakes us when one completes: no polling
            with contextlib.suppress(TimeoutError, concurrent.futures.CancelledError):
                distributed.wait(pending, timeout=remaining, return_when="FIRST_COMPLETED")
        elif all(isinstance(f, concurrent.futures.Future) for f in pending):
            concurrent.futures.wait(
                pending, timeout=remaining, return_when=concurrent.futures.FIRST_COMPLETED
            )
        else:  # actor calls sent straight away answer through Dask's ActorFuture: poll those
            time.sleep(pause if remaining is None else min(pause, remaining))
            pause = min(pause * 2, 0.02)
    ready = ready[:num_returns]
    chosen = {id(r) for r in ready}
    return ready, [r for r in items if id(r) not in chosen]


def cancel(ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task behind ``ref``, as Ray's ``ray.cancel``.

    A queued task is dropped; a running isolated task's child process is ended and its
    devices go back; ``get(ref)`` then raises :class:`TaskCancelledError`, as do tasks that
    depend on it. A running thread task cannot be interrupted: its result is dropped.

    Parameters
    ----------
    force
        Accepted for Ray's signature; Dask's ``force=True`` also cancels a task other
        clients still want.
    recursive
        Ray cancels the tasks the cancelled one submitted; here those are cancelled when
        they depend on it (Dask cancels dependents), and not otherwise.

    Notes
    -----
    Cancelling an actor method call is not supported (Ray refuses ``force`` there too):
    kill the actor with :func:`kill`.

    Examples
    --------
    >>> ref = slow.remote()  # doctest: +SKIP
    >>> cancel(ref)  # doctest: +SKIP
    """
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"cancel() takes an ObjectRef, got {type(ref).__name__}: {ref!r}")
    if not isinstance(ref._future, Future):
        raise TypeError(
            f"{ref!r} is an actor method call; actor calls cannot be cancelled, kill the "
            "actor instead: kill(actor)"
        )
    _flush()  # a call still in the sender's hands is sent first, then cancelled
    ref._future.client.cancel([ref._future], force=force)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def put(value: Any) -> ObjectRef:
    """Store ``value`` in the cluster's memory; returns a ref to pass to remote calls."""
    _flush()
    (future,) = _client().scatter([value], hash=False)
    return ObjectRef(future, future.key)


def kill(actor: ActorHandle) -> None:
    """End ``actor`` now: its process ends, its GPUs go back, later calls raise."""
    if not isinstance(actor, ActorHandle):
        raise TypeError(
            f"kill() takes an actor handle, got {type(actor).__name__}; use kill(Counter.remote())"
        )
    _flush()
    actor._kill()


# -- resources -----------------------------------------------------------------------------


def _table() -> dict[str, dict]:
    from .scheduler import HANDLER

    client = _client()
    return client.sync(getattr(client.scheduler, f"{HANDLER}_table"), refresh=True)


def cluster_resources() -> dict[str, float]:
    """Total resources of the cluster: ``{"CPU": threads, "GPU": devices, ...}``.

    What calls can ask for: ``CPU`` is each worker's declared CPU, or its thread count where
    it declares none (``num_cpus`` then maps onto threads).
    """
    _client()
    totals: dict[str, float] = {"CPU": 0.0, "GPU": 0.0}
    for _, caps in _capacities(_runtime):
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


# -- inside tasks and actors -----------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeContext:
    """Where the calling code runs (Ray's ``get_runtime_context()``)."""

    _task: _context.TaskContext | None
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
    task = _context.current()
    if task is not None:
        return RuntimeContext(task, task.worker)
    try:
        from .worker import lease_of_running_task

        plugin, key = lease_of_running_task()
    except NoLeaseError:
        return RuntimeContext(None, None)
    ids = tuple(plugin.ids_for(key))
    return RuntimeContext(
        _context.TaskContext(key, ids, tuple(plugin.tokens_for(key)), plugin.worker.address),
        plugin.worker.address,
    )


# -- remote functions ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    num_gpus: Any = 0
    num_cpus: Any = None
    resources: dict = field(default_factory=dict)
    max_calls: int | None = None
    isolation: str | None = None
    max_retries: int | None = None
    name: str | None = None

    def annotations(self) -> dict:
        isolation = self.isolation or ("process" if self.num_gpus else "thread")
        out: dict[str, Any] = {"isolation": isolation}
        if self.max_calls is not None:
            out["max_calls"] = self.max_calls
        return out

    def dask_resources(self) -> dict:
        out = dict(self.resources)
        if self.num_gpus:
            out["GPU"] = self.num_gpus
        runtime = _runtime
        # CPU slots are Dask's CPU resource where workers declare one (init's do); elsewhere
        # a call takes one of the worker's threads, as every Dask task does.
        if self.num_cpus and (runtime is None or runtime.cpu_declared):
            out["CPU"] = self.num_cpus
        return out


_OPTION_NAMES = {f for f in _Options.__dataclass_fields__}


def _options(base: _Options | None, kwargs: dict, example: str) -> _Options:
    unknown = set(kwargs) - _OPTION_NAMES
    if unknown:
        raise TypeError(
            f"unknown option(s) {sorted(unknown)}; the options are {sorted(_OPTION_NAMES)}, "
            f"e.g. {example}"
        )
    opts = replace(base or _Options(), **kwargs)
    if opts.num_gpus is None:
        opts = replace(opts, num_gpus=0)
    try:
        amount = parse_gpu_amount(opts.num_gpus)
    except InvalidRequestError as e:
        raise InvalidRequestError(
            opts.num_gpus, f"num_gpus: {e.reason}", example.replace("num_gpus=1", "num_gpus=1")
        ) from None
    if opts.num_cpus is not None and (
        isinstance(opts.num_cpus, bool)
        or not isinstance(opts.num_cpus, numbers.Real)
        or opts.num_cpus < 0
    ):
        raise InvalidRequestError(opts.num_cpus, "num_cpus must be a number >= 0", "num_cpus=1")
    if not isinstance(opts.resources, dict) or {"GPU", "CPU", "gpu", "cpu"} & set(opts.resources):
        raise InvalidRequestError(
            opts.resources,
            "resources= is for custom resources; GPUs and CPUs are asked with num_gpus and "
            "num_cpus",
            "@remote(num_gpus=1, resources={'special_hardware': 1})",
        )
    if opts.isolation is not None and opts.isolation not in ISOLATION_MODES:
        raise InvalidRequestError(
            opts.isolation, "isolation must be 'thread' or 'process'", "isolation='process'"
        )
    if opts.max_calls is not None:
        parse_max_calls(opts.max_calls)
    if opts.max_retries is not None and (
        isinstance(opts.max_retries, bool)
        or not isinstance(opts.max_retries, int)
        or opts.max_retries < 0
    ):
        raise InvalidRequestError(
            opts.max_retries, "max_retries must be an int >= 0", "max_retries=3"
        )
    # store the exact amount Dask will see: whole numbers as int, fractions as float
    num = int(amount) if amount == int(amount) else float(amount)
    return replace(opts, num_gpus=num)


def _key(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex}"


class _Batcher:
    """The one ordered sender of ``.remote()`` calls.

    One ``client.submit`` per call costs the scheduler a graph update each (about 2 ms on a
    small machine); consecutive calls with the same function and options go as one
    ``client.map`` instead. A batch leaves when it reaches ``LIMIT`` calls, when anything
    waits on a result (``get``, ``wait``, an actor call, ...), or 1 ms after its first call,
    so nothing is held back.

    Order: whoever sends (the background thread or a caller's :meth:`flush`) holds
    ``sending`` from taking the pending calls to having sent them, so a batch never overtakes
    an earlier one (a task never reaches the scheduler before the tasks it depends on), and
    :meth:`flush` returns only once everything added before it was sent.

    Errors: a call that cannot be sent (an argument or function that does not pickle) fails
    only its own ref, with the original exception, through a task under its key that raises
    it, so tasks that depend on it fail with it too. The sender never dies.
    """

    LIMIT = 512
    DELAY = 0.001

    def __init__(self, client: Client) -> None:
        self.client = client
        self.pending: list[tuple] = []
        self.functions: dict[Callable, Future] = {}
        self.lock = threading.Lock()
        self.sending = threading.Lock()  # held from swap to sent
        self.wake = threading.Condition(self.lock)
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="remote-batcher", daemon=True)
        self.thread.start()

    def add(self, function: Callable, args: tuple, kwargs: dict, ref: ObjectRef, opts: _Options):
        with self.lock:
            if self.closed:
                raise RuntimeError(
                    "dask_gpuresources was shut down; call init() again before .remote()"
                )
            self.pending.append((function, args, kwargs, ref, opts))
            full = len(self.pending) >= self.LIMIT
            if len(self.pending) == 1:
                self.wake.notify()
        if full:
            self.flush()

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.pending and not self.closed:
                    self.wake.wait()
                if self.closed:
                    return
            time.sleep(self.DELAY)
            try:
                self.flush()
            except BaseException:  # flush fails refs, not itself; if it ever did, live on
                logger.exception("dask_gpuresources: sending remote calls failed")

    def flush(self) -> None:
        with self.sending:
            with self.lock:
                batch, self.pending = self.pending, []
            start = 0
            for i in range(1, len(batch) + 1):
                if (
                    i == len(batch)
                    or batch[i][0] is not batch[start][0]
                    or batch[i][4] != batch[start][4]
                ):
                    self._send_or_fail(batch[start:i])
                    start = i

    def _shipped(self, function: Callable) -> Any:
        """The function as data in the cluster: shipped once, not pickled into every task.

        A function defined in a script is pickled by value; inside each task that would be
        paid for every call, by the scheduler and by the worker. As a scattered value, each
        worker receives it once and keeps it in memory.
        """
        future = self.functions.get(function)
        if future is None or future.status in ("lost", "error", "cancelled"):
            (future,) = self.client.scatter([function], hash=False, broadcast=True)
            self.functions[function] = future
        return future

    def _send_or_fail(self, run: list[tuple]) -> None:
        try:
            self._send(run)
        except Exception as exc:
            if len(run) > 1:  # find the calls that cannot be sent; send the others
                for call in run:
                    self._send_or_fail([call])
                return
            self._fail(run[0][3], _original(exc))

    def _send(self, run: list[tuple]) -> None:
        function, opts = run[0][0], run[0][4]
        shipped = self._shipped(function)
        with dask.annotate(**opts.annotations()):
            self.client.map(
                _context.invoke,
                [shipped] * len(run),
                [c[1] for c in run],
                [c[2] for c in run],
                key=[c[3]._id for c in run],
                resources=opts.dask_resources() or None,
                retries=opts.max_retries,
                pure=False,
            )

    def _fail(self, ref: ObjectRef, exc: BaseException) -> None:
        """Fail ``ref`` with ``exc``: a task under its key raises it (dependents fail too)."""
        try:
            try:
                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            # map, not submit: submit sends nothing for a key this client already knows
            self.client.map(_reraise, [exc], key=[ref._id], pure=False)
        except Exception:  # the client itself is gone: fail the ref where it is
            ref._future = _Failed(exc)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush()
        with self.lock:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=10)


def _reraise(exc: BaseException) -> Any:
    raise exc


def _original(exc: BaseException) -> BaseException:
    """The error under Dask's "Could not serialize object of type ..." wrapper."""
    while isinstance(exc, TypeError) and exc.__cause__ is not None:
        text = str(exc.args[0]) if exc.args else ""
        if not text.startswith("Could not serialize"):
            break
        exc = exc.__cause__
    return exc


def _flush() -> None:
    runtime = _runtime
    if runtime is not None and runtime.batcher is not None:
        runtime.batcher.flush()


class RemoteFunction:
    """A function decorated with :func:`remote`; call it with ``.remote(*args)``."""

    def __init__(self, function: Callable, options: _Options) -> None:
        self._function = function
        self._opts = options
        functools.update_wrapper(self, function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Remote functions cannot be called directly. Instead of running "
            f"'{self._function.__name__}()', try '{self._function.__name__}.remote()'."
        )

    def options(self, **options: Any) -> RemoteFunction:
        """A copy with some options changed for the calls made through it.

        Examples
        --------
        >>> f.options(num_gpus=2).remote()  # doctest: +SKIP
        """
        return RemoteFunction(
            self._function, _options(self._opts, options, "f.options(num_gpus=1)")
        )

    def remote(self, *args: Any, **kwargs: Any) -> ObjectRef:
        """Submit one call; returns its :class:`ObjectRef` at once."""
        _client()  # raises when init() was not called
        opts = self._opts
        key = _key(opts.name or self._function.__name__)
        _check_feasible(key, opts)
        ref = ObjectRef(Future(key, _runtime.client), key)
        _runtime.batcher.add(self._function, _unwrap(args), _unwrap(kwargs), ref, opts)
        return ref


# -- actors --------------------------------------------------------------------------------


class ActorClass:
    """A class decorated with :func:`remote`; create actors with ``.remote(*args)``."""

    def __init__(self, cls: type, options: _Options) -> None:
        self._cls = cls
        self._opts = options
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Actors cannot be instantiated directly. Instead of '{self._cls.__name__}()', use "
            f"'{self._cls.__name__}.remote()'."
        )

    def options(self, **options: Any) -> ActorClass:
        """A copy with some options changed for the actors created through it."""
        return ActorClass(self._cls, _options(self._opts, options, "A.options(num_gpus=1)"))

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        """Create an actor; it holds its GPUs from construction until it goes away."""
        from ._actors import ActorHost

        client = _client()
        opts = self._opts
        key = _key(opts.name or self._cls.__name__)
        _check_feasible(key, opts)
        isolation = opts.isolation or ("process" if opts.num_gpus else "thread")
        _flush()  # tasks whose refs the constructor takes go first
        future = client.submit(
            ActorHost,
            self._cls,
            _unwrap(args),
            _unwrap(kwargs),
            isolation,
            key=key,
            resources=opts.dask_resources() or None,
            actor=True,
            pure=False,
        )
        return ActorHandle(future, self._cls, key)


class ActorHandle:
    """A handle on a live actor: ``handle.method.remote(*args)`` returns an ObjectRef.

    Handles can be passed to tasks (thread isolation) and to other actors.
    """

    def __init__(self, future: Future, cls: type, key: str) -> None:
        self._future = future
        self._cls = cls
        self._key = key
        self._proxy: Any = None
        self._caller = uuid.uuid4().hex
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._deferred = 0  # calls waiting for the actor to be constructed
        self._dispatcher: ThreadPoolExecutor | None = None
        self._proxy_call: Any = None  # the proxy's ``call``, fetched once (see _send)
        runtime = _runtime
        if runtime is not None:
            runtime.handles.add(self)

    def _stop(self) -> None:
        """At shutdown: calls not yet sent are dropped, the sending thread ends."""
        if self._dispatcher is not None:
            self._dispatcher.shutdown(wait=False, cancel_futures=True)

    def __reduce__(self):
        return _rebuild_handle, (self._future, self._cls, self._key, self._proxy)

    def __del__(self) -> None:
        # The last reference to this handle is gone: so is this process's claim on the
        # actor. Dask's proxy sits in a reference cycle after a method call, and its own
        # future would keep the actor (and its GPUs) wanted until a garbage collection.
        proxy = self.__dict__.get("_proxy")
        if proxy is not None:
            with contextlib.suppress(Exception):
                _dask_internals.release_actor_proxy(proxy)

    def __repr__(self) -> str:
        return f"Actor({self._cls.__name__}, {self._key})"

    def __getattr__(self, name: str) -> _ActorMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        if not callable(getattr(self._cls, name, None)):
            raise AttributeError(
                f"actor class {self._cls.__name__} has no method {name!r}; its methods are "
                f"{sorted(n for n in dir(self._cls) if not n.startswith('_'))}"
            )
        return _ActorMethod(self, name)

    def _status_error(self) -> ActorDiedError | None:
        status = self._future.status
        if status not in ("error", "cancelled", "lost"):
            return None
        return ActorDiedError(self._key, getattr(self._proxy, "_address", None), f"status {status}")

    def _call(self, method: str, args: tuple, kwargs: dict) -> ObjectRef:
        call_id = f"{self._key}.{method}"
        dead = self._status_error()
        if dead is not None:
            return ObjectRef(_Failed(dead), call_id)
        payload = None
        if not _has_refs((args, kwargs)):
            # Serialized before a sequence number is taken: a call that cannot be sent
            # fails alone, and the calls after it do not wait for it at the actor.
            try:
                payload = _dumps((args, kwargs))
            except Exception as exc:
                return ObjectRef(_Failed(_original(exc)), call_id)
        with self._lock:
            seq = next(self._seq)
            ready = payload is not None and self._proxy is not None and self._deferred == 0
            if not ready:
                # Not constructed yet (it may be waiting for devices), or arguments still to
                # be computed: the call leaves from the handle's own thread once it can, so
                # that .remote() returns at once, as in Ray; calls keep their order.
                self._deferred += 1
        if ready:
            return ObjectRef(self._send(self._proxy, seq, method, payload), f"{call_id}#{seq}")
        if self._dispatcher is None:
            self._dispatcher = ThreadPoolExecutor(1, thread_name_prefix=f"send-{self._key}")
        return ObjectRef(
            self._dispatcher.submit(self._send_later, seq, method, args, kwargs, payload),
            f"{call_id}#{seq}",
        )

    def _send(self, proxy: Any, seq: int, method: str | None, payload: bytes) -> Any:
        try:
            call = self._proxy_call
            if call is None:
                call = proxy.call
                # Dask's proxy builds a fresh wrapper on every attribute access (tens of
                # microseconds of a call's latency); one serves every call. Not inside an
                # actor, where the proxy answers differently (a direct local call).
                if not getattr(thread_state, "actor", False):
                    self._proxy_call = call
            return call((self._caller, seq, method, payload))
        except RuntimeError as exc:  # "Worker holding Actor was lost"
            return _Failed(ActorDiedError(self._key, proxy._address, str(exc)))

    def _send_later(
        self, seq: int, method: str, args: tuple, kwargs: dict, payload: bytes | None
    ) -> Any:
        try:
            proxy = self._future.result()
            with self._lock:
                self._proxy = self._proxy or proxy
            if payload is None:
                try:
                    # the refs' values, computed elsewhere: waited for here, not in .remote()
                    payload = _dumps(_values((args, kwargs)))
                except BaseException as exc:
                    # the actor still expects this sequence number: let the next call go
                    self._send(proxy, seq, None, b"")
                    raise _original(exc) from None
            return self._send(proxy, seq, method, payload).result()
        finally:
            with self._lock:
                self._deferred -= 1

    def _kill(self) -> None:
        self._future.cancel(force=True)


def _rebuild_handle(future: Future, cls: type, key: str, proxy: Any) -> ActorHandle:
    handle = ActorHandle(future, cls, key)
    handle._proxy = proxy
    return handle


class _ActorMethod:
    def __init__(self, handle: ActorHandle, name: str) -> None:
        self._handle = handle
        self._name = name

    def remote(self, *args: Any, **kwargs: Any) -> ObjectRef:
        return self._handle._call(self._name, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Actor methods cannot be called directly. Instead of running "
            f"'actor.{self._name}()', try 'actor.{self._name}.remote()'."
        )


# -- the decorator -------------------------------------------------------------------------


def remote(*args: Any, **options: Any) -> Any:
    """Make a function a remote function, or a class an actor class.

    Bare (``@remote``) or with options (``@remote(num_gpus=1)``).

    Parameters
    ----------
    num_gpus
        GPUs each call or actor holds: a fraction below 1 or a whole number (default 0).
    num_cpus
        Dask ``CPU`` resource to hold (only where workers declare one).
    resources
        Other Dask resources, e.g. ``{"special_hardware": 1}``.
    max_calls
        Recycle an isolated child after this many calls (0: never; 1: a fresh process per
        call, Ray's default for GPU functions).
    isolation
        ``"process"`` (default when ``num_gpus > 0``) or ``"thread"``.
    max_retries
        Retries of a failed call (Dask ``retries``).

    Examples
    --------
    >>> @remote(num_gpus=1)
    ... def use_gpu():
    ...     return get_gpu_ids()
    >>> get(use_gpu.remote())  # doctest: +SKIP
    [0]
    """
    if len(args) == 1 and not options and (callable(args[0]) or isinstance(args[0], type)):
        return _make(args[0], _Options())
    if args:
        raise TypeError(
            "remote() takes a function or class, or only keyword options; use @remote or "
            "@remote(num_gpus=1)"
        )
    opts = _options(None, options, "@remote(num_gpus=1)")
    return lambda target: _make(target, opts)


def _make(target: Any, opts: _Options) -> Any:
    if isinstance(target, type):
        return ActorClass(target, opts)
    if callable(target):
        return RemoteFunction(target, opts)
    raise TypeError(f"@remote applies to functions and classes, got {target!r}")
