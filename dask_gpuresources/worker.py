"""The worker side: concrete device leases for every GPU task a Dask worker runs.

Dask's worker state machine already decides *when* a resource-restricted task may start
(``available_resources``). This module makes that decision per device and names the
devices:

- :class:`GPUWorkerPlugin` owns one :class:`~dask_gpuresources._allocator.DeviceLedger` per
  worker, maps its slots to the worker's own ``CUDA_VISIBLE_DEVICES``, and publishes the
  leases with the heartbeat.
- The worker's ``WorkerState`` gains :class:`GPUAdmission` as a mixin (swapped in place by the
  plugin, see ``_dask_internals``): a GPU task is admitted only when the ledger can place it on
  concrete devices now, leased at the moment Dask acquires its resources, and freed where Dask
  releases them. A task that does not fit does not block smaller ones that do.
- :func:`lease_of_running_task` finds the lease of a thread-pool task for
  :func:`~dask_gpuresources.get_gpu_ids`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Hashable
from fractions import Fraction
from typing import Any

import dask.config
from dask.utils import parse_bytes, parse_timedelta
from distributed import WorkerPlugin
from distributed.core import Status
from distributed.worker import get_worker, thread_state
from distributed.worker_state_machine import TaskState, WorkerState, merge_recs_instructions

from . import _config  # noqa: F401  (registers the config defaults)
from ._allocator import DeviceLedger, InvalidRequestError, parse_gpu_amount
from ._context import get_gpu_ids
from ._devices import device_tokens, physical_ids, visible_devices
from ._isolation import EXECUTOR_NAME, IsolatedExecutor, IsolatedRun, parse_max_calls
from ._nvml import NVMLBackend, default_backend, detect
from .exceptions import DeviceCountError, NoLeaseError

__all__ = ["GPU", "PLUGIN_NAME", "GPUWorkerPlugin", "get_gpu_ids", "lease_of_running_task"]

# A child of "distributed" so that our lines appear in worker and scheduler logs with
# Dask's own format and levels (the logging.distributed config).
logger = logging.getLogger("distributed.gpuresources")

#: The Dask resource name that stands for GPUs.
GPU = "GPU"
#: Name of the worker plugin (and of the worker's RPC handler).
PLUGIN_NAME = "gpuresources"


@functools.lru_cache(maxsize=1024)
def _cached_amount(value: Any) -> Fraction | int | None:
    try:
        amount = parse_gpu_amount(value)
    except InvalidRequestError:
        # The scheduler plugin rejects these at submission; a worker without it leaves the
        # task to Dask's own accounting rather than failing it here.
        return None
    # A whole number of devices as a plain int: the ledger's whole-device path then does
    # integer arithmetic only (Fraction's operators are Python code, run for every task).
    return amount.numerator if amount.denominator == 1 else amount


def gpu_amount(restrictions: dict | None) -> Fraction | int | None:
    """The GPU amount a task requests, exact (an int when whole), or None if it asks none."""
    if not restrictions:
        return None
    value = restrictions.get(GPU)
    if value is None:
        return None
    try:
        return _cached_amount(value)
    except TypeError:  # unhashable
        return None


class GPUAdmission(WorkerState):
    """Per-device admission for Dask's worker state machine (a mixin, no state of its own).

    The ledger lives on the plugin, reached through ``self.plugins`` (shared with the
    Worker), because ``WorkerState`` uses ``__slots__``. These methods run for every task on
    the worker's event loop, so each looks the plugin up once and calls as little as it can.
    """

    __slots__ = ()

    def _resource_restrictions_satisfied(self, ts: TaskState) -> bool:
        if not super()._resource_restrictions_satisfied(ts):
            return False
        amount = gpu_amount(ts.resource_restrictions)
        if not amount:
            return True
        ledger = getattr(self.plugins.get(PLUGIN_NAME), "ledger", None)
        return ledger is None or ledger.can_place(amount)

    def _acquire_resources(self, ts: TaskState) -> None:
        super()._acquire_resources(ts)
        plugin = self.plugins.get(PLUGIN_NAME)
        if plugin is None or plugin.ledger is None:
            return
        amount = gpu_amount(ts.resource_restrictions)
        if amount is not None and plugin.ledger.try_acquire(ts.key, amount) is None:
            # admitted by stock Dask before the plugin knew the task
            logger.warning("Task %r started without a device lease: no device fits", ts.key)
        annotations = ts.annotations
        if (annotations and "isolation" in annotations) or (
            amount and plugin._isolation == "process"
        ):
            plugin.route(ts)

    def _release_resources(self, ts: TaskState) -> None:
        super()._release_resources(ts)
        ledger = getattr(self.plugins.get(PLUGIN_NAME), "ledger", None)
        if ledger is None:
            return
        key = ts.key
        if key in self.actors and key in ledger:
            # An actor keeps its devices from construction until it goes away. Dask's own
            # books count them free again once the constructor returns (its invariant: only
            # running tasks hold resources); the ledger, which admits GPU tasks, does not.
            self.plugins[PLUGIN_NAME].actor_holds[key] = ts.resource_restrictions[GPU]
            return
        ledger.release(key)

    def _end_actor_hold(self, plugin: GPUWorkerPlugin, ts: TaskState, result: Any) -> Any:
        """After a release transition of the GPU actor ``ts``: free its devices."""
        recs, instructions = result
        plugin.actor_holds.pop(ts.key)
        plugin.ledger.release(ts.key)
        plugin.actor_released(ts.key)
        # The devices are free now: start what waits for them in this same stimulus.
        return merge_recs_instructions((recs, instructions), self._ensure_computing())

    def _next_ready_task(self) -> TaskState | None:
        # Dask's own choice first: it takes the head of the constrained heap when it fits
        # (asking _resource_restrictions_satisfied above), else a ready task.
        ts = super()._next_ready_task()
        if ts is not None or not self.constrained:
            return ts
        # The head of the heap does not fit and nothing else is ready: a smaller GPU task
        # behind it may fit (no head-of-line blocking).
        plugin = self.plugins.get(PLUGIN_NAME)
        if plugin is None or plugin.ledger is None:
            return None
        candidate = plugin.pick_constrained(self)
        if candidate is not None:
            if candidate is self.constrained.peek():
                self.constrained.pop()  # keeps the heap free of stale entries
            else:
                self.constrained.discard(candidate)
        return candidate


def _wrap_release(transition: Any) -> Any:
    def wrapped(self: GPUAdmission, ts: TaskState, *args: Any, **kwargs: Any) -> Any:
        result = transition(self, ts, *args, **kwargs)
        plugin = self.plugins.get(PLUGIN_NAME)
        holds = getattr(plugin, "actor_holds", None)
        # The common case, answered without another call: no GPU actor ends here.
        if not holds or ts.key not in holds or ts.state == "memory":
            return result
        return self._end_actor_hold(plugin, ts, result)

    wrapped.__name__ = transition.__name__
    return wrapped


# Every way a task leaves "memory" or "executing" (released, erred, forgotten) ends an
# actor's hold on its devices.
GPUAdmission._TRANSITIONS_TABLE = {
    (start, finish): (
        _wrap_release(fn)
        if finish in ("released", "error", "forgotten") and start != "released"
        else fn
    )
    for (start, finish), fn in WorkerState._TRANSITIONS_TABLE.items()
}


@functools.cache
def _admission_class(base: type[WorkerState]) -> type[WorkerState]:
    if issubclass(base, GPUAdmission):
        return base
    if base is WorkerState:
        return GPUAdmission
    return type(f"GPU{base.__name__}", (GPUAdmission, base), {"__slots__": ()})


def _declared_gpus(state: WorkerState) -> float | None:
    """The declared GPU count, after renaming the lowercase ``gpu`` that env vars produce."""
    for resources in (state.total_resources, state.available_resources):
        if GPU not in resources and "gpu" in resources:
            resources[GPU] = resources.pop("gpu")
    return state.total_resources.get(GPU)


class GPUWorkerPlugin(WorkerPlugin):
    """Turns a worker's declared GPU count into leases on concrete devices.

    Registered on every worker by :class:`~dask_gpuresources.scheduler.GPUSchedulerPlugin`
    (or by ``client.register_plugin(GPUWorkerPlugin())``). With ``detect=True`` (the worker
    preload), a worker that declares no ``GPU`` resource counts its devices with NVML.

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
        self.ledger: DeviceLedger | None = None
        self.ids: tuple[int, ...] = ()
        self.tokens: tuple[str, ...] = ()
        self.worker: Any = None
        self._original_state_class: type[WorkerState] | None = None
        self._bypass_limit = 10.0
        self._blocked: tuple[Hashable, float] | None = None
        self.executor: IsolatedExecutor | None = None
        #: actor key -> GPU amount it holds for life
        self.actor_holds: dict[Hashable, Any] = {}
        #: actor key -> callable that ends the actor's resources (its child process)
        self._actor_finalizers: dict[Hashable, Any] = {}
        self._isolation = "thread"
        self._max_calls = 0
        self._readings: NVMLBackend | None = None  # NVML, when it sees this worker's GPUs

    def __getstate__(self) -> dict:
        # Only the configuration travels (the scheduler ships this plugin to every worker).
        return {"detect": self.detect, "nvml": self.nvml}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    # -- lifecycle ---------------------------------------------------------------------------

    async def setup(self, worker: Any) -> None:
        """Size the ledger, install per-device admission, and lease running tasks."""
        self.worker = worker
        self._bypass_limit = parse_timedelta(
            dask.config.get("gpuresources.worker.bypass-limit"), default="s"
        )
        state = worker.state
        count, tokens, uuid_index = self._resolve_devices(state)
        self.tokens = tuple(tokens)
        self.ids = tuple(physical_ids(tokens, uuid_index))
        self.ledger = DeviceLedger(count)

        if state.total_resources.get(GPU) != count:
            await self._set_gpu_count(count)

        self._original_state_class = type(state)
        state.__class__ = _admission_class(type(state))
        self._lease_running_tasks(state)
        self._setup_isolation(worker)
        worker.metrics[PLUGIN_NAME] = self._heartbeat
        worker.handlers[PLUGIN_NAME] = self.snapshot
        if count:
            logger.info(
                "Worker %s hands out %d GPU(s): %s", worker.address, count, ",".join(tokens)
            )

    def teardown(self, worker: Any) -> None:
        """Give the worker its stock admission back and forget the ledger."""
        if self._original_state_class is not None:
            worker.state.__class__ = self._original_state_class
            self._original_state_class = None
        worker.metrics.pop(PLUGIN_NAME, None)
        worker.handlers.pop(PLUGIN_NAME, None)
        if self.executor is not None:
            if worker.executors.get(EXECUTOR_NAME) is self.executor:
                del worker.executors[EXECUTOR_NAME]
            self.executor.shutdown(wait=False)
            self.executor = None
        self.ledger = None

    def _setup_isolation(self, worker: Any) -> None:
        mode = dask.config.get("gpuresources.isolation.mode")
        if mode not in ("thread", "process"):
            raise ValueError(
                f"gpuresources.isolation.mode must be 'thread' or 'process', got {mode!r}; "
                "use DASK_GPURESOURCES__ISOLATION__MODE=process"
            )
        self._isolation = mode
        self._max_calls = parse_max_calls(dask.config.get("gpuresources.isolation.max-calls"))
        memory = dask.config.get("gpuresources.isolation.recycle-gpu-memory")
        memory = None if memory is None else parse_bytes(memory)
        self.executor = IsolatedExecutor(
            resolve=self._isolated_run,
            worker_address=lambda: worker.address,
            max_workers=max(2 * worker.state.nthreads, 4),
            idle_timeout=parse_timedelta(
                dask.config.get("gpuresources.isolation.idle-timeout"), default="s"
            ),
            spare=bool(dask.config.get("gpuresources.isolation.spare")),
            preload=dask.config.get("gpuresources.isolation.preload"),
            nvml=None if memory is None else (self.nvml or default_backend()),
            recycle_gpu_memory=memory,
        )
        worker.executors[EXECUTOR_NAME] = self.executor

    def _resolve_devices(self, state: WorkerState) -> tuple[int, list[str], dict[str, int]]:
        declared = _declared_gpus(state)
        visible = visible_devices()
        if declared is None:
            if not self.detect:
                return 0, [], {}
            found = detect(self.nvml or default_backend(), visible)
            if found.reason:
                logger.info("No GPUs detected, so this worker offers GPU=0: %s", found.reason)
            else:
                self._readings = self.nvml or default_backend()
            return found.count, list(found.tokens), dict(found.uuid_index)

        if declared < 0 or declared != int(declared):
            raise DeviceCountError(
                f"a worker's GPU count must be a whole number of devices, got GPU={declared!r}; "
                f"use --resources GPU={max(int(declared), 0)}"
            )
        count = int(declared)
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

    async def _set_gpu_count(self, count: int) -> None:
        state = self.worker.state
        if self.worker.status in (Status.running, Status.paused):
            await self.worker.set_resources(**{GPU: count})
        else:  # not registered yet: the scheduler learns the count at registration
            old = state.total_resources.get(GPU, 0)
            state.total_resources[GPU] = count
            state.available_resources[GPU] = state.available_resources.get(GPU, 0) + count - old

    def _lease_running_tasks(self, state: WorkerState) -> None:
        for ts in list(state.executing | state.long_running):
            if ts.key in self.ledger:
                continue
            amount = gpu_amount(ts.resource_restrictions)
            if amount is None:
                continue
            if self.ledger.try_acquire(ts.key, amount) is None:
                logger.warning(
                    "Task %r was already running with GPU=%s when the plugin started and "
                    "no free device can hold it; it runs without a device lease",
                    ts.key,
                    ts.resource_restrictions.get(GPU),
                )

    # -- admission (called by GPUAdmission on the worker's event loop) -----------------------

    def pick_constrained(self, state: WorkerState) -> TaskState | None:
        """The highest-priority constrained task that can start now, if any.

        The head of the heap goes first when it fits. When it does not, later tasks that
        fit may pass it, until it has waited ``gpuresources.worker.bypass-limit``; from then
        on nothing passes it, so the devices drain until it fits.
        """
        head = state.constrained.peek()
        if state._resource_restrictions_satisfied(head):
            self._blocked = None
            return head
        now = time.monotonic()
        if self._blocked is None or self._blocked[0] != head.key:
            self._blocked = (head.key, now)
        elif now - self._blocked[1] > self._bypass_limit:
            return None

        smallest_misfit = gpu_amount(head.resource_restrictions)
        if smallest_misfit is not None and self.ledger.all_taken():
            return None
        for ts in state.constrained.sorted():
            if ts is head:
                continue
            amount = gpu_amount(ts.resource_restrictions)
            # Placement is monotonic in the amount: what did not fit excludes anything larger.
            if amount is not None and smallest_misfit is not None and amount >= smallest_misfit:
                continue
            if state._resource_restrictions_satisfied(ts):
                return ts
            if amount is not None:
                smallest_misfit = amount
        return None

    # -- isolation ---------------------------------------------------------------------------

    def route(self, ts: TaskState) -> None:
        """Send ``ts`` to the isolated executor if it (or the worker's config) asks for it.

        An explicit ``executor`` annotation wins; actors and async tasks always run in the
        worker (an actor must live there; an async task runs on its event loop). The
        worker's ``gpuresources.isolation.mode`` applies to GPU tasks; a task annotated
        ``isolation="process"`` is isolated even without a GPU (it then sees none).
        """
        annotations = ts.annotations or {}
        mode = annotations.get("isolation")
        if mode is None:  # most tasks: decided by the worker's mode (thread by default)
            if self._isolation != "process" or not gpu_amount(ts.resource_restrictions):
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
        lease = self.ledger.lease(key) if self.ledger is not None else None
        slots = lease.devices if lease is not None else ()
        return IsolatedRun(
            key=key,
            gpu_ids=tuple(sorted(self.ids[s] for s in slots)),
            tokens=tuple(self.tokens[s] for s in slots),
            max_calls=self._max_calls if max_calls is None else parse_max_calls(max_calls),
        )

    def on_actor_release(self, key: Hashable, finalizer: Any) -> None:
        """Call ``finalizer()`` when the actor ``key`` goes away (released, killed)."""
        self._actor_finalizers[key] = finalizer

    def actor_released(self, key: Hashable) -> None:
        finalizer = self._actor_finalizers.pop(key, None)
        if finalizer is not None:
            try:
                finalizer()
            except Exception:
                logger.exception("Ending actor %r failed", key)

    def transition(self, key: Hashable, start: str, finish: str, **kwargs: Any) -> None:
        # A cancelled isolated task: end its child now, so that its devices come back
        # at once instead of when the task would have finished.
        # (Dask reports the requested state, "released"; the task is left "cancelled".)
        if start == "executing" and finish in ("released", "cancelled") and self.executor:
            ts = self.worker.state.tasks.get(key)
            if ts is None or ts.state in ("cancelled", "released"):
                self.executor.abort(key, "was cancelled")

    # -- what the worker publishes -----------------------------------------------------------

    def snapshot(self) -> dict:
        """This worker's devices and their holders, as plain data.

        Returns
        -------
        dict
            ``{"devices": [{"id": int, "token": str, "holders": {key: share}}, ...]}`` with
            keys as strings and shares as floats.
        """
        ledger = self.ledger
        if ledger is None:
            return {"devices": []}
        holders = ledger.holders()
        state = self.worker.state if self.worker is not None else None
        return {
            "executing": len(state.executing) if state is not None else 0,
            "actors": [str(k) for k in self.actor_holds],
            "devices": [
                {
                    "id": self.ids[slot],
                    "token": self.tokens[slot],
                    "holders": {str(k): float(v) for k, v in holders[slot].items()},
                    **self._reading(slot),
                }
                for slot in range(ledger.n_devices)
            ],
        }

    def _reading(self, slot: int) -> dict:
        """NVML's memory and utilization for a device, when NVML sees it."""
        backend = self._readings
        if backend is None:
            return {}
        try:
            index = int(self.ids[slot])
            return {
                "memory_used": backend.memory_used(index),
                "utilization": backend.utilization(index),
            }
        except Exception as err:  # NVML lost, or a logical device NVML does not have
            logger.info("Not reading GPU memory and utilization any more: %s", err)
            self._readings = None
            return {}

    def _heartbeat(self, worker: Any) -> dict:
        return self.snapshot()

    def ids_for(self, key: Hashable) -> list[int]:
        """The physical ids leased to ``key`` (sorted), ``[]`` if it holds none."""
        lease = self.ledger.lease(key) if self.ledger is not None else None
        if lease is None:
            return []
        ids = self.ids
        return sorted([ids[slot] for slot in lease.devices])

    def tokens_for(self, key: Hashable) -> list[str]:
        """The ``CUDA_VISIBLE_DEVICES`` entries leased to ``key``, in device order."""
        lease = self.ledger.lease(key) if self.ledger is not None else None
        if lease is None:
            return []
        return [self.tokens[slot] for slot in lease.devices]


def _running_task() -> tuple[Any, Hashable]:
    try:
        worker = get_worker()
    except ValueError:
        raise NoLeaseError(
            "get_gpu_ids() was called outside a Dask task; call it inside a function you "
            "submit, e.g. client.submit(train, resources={'GPU': 1})"
        ) from None
    key = getattr(thread_state, "key", None)
    if key is None:
        raise NoLeaseError(
            "get_gpu_ids() cannot tell which task is running here (async tasks run on the "
            "worker's event loop); call it from a regular (sync) task function"
        )
    return worker, key


def lease_of_running_task() -> tuple[GPUWorkerPlugin, Hashable]:
    """The worker plugin of the task running on this thread, and that task's key."""
    worker, key = _running_task()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, GPUWorkerPlugin) or plugin.ledger is None:
        raise NoLeaseError(
            f"worker {worker.address} runs without dask_gpuresources; start the scheduler "
            "with `dask scheduler --preload dask_gpuresources` or call "
            "dask_gpuresources.install(client)"
        )
    return plugin, key
