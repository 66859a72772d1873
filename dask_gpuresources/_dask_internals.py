"""Every private piece of distributed that the package touches, named in one place.

distributed documents these as implementation details that may change without deprecation.
Each read or write of private Dask state is a small function here; each change to a running
scheduler returns a function that undoes it (the scheduler plugin's ``close()`` runs them).
:data:`INTERNALS` lists every private name the package relies on, including those a module
uses because it is that module's reason to exist (``_admission`` subclasses ``WorkerState``).

``tests/test_package.py`` calls :func:`missing_internals`, so that a release which removes or
renames one fails loudly, naming it, and checks that every entry is still used;
``tests/test_dask_canaries.py`` pins the behaviour each one is relied on for. The tested range
of ``distributed`` is pinned in ``pyproject.toml``.
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
    "actor_address",
    "actor_caller",
    "actor_status",
    "actor_worker_lost",
    "count_in_process_memory",
    "dashboard_prefix",
    "dask_valid_workers",
    "fail_task",
    "keep_out_of_stealing",
    "missing_internals",
    "move_actor",
    "moves_in_flight",
    "register_event_handler",
    "replace_worker_method",
    "set_state_class",
    "set_worker_executor",
    "set_worker_metric",
    "release_actor_proxy",
    "release_tasks",
    "remove_from_stealing",
    "rename_worker_resource",
    "request_move",
    "running_actor_key",
    "scheduler_extension",
    "set_scheduler_extension",
    "run_instead",
    "set_scheduler_handler",
    "set_task_restrictions",
    "set_worker_capacity",
    "set_worker_extension",
    "set_worker_handler",
    "steal_confirmed",
    "stealing_extension",
    "worker_extension",
    "wrap_scheduler_handler",
    "wrap_scheduler_method",
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


def actor_address(proxy: object) -> str | None:
    """The address of the worker that hosts the actor behind Dask's ``Actor`` proxy."""
    return getattr(proxy, "_address", None)


def actor_status(proxy: object) -> str | None:
    """The status of the actor's own future as the proxy's client sees it (``"finished"``
    while it lives; ``"error"`` once its worker is gone or its constructor raised;
    ``"cancelled"`` once killed), or None where the proxy holds no future (on a worker)."""
    future = getattr(proxy, "_future", None)
    return None if future is None else future.status


#: How often a call in flight looks whether its actor's worker is gone (see actor_caller).
ACTOR_WATCH_INTERVAL = 0.1


