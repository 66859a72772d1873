"""Where GPU tasks go: each worker's GPU backlog in front of Dask's own objective, and the
periodic move of GPU work queued behind busy devices to workers whose devices are idle
(through Dask's safe work-stealing protocol).

:class:`Placement` is part of :class:`~dask_gpuresources.scheduler.GPUSchedulerPlugin`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .worker import GPU

logger = logging.getLogger("distributed.gpuresources")

__all__ = ["UNITS", "Placement"]

# GPU load is summed in integer units of 1/10000 device (Ray's precision), so that
# thousands of fractional tasks entering and leaving processing never drift.
UNITS = 10_000


class Placement:
    """The scheduler plugin's GPU load per worker, its placement and its rebalancing."""

    def _enter_processing(self, ts: Any) -> None:
        restrictions = ts.resource_restrictions
        if not restrictions:
            return
        value = restrictions.get(GPU)
        ws = ts.processing_on
        if not value or ws is None:
            return
        units = round(value * UNITS)
        addr = ws.address
        self._processing[ts.key] = (addr, units)
        load = self._load[addr] = self._load.get(addr, 0) + units
        if load > ws.resources.get(GPU, 0) * UNITS:
            self._overloaded.add(addr)

    def _add_load(self, addr: str, units: int) -> None:
        load = self._load[addr] = self._load.get(addr, 0) + units
        ws = self.scheduler.workers.get(addr)
        if ws is not None and load > ws.resources.get(GPU, 0) * UNITS:
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
            if ws is not None and load > ws.resources.get(GPU, 0) * UNITS:
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
        units = round(value * UNITS)
        load = self._load
        best = math.inf
        chosen: list = []
        for ws in valid:
            capacity = ws.resources.get(GPU, 0) * UNITS
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
            free = int(capacity * UNITS) - self._load.get(addr, 0)
            if free > 0 and scheduler.workers[addr] in scheduler.running:
                idle[addr] = free
        if not idle:
            return
        for addr in list(self._overloaded):
            ws = scheduler.workers.get(addr)
            if ws is None or set(idle) <= {addr}:
                continue
            excess = self._load.get(addr, 0) - int(ws.resources.get(GPU, 0) * UNITS)
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
