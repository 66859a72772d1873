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
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

from dask.utils import parse_timedelta
from distributed import SchedulerPlugin
from distributed.comm import get_address_host
from distributed.protocol.pickle import dumps
from tornado.ioloop import PeriodicCallback

from . import _config  # _config.get: reads with the yaml's defaults as fallback
from ._requests import check_annotations, format_amount, gpu_request
from .exceptions import InfeasibleRequestError, InvalidRequestError
from .worker import GPU, PLUGIN_NAME, GPUWorkerPlugin

__all__ = ["DEVICES_HANDLER", "HANDLER", "GPUSchedulerPlugin", "Overlap", "overlaps"]

# A child of "distributed" so that our lines appear in worker and scheduler logs with
# Dask's own format and levels (the logging.distributed config).
logger = logging.getLogger("distributed.gpuresources")

#: Name of the scheduler handler that serves the allocation table.
HANDLER = "gpuresources_allocations"
#: Name of the scheduler handler through which a worker reports its devices.
DEVICES_HANDLER = "gpuresources_devices"

OVERLAP_POLICIES = ("warn", "raise", "ignore")

# GPU load is summed in integer units of 1/10000 device (Ray's precision), so that
# thousands of fractional tasks entering and leaving processing never drift.
_UNITS = 10_000


class Overlap(NamedTuple):
    """Two workers of one host that hand out the same physical devices.

    ``first`` reported its devices before ``second``; ``shared`` pairs the device tokens
    (``CUDA_VISIBLE_DEVICES`` entries) of ``first`` and ``second`` that name one device.
    """

    host: str
    first: str
    second: str
    shared: tuple[tuple[str, str], ...]


def _is_uuid(token: str) -> bool:
    return token.startswith(("GPU-", "MIG-"))


def _same_device(a: tuple[str, str | None], b: tuple[str, str | None]) -> bool:
    (token_a, uuid_a), (token_b, uuid_b) = a, b
    if uuid_a and uuid_b:
        # NVML's UUIDs decide: two containers of one host may both call different GPUs "0"
        return uuid_a == uuid_b
    if token_a == token_b:
        return True
    # an abbreviated UUID in CUDA_VISIBLE_DEVICES names the device whose UUID it begins
    return bool(
        (uuid_a and _is_uuid(token_b) and uuid_a.startswith(token_b))
        or (uuid_b and _is_uuid(token_a) and uuid_b.startswith(token_a))
    )


def overlaps(
    workers: Mapping[str, tuple[str, Sequence[str], Sequence[str | None]]],
) -> list[Overlap]:
    """The pairs of workers of one host whose devices are the same physical devices.

    Parameters
    ----------
    workers
        ``{address: (host, tokens, uuids)}`` in the order the workers reported their
        devices: ``tokens`` are the worker's ``CUDA_VISIBLE_DEVICES`` entries (``"0"``,
        ``"GPU-8f3e..."``), ``uuids`` NVML's UUID of each device, ``None`` where unknown.
        Two devices are one when both UUIDs are known and equal, or, where a UUID is
        unknown, when the tokens are equal (or one is the beginning of the other's UUID).

    Returns
    -------
    list of Overlap
        One per overlapping pair, the earlier worker first; ``[]`` when none overlap.

    Examples
    --------
    >>> overlaps({
    ...     "tcp://10.0.0.1:4001": ("10.0.0.1", ["0", "1"], [None, None]),
    ...     "tcp://10.0.0.1:4002": ("10.0.0.1", ["1", "2"], [None, None]),
    ...     "tcp://10.0.0.2:4001": ("10.0.0.2", ["0", "1"], [None, None]),
    ... })  # doctest: +NORMALIZE_WHITESPACE
    [Overlap(host='10.0.0.1', first='tcp://10.0.0.1:4001', second='tcp://10.0.0.1:4002',
             shared=(('1', '1'),))]

    NVML's UUIDs tell devices apart that share a token, and join devices named differently:

    >>> overlaps({
    ...     "tcp://h:1": ("h", ["0", "1"], ["GPU-aaaa", "GPU-bbbb"]),
    ...     "tcp://h:2": ("h", ["0", "GPU-aa"], ["GPU-cccc", None]),
    ... })  # doctest: +NORMALIZE_WHITESPACE
    [Overlap(host='h', first='tcp://h:1', second='tcp://h:2', shared=(('0', 'GPU-aa'),))]
    """
    by_host: dict[str, list[tuple[str, list[tuple[str, str | None]]]]] = {}
    for addr, (host, tokens, uuids) in workers.items():
        uuids = (list(uuids) + [None] * len(tokens))[: len(tokens)]
        by_host.setdefault(host, []).append((addr, list(zip(tokens, uuids, strict=True))))
    out = []
    for host, members in by_host.items():
        for i, (first, devices_a) in enumerate(members):
            for second, devices_b in members[i + 1 :]:
                shared = tuple(
                    (a[0], b[0]) for a in devices_a for b in devices_b if _same_device(a, b)
                )
                if shared:
                    out.append(Overlap(host, first, second, shared))
    return out


