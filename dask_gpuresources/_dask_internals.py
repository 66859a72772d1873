"""Every private piece of distributed that the plugins touch, named in one place.

distributed documents these as implementation details that may change without deprecation.
``tests/test_dask_internals.py`` calls :func:`missing_internals` so that a release which
removes or renames one fails loudly, naming it, instead of breaking device accounting quietly.
The tested range of ``distributed`` is pinned in ``pyproject.toml``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from distributed.protocol import to_serialize

__all__ = [
    "INTERNALS",
    "actor_caller",
    "missing_internals",
    "count_in_process_memory",
    "register_event_handler",
    "release_actor_proxy",
    "run_instead",
    "set_worker_extension",
    "set_worker_handler",
    "worker_extension",
]


def worker_extension(worker: object, name: str) -> object | None:
    """``worker.extensions[name]``: state that lives as long as the worker (Dask calls each
    extension's ``close()`` when the worker closes)."""
    return worker.extensions.get(name)  # type: ignore[attr-defined]


def set_worker_extension(worker: object, name: str, extension: object) -> None:
    """Add ``extension`` to the worker's extensions (closed with the worker)."""
    worker.extensions[name] = extension  # type: ignore[attr-defined]


def set_worker_handler(worker: object, name: str, handler: object | None) -> None:
    """Serve ``handler`` as the worker's RPC operation ``name`` (``None`` removes it)."""
    handlers = worker.handlers  # type: ignore[attr-defined]
    if handler is None:
        handlers.pop(name, None)
    else:
        handlers[name] = handler


def release_actor_proxy(proxy: object) -> None:
    """Drop the reference a Dask ``Actor`` proxy holds on its actor's key.

    Each method call through the proxy builds a self-referencing closure that holds the proxy
    (``Actor.__getattr__``), so the proxy and its ``Future`` outlive the last handle until the
    garbage collector runs, and the actor (with its GPUs) stays wanted. Releasing the proxy's
    own future ends that at once; other holders keep theirs.
    """
    future = getattr(proxy, "_future", None)
    if future is not None:
        future.release()


def actor_caller(proxy: object, method: str) -> Callable[[Any], concurrent.futures.Future]:
    """A function that calls ``method(arg)`` of the actor behind Dask's ``Actor`` proxy,
    from any thread but the proxy's event loop, and returns a ``concurrent.futures.Future``.

    Dask's own call (``proxy.method(arg)``) returns an ``ActorFuture`` whose ``result()``
    goes through ``sync()``: a second hand-off to the event loop, an extra loop iteration
    and two more tasks per call. This sends the same ``actor_execute`` message from one
    coroutine and hands its outcome straight to the waiting thread (about 0.1 ms off each
    call, measured interleaved in one process); ``concurrent.futures.wait`` also works on
    what it returns. A lost connection is retried once the actor's future settles, then
    raises ``OSError``, as Dask does.
    """
    loop = proxy._io_loop.asyncio_loop  # type: ignore[attr-defined]
    rpc = proxy._worker_rpc  # type: ignore[attr-defined]
    key = proxy.key  # type: ignore[attr-defined]

    async def execute(arg: Any) -> Any:
        try:
            result = await rpc.actor_execute(
                function=method, actor=key, args=[to_serialize(arg)], kwargs={}
            )
        except OSError:
            future = proxy._future  # type: ignore[attr-defined]
            if future is not None and not future.done():
                await future
                return await execute(arg)
            raise OSError("Unable to contact Actor's worker") from None
        if result["status"] == "OK":
            return result["result"]
        raise result["exception"]

    def call(arg: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(execute(arg), loop)

    return call


def count_in_process_memory(worker: object, extra: Callable[[], int]) -> Callable[[], None]:
    """Make the memory Dask measures for ``worker`` include ``extra()`` bytes.

    ``SystemMonitor.get_process_memory`` is the one place Dask reads a worker's memory from
    the OS: the heartbeat's ``memory`` (the scheduler's ``ws.memory.process``, the
    dashboard's memory bars) and the worker memory manager's pause and spill thresholds all
    come from it. Returns a function that undoes the change.
    """
    monitor = worker.monitor  # type: ignore[attr-defined]
    measure = monitor.get_process_memory

    def get_process_memory() -> int:
        return measure() + extra()

    monitor.get_process_memory = get_process_memory

    def undo() -> None:
        if monitor.__dict__.get("get_process_memory") is get_process_memory:
            del monitor.get_process_memory

    return undo


def register_event_handler(event: type, handler: object) -> None:
    """Teach ``WorkerState`` to handle a state-machine event of ours (a singledispatch
    registration on ``WorkerState._handle_event``; events are only ever sent by us)."""
    from distributed.worker_state_machine import WorkerState

    WorkerState.__dict__["_handle_event"].register(event, handler)


def run_instead(ts: object, function: Callable[..., Any], *args: Any) -> None:
    """Make the worker run ``function(*args)`` for the task ``ts`` instead of its own
    function (a request the worker refuses then fails with ``function``'s exception, as any
    task error does). Call it before the task executes: ``Worker.execute`` reads
    ``ts.run_spec`` when the task starts."""
    from dask._task_spec import Task

    ts.run_spec = Task(ts.key, function, *args)  # type: ignore[attr-defined]


#: (module, dotted attribute, why we need it)
INTERNALS: tuple[tuple[str, str, str], ...] = (
    (
        "distributed.actor",
        "Actor._worker_rpc",
        "facade actor calls send actor_execute themselves (actor_caller)",
    ),
    (
        "distributed.actor",
        "Actor._io_loop",
        "facade actor calls run their coroutine on the proxy's loop (actor_caller)",
    ),
    (
        "distributed.worker",
        "Worker.actor_execute",
        "the message facade actor calls send, and its {'status', 'result'|'exception'} reply",
    ),
    (
        "distributed.system_monitor",
        "SystemMonitor.get_process_memory",
        "isolated children's memory counted in the worker's (heartbeat, pause, spill)",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState._resource_restrictions_satisfied",
        "per-device admission: a GPU task starts only when the ledger can place it",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState._acquire_resources",
        "devices are leased at the moment the worker acquires a task's resources",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState._release_resources",
        "devices are freed where the worker releases a task's resources",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState._next_ready_task",
        "no head-of-line blocking: a waiting GPU task does not block smaller ones that fit",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState.constrained",
        "the worker's heap of resource-restricted tasks, scanned for one that fits "
        "(peek, pop, discard, sorted, in)",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState.handle_stimulus",
        "overridden by admission to see an actor's construction end after it was cancelled",
    ),
    (
        "distributed.worker_state_machine",
        "ExecuteSuccessEvent",
        "an actor's construction ended: its key and its instance (value)",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState.long_running",
        "seceded tasks still hold their devices: leased when the plugin is installed",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState.tasks",
        "the task states the isolated executor looks up by key",
    ),
    (
        "distributed.worker_state_machine",
        "TaskState.resource_restrictions",
        "what a task asks for: admission, aging and leases read it",
    ),
    (
        "distributed.worker_state_machine",
        "TaskState.priority",
        "Dask's order, kept by the index of constrained tasks",
    ),
    (
        "distributed.worker_state_machine",
        "TaskState.run_spec",
        "async tasks are never isolated (run_spec.is_coro); a refused request's task runs a "
        "function that raises instead (run_instead)",
    ),
    (
        "dask._task_spec",
        "Task.is_coro",
        "async tasks run on the worker's event loop, never in an isolated child",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState.total_resources",
        "the declared GPU count, read and (for detection or the 'gpu' spelling) written",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState.available_resources",
        "kept in step with total_resources when the GPU count is set",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState.executing",
        "tasks already running when the plugin is installed are given leases",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState.plugins",
        "the state machine finds the plugin (and its ledger) through this shared dict",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState._transition",
        "an actor's hold ends on whichever transition takes its key out of the live actors",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState._handle_event",
        "DevicesFreed (ours) wakes the state machine when devices come free outside a "
        "transition (singledispatch registration)",
    ),
    (
        "distributed.worker_state_machine",
        "StateMachineEvent",
        "the base class of the DevicesFreed event",
    ),
    (
        "distributed.worker",
        "Worker.extensions",
        "the worker's device state lives as long as the worker (closed with it), not as "
        "long as a plugin instance (Dask replaces a plugin registered again)",
    ),
    (
        "distributed.worker",
        "Worker.handlers",
        "the worker serves its device snapshot to the scheduler's table",
    ),
    (
        "distributed.worker",
        "Worker.set_resources",
        "a runtime GPU count change resizes the ledger",
    ),
    (
        "distributed.worker",
        "Worker.handle_stimulus",
        "sends DevicesFreed to the state machine",
    ),
    (
        "distributed.worker",
        "Worker.metrics",
        "leases travel to the scheduler with the heartbeat",
    ),
    (
        "distributed.worker",
        "thread_state",
        "which task key runs on the calling thread, for get_gpu_ids()",
    ),
    (
        "distributed.worker",
        "Worker.executors",
        "isolated GPU tasks run on the executor the worker plugin adds here",
    ),
    (
        "distributed.worker",
        "_run_task_simple",
        "what Dask hands a non-thread-pool executor; it calls task(data), which the "
        "isolated executor turns into a call in a child process",
    ),
    (
        "distributed.worker_state_machine",
        "TaskState.annotations",
        "the 'executor' annotation routes a task to the isolated executor at acquisition",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState.actors",
        "actor tasks are never isolated (the instance must live in the worker)",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState._TRANSITIONS_TABLE",
        "an actor's device hold ends on every transition that releases it",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState._ensure_computing",
        "tasks waiting for an actor's devices start as soon as the actor goes away",
    ),
    (
        "distributed.worker_state_machine",
        "merge_recs_instructions",
        "combines Dask's transition result with the tasks started after a hold ends",
    ),
    (
        "distributed.cli.dask_spec",
        "main",
        "init()'s worker processes import first, then run `dask spec` once the scheduler is up",
    ),
    (
        "distributed.scheduler",
        "TaskState.actor",
        "an actor's GPU load stays counted in placement for the actor's life",
    ),
    (
        "distributed.scheduler",
        "Scheduler.valid_workers",
        "placement: GPU tasks are offered the workers whose devices are free (least backlog)",
    ),
    (
        "distributed.scheduler",
        "SchedulerState.resources",
        "declared capacity per resource and worker",
    ),
    (
        "distributed.scheduler",
        "Scheduler.add_resources",
        "renames the lowercase 'gpu' resource that environment variables produce",
    ),
    (
        "distributed.scheduler",
        "Scheduler.remove_resources",
        "renames the lowercase 'gpu' resource that environment variables produce",
    ),
    (
        "distributed.scheduler",
        "Scheduler.register_worker_plugin",
        "the scheduler plugin equips every present and future worker",
    ),
    (
        "distributed.scheduler",
        "Scheduler.transition",
        "a rejected request becomes an erred task carrying our exception",
    ),
    (
        "distributed.scheduler",
        "TaskState.resource_restrictions",
        "GPU requests are validated and normalised at submission",
    ),
    (
        "distributed.scheduler",
        "TaskState.processing_on",
        "per-worker GPU load for placement",
    ),
    (
        "distributed.scheduler",
        "WorkerState.metrics",
        "the allocation table is read from each worker's heartbeat metrics",
    ),
    (
        "distributed.stealing",
        "WorkStealing.put_key_in_stealable",
        "occupancy-based stealing does not see devices; GPU tasks are kept out of it",
    ),
    (
        "distributed.stealing",
        "WorkStealing.move_task_request",
        "queued GPU work moves to workers whose devices are idle (the safe steal protocol)",
    ),
    (
        "distributed.stealing",
        "WorkStealing.remove_key_from_stealable",
        "GPU tasks made stealable before the plugin started are taken out of stealing",
    ),
    (
        "distributed.stealing",
        "WorkStealing.in_flight",
        "a move rebalance() requested is followed until stealing settles it",
    ),
    (
        "distributed.scheduler",
        "Scheduler.handlers",
        "the allocation table, its JSON form and the workers' device announcements are "
        "scheduler RPC handlers",
    ),
    (
        "distributed.scheduler",
        "Scheduler.extensions",
        "the work-stealing extension is found here (GPU tasks are kept out of it)",
    ),
    (
        "distributed.scheduler",
        "Scheduler.transitions",
        "GPU tasks placed on a worker whose devices are refused (overlap: raise) are released",
    ),
    (
        "distributed.scheduler",
        "WorkerState.resources",
        "a worker's declared GPU count, read for placement and set to 0 when refused",
    ),
    (
        "distributed.scheduler",
        "WorkerState.processing",
        "the GPU tasks queued on an overloaded worker, for rebalance()",
    ),
    (
        "distributed.scheduler",
        "TaskState.priority",
        "rebalance() moves the lowest-priority queued GPU tasks first",
    ),
    (
        "distributed.dashboard.components",
        "DashboardComponent",
        "the GPU allocations page is a dashboard component",
    ),
    (
        "distributed.dashboard.components.scheduler",
        "BOKEH_THEME",
        "the page uses the dashboard's theme",
    ),
    (
        "distributed.dashboard.components.scheduler",
        "env",
        "the page renders with the dashboard's Jinja environment",
    ),
    (
        "distributed.dashboard.core",
        "BokehApplication",
        "the page is added to the scheduler's Bokeh server",
    ),
    (
        "distributed.dashboard.scheduler",
        "template_variables",
        "the page appears in the dashboard's navigation",
    ),
    (
        "distributed.http.utils",
        "RequestHandler",
        "the JSON route /api/v1/gpu_allocations",
    ),
    (
        "distributed.deploy.subprocess",
        "SubprocessWorker",
        "init()'s local workers are subprocess workers of a SpecCluster",
    ),
    (
        "distributed.deploy.spec",
        "ProcessInterface",
        "init()'s prestarted worker processes",
    ),
    (
        "distributed.worker",
        "Worker.execute",
        "Dask dispatches a task to a non-thread-pool executor by the executor's class name "
        "(one without 'ThreadPoolExecutor' gets _run_task_simple)",
    ),
)


def _has(obj: object, name: str) -> bool:
    if hasattr(obj, name):
        return True
    # Slotted attributes and annotated instance attributes are not class attributes.
    if isinstance(obj, type):
        for klass in obj.__mro__:
            if name in getattr(klass, "__slots__", ()) or name in inspect.get_annotations(klass):
                return True
    return False


def missing_internals() -> list[str]:
    """The internals in :data:`INTERNALS` that this distributed release lacks.

    Returns
    -------
    list of str
        One message per missing piece, naming it and what depends on it; empty when all
        are present.

    Examples
    --------
    >>> missing_internals()
    []
    """
    missing = []
    for module_name, dotted, why in INTERNALS:
        obj: object = importlib.import_module(module_name)
        for part in dotted.split("."):
            if not _has(obj, part):
                missing.append(f"{module_name}.{dotted} is missing (needed for: {why})")
                break
            obj = getattr(obj, part, None)
    return missing
