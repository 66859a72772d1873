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

from . import _dask_internals
from ._names import GPU

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
        capacity = ws.resources.get(GPU, 0) * UNITS
        if load > capacity:
            self._overloaded.add(addr)
            if self._held and units > capacity - self._held.get(addr, 0):
                self._strand(ts.key, addr, units)

    # -- requests that cannot run where they wait --------------------------------------------
    #
    # Actors hold their devices for life: a request larger than a worker's devices less its
    # actors' holds cannot start there until an actor goes, which may be never. Such a
    # request is "stranded": its units stay in the worker's load (the worker is overloaded),
    # but they do not count against the worker's free devices for placement, which other
    # requests can use now; and rebalance() moves it to a worker where it fits as soon as
    # one has the devices free. Holds begin and end rarely (an actor constructed, released),
    # so a worker whose holds or capacity changed is re-examined lazily, on placement's next
    # question or the next tick, not on the transition that changed them.

    def _strand(self, key: Any, addr: str, units: int) -> None:
        self._stranded.setdefault(addr, {})[key] = units
        self._stale.add(addr)

    def _unstrand(self, key: Any, addr: str) -> None:
        here = self._stranded.get(addr)
        if here is not None and here.pop(key, None) is not None:
            if not here:
                del self._stranded[addr]
            self._stale.add(addr)

    def _hold(self, key: Any, addr: str, units: int) -> None:
        """An actor's devices are held for its life from now (its constructor returned)."""
        self._actor_holds[key] = (addr, units)
        self._held[addr] = self._held.get(addr, 0) + units
        self._restrand.add(addr)

    def _unhold(self, key: Any) -> None:
        addr, units = self._actor_holds.pop(key)
        held = self._held.get(addr)
        if held is not None:
            if held > units:
                self._held[addr] = held - units
            else:
                del self._held[addr]
            self._restrand.add(addr)
        self._exit_processing(addr, units)

    def hold_ended_handler(self, key: Any, worker: str) -> None:
        """Worker ``worker`` says the hold of its live actor ``key`` ended (its isolated
        child died): its devices are free there now, though the actor's key stays in memory
        until it is released, and placement counts them free again at once."""
        if isinstance(key, list):  # a tuple key, as the RPC's msgpack sends it
            key = tuple(key)
        record = self._actor_holds.get(key)
        if record is None or record[0] != worker or self._retired:
            return
        self._ended_holds.add(key)
        self._unhold(key)

    def _restrand_marked(self) -> None:
        """Re-examine which GPU requests of the marked workers are stranded."""
        restrand = self._restrand
        workers = self.scheduler.workers
        processing = self._processing
        while restrand:
            addr = restrand.pop()
            self._stranded.pop(addr, None)
            self._stale.add(addr)
            ws = workers.get(addr)
            if ws is None:
                continue
            room = ws.resources.get(GPU, 0) * UNITS - self._held.get(addr, 0)
            for ts in ws.processing:
                record = processing.get(ts.key)
                if record is not None and record[0] == addr and record[1] > room:
                    self._strand(ts.key, addr, record[1])

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
        if self._restrand:
            self._restrand_marked()
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
        free = self._free_units(addr, capacity)
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
                if addr in self._held:
                    self._restrand.add(addr)
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
            least = set().union(*(group[top] for top, group in chosen))
            if self._held:
                # not where actors' holds leave too little room for it ever to start
                held = self._held
                least = {
                    ws
                    for ws in least
                    if units <= round(ws.resources.get(GPU, 0) * UNITS) - held.get(ws.address, 0)
                }
            return least
        # devices free: every worker that fits the request now
        return set().union(
            *(members for _, group in chosen for free, members in group.items() if free >= units)
        )

    def _valid_workers(self, original: Any, ts: Any) -> set | None:
        """Dask's valid workers for ``ts`` (``original(ts)``), narrowed for GPU tasks to the
        least backlog; the scheduler's ``valid_workers`` while placement is on.

        Backlog is the GPU work queued ahead of the task per device of a worker (0 while a
        device is free). Offering only the workers with the least of it, and letting Dask's
        objective choose among them, places exactly as ordering by (backlog, Dask's
        objective) would. The index above answers in a few set operations; the scan
        (:meth:`_scan_least_backlog`) answers where it cannot (the least-backlog workers
        are not among the valid ones: other restrictions, paused workers).
        """
        valid = original(ts)
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
        held = self._held
        stranded = self._stranded
        best = math.inf
        chosen: list = []
        for ws in valid:
            capacity = ws.resources.get(GPU, 0) * UNITS
            addr = ws.address
            if not capacity or units > capacity - held.get(addr, 0):
                continue  # no devices, or too few that actors leave for it ever to start
            ahead = load.get(addr, 0) + units - capacity
            if addr in stranded:
                ahead -= sum(stranded[addr].values())
            backlog = ahead / capacity if ahead > 0 else 0.0
            if backlog < best:
                best, chosen = backlog, [ws]
            elif backlog == best:
                chosen.append(ws)
        return set(chosen) if chosen else valid

    def rebalance(self) -> None:
        """Move GPU requests that cannot start where they wait to workers that can run them now.

        Two kinds move: a stranded request (it cannot start on its worker while that
        worker's actors live; the highest priority first) and the excess of a worker with
        more GPU work than devices (the last to run first). Each goes to a worker whose free
        devices, less the GPU work queued there that can start there, hold it now. Tasks and
        actors alike move through Dask's work-stealing protocol, so a request that has
        already started is never moved (the worker refuses), and worker or resource
        restrictions are respected. A move under way counts against its thief's free
        devices, so that ticks in quick succession never send one idle device more than it
        can run.
        """
        self._rebalance_soon = False
        if self._retired:  # a callback scheduled before another instance took over
            return
        self._sync_devices()
        scheduler = self.scheduler
        self._relevel_all()
        stealing = _dask_internals.stealing_extension(scheduler)
        if stealing is None or not (self._overloaded or self._stranded):
            return
        incoming = self._follow_moves()
        if self._restrand:
            self._restrand_marked()
        workers = scheduler.workers
        idle: dict[str, int] = {}
        for addr, capacity in scheduler.resources.get(GPU, {}).items():
            free = self._free_units(addr, round(capacity * UNITS)) - incoming.get(addr, 0)
            if free > 0 and workers[addr] in scheduler.running:
                idle[addr] = free
        if not idle:
            return
        tasks = scheduler.tasks
        for addr, here in list(self._stranded.items()):
            ws = workers.get(addr)
            if ws is None or set(idle) <= {addr}:
                continue
            stranded = [tasks[key] for key in here if key in tasks and key not in self._moving]
            for ts in sorted(stranded, key=_priority):
                if not idle:
                    return
                self._move(stealing, ts, ws, here[ts.key], idle)
        for addr in list(self._overloaded):
            ws = workers.get(addr)
            if ws is None or set(idle) <= {addr}:
                continue
            here = self._stranded.get(addr, {})
            excess = self._load.get(addr, 0) - sum(here.values())
            excess -= int(ws.resources.get(GPU, 0) * UNITS)
            if excess <= 0:
                continue
            for ts in _last_to_run(ws.processing, self._processing):
                if excess <= 0 or not idle:
                    break
                if ts.key in here or ts.key in self._moving:
                    continue
                units = self._processing[ts.key][1]
                if self._move(stealing, ts, ws, units, idle):
                    excess -= units

    def _free_units(self, addr: str, capacity: int) -> int:
        """Free device units of ``addr`` (``capacity`` units), less the GPU work there that
        can start there: stranded requests do not take the devices that other requests can
        use now."""
        free = capacity - self._load.get(addr, 0)
        stranded = self._stranded.get(addr)
        if stranded:
            free += sum(stranded.values())
        return free

    def _move(self, stealing: Any, ts: Any, victim: Any, units: int, idle: dict) -> bool:
        """Ask Dask's stealing to move ``ts`` to the first idle worker that can run it now."""
        scheduler = self.scheduler
        valid = _dask_internals.dask_valid_workers(scheduler, ts)  # not narrowed
        addr = victim.address
        thief = next(
            (
                a
                for a, free in idle.items()
                if a != addr and free >= units and (valid is None or scheduler.workers[a] in valid)
            ),
            None,
        )
        if thief is None:
            return False
        _dask_internals.request_move(stealing, ts, victim, scheduler.workers[thief])
        self._moving.add(ts.key)
        idle[thief] -= units
        if idle[thief] <= 0:
            del idle[thief]
        return True

    def _rehome(self, key: Any, ts: Any, new: str) -> None:
        """The GPU request ``key`` now waits on worker ``new`` (a move stealing enacted)."""
        record = self._processing.get(key)
        if record is None:
            return
        addr, units = record
        if new == addr:
            return
        self._unstrand(key, addr)
        if addr in self._load:
            self._add_load(addr, -units)
        self._add_load(new, units)
        self._processing[key] = (new, units)
        if new in self._held:
            self._restrand.add(new)
        if ts.actor:
            # Dask's stealing moves the task, not the worker's record of its actors
            _dask_internals.move_actor(ts, self.scheduler.workers.get(addr), ts.processing_on)

    def _steal_confirmed(self, key: Any) -> None:
        """Stealing enacted a move (its "confirm" event): follow it at once, before any
        later transition of the task can read the old worker."""
        ts = self.scheduler.tasks.get(key)
        if ts is not None and ts.processing_on is not None:
            self._moving.discard(key)
            self._rehome(key, ts, ts.processing_on.address)

    def _follow_moves(self) -> dict[str, int]:
        """Re-home the load of moved GPU tasks; returns the units still on their way to each
        thief.

        Work stealing moves tasks without transition hooks (its "confirm" event re-homes
        them at once, see :meth:`_steal_confirmed`; this catches what it did not). With our
        placement on, Dask's stealing leaves GPU tasks alone, so only the tasks rebalance()
        asked to move can have moved; without it, any GPU task may have.
        """
        tasks = self.scheduler.tasks
        stealing = self._stealing
        in_flight = None if stealing is None else _dask_internals.moves_in_flight(stealing)
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
            self._rehome(key, ts, ts.processing_on.address)
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