def actor_caller(
    proxy: object, method: str, gone: Callable[[str], BaseException]
) -> Callable[[Any], concurrent.futures.Future]:
    """A function that calls ``method(arg)`` of the actor behind Dask's ``Actor`` proxy,
    from any thread but the proxy's event loop, and returns a ``concurrent.futures.Future``.

    Dask's own call (``proxy.method(arg)``) returns an ``ActorFuture`` whose ``result()``
    goes through ``sync()``: a second hand-off to the event loop, an extra loop iteration
    and two more tasks per call. This sends the same ``actor_execute`` message from one
    coroutine and hands its outcome straight to the waiting thread (about 0.1 ms off each
    call, measured interleaved in one process); ``concurrent.futures.wait`` also works on
    what it returns.

    A dead worker: a call to it would spend Dask's whole connect timeout (30 s) retrying its
    address. Once the scheduler has marked the actor's future erred or cancelled, a new call
    fails at once, and calls in flight are ended by one watcher per caller (looking every
    ``ACTOR_WATCH_INTERVAL`` seconds while calls are in flight, so a call pays only a set
    insertion); both fail with ``gone(reason)``. A lost connection while the future still
    looks alive is retried once the future settles, then fails with ``gone`` too.
    """
    loop = proxy._io_loop.asyncio_loop  # type: ignore[attr-defined]
    rpc = proxy._worker_rpc  # type: ignore[attr-defined]
    key = proxy.key  # type: ignore[attr-defined]
    future = proxy._future  # type: ignore[attr-defined]
    inflight: set[asyncio.Task] = set()
    watching: list[asyncio.Task] = []
    ended: list[str] = []  # why the watcher ended the calls in flight

    def dead() -> str | None:
        status = None if future is None else future.status
        if status in ("error", "cancelled", "lost"):
            return f"its future is {status}"
        return None

    async def watch() -> None:
        while inflight:
            await asyncio.sleep(ACTOR_WATCH_INTERVAL)
            reason = dead()
            if reason is not None:
                ended.append(reason)
                for task in list(inflight):
                    task.cancel()
                return

    async def execute(arg: Any) -> Any:
        reason = dead()
        if reason is not None:
            raise gone(reason)
        task = asyncio.current_task()
        inflight.add(task)
        if future is not None and (not watching or watching[0].done()):
            watching[:] = [asyncio.ensure_future(watch())]
        try:
            result = await rpc.actor_execute(
                function=method, actor=key, args=[to_serialize(arg)], kwargs={}
            )
        except asyncio.CancelledError:
            if ended:
                raise gone(ended[-1]) from None
            raise
        except OSError:
            if future is not None and not future.done():
                await future
                return await execute(arg)
            raise gone("Unable to contact Actor's worker") from None
        finally:
            inflight.discard(task)
        if result["status"] == "OK":
            return result["result"]
        raise result["exception"]

    def call(arg: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(execute(arg), loop)

    return call


def actor_worker_lost(exc: BaseException | None) -> bool:
    """Whether ``exc`` is Dask's error for an actor whose worker was lost (the text of the
    ``RuntimeError`` that ``Actor`` raises then is all that tells it apart)."""
    return isinstance(exc, RuntimeError) and "Worker holding Actor was lost" in str(exc)


def running_actor_key(worker: object) -> object | None:
    """The key of the plain Dask actor whose method runs on this thread, or None.

    Dask runs a sync actor method in its ``actor`` executor through ``_run_actor(func, ...)``
    and records only ``"Class.method"`` as the thread's key, not the actor's own key: the
    actor is the bound method's instance, found among the worker's live actors.
    """
    from distributed.worker import _run_actor

    code = _run_actor.__code__
    frame = inspect.currentframe()
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    if frame is None:
        return None
    instance = getattr(frame.f_locals.get("func"), "__self__", None)
    del frame
    if instance is None:
        return None
    for key, actor in worker.state.actors.items():  # type: ignore[attr-defined]
        if actor is instance:
            return key
    return None


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


def set_state_class(state: object, cls: type) -> None:
    """Make the worker's ``WorkerState`` an instance of ``cls`` (a subclass of its class that
    overrides the private methods admission decides in; see ``_admission``)."""
    if not (issubclass(cls, type(state)) or issubclass(type(state), cls)):
        raise TypeError(f"{cls.__name__} does not extend {type(state).__name__}")
    state.__class__ = cls


def set_worker_metric(
    worker: object, name: str, metric: Callable[[Any], Any]
) -> Callable[[], None]:
    """Send ``metric(worker)`` with every heartbeat as ``metrics[name]`` (the scheduler reads
    it as ``WorkerState.metrics[name]``). Returns a function that undoes it."""
    return _put(worker.metrics, name, metric)  # type: ignore[attr-defined]


def set_worker_executor(worker: object, name: str, executor: object) -> Callable[[], None]:
    """Offer ``executor`` to tasks annotated ``executor=name`` (``Worker.executors``).
    Returns a function that undoes it."""
    return _put(worker.executors, name, executor)  # type: ignore[attr-defined]


def _put(mapping: dict, name: str, value: object) -> Callable[[], None]:
    """``mapping[name] = value``, and a function that takes it out again unless someone
    replaced it since."""
    mapping[name] = value

    def undo() -> None:
        if mapping.get(name) is value:
            del mapping[name]

    return undo


def replace_worker_method(
    worker: object, name: str, replacement: Callable[..., Any]
) -> Callable[[], None]:
    """Make ``worker.<name>`` call ``replacement`` (an instance attribute stands in for the
    class's method; Dask calls ``Worker.set_resources`` through the instance). Returns a
    function that undoes it, unless someone replaced it again since."""
    worker.__dict__[name] = replacement  # type: ignore[attr-defined]

    def undo() -> None:
        if worker.__dict__.get(name) is replacement:  # type: ignore[attr-defined]
            del worker.__dict__[name]  # type: ignore[attr-defined]

    return undo


def register_event_handler(event: type, handler: object) -> None:
    """Teach ``WorkerState`` to handle a state-machine event of ours (a singledispatch
    registration on ``WorkerState._handle_event``; events are only ever sent by us)."""
    from distributed.worker_state_machine import WorkerState

    WorkerState.__dict__["_handle_event"].register(event, handler)


def scheduler_extension(scheduler: object, name: str) -> object | None:
    """``scheduler.extensions[name]``: state that lives as long as the scheduler, whatever
    happens to the plugin instances that use it."""
    return scheduler.extensions.get(name)  # type: ignore[attr-defined]


def set_scheduler_extension(scheduler: object, name: str, extension: object) -> None:
    """Add ``extension`` to the scheduler's extensions (its ``teardown()`` runs when the
    scheduler closes)."""
    scheduler.extensions[name] = extension  # type: ignore[attr-defined]


def steal_confirmed(msg: Any) -> Any:
    """The key of the move that a ``"stealing"`` event ``msg`` says was enacted, else None.

    ``WorkStealing.move_task_confirm`` logs ``("confirm", key, state, victim, thief,
    stimulus_id)`` right after it moved the task to the thief, on the same call, before
    any later transition of the task.

    Examples
    --------
    >>> steal_confirmed(("confirm", "x", "constrained", "tcp://a", "tcp://b", "steal-1"))
    'x'
    >>> steal_confirmed(("already-computing", "x", "executing", "tcp://a", "tcp://b", "s"))
    """
    if type(msg) is tuple and len(msg) == 6 and msg[0] == "confirm":
        return msg[1]
    return None


def move_actor(ts: object, victim: object | None, thief: object | None) -> None:
    """Record on the scheduler that the actor task ``ts`` now lives on ``thief``.

    Dask's stealing moves an actor's task between workers' ``processing`` but leaves it in
    the victim's ``actors`` set; the scheduler's later ``processing -> released`` then
    removes it from the thief's set, which lacks it (``KeyError``), and the victim keeps a
    stale actor forever.
    """
    if victim is not None:
        victim.actors.discard(ts)  # type: ignore[attr-defined]
    if thief is not None:
        thief.actors.add(ts)  # type: ignore[attr-defined]


def run_instead(ts: object, function: Callable[..., Any], *args: Any) -> None:
    """Make the worker run ``function(*args)`` for the task ``ts`` instead of its own
    function (a request the worker refuses then fails with ``function``'s exception, as any
    task error does). Call it before the task executes: ``Worker.execute`` reads
    ``ts.run_spec`` when the task starts."""
    from dask._task_spec import Task

    ts.run_spec = Task(ts.key, function, *args)  # type: ignore[attr-defined]


# -- the scheduler: methods, handlers and the work-stealing extension ----------------------
#
# Each function below that changes the scheduler returns a function that undoes the change,
# and that undo leaves alone whatever someone else installed over it since.


def wrap_scheduler_method(
    scheduler: object, name: str, wrapper: Callable[..., Any]
) -> Callable[[], None]:
    """Make the scheduler's method ``name`` call ``wrapper(original, *args, **kwargs)``.

    The scheduler calls ``self.valid_workers(ts)`` and ``self.workers_to_close(...)``
    through the instance, so an instance attribute stands in for the class's method; Dask's
    RPC handler of the same name (``workers_to_close``: adaptive scale-down asks through it)
    is bound to the original at construction and is replaced too. ``original`` is the
    method as it was. Returns a function that undoes both.
    """
    original = getattr(scheduler, name)

    def replacement(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    # not functools.wraps: Dask's handlers read the signature (has_keyword(handler, "comm"))
    replacement.__name__ = name
    setattr(scheduler, name, replacement)
    handlers = scheduler.handlers  # type: ignore[attr-defined]
    handled = name in handlers and handlers[name] == original
    if handled:
        handlers[name] = replacement

    def undo() -> None:
        if scheduler.__dict__.get(name) is replacement:
            delattr(scheduler, name)
        if handled and handlers.get(name) is replacement:
            handlers[name] = original

    return undo


def dask_valid_workers(scheduler: object, ts: object) -> set | None:
    """Dask's own ``Scheduler.valid_workers(ts)``, whatever stands in for it on the
    instance: the workers ``ts``'s restrictions allow (None: any)."""
    return type(scheduler).valid_workers(scheduler, ts)  # type: ignore[attr-defined]


def wrap_scheduler_handler(
    scheduler: object, name: str, wrapper: Callable[..., Any]
) -> Callable[[], None] | None:
    """Serve the scheduler's RPC operation ``name`` with ``wrapper(original, **msg)``.

    Returns a function that puts ``original`` back, or None where the scheduler has no
    such handler (nothing changed).
    """
    handlers = scheduler.handlers  # type: ignore[attr-defined]
    original = handlers.get(name)
    if original is None:
        return None

    def replacement(**kwargs: Any) -> Any:
        return wrapper(original, **kwargs)

    handlers[name] = replacement

    def undo() -> None:
        if handlers.get(name) is replacement:
            handlers[name] = original

    return undo


def set_scheduler_handler(
    scheduler: object, name: str, handler: Callable[..., Any]
) -> Callable[[], None]:
    """Serve ``handler`` as the scheduler's RPC operation ``name`` (what
    ``client.scheduler.<name>(...)`` calls). Returns a function that removes it again."""
    handlers = scheduler.handlers  # type: ignore[attr-defined]
    handlers[name] = handler

    def undo() -> None:
        if handlers.get(name) is handler:
            del handlers[name]

    return undo


def stealing_extension(scheduler: object) -> object | None:
    """Dask's work-stealing extension of ``scheduler``, or None where stealing is off."""
    return scheduler.extensions.get("stealing")  # type: ignore[attr-defined]


def keep_out_of_stealing(stealing: object, keep_out: Callable[[Any], bool]) -> Callable[[], None]:
    """Dask's work stealing never considers a task for which ``keep_out(ts)`` is true.

    Stealing calls ``self.put_key_in_stealable(ts)`` for every task that enters processing
    (and when it recalculates costs); only the tasks put there are ever stolen. Returns a
    function that undoes this.
    """
    original = stealing.put_key_in_stealable  # type: ignore[attr-defined]

    def put_key_in_stealable(ts: Any) -> None:
        if not keep_out(ts):
            original(ts)

    stealing.put_key_in_stealable = put_key_in_stealable  # type: ignore[attr-defined]

    def undo() -> None:
        if stealing.__dict__.get("put_key_in_stealable") is put_key_in_stealable:
            del stealing.put_key_in_stealable  # type: ignore[attr-defined]

    return undo


def remove_from_stealing(stealing: object, ts: object) -> None:
    """Take ``ts`` out of the tasks work stealing may steal (a no-op if it is not there)."""
    stealing.remove_key_from_stealable(ts)  # type: ignore[attr-defined]


def request_move(stealing: object, ts: object, victim: object, thief: object) -> None:
    """Ask work stealing to move the processing task ``ts`` from ``victim`` to ``thief``.

    The safe protocol: the victim is asked first, and a task that has already started
    there stays (the scheduler's state is changed only on the victim's answer).
    """
    stealing.move_task_request(ts, victim, thief)  # type: ignore[attr-defined]


def moves_in_flight(stealing: object) -> Any:
    """The moves stealing has asked for and not settled: ``{ts: {"thief": ws, ...}}``."""
    return stealing.in_flight  # type: ignore[attr-defined]


# -- the scheduler: resources, restrictions and transitions ---------------------------------


def set_worker_capacity(scheduler: object, addr: str, resource: str, value: float) -> None:
    """Make the scheduler place by ``value`` of ``resource`` on worker ``addr``.

    Placement reads both ``scheduler.resources[resource][addr]`` (which workers are valid)
    and ``ws.resources`` (what the worker declares); the worker's own books, and the
    resources in use, stay as they are.
    """
    ws = scheduler.workers.get(addr)  # type: ignore[attr-defined]
    if ws is None:
        return
    ws.resources[resource] = value
    scheduler.resources.setdefault(resource, {})[addr] = value  # type: ignore[attr-defined]


def rename_worker_resource(scheduler: object, addr: str, old: str, new: str) -> None:
    """Rename resource ``old`` of worker ``addr`` to ``new`` in the scheduler's books."""
    ws = scheduler.workers.get(addr)  # type: ignore[attr-defined]
    if ws is None or old not in ws.resources:
        return
    scheduler.remove_resources(addr)  # type: ignore[attr-defined]
    ws.resources[new] = ws.resources.pop(old)
    scheduler.add_resources(addr)  # type: ignore[attr-defined]


def set_task_restrictions(ts: object, restrictions: dict) -> None:
    """Replace the resource restrictions of the scheduler's task ``ts``; set before the
    task is placed (in ``update_graph``), they are what placement and the worker see."""
    ts.resource_restrictions = restrictions  # type: ignore[attr-defined]


def fail_task(scheduler: object, key: Any, error: BaseException, *, stimulus_id: str) -> None:
    """Make the scheduler's task ``key`` erred with ``error``, as if it had raised it: its
    futures raise ``error``, and its dependents fail."""
    from distributed.protocol.pickle import dumps

    recommendations = scheduler.transition(  # type: ignore[attr-defined]
        key,
        "erred",
        stimulus_id=stimulus_id,
        exception=dumps(error),
        cause=key,
        exception_text=str(error),
    )
    scheduler.transitions(recommendations, stimulus_id)  # type: ignore[attr-defined]


def release_tasks(scheduler: object, keys: list, *, stimulus_id: str) -> None:
    """Send the processing tasks ``keys`` back to be placed again (the worker they were
    on is told to drop them; a task that already runs there is cancelled)."""
    scheduler.transitions(  # type: ignore[attr-defined]
        {key: "released" for key in keys}, stimulus_id
    )


def dashboard_prefix(bokeh_tornado: object) -> str:
    """The URL prefix under which Dask's dashboard (a ``BokehTornado``) serves its pages
    (the scheduler's ``http_prefix``), ``""`` for none."""
    return getattr(bokeh_tornado, "_prefix", "") or ""


#: (module, dotted attribute, why we need it)
INTERNALS: tuple[tuple[str, str, str], ...] = (
    (
        "distributed.worker",
        "_run_actor",
        "get_gpu_ids() in a plain Dask actor's method finds the actor by the method that "
        "_run_actor(func, ...) runs (running_actor_key)",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState.actors",
        "the worker's live actors by key (running_actor_key); an actor's hold ends when its "
        "key leaves them; actor tasks are never isolated (the instance lives in the worker)",
    ),
    (
        "distributed.actor",
        "Actor._address",
        "the worker a facade actor lives on, named in ActorDiedError (actor_address)",
    ),
    (
        "distributed.actor",
        "Actor._future",
        "a proxy's own future on the actor: released with the last handle "
        "(release_actor_proxy); its status says the actor's worker is gone (actor_caller), "
        "and it raises RuntimeError('Worker holding Actor was lost') then (actor_worker_lost)",
    ),
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
        "WorkerState",
        "the worker's state machine becomes an instance of a subclass of its own class "
        "(set_state_class), whose private methods admission overrides",
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
        "a runtime GPU count change resizes the ledger (replace_worker_method)",
    ),
    (
        "distributed.worker",
        "Worker.handle_stimulus",
        "sends DevicesFreed to the state machine",
    ),
    (
        "distributed.worker",
        "Worker.metrics",
        "leases travel to the scheduler with the heartbeat (set_worker_metric)",
    ),
    (
        "distributed.worker",
        "thread_state",
        "which task key runs on the calling thread, for get_gpu_ids()",
    ),
    (
        "distributed.worker",
        "Worker.executors",
        "isolated GPU tasks run on the executor the worker plugin adds here (set_worker_executor)",
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
        "placement: GPU tasks are offered the workers whose devices are free (least "
        "backlog); the scheduler looks it up on the instance (wrap_scheduler_method, "
        "dask_valid_workers)",
    ),
    (
        "distributed.scheduler",
        "SchedulerState.resources",
        "declared capacity per resource and worker, by which the scheduler finds valid "
        "workers; set with WorkerState.resources when GPUs are refused (set_worker_capacity)",
    ),
    (
        "distributed.scheduler",
        "Scheduler.add_resources",
        "renames the lowercase 'gpu' resource that environment variables produce "
        "(rename_worker_resource); it is the 'set_resources' handler that placement follows "
        "(wrap_scheduler_handler)",
    ),
    (
        "distributed.scheduler",
        "Scheduler.remove_resources",
        "renames the lowercase 'gpu' resource that environment variables produce "
        "(rename_worker_resource)",
    ),
    (
        "distributed.scheduler",
        "Scheduler.register_worker_plugin",
        "the scheduler plugin equips every present and future worker",
    ),
    (
        "distributed.scheduler",
        "Scheduler.transition",
        "a rejected request becomes an erred task carrying our exception (fail_task)",
    ),
    (
        "distributed.scheduler",
        "TaskState.resource_restrictions",
        "GPU requests are validated and normalised at submission (set_task_restrictions)",
    ),
    (
        "distributed.scheduler",
        "TaskState.processing_on",
        "the worker a queued GPU task waits on (placement's load, rebalance(), overlap)",
    ),
    (
        "distributed.scheduler",
        "WorkerState.metrics",
        "the allocation table is read from each worker's heartbeat metrics",
    ),
    (
        "distributed.stealing",
        "WorkStealing.put_key_in_stealable",
        "occupancy-based stealing does not see devices; GPU tasks are kept out of it "
        "(keep_out_of_stealing)",
    ),
    (
        "distributed.stealing",
        "WorkStealing.move_task_request",
        "queued GPU work moves to workers whose devices are idle (the safe steal protocol; "
        "request_move)",
    ),
    (
        "distributed.stealing",
        "WorkStealing.remove_key_from_stealable",
        "GPU tasks made stealable before the plugin started are taken out of stealing "
        "(remove_from_stealing)",
    ),
    (
        "distributed.stealing",
        "WorkStealing.move_task_confirm",
        "its 'confirm' event tells placement at once that a move it asked for happened "
        "(steal_confirmed)",
    ),
    (
        "distributed.stealing",
        "WorkStealing.log",
        "the 'stealing' events placement follows moves by",
    ),
    (
        "distributed.scheduler",
        "WorkerState.actors",
        "an actor moved by stealing is recorded on its new worker (move_actor)",
    ),
    (
        "distributed.stealing",
        "WorkStealing.in_flight",
        "a move rebalance() requested is followed until stealing settles it (moves_in_flight)",
    ),
    (
        "distributed.scheduler",
        "Scheduler.handlers",
        "the allocation table, its JSON form and the workers' device announcements are "
        "scheduler RPC handlers (set_scheduler_handler); set_resources and workers_to_close "
        "are served wrapped (wrap_scheduler_handler, wrap_scheduler_method)",
    ),
    (
        "distributed.scheduler",
        "Scheduler.extensions",
        "the work-stealing extension is found here (stealing_extension); the scheduler "
        "plugin's state that outlives an instance lives here (scheduler_extension)",
    ),
    (
        "distributed.scheduler",
        "Scheduler.transitions",
        "GPU tasks placed on a worker whose devices are refused (overlap: raise) are "
        "released (release_tasks); a rejected request's erred transition is applied "
        "(fail_task)",
    ),
    (
        "distributed.scheduler",
        "WorkerState.resources",
        "a worker's declared GPU count, read for placement and set to 0 when refused "
        "(set_worker_capacity)",
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
    (
        "distributed.scheduler",
        "Scheduler.workers_to_close",
        "adaptive scale-down and retire_workers(n=...) never close a worker hosting a GPU "
        "actor; the scheduler calls it on the instance, and its RPC handler is bound to it "
        "(wrap_scheduler_method)",
    ),
    (
        "distributed.scheduler",
        "TaskState.who_has",
        "the worker a live GPU actor holds its devices on, when a plugin instance rebuilds "
        "its holds from the scheduler's tasks",
    ),
    (
        "distributed.scheduler",
        "SchedulerState.running",
        "rebalance() moves GPU work only to running workers (not paused or closing ones)",
    ),
    (
        "distributed.scheduler",
        "Scheduler.http_application",
        "the JSON route and the dashboard page are added to the scheduler's HTTP server",
    ),
    (
        "bokeh.server.tornado",
        "BokehTornado._prefix",
        "the page is served under the prefix Dask's dashboard has (dashboard_prefix)",
    ),
    (
        "distributed.worker",
        "Worker.state",
        "the worker's state machine: its class is extended by admission (a subclass set as "
        "its __class__), its tasks, resources and actors read",
    ),
    (
        "distributed.worker",
        "Worker.monitor",
        "the SystemMonitor whose get_process_memory counts isolated children's memory "
        "(count_in_process_memory)",
    ),
    (
        "distributed.worker_state_machine",
        "WorkerState.long_running",
        "tasks already running (seceded ones too) when the plugin is installed are given leases",
    ),
    (
        "distributed.worker_state_machine",
        "ExecuteSuccessEvent",
        "the event by which an actor's constructor returns its instance to the state machine "
        "(an isolated actor's instance is watched from it)",
    ),
    (
        "distributed.worker_state_machine",
        "TaskState.run_spec",
        "what a task runs: coroutine tasks stay on the worker's loop, not isolated",
    ),
    (
        "dask._task_spec",
        "Task.is_coro",
        "a coroutine function task cannot run in an isolated child process",
    ),
)


def _has(obj: object, name: str) -> bool:
    if hasattr(obj, name):
        return True
    # Slotted attributes and annotated instance attributes are not class attributes, nor
    # are attributes that only the constructor sets (``self._address = address``).
    if isinstance(obj, type):
        for klass in obj.__mro__:
            if name in getattr(klass, "__slots__", ()) or name in inspect.get_annotations(klass):
                return True
            init = klass.__dict__.get("__init__")
            if name in getattr(getattr(init, "__code__", None), "co_names", ()):
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
