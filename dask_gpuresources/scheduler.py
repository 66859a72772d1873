"""The scheduler side: equips every worker, rejects impossible requests, places GPU work.

:class:`GPUSchedulerPlugin` is installed by ``dask scheduler --preload dask_gpuresources``
or by :func:`dask_gpuresources.install`. It

- registers :class:`~dask_gpuresources.worker.GPUWorkerPlugin` on every present and future
  worker (the pattern of Dask's own shuffle extension);
- validates GPU requests as they are submitted: a bad amount, or one no worker can ever
  hold, fails that task at once with an error that says why (``gpuresources.infeasible``
  chooses waiting instead, for clusters that scale up);
- places GPU tasks where devices are free, by adding each worker's GPU backlog in front of
  Dask's own worker objective, and moves GPU work queued behind busy devices to workers
  whose devices are idle, through Dask's safe work-stealing protocol;
- serves the cluster-wide allocation table (from the workers' heartbeats) through the
  ``gpuresources_allocations`` handler;
- notices workers on one host that hand out the same physical devices (two
  ``dask worker --resources GPU=2`` without ``CUDA_VISIBLE_DEVICES``) and warns once per
  host, or refuses the later worker's GPUs (``gpuresources.scheduler.overlap``). Workers
  report their devices through the ``gpuresources_devices`` handler when their plugin
  starts, and in every heartbeat.

This module holds the plugin's lifecycle (``start``/``close``) and the validation of
submitted requests; the rest is split by concern into parts the plugin class is made of:
:mod:`._placement` (GPU load, placement, rebalancing), :mod:`._table` (the allocation table
and its handlers) and :mod:`._overlap` (workers of one host that share devices).
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import Hashable
from typing import Any

from dask.utils import parse_timedelta
from distributed import SchedulerPlugin
from distributed.protocol.pickle import dumps
from tornado.ioloop import PeriodicCallback

from . import (
    _config,  # _config.get: reads with the yaml's defaults as fallback
    _dask_internals,
)
from ._names import EXTENSION, GPU, PLUGIN_NAME
from ._overlap import OVERLAP_POLICIES, Overlap, OverlapChecks, overlaps
from ._placement import UNITS, Placement
from ._requests import check_annotations, format_amount, gpu_request
from ._table import AllocationTable
from .exceptions import InfeasibleRequestError, InvalidRequestError
from .worker import GPUWorkerPlugin

__all__ = [
    "DEVICES_HANDLER",
    "HANDLER",
    "HOLD_ENDED_HANDLER",
    "GPUSchedulerPlugin",
    "Overlap",
    "SchedulerState",
    "overlaps",
]

# A child of "distributed" so that our lines appear in worker and scheduler logs with
# Dask's own format and levels (the logging.distributed config).
logger = logging.getLogger("distributed.gpuresources")

#: Name of the scheduler handler that serves the allocation table.
HANDLER = "gpuresources_allocations"
#: Name of the scheduler handler through which a worker reports its devices.
DEVICES_HANDLER = "gpuresources_devices"
#: Name of the scheduler handler through which a worker reports that a live actor's hold
#: ended without its key being released (its isolated child process died).
HOLD_ENDED_HANDLER = "gpuresources_hold_ended"


_HANDLER_METHODS = {
    HANDLER: "allocations_handler",
    f"{HANDLER}_table": "table_handler",
    DEVICES_HANDLER: "devices_handler",
    HOLD_ENDED_HANDLER: "hold_ended_handler",
}


# What a plugin instance hands on to the next one registered on the same scheduler: what
# the scheduler's own state cannot tell again (errors of rejected requests, devices workers
# reported, GPUs refused for overlap, moves under way, warnings given). The GPU load and the
# actors' holds are rebuilt from the scheduler's tasks instead, which stay true whatever
# transitions happened while no instance was listening.
_ADOPTED = (
    "_rejected",
    "_moving",
    "_devices",
    "_shared",
    "_warned_hosts",
    "_refused",
    "_warned_shapes",
    "_ended_holds",
)


class SchedulerState:
    """What outlives a :class:`GPUSchedulerPlugin` instance: ``scheduler.extensions`` holds
    it under ``"gpuresources"``.

    Dask replaces a plugin registered again under its name without closing it, and keeps
    both when the second has another name; the instance that starts last takes this state
    over and retires the one before it (its periodic rebalancer stopped, its hooks inert).
    """

    def __init__(self) -> None:
        self.plugin: GPUSchedulerPlugin | None = None  # the instance in charge
        self.shared: dict[str, Any] = {}

    def teardown(self) -> None:
        """Dask calls this when the scheduler closes: no rebalancer outlives it."""
        if self.plugin is not None:
            self.plugin._stop_callbacks()


def _inert(*args: Any, **kwargs: Any) -> None:
    return None


def _is_gpu_task(ts: Any) -> bool:
    restrictions = ts.resource_restrictions
    return bool(restrictions and restrictions.get(GPU))


class GPUSchedulerPlugin(AllocationTable, Placement, OverlapChecks, SchedulerPlugin):
    """Scheduler plugin of dask_gpuresources (see the module docstring).

    Parameters
    ----------
    worker_plugin
        The worker plugin to register on every worker; ``None`` uses
        ``GPUWorkerPlugin()``.

    Examples
    --------
    >>> client.register_plugin(GPUSchedulerPlugin())  # doctest: +SKIP
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, *, worker_plugin: GPUWorkerPlugin | None = None) -> None:
        self.worker_plugin = worker_plugin if worker_plugin is not None else GPUWorkerPlugin()
        self.scheduler: Any = None
        # key -> (worker address, units) for GPU tasks in processing; load = their sum per worker
        self._processing: dict[Hashable, tuple[str, int]] = {}
        self._load: dict[str, int] = {}
        self._rejected: dict[Hashable, Exception] = {}
        # actor key -> (worker address, units): GPU actors hold their devices for life
        self._actor_holds: dict[Hashable, tuple[str, int]] = {}
        #: live actors whose worker reported their hold ended (a dead isolated child): the
        #: scheduler's tasks still show them, so a rebuild must not count them again
        self._ended_holds: set[Hashable] = set()
        self._held: dict[str, int] = {}  # worker -> units its actors hold
        # worker -> {key: units} of GPU requests there that its actors leave too little
        # room to start; and the workers whose holds changed, to be re-examined
        self._stranded: dict[str, dict[Hashable, int]] = {}
        self._restrand: set[str] = set()
        self._warned_shapes: set[str] = set()
        self._warned_empty = False
        # what undoes each change start() made to the scheduler, in the order made
        self._undos: list[Any] = []
        self._overloaded: set[str] = set()
        # placement's index: capacity units -> {free units -> workers}, each worker's place,
        # and the workers whose place is to be updated before the index answers
        self._levels: dict[int, dict[int, set]] = {}
        self._levels_of: dict[str, tuple[int, int, Any]] = {}
        self._stale: set[str] = set()
        self._rebalance_soon = False
        self._rebalancer: PeriodicCallback | None = None
        self._retired = False  # another instance took over (see SchedulerState)
        self._stealing: Any = None
        # GPU tasks rebalance() asked Dask's stealing to move, until the move is settled
        self._moving: set[Hashable] = set()
        # worker -> (host, device tokens, NVML UUIDs), in the order workers reported them
        self._devices: dict[str, tuple[str, tuple[str, ...], tuple[str | None, ...]]] = {}
        # worker -> {token of its device: [other workers of its host with that device]}
        self._shared: dict[str, dict[str, list[str]]] = {}
        self._warned_hosts: set[str] = set()
        # worker -> the GPU capacity it declared, while its GPUs are refused (overlap: raise)
        self._refused: dict[str, float] = {}
        # the round of questions to the workers under way (table refreshes share it)
        self._refreshing: asyncio.Future | None = None
        self._refreshed_at = 0.0

    def __getstate__(self) -> dict:
        return {"worker_plugin": self.worker_plugin}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, scheduler: Any) -> None:
        """Install handlers and placement, then equip every worker."""
        policy = _config.get("gpuresources.scheduler.overlap")
        if policy not in OVERLAP_POLICIES:
            raise ValueError(
                "gpuresources.scheduler.overlap must be 'warn', 'raise' or 'ignore', got "
                f"{policy!r}; use DASK_GPURESOURCES__SCHEDULER__OVERLAP=warn"
            )
        self.scheduler = scheduler
        self._take_over(scheduler)
        undos = self._undos
        for name, method in _HANDLER_METHODS.items():
            undos.append(
                _dask_internals.set_scheduler_handler(scheduler, name, getattr(self, method))
            )
        from ._http import bokeh_pages, install_routes

        install_routes(scheduler, self)
        # Only a scheduler that serves Dask's dashboard gets the page (and imports Bokeh):
        # Bokeh's modules would double the scheduler's heap, and every full garbage
        # collection would walk them.
        if bokeh_pages(scheduler) is not None:
            try:
                from .dashboard import install_page

                install_page(scheduler, self)
            except Exception:
                logger.exception("Could not add the GPU allocations page to the dashboard")
        for addr in list(scheduler.workers):
            self.add_worker(scheduler=scheduler, worker=addr)
        self._rebuild()

        if _config.get("gpuresources.scheduler.placement"):
            # GPU tasks are offered only the workers with the least device backlog, and
            # Dask's own objective chooses among those.
            undos.append(
                _dask_internals.wrap_scheduler_method(
                    scheduler, "valid_workers", self._valid_workers
                )
            )
            stealing = _dask_internals.stealing_extension(scheduler)
            if stealing is not None:
                # Dask's stealing balances thread occupancy and does not see devices: it
                # moves GPU tasks from a worker with 8 busy devices to one with 1 (and
                # back). GPU tasks are balanced by rebalance() instead.
                undos.append(_dask_internals.keep_out_of_stealing(stealing, _is_gpu_task))
                self._stealing = stealing
                # GPU tasks made stealable before the plugin started are not any more: from
                # here on, only rebalance() moves GPU tasks, and it knows which.
                for key in list(self._processing):
                    ts = scheduler.tasks.get(key)
                    if ts is not None:
                        _dask_internals.remove_from_stealing(stealing, ts)
        # Adaptive scale-down (and retire_workers(n=...)) asks the scheduler which workers
        # to close: never one that hosts a GPU actor, which would die with it.
        undos.append(
            _dask_internals.wrap_scheduler_method(
                scheduler, "workers_to_close", self.workers_to_close
            )
        )
        # A worker that sets its resources again (Worker.set_resources) changes its GPU
        # capacity: placement's index follows.
        undo = _dask_internals.wrap_scheduler_handler(
            scheduler, "set_resources", self.set_resources
        )
        if undo is not None:
            undos.append(undo)
        interval = parse_timedelta(
            _config.get("gpuresources.scheduler.rebalance-interval"), default="ms"
        )
        if interval:
            self._rebalancer = PeriodicCallback(self.rebalance, interval * 1000)
            self._rebalancer.start()

        await scheduler.register_worker_plugin(
            None, dumps(self.worker_plugin), name=PLUGIN_NAME, idempotent=True
        )
        # Transitions during the await reached no instance of ours if one was retired
        # above; Dask adds this instance to its plugins right after start() returns, with
        # no await in between.
        self._rebuild()

    def _take_over(self, scheduler: Any) -> None:
        """Adopt the state an earlier instance kept, and retire that instance."""
        state = _dask_internals.scheduler_extension(scheduler, EXTENSION)
        if not isinstance(state, SchedulerState):
            state = SchedulerState()
            _dask_internals.set_scheduler_extension(scheduler, EXTENSION, state)
        old = state.plugin
        if old is not None and old is not self:
            old._retire()
        for name in _ADOPTED:
            if name in state.shared:
                setattr(self, name, state.shared[name])
            else:
                state.shared[name] = getattr(self, name)
        state.plugin = self

    def _rebuild(self) -> None:
        """GPU load and actor holds, from the scheduler's tasks as they stand."""
        for mapping in (
            self._processing,
            self._load,
            self._held,
            self._stranded,
            self._actor_holds,
            self._levels,
            self._levels_of,
        ):
            mapping.clear()
        self._restrand.clear()
        self._overloaded.clear()
        scheduler = self.scheduler
        self._stale = set(scheduler.workers)
        processing = []
        for key, ts in scheduler.tasks.items():
            if ts.state == "processing":
                processing.append(ts)
            elif ts.actor and ts.state == "memory" and ts.who_has and key not in self._ended_holds:
                restrictions = ts.resource_restrictions
                value = restrictions.get(GPU) if restrictions else None
                if value:
                    addr = next(iter(ts.who_has)).address
                    units = round(value * UNITS)
                    self._add_load(addr, units)
                    self._hold(key, addr, units)
        for ts in processing:
            self._enter_processing(ts)
        self._restrand.update(self._held)
        for key in list(self._rejected):
            ts = scheduler.tasks.get(key)
            if ts is not None and ts.state == "no-worker":
                scheduler.loop.add_callback(self._fail_rejected, key)

    def _stop_callbacks(self) -> None:
        if self._rebalancer is not None:
            self._rebalancer.stop()
            self._rebalancer = None

    def _retire(self) -> None:
        """Hand over to the instance registered after this one: stop the periodic
        rebalancer, undo what :meth:`start` installed, and answer Dask's hooks with
        nothing (Dask still calls them on an instance registered under another name)."""
        self._undo(restore=False)
        self._retired = True
        for hook in ("transition", "update_graph", "add_worker", "remove_worker", "log_event"):
            setattr(self, hook, _inert)

    async def close(self) -> None:
        """Undo :meth:`start`."""
        if self._retired:
            return
        self._undo(restore=True)
        if self.scheduler is not None:
            state = _dask_internals.scheduler_extension(self.scheduler, EXTENSION)
            if isinstance(state, SchedulerState) and state.plugin is self:
                state.plugin = None

    def _undo(self, *, restore: bool) -> None:
        self._stop_callbacks()
        if self.scheduler is None:
            return
        while self._undos:  # the last change first: each undo finds what it installed
            self._undos.pop()()
        self._stealing = None
        if restore:
            for addr in list(self._refused):
                self._restore_gpus(addr)
        from ._http import uninstall_routes

        uninstall_routes(self.scheduler, self)
        if f"{__package__}.dashboard" in sys.modules:  # else no page was ever installed
            from .dashboard import uninstall_page

            uninstall_page(self.scheduler)

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """Rename the lowercase ``gpu`` resource; check the worker's devices for overlap."""
        ws = scheduler.workers.get(worker)
        if ws is None:
            return
        if GPU not in ws.resources and "gpu" in ws.resources:
            _dask_internals.rename_worker_resource(scheduler, worker, "gpu", GPU)
        self._stale.add(worker)
        # Devices reported before the worker was added (a plugin set up before it
        # registered), or in the metrics it registered with.
        if worker in self._devices:
            self._check_host(self._devices[worker][0])
        else:
            self._record_from_heartbeat(worker, ws)

    def set_resources(self, original: Any, **msg: Any) -> Any:
        """Dask's ``set_resources`` handler, then the worker's new capacity in placement."""
        result = original(**msg)
        self._stale.add(msg["worker"])
        return result

    def workers_to_close(
        self, original: Any, *args: Any, attribute: str = "address", **kwargs: Any
    ) -> list:
        """Dask's choice of workers to close for scale-down (``original``), less those
        hosting GPU actors.

        Dask does not look at actors there, and an actor dies with its worker; a GPU actor
        holds its devices for its whole life, as in Ray, so its worker stays.
        """
        chosen = original(*args, attribute=attribute, **kwargs)
        hosts = {addr for addr, _ in self._actor_holds.values()}
        if not hosts:
            return chosen
        keep = {
            getattr(self.scheduler.workers[a], attribute)
            for a in hosts
            if a in self.scheduler.workers
        }
        return [w for w in chosen if w not in keep]

    def remove_worker(
        self, scheduler: Any, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        """Forget the worker's GPU load and devices; its leases died with it."""
        self._load.pop(worker, None)
        self._held.pop(worker, None)
        self._stranded.pop(worker, None)
        self._restrand.discard(worker)
        self._stale.discard(worker)
        self._index(worker, None)  # out of placement's index
        self._overloaded.discard(worker)
        self._refused.pop(worker, None)
        record = self._devices.pop(worker, None)
        if record is not None:
            self._check_host(record[0], gone=worker)

    # -- submission ----------------------------------------------------------------------------

    def update_graph(self, scheduler: Any, *, tasks: list, **kwargs: Any) -> None:
        """Validate and normalise the GPU requests of newly submitted tasks."""
        largest: tuple[int, str | None] | None = None
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is None or ts.state != "released":
                continue
            if ts.annotations and ("isolation" in ts.annotations or "max_calls" in ts.annotations):
                try:
                    check_annotations(ts.annotations)
                except InvalidRequestError as e:
                    self._reject(ts, e)
                    continue
            if not ts.resource_restrictions:
                continue
            restrictions = ts.resource_restrictions
            if GPU not in restrictions:
                if "gpu" not in restrictions:
                    continue
                restrictions = dict(restrictions)
                restrictions[GPU] = restrictions.pop("gpu")
                _dask_internals.set_task_restrictions(ts, restrictions)
            try:
                amount, devices = gpu_request(restrictions[GPU])
            except InvalidRequestError as e:
                self._reject(ts, e)
                continue
            if not amount:
                continue
            exact = float(amount)
            if restrictions[GPU] != exact:
                # One representation end to end: what workers (and Dask's books) see is the
                # amount the ledger will lease, a whole number of 1/10000 units.
                _dask_internals.set_task_restrictions(ts, {**restrictions, GPU: exact})
            if largest is None:
                largest = self._largest_worker()
            if largest[0] >= devices:
                continue
            if not scheduler.workers:
                # A cluster with no worker yet (an adaptive or job-queue cluster scaling up)
                # cannot judge the request: it waits in no-worker, as any Dask task does.
                if not self._warned_empty:
                    self._warned_empty = True
                    logger.info(
                        "GPU tasks wait for workers: the cluster has none yet, so their "
                        "requests are judged by the workers that join"
                    )
                continue
            error = InfeasibleRequestError(key, format_amount(amount), *largest)
            if _config.get("gpuresources.infeasible") == "wait":
                shape = format_amount(amount)
                if shape not in self._warned_shapes:
                    self._warned_shapes.add(shape)
                    logger.warning("Waiting for a worker that can hold it: %s", error)
            else:
                self._reject(ts, error)

    def _largest_worker(self) -> tuple[int, str | None]:
        capacity = self.scheduler.resources.get(GPU, {})
        if not capacity:
            return 0, None
        addr = max(capacity, key=capacity.__getitem__)
        count = int(capacity[addr])
        return count, (addr if count else None)

    def _reject(self, ts: Any, error: Exception) -> None:
        # No worker offers infinite GPUs, so Dask sends the task to no-worker, where
        # transition() fails it with our error.
        self._rejected[ts.key] = error
        _dask_internals.set_task_restrictions(
            ts, {**(ts.resource_restrictions or {}), GPU: math.inf}
        )

    def _fail_rejected(self, key: Hashable) -> None:
        error = self._rejected.pop(key, None)
        ts = self.scheduler.tasks.get(key)
        if error is None or ts is None or ts.state != "no-worker":
            return
        _dask_internals.fail_task(
            self.scheduler, key, error, stimulus_id=f"gpuresources-reject-{key}"
        )

    def log_event(self, topic: str, msg: Any) -> None:
        """Follow a move of Dask's work stealing the moment it is enacted."""
        if topic == "stealing" and self._moving:
            key = _dask_internals.steal_confirmed(msg)
            if key is not None and key in self._moving:
                self._steal_confirmed(key)

    def transition(
        self, key: Hashable, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        """Track each worker's GPU load; fail rejected requests once they wait."""
        # Dask calls this for every transition of every task: the common cases come first
        # and cost a comparison or two.
        if finish == "processing":
            ts = self.scheduler.tasks.get(key)
            if ts is not None:
                self._enter_processing(ts)
        elif start == "processing":
            record = self._processing.pop(key, None)
            if record is not None:
                if self._moving:
                    self._moving.discard(key)
                if self._stranded:
                    self._unstrand(key, record[0])
                ts = self.scheduler.tasks.get(key) if finish == "memory" else None
                if ts is not None and ts.actor:
                    # Dask frees an actor's resources once its constructor returns; its
                    # devices stay held (and counted in placement) until it goes away.
                    self._hold(key, *record)
                else:
                    self._exit_processing(*record)
        elif start == "memory":
            if self._actor_holds and key in self._actor_holds:
                # the actor was released, killed, or lost with its worker
                self._unhold(key)
            elif self._ended_holds:
                self._ended_holds.discard(key)
        if self._rejected:
            if finish == "no-worker" and key in self._rejected:
                self.scheduler.loop.add_callback(self._fail_rejected, key)
            elif finish == "forgotten":
                self._rejected.pop(key, None)
