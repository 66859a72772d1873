"""The worker side: concrete device leases for every GPU task a Dask worker runs.

- :class:`WorkerDevices` is the device state of one worker (ledger, device tokens and ids,
  warm isolated children, actor holds and finalizers). It is created once per worker and
  outlives any plugin instance: Dask replaces a worker plugin registered again under the
  same name, and the new instance adopts the state that is there.
- :class:`GPUWorkerPlugin` wires it in: sizes the ledger from the declared (or detected)
  count, maps its slots to the worker's own ``CUDA_VISIBLE_DEVICES``, installs per-device
  admission (:mod:`._admission`) and publishes the leases with the heartbeat.
- :func:`devices_of` and :func:`lease_of_running_task` (from :mod:`._lease`) find a worker's
  device state and the lease of a thread-pool task for :func:`~dask_gpuresources.get_gpu_ids`.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Hashable
from fractions import Fraction
from time import monotonic as time
from typing import Any

import psutil
from dask.utils import parse_bytes, parse_timedelta
from distributed import WorkerPlugin
from distributed.core import Status
from distributed.worker_state_machine import TaskState, WorkerState

from . import _config, _dask_internals, _names, _nvml
from ._admission import (
    GPU,
    ConstrainedIndex,
    DevicesFreed,
    Refused,
    admission_class,
    gpu_amount,
)
from ._allocator import DeviceLedger
from ._context import get_gpu_ids
from ._devices import device_tokens, physical_ids, visible_devices
from ._isolation import EXECUTOR_NAME, IsolatedExecutor, IsolatedRun
from ._lease import devices_of, lease_of_running_task
from ._nvml import NVMLBackend, default_backend, detect
from ._requests import parse_max_calls
from .exceptions import DeviceCountError

__all__ = [
    "GPU",
    "PLUGIN_NAME",
    "GPUWorkerPlugin",
    "WorkerDevices",
    "devices_of",
    "get_gpu_ids",
    "gpu_amount",
    "lease_of_running_task",
]

# A child of "distributed" so that our lines appear in worker and scheduler logs with
# Dask's own format and levels (the logging.distributed config).
logger = logging.getLogger("distributed.gpuresources")

#: seconds a cancelled actor's lingering instance may keep its devices (see watch_instance)
LINGER_LIMIT = 30.0

#: Name of the worker plugin (and of the worker's RPC handler); defined in the leaf module
#: ``_names`` so that the scheduler side need not import this one for it.
PLUGIN_NAME = _names.PLUGIN_NAME


def _declared_gpus(state: WorkerState) -> float | None:
    """The declared GPU count, after renaming the lowercase ``gpu`` that env vars produce."""
    for resources in (state.total_resources, state.available_resources):
        if GPU not in resources and "gpu" in resources:
            resources[GPU] = resources.pop("gpu")
    return state.total_resources.get(GPU)


def _whole_count(declared: float, *, what: str) -> int:
    if declared < 0 or declared != int(declared):
        raise DeviceCountError(
            f"a worker's GPU count must be a whole number of devices, got GPU={declared!r}; "
            f"use {what}"
        )
    return int(declared)


class WorkerDevices:
    """The device state of one worker: created once, adopted by every plugin instance.

    It holds the ledger, the device tokens and ids, the isolated executor (warm children),
    the actors' device holds and finalizers. It lives in ``worker.extensions`` and as a class
    attribute of the worker's ``WorkerState`` class (see :mod:`._admission`), so a worker
    plugin registered again under the same name (Dask replaces it) changes nothing here;
    only the worker's close ends it.

    Use :meth:`attach` rather than the constructor.
    """

    def __init__(self, worker: Any, *, detect: bool, nvml: NVMLBackend | None) -> None:
        self.worker = worker
        self.detect = detect
        self.nvml = nvml
        self.ledger = DeviceLedger(0)
        self.ids: tuple[int, ...] = ()
        self.tokens: tuple[str, ...] = ()
        self.uuids: tuple[str | None, ...] = ()
        self.executor: IsolatedExecutor | None = None
        #: actor key -> GPU amount it holds for life
        self.actor_holds: dict[Hashable, Any] = {}
        #: actor key -> callable that ends the actor's resources (its child, its thread);
        #: it may return a future that is done once the actor's running method returns
        self.finalizers: dict[Hashable, Any] = {}
        #: every actor key with a hold or a finalizer: checked on each of its transitions
        self.actors: set[Hashable] = set()
        #: plain Dask actors cancelled while constructing: key -> the finalizer of their
        #: instance, which Dask's machinery still holds for a moment after dropping it
        self._collecting: dict[Hashable, Any] = {}
        #: of those, the ones whose hold ended before their instance was collected
        self._awaiting: set[Hashable] = set()
        #: isolated actors whose child died after construction, before their hold began
        self._died_early: set[Hashable] = set()
        self._isolation = "thread"
        self._max_calls = 0
        #: seconds a task may wait without fitting before it is protected (aging)
        self._aging = 10.0
        #: the task past its aging limit that nothing conflicting may pass (see protect)
        self.protected: TaskState | None = None
        self._protected_needs: frozenset[str] = frozenset()
        #: Dask's constrained queue, grouped by restrictions (see ConstrainedIndex)
        self.queue = ConstrainedIndex()
        self._readings: NVMLBackend | None = None  # NVML, when it sees this worker's GPUs
        self._uuid_index: dict[str, int] = {}
        self._count = 0  # the GPU count the ledger is sized for
        # GPU held by running tasks as Dask's books count it (exact): Dask's float
        # available_resources["GPU"] is set from it, so it never drifts.
        self._book_used: Fraction | int = 0
        self._original_state_class: type[WorkerState] | None = None
        self._original_set_resources: Any = None
        #: what undoes each change made to the worker at install, newest last (see close)
        self._undo: list[Any] = []
        self._processes: dict[int, psutil.Process] = {}  # isolated children, by pid
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def attach(
        cls, worker: Any, *, detect: bool = False, nvml: NVMLBackend | None = None
    ) -> WorkerDevices:
        """The worker's device state: the existing one, or a new one installed now."""
        existing = _dask_internals.worker_extension(worker, PLUGIN_NAME)
        if isinstance(existing, WorkerDevices) and not existing.closed:
            return existing
        devices = cls(worker, detect=detect, nvml=nvml)
        await devices._install()
        return devices

    async def _install(self) -> None:
        worker = self.worker
        self._aging = parse_timedelta(_config.get("gpuresources.worker.bypass-limit"), default="s")
        state = worker.state
        declared = _declared_gpus(state)
        count, tokens, uuid_index = self._resolve_devices(declared)
        self._uuid_index = uuid_index
        self._set_devices(count, tokens)
        if declared is not None or count:
            # A worker that declares no GPU (and detects none) stays exactly as Dask made it.
            if declared != count:
                await self._set_gpu_count(count)
        self._count = count

        self._original_state_class = type(state)
        _dask_internals.set_state_class(state, admission_class(type(state), self))
        self._lease_running_tasks(state)
        self._setup_isolation(worker)
        # Isolated children's memory is the worker's: heartbeats, the dashboard and Dask's
        # pause and spill thresholds count it.
        self._undo += [_dask_internals.count_in_process_memory(worker, self.children_memory)]
        _dask_internals.set_worker_extension(worker, PLUGIN_NAME, self)
        self._undo += [_dask_internals.set_worker_metric(worker, PLUGIN_NAME, self._heartbeat)]
        _dask_internals.set_worker_handler(worker, PLUGIN_NAME, self.snapshot)
        # Runtime Worker.set_resources(GPU=n) resizes the ledger (or is refused).
        self._original_set_resources = worker.set_resources
        self._undo += [
            _dask_internals.replace_worker_method(worker, "set_resources", self._set_resources)
        ]
        if count:
            logger.info(
                "Worker %s hands out %d GPU(s): %s", worker.address, count, ",".join(tokens)
            )
            nthreads = state.nthreads
            if nthreads < count:
                # Each task takes a thread: fewer threads than devices leaves devices idle.
                logger.warning(
                    "Worker %s declares %d GPUs but has %d thread(s): at most %d GPU task(s) "
                    "run at once and %d device(s) stay idle. Start it with --nthreads %d "
                    "(or nthreads=%d) to use every device.",
                    worker.address,
                    count,
                    nthreads,
                    nthreads,
                    count - nthreads,
                    count,
                    count,
                )
        await self._announce()

    async def _announce(self) -> None:
        """Tell the scheduler which devices this worker hands out (overlap detection)."""
        worker = self.worker
        if not self.tokens or worker.status not in (Status.running, Status.paused):
            return  # not registered yet: the scheduler reads them from the heartbeat
        try:
            await worker.scheduler.gpuresources_devices(
                worker=worker.address, tokens=list(self.tokens), uuids=list(self.uuids)
            )
        except Exception as err:  # a scheduler without the plugin
            logger.debug("Could not announce devices to the scheduler: %s", err)

    def close(self) -> None:
        """End the device state (worker close): actors finalized, children ended."""
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        self.protected = None
        for key in list(self.finalizers):
            self._finalize(key)
        worker = self.worker
        while self._undo:
            self._undo.pop()()
        _dask_internals.set_worker_handler(worker, PLUGIN_NAME, None)
        if self.executor is not None:
            self.executor.shutdown(wait=False)
            self.executor = None

    def _setup_isolation(self, worker: Any) -> None:
        mode = _config.get("gpuresources.isolation.mode")
        if mode not in ("thread", "process"):
            raise ValueError(
                f"gpuresources.isolation.mode must be 'thread' or 'process', got {mode!r}; "
                "use DASK_GPURESOURCES__ISOLATION__MODE=process"
            )
        self._isolation = mode
        self._max_calls = parse_max_calls(_config.get("gpuresources.isolation.max-calls"))
        memory = _config.get("gpuresources.isolation.recycle-gpu-memory")
        memory = None if memory is None else parse_bytes(memory)
        self.executor = IsolatedExecutor(
            resolve=self._isolated_run,
            worker_address=lambda: worker.address,
            max_workers=max(2 * worker.state.nthreads, 4),
            idle_timeout=parse_timedelta(
                _config.get("gpuresources.isolation.idle-timeout"), default="s"
            ),
            spare=bool(_config.get("gpuresources.isolation.spare")),
            preload=_config.get("gpuresources.isolation.preload"),
            nvml=None if memory is None else (self.nvml or default_backend()),
            recycle_gpu_memory=memory,
            cluster=lambda: _cluster_of(worker),
            kill_grace=parse_timedelta(
                _config.get("gpuresources.isolation.kill-grace-period"), default="s"
            ),
        )
        self._undo += [_dask_internals.set_worker_executor(worker, EXECUTOR_NAME, self.executor)]

    def _resolve_devices(self, declared: float | None) -> tuple[int, list[str], dict[str, int]]:
        visible = visible_devices()
        if declared is None:
            if not self.detect:
                return 0, [], {}
            found = detect(self.nvml or default_backend(), visible)
            if found.reason:
                logger.info("No GPUs detected, so this worker offers no GPU: %s", found.reason)
            else:
                self._readings = self.nvml or default_backend()
            return found.count, list(found.tokens), dict(found.uuid_index)

        count = _whole_count(declared, what=f"--resources GPU={max(int(declared), 0)}")
        tokens = device_tokens(count, visible)
        uuid_index: dict[str, int] = {}
        if count:
            found = detect(self.nvml or default_backend(), visible)
            uuid_index = dict(found.uuid_index)
            if found.reason is None:
                self._readings = self.nvml or default_backend()
            if found.reason is None and count > found.count:
                logger.warning(
                    "This worker declares GPU=%d but NVML sees %d device(s); the extra %d are "
                    "logical devices for scheduling only",
                    count,
                    found.count,
                    count - found.count,
                )
        return count, tokens, uuid_index

    def _set_devices(self, count: int, tokens: list[str]) -> None:
        self.tokens = tuple(tokens)
        self.ids = tuple(physical_ids(tokens, self._uuid_index))
        backend = self._readings
        self.uuids = tuple(
            _nvml_uuid(backend, token) if backend is not None else None for token in tokens
        )
        self.ledger.resize(count, wait=True)

    async def _set_gpu_count(self, count: int) -> None:
        state = self.worker.state
        if self.worker.status in (Status.running, Status.paused):
            await self._original_set_resources_or_worker(**{GPU: count})
        else:  # not registered yet: the scheduler learns the count at registration
            old = state.total_resources.get(GPU, 0)
            state.total_resources[GPU] = count
            state.available_resources[GPU] = state.available_resources.get(GPU, 0) + count - old

    async def _original_set_resources_or_worker(self, **resources: float) -> None:
        original = self._original_set_resources or self.worker.set_resources
        await original(**resources)

    async def _set_resources(self, **resources: float) -> None:
        """``Worker.set_resources``, with ``GPU=n`` resizing the ledger too."""
        value = resources.get(GPU, resources.get("gpu"))
        if value is None:
            return await self._original_set_resources(**resources)
        if "gpu" in resources:
            resources[GPU] = resources.pop("gpu")
        count = _whole_count(value, what=f"set_resources(GPU={max(int(value), 0)})")
        await self._original_set_resources(**resources)
        self._resize(count)

    def _resize(self, count: int) -> None:
        if count == self._count:
            return
        tokens = device_tokens(count, visible_devices()) if count > len(self.tokens) else []
        tokens = list(self.tokens[:count]) + tokens[len(self.tokens) :]
        # Slots that go are not handed out any more; they leave the ledger as they come free.
        self._set_devices(count, tokens if count >= len(self.tokens) else list(self.tokens))
        self.ledger.resize(count, wait=True)
        self._count = count
        self._sync_book()
        logger.info("Worker %s now hands out %d GPU(s)", self.worker.address, count)
        self.worker.handle_stimulus(DevicesFreed(stimulus_id=f"gpuresources-resize-{time()}"))

    def _lease_running_tasks(self, state: WorkerState) -> None:
        for ts in list(state.executing | state.long_running):
            amount = gpu_amount(ts.resource_restrictions)
            if amount is None or amount.__class__ is Refused:
                continue
            self._book_used += amount
            if ts.key in self.ledger:
                continue
            if self.ledger.try_acquire(ts.key, amount) is None:
                logger.warning(
                    "Task %r was already running with GPU=%s when the plugin started and "
                    "no free device can hold it; it runs without a device lease",
                    ts.key,
                    ts.resource_restrictions.get(GPU),
                )

    # -- admission (called by GPUAdmission on the worker's event loop) -----------------------

    def can_place(self, amount: Fraction | int) -> bool:
        """Whether the ledger can place ``amount`` now."""
        return self.ledger.can_place(amount)

    def acquire(self, ts: TaskState, amount: Fraction | int) -> None:
        """Lease devices to ``ts`` as Dask acquires its resources."""
        self._book_used += amount
        self._sync_book()
        if self.ledger.try_acquire(ts.key, amount) is None:
            # admitted by stock Dask before the plugin knew the task
            logger.warning("Task %r started without a device lease: no device fits", ts.key)

    def release(self, ts: TaskState, amount: Fraction | int, *, actor: bool) -> None:
        """Free ``ts``'s devices as Dask releases its resources; an actor keeps them."""
        self._book_used -= amount
        self._sync_book()
        key = ts.key
        if actor and key in self.ledger and not self._ended_early(key):
            # An actor keeps its devices from construction until it goes away. Dask's own
            # books count them free once the constructor returns; the ledger, which admits
            # GPU tasks, does not. One that did not construct, or was cancelled meanwhile,
            # still holds them until the transition that follows in this same stimulus has
            # dropped its instance (and ended its child): only then are they free.
            self.actor_holds[key] = amount
            self.actors.add(key)
            return
        self.ledger.release(key)

    def _sync_book(self) -> None:
        # Dask's float view of GPU, from exact numbers: total minus what running tasks hold.
        state = self.worker.state
        total = state.total_resources.get(GPU)
        if total is None:
            return
        used = self._book_used
        if type(used) is not int:
            if used.denominator != 1:
                state.available_resources[GPU] = float(Fraction(total) - used)
                return
            used = self._book_used = used.numerator  # whole again: back to int arithmetic
        state.available_resources[GPU] = total - used  # exact: whole numbers of devices

    def _ended_early(self, key: Hashable) -> bool:
        if key in self._died_early:
            self._died_early.discard(key)
            return True
        return False

    def actor_died(self, key: Hashable) -> None:
        """The isolated child of live actor ``key`` died (not by a kill): its hold ends now,
        on the event loop. (Its calls fail with ActorDiedError; its handle may live on.)"""
        if self.actor_holds.pop(key, None) is not None:
            self._drained(key)
            # The scheduler counts an actor's devices held until its key is released, which
            # may be never while a handle lives: tell it they are free.
            self.worker.loop.add_callback(self._report_hold_ended, key)
        elif key in self.ledger:
            # Constructed, but Dask has not yet finished the creation task: the hold that
            # would begin then must not (see release).
            self._died_early.add(key)

    async def _report_hold_ended(self, key: Hashable) -> None:
        worker = self.worker
        try:
            await worker.scheduler.gpuresources_hold_ended(key=key, worker=worker.address)
        except Exception as err:  # a scheduler without the plugin, or one going away
            logger.debug("Could not report the end of actor %r's hold: %s", key, err)

    def on_actor_release(self, key: Hashable, finalizer: Any) -> None:
        """Call ``finalizer()`` when the actor ``key`` goes away (released, killed, lost).

        ``finalizer`` may return a future that is done once the actor's running method
        returns (thread mode) or its child process is gone (isolated); its devices stay
        leased until then.
        """
        self.finalizers[key] = finalizer
        self.actors.add(key)

    def watch_instance(self, key: Hashable, instance: Any) -> None:
        """The construction of actor ``key`` finished after it was cancelled: its hold may
        end only once ``instance`` is collected (the worker's execute machinery holds the
        finished construction's result for a moment after Dask dropped the actor).
        On the event loop, as every method here that changes the state below."""
        if key in self.finalizers:
            return  # one of the facade's: its finalizer ends it (drops the user's instance)
        try:
            finalizer = weakref.finalize(instance, self._collected_soon, key)
        except TypeError:  # an instance without weak references: as soon as Dask drops it
            return
        finalizer.atexit = False
        self._collecting[key] = finalizer

    def _collected_soon(self, key: Hashable) -> None:
        # Any thread, possibly inside a garbage collection on the event loop's own thread:
        # no lock here, only a hand-off to the loop.
        with contextlib.suppress(Exception):
            self.worker.loop.add_callback(self._collected, key)

    def _collected(self, key: Hashable) -> None:
        self._collecting.pop(key, None)
        if key in self._awaiting:
            self._awaiting.discard(key)
            self._drained(key)

    def _linger_limit(self, key: Hashable) -> None:
        if key not in self._awaiting:
            return
        self._awaiting.discard(key)
        self._collecting.pop(key, None)
        logger.warning(
            "The instance of actor %r, cancelled while it was constructed, is still "
            "referenced after %g s; its GPUs are given back now",
            key,
            LINGER_LIMIT,
        )
        self._drained(key)

    def actor_gone(self, key: Hashable) -> bool:
        """The actor ``key`` is no longer live here: finalize it and end its hold.

        Returns whether devices came free now (else later, or none were held).
        """
        self.actors.discard(key)
        self._died_early.discard(key)
        watched = self._collecting.pop(key, None)
        if watched is not None and watched.alive and key in self.ledger:
            # its instance still exists: the hold ends when it is collected, or after
            # LINGER_LIMIT seconds if something keeps it (said in the log)
            self._collecting[key] = watched
            self._awaiting.add(key)
            self.actor_holds.pop(key, None)
            self.worker.loop.call_later(LINGER_LIMIT, self._linger_limit, key)
            return False
        drained = self._finalize(key)
        amount = self.actor_holds.pop(key, None)
        if amount is None:
            if key in self.ledger and drained is None:
                self.ledger.release(key)
                return True
            return False
        if drained is not None and not drained.done():
            # A thread-mode actor's method is still running on its device, or an isolated
            # actor's process has not yet exited: the lease stays until then.
            loop = self.worker.loop

            def done(_: Any) -> None:
                loop.add_callback(self._drained, key)

            drained.add_done_callback(done)
            return False
        self.ledger.release(key)
        return True

    def _drained(self, key: Hashable) -> None:
        if self.ledger.release(key) is not None and not self.closed:
            self.worker.handle_stimulus(DevicesFreed(stimulus_id=f"gpuresources-drained-{time()}"))

    def _finalize(self, key: Hashable) -> Any:
        finalizer = self.finalizers.pop(key, None)
        if finalizer is None:
            return None
        try:
            return finalizer()
        except Exception:
            logger.exception("Ending actor %r failed", key)
            return None

    def cancelled(self, key: Hashable) -> None:
        """``key`` was cancelled while executing: end its isolated child, if it has one."""
        if self.executor is not None:
            self.executor.abort(key, "was cancelled")

    def pick_constrained(self, state: WorkerState) -> TaskState | None:
        """The first task in Dask's order whose resources are free now, if any, when the
        head of Dask's queue cannot start (no head-of-line blocking, GPU or not). While a
        task is protected (see :meth:`protect`), tasks asking for what it asks for do not
        count as free."""
        head = state.constrained.peek()
        queue = self.queue
        if not queue.active:
            queue.activate(state.constrained.sorted(), time())
        fits = state.fits
        # Tasks with the head's restrictions do not fit either; the first fitting task of
        # the other groups is the first fitting task behind the head.
        return queue.first(
            lambda ts: ts is not head and fits(ts), live=state.constrained.__contains__
        )

    def protect(self, state: Any) -> TaskState | None:
        """The protected task: the one that has waited longest among those past
        ``gpuresources.worker.bypass-limit`` that do not fit now but will once running
        tasks end, kept until it starts or cannot drain any more. None if there is none.

        While it is protected, nothing that asks for a resource it asks for starts before
        it; what asks for other resources does. Devices held by actors never drain: a task
        that fits only once an actor goes is never protected, so it holds nothing back.
        """
        protected = self.protected
        constrained = state.constrained
        if protected is not None:
            if protected in constrained and self._drains_for(protected, state):
                return protected
            self.protected = None
        fits = state._fits_now
        candidate = self.queue.oldest_waiting(
            time() - self._aging,
            lambda ts: not fits(ts) and self._drains_for(ts, state),
            live=constrained.__contains__,
        )
        if candidate is not None:
            self.protected = candidate
            self._protected_needs = frozenset(
                name for name, needed in candidate.resource_restrictions.items() if needed
            )
        return candidate

    def conflicts(self, restrictions: dict) -> bool:
        """Whether a task asking ``restrictions`` asks for a resource the protected task
        asks for (then it waits until that one has started)."""
        needs = self._protected_needs
        for name, needed in restrictions.items():
            if needed and name in needs:
                return True
        return False

    def _drains_for(self, ts: TaskState, state: Any) -> bool:
        """Whether ``ts`` fits once every running task has ended (actors keep theirs)."""
        restrictions = ts.resource_restrictions
        total = state.total_resources
        for name, needed in restrictions.items():
            if name != GPU and total.get(name, 0) < needed:
                return False
        amount = gpu_amount(restrictions)
        if not amount or amount.__class__ is Refused:
            return True
        return self.ledger.fits_when_drained(amount, permanent=self.actor_holds)

    # -- isolation ---------------------------------------------------------------------------

    def route(self, ts: TaskState, amount: Fraction | int | None) -> None:
        """Send ``ts`` to the isolated executor if it (or the worker's config) asks for it.

        An explicit ``executor`` annotation wins; actors and async tasks always run in the
        worker (an actor must live there; an async task runs on its event loop). The
        worker's ``gpuresources.isolation.mode`` applies to GPU tasks; a task annotated
        ``isolation="process"`` is isolated even without a GPU (it then sees none).
        """
        annotations = ts.annotations or {}
        mode = annotations.get("isolation")
        if mode is None:  # most tasks: decided by the worker's mode (thread by default)
            if self._isolation != "process" or not amount:
                return
        elif mode != "process":
            return
        if "executor" in annotations or self.executor is None or ts.key in self.worker.state.actors:
            return
        if ts.run_spec is None or getattr(ts.run_spec, "is_coro", False):
            return
        ts.annotations = {**annotations, "executor": EXECUTOR_NAME}

    def _isolated_run(self, key: Hashable) -> IsolatedRun:
        ts = self.worker.state.tasks.get(key)
        annotations = (ts.annotations if ts is not None else None) or {}
        max_calls = annotations.get("max_calls")
        lease = self.ledger.lease(key)
        slots = lease.devices if lease is not None else ()
        return IsolatedRun(
            key=key,
            gpu_ids=tuple(sorted(self.ids[s] for s in slots)),
            tokens=tuple(self.tokens[s] for s in slots),
            max_calls=self._max_calls if max_calls is None else parse_max_calls(max_calls),
        )

    # -- what the worker publishes -----------------------------------------------------------

    def snapshot(self) -> dict:
        """This worker's devices and their holders, as plain data.

        Returns
        -------
        dict
            ``{"devices": [{"id": int, "token": str, "uuid": str | None,
            "holders": {key: share}}, ...], "actors": [key, ...], "executing": n,
            "children": [{"pid", "devices", "state", "calls", "rss"}, ...],
            "children_memory": bytes}`` with keys as strings and shares as floats.
        """
        ledger = self.ledger
        holders = ledger.holders()
        state = self.worker.state
        children = self.children()
        return {
            "executing": len(state.executing),
            "actors": [str(k) for k in self.actor_holds],
            "children": children,
            "children_memory": sum(row["rss"] for row in children),
            "devices": [
                {
                    "id": self.ids[slot],
                    "token": self.tokens[slot],
                    "uuid": self.uuids[slot],
                    "holders": {str(k): float(v) for k, v in holders[slot].items()},
                    **self._reading(slot),
                }
                for slot in range(min(ledger.n_devices, len(self.ids)))
            ],
        }

    def _reading(self, slot: int) -> dict:
        """NVML's memory and utilization for a device, read by its token (an index, a GPU
        or a MIG UUID); ``{}`` for a device NVML does not have (a logical one)."""
        backend = self._readings
        if backend is None:
            return {}
        try:
            found = _nvml.reading(backend, self.tokens[slot])
        except _nvml.NVMLUnavailable as err:  # NVML lost
            logger.info("Not reading GPU memory and utilization any more: %s", err)
            self._readings = None
            return {}
        return {k: found[k] for k in ("memory_used", "memory_total", "utilization") if k in found}

    def children(self) -> list[dict]:
        """The isolated children alive now: pid, devices, state, calls, and ``rss`` (bytes
        of host memory, 0 when it could not be read)."""
        rows = self.executor.children() if self.executor is not None else []
        processes = self._processes
        for row in rows:
            pid = row["pid"]
            process = processes.get(pid)
            try:
                if process is None:
                    process = processes[pid] = psutil.Process(pid)
                row["rss"] = process.memory_info().rss
            except psutil.Error:
                processes.pop(pid, None)
                row["rss"] = 0
        if len(processes) > len(rows):
            alive = {row["pid"] for row in rows}
            for pid in [pid for pid in processes if pid not in alive]:
                del processes[pid]
        return rows

    def children_memory(self) -> int:
        """Host memory (RSS, bytes) of the worker's isolated children together."""
        if self.executor is None:
            return 0
        return sum(row["rss"] for row in self.children())

    def _heartbeat(self, worker: Any) -> dict:
        return self.snapshot()

    def ids_for(self, key: Hashable) -> list[int]:
        """The physical ids leased to ``key`` (sorted), ``[]`` if it holds none."""
        lease = self.ledger.lease(key)
        if lease is None:
            return []
        ids = self.ids
        return sorted([ids[slot] for slot in lease.devices])

    def tokens_for(self, key: Hashable) -> list[str]:
        """The ``CUDA_VISIBLE_DEVICES`` entries leased to ``key``, in device order."""
        lease = self.ledger.lease(key)
        if lease is None:
            return []
        return [self.tokens[slot] for slot in lease.devices]