def _device_names(shared: Sequence[tuple[str, str]]) -> str:
    return ", ".join(a if a == b else f"{a} (= {b})" for a, b in shared)


_OVERLAP_FIX = (
    "Give each worker its own devices with CUDA_VISIBLE_DEVICES, e.g. "
    "`CUDA_VISIBLE_DEVICES=0,1 dask worker ...` and `CUDA_VISIBLE_DEVICES=2,3 dask worker "
    "...`, or start the workers with dask_gpuresources.init(num_gpus=...) or "
    "`dask gpuresources start --nworkers N`, which split the devices among them"
)


_HANDLER_METHODS = {
    HANDLER: "allocations_handler",
    f"{HANDLER}_table": "table_handler",
    DEVICES_HANDLER: "devices_handler",
}


class GPUSchedulerPlugin(SchedulerPlugin):
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
        self._warned_shapes: set[str] = set()
        self._warned_empty = False
        self._workers_to_close: Any = None  # the scheduler's own, while ours stands in
        self._overloaded: set[str] = set()
        self._rebalance_soon = False
        self._rebalancer: PeriodicCallback | None = None
        self._placement = False
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
        scheduler.handlers[HANDLER] = self.allocations_handler
        scheduler.handlers[f"{HANDLER}_table"] = self.table_handler
        scheduler.handlers[DEVICES_HANDLER] = self.devices_handler
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
        for ts in scheduler.tasks.values():
            if ts.state == "processing":
                self._enter_processing(ts)

        if _config.get("gpuresources.scheduler.placement"):
            # The scheduler looks this method up on the instance for every placement: GPU
            # tasks are offered only the workers with the least device backlog, and Dask's
            # own objective chooses among those.
            scheduler.valid_workers = self._valid_workers
            self._placement = True
            stealing = scheduler.extensions.get("stealing")
            if stealing is not None:
                # Dask's stealing balances thread occupancy and does not see devices: it
                # moves GPU tasks from a worker with 8 busy devices to one with 1 (and
                # back). GPU tasks are balanced by rebalance() instead.
                original = type(stealing).put_key_in_stealable

                def put_key_in_stealable(ts: Any) -> None:
                    restrictions = ts.resource_restrictions
                    if not restrictions or not restrictions.get(GPU):
                        original(stealing, ts)

                stealing.put_key_in_stealable = put_key_in_stealable
                self._stealing = stealing
                # GPU tasks made stealable before the plugin started are not any more: from
                # here on, only rebalance() moves GPU tasks, and it knows which.
                for key in list(self._processing):
                    ts = scheduler.tasks.get(key)
                    if ts is not None:
                        stealing.remove_key_from_stealable(ts)
        # Adaptive scale-down (and retire_workers(n=...)) asks the scheduler which workers
        # to close: never one that hosts a GPU actor, which would die with it.
        self._workers_to_close = scheduler.workers_to_close
        scheduler.workers_to_close = self.workers_to_close
        if "workers_to_close" in scheduler.handlers:
            scheduler.handlers["workers_to_close"] = self.workers_to_close
        interval = parse_timedelta(
            _config.get("gpuresources.scheduler.rebalance-interval"), default="ms"
        )
        if interval:
            self._rebalancer = PeriodicCallback(self.rebalance, interval * 1000)
            self._rebalancer.start()

        await scheduler.register_worker_plugin(
            None, dumps(self.worker_plugin), name=PLUGIN_NAME, idempotent=True
        )

    async def close(self) -> None:
        """Undo :meth:`start`."""
        if self._rebalancer is not None:
            self._rebalancer.stop()
            self._rebalancer = None
        if self.scheduler is None:
            return
        if self._placement and self.scheduler.__dict__.get("valid_workers") is not None:
            del self.scheduler.valid_workers
            self._placement = False
        if self._stealing is not None:
            self._stealing.__dict__.pop("put_key_in_stealable", None)
            self._stealing = None
        if self._workers_to_close is not None:
            if self.scheduler.__dict__.get("workers_to_close") == self.workers_to_close:
                del self.scheduler.workers_to_close
            if self.scheduler.handlers.get("workers_to_close") == self.workers_to_close:
                self.scheduler.handlers["workers_to_close"] = self._workers_to_close
            self._workers_to_close = None
        for name in (HANDLER, f"{HANDLER}_table", DEVICES_HANDLER):
            if self.scheduler.handlers.get(name) == getattr(self, _HANDLER_METHODS[name]):
                del self.scheduler.handlers[name]
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
            scheduler.remove_resources(worker)
            ws.resources[GPU] = ws.resources.pop("gpu")
            scheduler.add_resources(worker)
        # Devices reported before the worker was added (a plugin set up before it
        # registered), or in the metrics it registered with.
        if worker in self._devices:
            self._check_host(self._devices[worker][0])
        else:
            self._record_from_heartbeat(worker, ws)

    def workers_to_close(self, *args: Any, attribute: str = "address", **kwargs: Any) -> list:
        """Dask's choice of workers to close for scale-down, less those hosting GPU actors.

        Dask does not look at actors there, and an actor dies with its worker; a GPU actor
        holds its devices for its whole life, as in Ray, so its worker stays.
        """
        chosen = self._workers_to_close(*args, attribute=attribute, **kwargs)
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
        self._overloaded.discard(worker)
        self._refused.pop(worker, None)
        record = self._devices.pop(worker, None)
        if record is not None:
            self._check_host(record[0], gone=worker)

    # -- devices of one host used twice ------------------------------------------------------

    def devices_handler(
        self, worker: str, tokens: list[str], uuids: list[str | None] | None = None
    ) -> None:
        """Record the devices ``worker`` hands out and check its host for overlap.

        ``tokens`` are the worker's ``CUDA_VISIBLE_DEVICES`` entries, one per device it
        hands out; ``uuids`` NVML's UUID of each, ``None`` where unknown. A worker the
        scheduler does not know yet is checked once it is added.
        """
        tokens = [str(t) for t in tokens]
        uuids = list(uuids or ())
        uuids = [None if u is None else str(u) for u in uuids[: len(tokens)]]
        uuids += [None] * (len(tokens) - len(uuids))
        ws = self.scheduler.workers.get(worker) if self.scheduler is not None else None
        host = ws.host if ws is not None else get_address_host(worker)
        # a worker that reports again keeps its place in the order (who came first)
        self._devices[worker] = (host, tuple(tokens), tuple(uuids))
        if ws is not None:
            self._check_host(host)

    def _record_from_heartbeat(self, addr: str, ws: Any) -> None:
        snap = ws.metrics.get(PLUGIN_NAME)
        if not isinstance(snap, dict):
            return
        devices = snap.get("devices")
        if devices:
            self._devices[addr] = (
                ws.host,
                tuple(str(d.get("token", d.get("id"))) for d in devices),
                tuple(d.get("uuid") for d in devices),
            )
            self._check_host(ws.host)

    def _sync_devices(self) -> None:
        """Record the devices of workers that only their heartbeats told about."""
        devices = self._devices
        for addr, ws in self.scheduler.workers.items():
            if addr not in devices:
                self._record_from_heartbeat(addr, ws)
        for addr in list(self._refused):
            # a worker that sets its resources again gets its GPUs refused again
            ws = self.scheduler.workers.get(addr)
            if ws is not None and ws.resources.get(GPU, 0):
                self._refused[addr] = ws.resources[GPU]
                self._set_gpu_capacity(addr, 0)

    def _check_host(self, host: str, gone: str | None = None) -> None:
        """Recompute which workers of ``host`` share devices; warn or refuse (policy)."""
        workers = self.scheduler.workers
        members = {
            addr: record
            for addr, record in self._devices.items()
            if record[0] == host and addr != gone and addr in workers
        }
        for addr in list(self._shared):
            if addr in members or addr == gone:
                del self._shared[addr]
        found = overlaps(members)
        for pair in found:
            for me, other, mine in (
                (pair.first, pair.second, 0),
                (pair.second, pair.first, 1),
            ):
                shared = self._shared.setdefault(me, {})
                for tokens in pair.shared:
                    shared.setdefault(tokens[mine], []).append(other)
        if not found:
            self._warned_hosts.discard(host)  # resolved: a later overlap here warns again
        policy = _config.get("gpuresources.scheduler.overlap")
        if policy == "raise":
            self._refuse_later_workers(host, members, found)
        elif found and policy != "ignore" and host not in self._warned_hosts:
            self._warned_hosts.add(host)
            text = "; ".join(
                f"{p.first} and {p.second} both hand out GPU device(s) {_device_names(p.shared)}"
                for p in found
            )
            logger.warning(
                "Workers on host %s use the same physical GPUs twice: %s. %s "
                "(gpuresources.scheduler.overlap: raise refuses the later worker's GPUs, "
                "ignore silences this).",
                host,
                text,
                _OVERLAP_FIX,
            )
            self.scheduler.log_event(
                PLUGIN_NAME,
                {
                    "action": "overlapping-devices",
                    "host": host,
                    "policy": policy,
                    "overlaps": [
                        {"workers": [p.first, p.second], "devices": [list(d) for d in p.shared]}
                        for p in found
                    ],
                    "fix": _OVERLAP_FIX,
                },
            )
        if policy != "raise":
            for addr in [a for a in self._refused if a in members]:
                self._restore_gpus(addr)

    def _refuse_later_workers(self, host: str, members: Mapping, found: list[Overlap]) -> None:
        # In the order workers came, a worker whose devices overlap those of an earlier
        # worker that still hands out its GPUs is refused; one that overlaps only refused
        # workers keeps (or gets back) its GPUs.
        earlier: dict[str, list[Overlap]] = {}
        for pair in found:
            earlier.setdefault(pair.second, []).append(pair)
        refused: set[str] = set()
        for addr in members:
            pairs = [p for p in earlier.get(addr, ()) if p.first not in refused]
            if not pairs:
                if addr in self._refused:
                    self._restore_gpus(addr)
                continue
            refused.add(addr)
            if addr in self._refused:
                continue
            others = [p.first for p in pairs]
            devices = _device_names([d for p in pairs for d in p.shared])
            ws = self.scheduler.workers[addr]
            self._refused[addr] = ws.resources.get(GPU, 0)
            self._set_gpu_capacity(addr, 0)
            released = self._release_gpu_tasks(addr)
            logger.error(
                "Refusing the GPUs of worker %s: it hands out GPU device(s) %s, which %s on "
                "host %s hands out too (gpuresources.scheduler.overlap: raise). No GPU task "
                "is placed there%s. %s.",
                addr,
                devices,
                " and ".join(others),
                host,
                f"; {released} GPU task(s) sent there go elsewhere" if released else "",
                _OVERLAP_FIX,
            )
            self.scheduler.log_event(
                PLUGIN_NAME,
                {
                    "action": "refused-gpus",
                    "host": host,
                    "worker": addr,
                    "overlaps": others,
                    "devices": [list(d) for p in pairs for d in p.shared],
                    "fix": _OVERLAP_FIX,
                },
            )

    def _set_gpu_capacity(self, addr: str, value: float) -> None:
        # The scheduler places by scheduler.resources[GPU][addr] (and ws.resources); the
        # worker's own bookkeeping and the used resources stay as they are.
        ws = self.scheduler.workers.get(addr)
        if ws is None:
            return
        ws.resources[GPU] = value
        self.scheduler.resources.setdefault(GPU, {})[addr] = value

    def _restore_gpus(self, addr: str) -> None:
        capacity = self._refused.pop(addr, None)
        if capacity is None:
            return
        self._set_gpu_capacity(addr, capacity)
        logger.info("Worker %s hands out its %g GPU(s) again", addr, capacity)

    def _release_gpu_tasks(self, addr: str) -> int:
        """Send the GPU tasks placed on ``addr`` back to be placed elsewhere."""
        keys = [
            key
            for key in self._processing
            if (ts := self.scheduler.tasks.get(key)) is not None
            and ts.processing_on is not None
            and ts.processing_on.address == addr
            and not ts.actor
        ]
        if keys:
            stimulus_id = f"gpuresources-overlap-{addr}"
            self.scheduler.transitions({key: "released" for key in keys}, stimulus_id)
        return len(keys)

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
                ts.resource_restrictions = restrictions
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
                ts.resource_restrictions = {**restrictions, GPU: exact}
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
        ts.resource_restrictions = {**(ts.resource_restrictions or {}), GPU: math.inf}

    def _fail_rejected(self, key: Hashable) -> None:
        error = self._rejected.pop(key, None)
        ts = self.scheduler.tasks.get(key)
        if error is None or ts is None or ts.state != "no-worker":
            return
        stimulus_id = f"gpuresources-reject-{key}"
        recommendations = self.scheduler.transition(
            key,
            "erred",
            stimulus_id=stimulus_id,
            exception=dumps(error),
            cause=key,
            exception_text=str(error),
        )
        self.scheduler.transitions(recommendations, stimulus_id)

    # -- placement -------------------------------------------------------------------------

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
                ts = self.scheduler.tasks.get(key) if finish == "memory" else None
                if ts is not None and ts.actor:
                    # Dask frees an actor's resources once its constructor returns; its
                    # devices stay held (and counted in placement) until it goes away.
                    self._actor_holds[key] = record
                else:
                    self._exit_processing(*record)
        elif start == "memory":
            if self._actor_holds and key in self._actor_holds:
                # the actor was released, killed, or lost with its worker
                self._exit_processing(*self._actor_holds.pop(key))
        if self._rejected:
            if finish == "no-worker" and key in self._rejected:
                self.scheduler.loop.add_callback(self._fail_rejected, key)
            elif finish == "forgotten":
                self._rejected.pop(key, None)

    def _enter_processing(self, ts: Any) -> None:
        restrictions = ts.resource_restrictions
        if not restrictions:
            return
        value = restrictions.get(GPU)
        ws = ts.processing_on
        if not value or ws is None:
            return
        units = round(value * _UNITS)
        addr = ws.address
        self._processing[ts.key] = (addr, units)
        load = self._load[addr] = self._load.get(addr, 0) + units
        if load > ws.resources.get(GPU, 0) * _UNITS:
            self._overloaded.add(addr)

    def _add_load(self, addr: str, units: int) -> None:
        load = self._load[addr] = self._load.get(addr, 0) + units
        ws = self.scheduler.workers.get(addr)
        if ws is not None and load > ws.resources.get(GPU, 0) * _UNITS:
            self._overloaded.add(addr)
        else:
            self._overloaded.discard(addr)

    def _exit_processing(self, addr: str, units: int) -> None:
        load = self._load.get(addr)
        if load is None:  # the worker is gone, and its load with it
            return
        load = self._load[addr] = load - units
        overloaded = self._overloaded
        if not overloaded:
            return
        if addr in overloaded:
            ws = self.scheduler.workers.get(addr)
            if ws is not None and load > ws.resources.get(GPU, 0) * _UNITS:
                return  # still more GPU work than devices here: nothing came free
            overloaded.discard(addr)
            if not overloaded:
                return
        if not self._rebalance_soon and self._rebalancer is not None:
            # A device came free here while GPU work waits elsewhere: rebalance now rather
            # than on the next tick.
            self._rebalance_soon = True
            self.scheduler.loop.add_callback(self.rebalance)

    def _valid_workers(self, ts: Any) -> set | None:
        """Dask's valid workers for ``ts``, narrowed for GPU tasks to the least backlog.

        Backlog is the GPU work queued ahead of the task per device of a worker (0 while a
        device is free). Offering only the workers with the least of it, and letting Dask's
        objective choose among them, places exactly as ordering by (backlog, Dask's
        objective) would, with one pass over the workers instead of a Python call per
        candidate.
        """
        valid = type(self.scheduler).valid_workers(self.scheduler, ts)
        restrictions = ts.resource_restrictions
        value = restrictions.get(GPU) if restrictions else None
        if not value or not valid or len(valid) == 1:
            return valid
        units = round(value * _UNITS)
        load = self._load
        best = math.inf
        chosen: list = []
        for ws in valid:
            capacity = ws.resources.get(GPU, 0) * _UNITS
            if not capacity:
                continue
            ahead = load.get(ws.address, 0) + units - capacity
            backlog = ahead / capacity if ahead > 0 else 0.0
            if backlog < best:
                best, chosen = backlog, [ws]
            elif backlog == best:
                chosen.append(ws)
        return set(chosen) if chosen else valid

    def rebalance(self) -> None:
        """Move GPU tasks queued behind busy devices to workers whose devices are idle.

        Uses Dask's work-stealing protocol, so a task that has already started is never
        moved (the worker refuses), and worker or resource restrictions are respected.
        """
        self._rebalance_soon = False
        self._sync_devices()
        scheduler = self.scheduler
        stealing = scheduler.extensions.get("stealing")
        if stealing is None or not self._overloaded:
            return
        self._follow_moves()
        idle: dict[str, int] = {}
        for addr, capacity in scheduler.resources.get(GPU, {}).items():
            free = int(capacity * _UNITS) - self._load.get(addr, 0)
            if free > 0 and scheduler.workers[addr] in scheduler.running:
                idle[addr] = free
        if not idle:
            return
        for addr in list(self._overloaded):
            ws = scheduler.workers.get(addr)
            if ws is None or set(idle) <= {addr}:
                continue
            excess = self._load.get(addr, 0) - int(ws.resources.get(GPU, 0) * _UNITS)
            if excess <= 0:
                continue
            queued = [ts for ts in ws.processing if ts.key in self._processing]
            # The lowest-priority tasks run last, so they are the ones waiting for devices.
            queued.sort(key=lambda ts: ts.priority, reverse=True)
            for ts in queued:
                if excess <= 0 or not idle:
                    break
                units = self._processing[ts.key][1]
                valid = type(scheduler).valid_workers(scheduler, ts)  # not narrowed
                thief = next(
                    (
                        a
                        for a, free in idle.items()
                        if a != addr
                        and free >= units
                        and (valid is None or scheduler.workers[a] in valid)
                    ),
                    None,
                )
                if thief is None:
                    continue
                stealing.move_task_request(ts, ws, scheduler.workers[thief])
                self._moving.add(ts.key)
                excess -= units
                idle[thief] -= units
                if idle[thief] <= 0:
                    del idle[thief]

    def _follow_moves(self) -> None:
        # Work stealing moves tasks without transition hooks: re-home their load. With our
        # placement on, Dask's stealing leaves GPU tasks alone, so only the tasks rebalance()
        # asked to move can have moved; without it, any GPU task may have.
        tasks = self.scheduler.tasks
        in_flight = self._stealing.in_flight if self._stealing is not None else None
        keys = list(self._processing) if in_flight is None else list(self._moving)
        for key in keys:
            record = self._processing.get(key)
            ts = tasks.get(key)
            if record is None or ts is None or ts.processing_on is None:
                self._moving.discard(key)
                continue
            if in_flight is not None and ts not in in_flight:
                self._moving.discard(key)  # settled: moved, refused, or rescheduled
            addr, units = record
            new = ts.processing_on.address
            if new == addr:
                continue
            if addr in self._load:
                self._add_load(addr, -units)
            self._add_load(new, units)
            self._processing[key] = (new, units)

    # -- the allocation table ----------------------------------------------------------------

    def _heartbeat_snapshots(self) -> dict[str, dict]:
        """Each worker's snapshot as its last heartbeat carried it."""
        out = {}
        for addr, ws in self.scheduler.workers.items():
            snap = ws.metrics.get(PLUGIN_NAME)
            if isinstance(snap, dict):
                out[addr] = snap
        return out

    async def _snapshots(self, refresh: bool, max_age: float = 0.0) -> dict[str, dict]:
        """Worker snapshots: asked now with ``refresh`` (heartbeat ones where a worker
        does not answer), else from the heartbeats.

        Callers that ask while a round of questions is under way share it: a hundred
        dashboard or ``status`` requests at once cost the workers one message each, not a
        hundred. With ``max_age``, an answer younger than that many seconds is reused.
        """
        out = self._heartbeat_snapshots()
        if refresh and self.scheduler.workers:
            fresh_enough = (
                self._refreshing is not None
                and self._refreshing.done()
                and time.monotonic() - self._refreshed_at < max_age
            )
            if not fresh_enough and (self._refreshing is None or self._refreshing.done()):
                self._refreshed_at = time.monotonic()
                self._refreshing = asyncio.ensure_future(
                    self.scheduler.broadcast(
                        msg={"op": PLUGIN_NAME},
                        workers=list(self.scheduler.workers),
                        on_error="return",
                    )
                )
            fresh = await asyncio.shield(self._refreshing)
            out.update(
                (a, snap)
                for a, snap in fresh.items()
                if isinstance(snap, dict) and a in self.scheduler.workers
            )
        return out

    def table(self, snapshots: dict[str, dict] | None = None) -> dict:
        """The allocation table as plain data (JSON route, ``status``, metrics).

        ``{worker: {"gpus": n, "executing": n, "overlap": [worker, ...], "refused": bool,
        "devices": {id: {"token": str, "uuid": str|None, "shared_with": [worker, ...],
        "holders": [{"key", "kind": "task"|"actor", "amount"}], "memory_used": bytes|None,
        "utilization": percent|None}}}}``

        ``overlap`` lists the other workers of the host that hand out some of the same
        physical devices, ``shared_with`` those per device; ``refused`` is true while the
        worker's GPUs are refused for it (``gpuresources.scheduler.overlap: raise``; its
        ``gpus`` is then 0).
        """
        if snapshots is None:
            snapshots = self._heartbeat_snapshots()
        self._sync_devices()
        out = {}
        for addr, ws in self.scheduler.workers.items():
            snap = snapshots.get(addr) or {}
            actors = set(snap.get("actors", ()))
            shared = self._shared.get(addr, {})
            out[addr] = {
                "gpus": ws.resources.get(GPU, 0),
                "executing": snap.get("executing", 0),
                "overlap": sorted({w for others in shared.values() for w in others}),
                "refused": addr in self._refused,
                "devices": {
                    str(d["id"]): {
                        "token": d.get("token"),
                        "uuid": d.get("uuid"),
                        "shared_with": sorted(shared.get(str(d.get("token")), ())),
                        "holders": [
                            {
                                "key": key,
                                "kind": "actor" if key in actors else "task",
                                "amount": share,
                            }
                            for key, share in d["holders"].items()
                        ],
                        "memory_used": d.get("memory_used"),
                        "memory_total": d.get("memory_total"),
                        "utilization": d.get("utilization"),
                    }
                    for d in snap.get("devices", ())
                },
            }
        return out

    async def table_handler(self, refresh: bool = True, max_age: float = 0.0) -> dict:
        """:meth:`table`, with the workers asked now (``refresh``; an answer younger than
        ``max_age`` seconds is reused) or from heartbeats."""
        return self.table(await self._snapshots(refresh, max_age))

    async def allocations_handler(self, refresh: bool = True) -> dict:
        """``{worker: {device id: {holder key: share}}}`` for every worker with devices.

        With ``refresh`` the workers are asked now; otherwise the table is the one their
        last heartbeats carried.
        """
        return {
            addr: {int(d["id"]): dict(d["holders"]) for d in snap["devices"]}
            for addr, snap in (await self._snapshots(refresh)).items()
            if addr in self.scheduler.workers and snap.get("devices")
        }
