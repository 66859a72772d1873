"""Where GPU tasks go: each worker's GPU backlog in front of Dask's own objective, and the
periodic move of GPU work queued behind busy devices to workers whose devices are idle
(through Dask's safe work-stealing protocol).

:class:`Placement` is part of :class:`~dask_gpuresources.scheduler.GPUSchedulerPlugin`.
"""

from __future__ import annotations

import heapq
import logging
import math
import operator
from collections.abc import Iterator
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
        self._stale.add(addr)
        if load > ws.resources.get(GPU, 0) * UNITS:
            self._overloaded.add(addr)

    def _add_load(self, addr: str, units: int) -> None:
        load = self._load[addr] = self._load.get(addr, 0) + units
        ws = self.scheduler.workers.get(addr)
        self._stale.add(addr)
        if ws is not None and load > ws.resources.get(GPU, 0) * UNITS:
            self._overloaded.add(addr)
        else:
            self._overloaded.discard(addr)

    def _exit_processing(self, addr: str, units: int) -> None:
        load = self._load.get(addr)
        if load is None:  # the worker is gone, and its load with it
            return
        load = self._load[addr] = load - units
        self._stale.add(addr)
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

    # -- the index of workers by free device units -----------------------------------------
    #
    # Placement asks, for every GPU task, which workers have the least device backlog. A
    # scan of the valid workers answers in O(workers) Python steps per task (about 30 us at
    # 128 workers, 250 us at 1,000). The index answers from the few distinct levels of free
    # units instead: capacity -> {free units -> workers}. A change of load or capacity (a task
    # entering or leaving processing, a worker joining or setting its resources again, GPUs
    # refused for overlap) only marks its worker stale, a set insertion on the hot path; the
    # index re-levels the stale workers when placement next asks. A worker that leaves is
    # taken out at once. Every rebalance tick also re-levels any worker whose capacity
    # changed unseen.

    def _relevel_stale(self) -> None:
        workers = self.scheduler.workers
        stale = self._stale
        while stale:
            addr = stale.pop()
            self._index(addr, workers.get(addr))

    def _index(self, addr: str, ws: Any) -> None:
        """Put worker ``addr`` at its current level (capacity, free units) in the index, or
        take it out (``ws`` None: no longer a worker; or no GPUs)."""
        where = self._levels_of.pop(addr, None)
        if where is not None:
            capacity, free, old = where
            group = self._levels[capacity]
            members = group[free]
            members.discard(old)
            if not members:
                del group[free]
                if not group:
                    del self._levels[capacity]
        if ws is None:
            return
        capacity = round(ws.resources.get(GPU, 0) * UNITS)
        if capacity <= 0:
            return
        free = capacity - self._load.get(addr, 0)
        self._levels.setdefault(capacity, {}).setdefault(free, set()).add(ws)
        self._levels_of[addr] = (capacity, free, ws)

    def _relevel_all(self) -> None:
        """Re-level every worker whose capacity changed without the plugin seeing it."""
        levels_of = self._levels_of
        workers = self.scheduler.workers
        stale = self._stale
        for addr, ws in workers.items():
            where = levels_of.get(addr)
            capacity = round(ws.resources.get(GPU, 0) * UNITS)
            if where is None:
                if capacity > 0:
                    stale.add(addr)
            elif where[0] != capacity or where[2] is not ws:
                stale.add(addr)
        stale.update(a for a in levels_of if a not in workers)
        self._relevel_stale()

    def _least_backlog(self, units: int) -> set | None:
        """The indexed workers with the least backlog for a request of ``units``."""
        if self._stale:
            self._relevel_stale()
        best = math.inf
        chosen: list[tuple[int, dict[int, set]]] = []  # (top free level, its group)
        for capacity, group in self._levels.items():
            top = max(group)
            ahead = units - top
            backlog = ahead / capacity if ahead > 0 else 0.0
            if backlog < best:
                best, chosen = backlog, [(top, group)]
            elif backlog == best:
                chosen.append((top, group))
        if not chosen:
            return None
        if best > 0:  # every device busy: the workers at each group's top level
            return set().union(*(group[top] for top, group in chosen))
        # devices free: every worker that fits the request now
        return set().union(
            *(members for _, group in chosen for free, members in group.items() if free >= units)
        )

    def _valid_workers(self, ts: Any) -> set | None:
        """Dask's valid workers for ``ts``, narrowed for GPU tasks to the least backlog.

        Backlog is the GPU work queued ahead of the task per device of a worker (0 while a
        device is free). Offering only the workers with the least of it, and letting Dask's
        objective choose among them, places exactly as ordering by (backlog, Dask's
        objective) would. The index above answers in a few set operations; the scan
        (:meth:`_scan_least_backlog`) answers where it cannot (the least-backlog workers
        are not among the valid ones: other restrictions, paused workers).
        """
        valid = type(self.scheduler).valid_workers(self.scheduler, ts)
        restrictions = ts.resource_restrictions
        value = restrictions.get(GPU) if restrictions else None
        if not value or not valid or len(valid) == 1:
            return valid
        units = round(value * UNITS)
        least = self._least_backlog(units)
        if least:
            chosen = least & valid
            if chosen:
                return chosen
        return self._scan_least_backlog(valid, units)

    def _scan_least_backlog(self, valid: set, units: int) -> set:
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
        moved (the worker refuses), and worker or resource restrictions are respected. A
        move under way counts against its thief's free devices, so that ticks in quick
        succession never send one idle device more than it can run.
        """
        self._rebalance_soon = False
        self._sync_devices()
        scheduler = self.scheduler
        self._relevel_all()
        stealing = scheduler.extensions.get("stealing")
        if stealing is None or not self._overloaded:
            return
        incoming = self._follow_moves()
        idle: dict[str, int] = {}
        for addr, capacity in scheduler.resources.get(GPU, {}).items():
            free = int(capacity * UNITS) - self._load.get(addr, 0) - incoming.get(addr, 0)
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
            for ts in _last_to_run(ws.processing, self._processing):
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

    def _follow_moves(self) -> dict[str, int]:
        """Re-home the load of moved GPU tasks; returns the units still on their way to each
        thief.

        Work stealing moves tasks without transition hooks. With our placement on, Dask's
        stealing leaves GPU tasks alone, so only the tasks rebalance() asked to move can have
        moved; without it, any GPU task may have.
        """
        tasks = self.scheduler.tasks
        in_flight = self._stealing.in_flight if self._stealing is not None else None
        keys = list(self._processing) if in_flight is None else list(self._moving)
        incoming: dict[str, int] = {}
        for key in keys:
            record = self._processing.get(key)
            ts = tasks.get(key)
            if record is None or ts is None or ts.processing_on is None:
                self._moving.discard(key)
                continue
            if in_flight is not None:
                move = in_flight.get(ts)
                if move is None:
                    self._moving.discard(key)  # settled: moved, refused, or rescheduled
                else:
                    thief = move["thief"].address
                    incoming[thief] = incoming.get(thief, 0) + record[1]
            addr, units = record
            new = ts.processing_on.address
            if new == addr:
                continue
            if addr in self._load:
                self._add_load(addr, -units)
            self._add_load(new, units)
            self._processing[key] = (new, units)
        return incoming


_priority = operator.attrgetter("priority")


def _last_to_run(processing: set, ours: dict) -> Iterator[Any]:
    """The GPU tasks of ``processing``, lowest priority (the last to run) first.

    A tick moves a few of them, so it takes the few it needs (an O(n) selection, growing 4x
    as it goes on) instead of sorting a worker's whole queue (10,000 tasks: a few ms).
    """
    queued = [ts for ts in processing if ts.key in ours]
    k, done = 8, 0
    while done < len(queued):
        if k < len(queued):
            batch = heapq.nlargest(k, queued, key=_priority)
        else:
            batch = sorted(queued, key=_priority, reverse=True)
        yield from batch[done:]
        done = len(batch)
        k *= 4