def _nvml_uuid(backend: NVMLBackend, token: str) -> str | None:
    return _nvml.uuid_of(backend, token)


class GPUWorkerPlugin(WorkerPlugin):
    """Turns a worker's declared GPU count into leases on concrete devices.

    Registered on every worker by :class:`~dask_gpuresources.scheduler.GPUSchedulerPlugin`
    (or by ``client.register_plugin(GPUWorkerPlugin())``). With ``detect=True`` (the worker
    preload), a worker that declares no ``GPU`` resource counts its devices with NVML.

    The device state (ledger, leases, actor holds, warm children) belongs to the worker, not
    to this plugin: registering the plugin again (Dask then replaces it) adopts the state
    that is there, and removing it leaves the state in place; the worker's close ends it.

    Parameters
    ----------
    detect
        Count GPUs with NVML when the worker declares none.
    nvml
        The NVML backend; ``None`` uses the real one (tests pass a ``FakeNVML``).

    Examples
    --------
    >>> from distributed import Client, LocalCluster
    >>> cluster = LocalCluster(resources={"GPU": 2})  # doctest: +SKIP
    >>> client = Client(cluster)  # doctest: +SKIP
    >>> client.register_plugin(GPUWorkerPlugin())  # doctest: +SKIP
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, *, detect: bool = False, nvml: NVMLBackend | None = None) -> None:
        self.detect = detect
        self.nvml = nvml
        self.devices: WorkerDevices | None = None

    def __getstate__(self) -> dict:
        # Only the configuration travels (the scheduler ships this plugin to every worker).
        return {"detect": self.detect, "nvml": self.nvml}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    async def setup(self, worker: Any) -> None:
        """Adopt the worker's device state, or install it (sizing the ledger, per-device
        admission, leases for running tasks)."""
        self.devices = await WorkerDevices.attach(worker, detect=self.detect, nvml=self.nvml)

    def teardown(self, worker: Any) -> None:
        """Nothing: the device state outlives this plugin (the worker's close ends it)."""
        self.devices = None

    # Read-only views of the device state, for code that holds the plugin.
    @property
    def ledger(self) -> DeviceLedger | None:
        return self.devices.ledger if self.devices is not None else None

    @property
    def ids(self) -> tuple[int, ...]:
        return self.devices.ids if self.devices is not None else ()

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.devices.tokens if self.devices is not None else ()

    @property
    def executor(self) -> IsolatedExecutor | None:
        return self.devices.executor if self.devices is not None else None

    @property
    def actor_holds(self) -> dict:
        return self.devices.actor_holds if self.devices is not None else {}

    def snapshot(self) -> dict:
        """The worker's devices and their holders (see :meth:`WorkerDevices.snapshot`)."""
        return self.devices.snapshot() if self.devices is not None else {"devices": []}


def _cluster_of(worker: Any) -> dict[str, Any] | None:
    """What an isolated child needs to reach the worker's cluster: the scheduler's address
    and the worker's TLS settings (as plain values: the child does not import Dask until a
    task asks for the cluster)."""
    address = getattr(getattr(worker, "scheduler", None), "address", None)
    if address is None:
        return None
    security = getattr(worker, "security", None)
    fields = {}
    for field in getattr(type(security), "__slots__", ()):
        value = getattr(security, field, None)
        if field != "extra_conn_args" and value is not None:
            fields[field] = value
    return {"scheduler": address, "security": fields}
