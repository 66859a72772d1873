"""The only code that touches a Dask worker's state machine.

Dask's ``WorkerState`` decides *when* a resource-restricted task may start by comparing
float sums (``available_resources``). For ``GPU`` that is wrong twice over: the sum of free
fractions says nothing about whether one device can take a request, and the floats drift
(after ``0.1`` and ``0.2`` come and go a device reads ``0.9999999999999999`` free, and every
``GPU=1`` task waits forever). So for ``GPU`` the worker's ledger alone decides:

- :class:`GPUAdmission` is mixed into the worker's ``WorkerState`` class, once per worker (see
  :func:`admission_class`); the worker's device state is a class attribute of that class, so
  it does not depend on any plugin instance (Dask replaces a worker plugin registered again
  under the same name).
- A GPU task is admitted when the ledger can place it on concrete devices now, leased at the
  moment Dask acquires its resources, and freed where Dask releases them. Dask's float book
  for ``GPU`` is kept as the exact complement of what running tasks hold.
- An actor keeps its devices after its constructor returns (Dask's books free them then);
  the hold ends whenever the key is no longer a live actor of this worker (released,
  forgotten, erred, cancelled during construction, rescheduled), by whatever transition. Its
  finalizer (the facade's actor host) runs then, GPU or not.
- A task whose resources are free starts, whatever waits before it in Dask's order (no
  head-of-line blocking, GPU or not).
- Aging: once a task has waited ``gpuresources.worker.bypass-limit`` without fitting, and
  would fit once running tasks end (devices held by actors never do), it is *protected*:
  nothing that asks for a resource it asks for starts until it has started. Its clock is
  its own (see :class:`ConstrainedIndex`), so arrivals cannot reset it.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from time import monotonic as time
from typing import TYPE_CHECKING, Any

from distributed.worker_state_machine import (
    ExecuteSuccessEvent,
    StateMachineEvent,
    TaskState,
    WorkerState,
    merge_recs_instructions,
)
from sortedcontainers import SortedList

from . import _dask_internals
from ._requests import parse_gpu_amount
from .exceptions import InvalidRequestError

if TYPE_CHECKING:
    from .worker import WorkerDevices

__all__ = [
    "GPU",
    "ConstrainedIndex",
    "Refused",
    "DevicesFreed",
    "GPUAdmission",
    "admission_class",
    "gpu_amount",
]

#: The Dask resource name that stands for GPUs.
GPU = "GPU"


class Refused:
    """The GPU amount of a request that is not valid (``GPU=1.5``, ``-1``): the worker runs
    such a task at once, with no lease and without touching any book, and it fails with the
    error :func:`~dask_gpuresources._requests.parse_gpu_amount` gives (the scheduler plugin
    rejects these at submission; a worker without it must refuse them too).

    Examples
    --------
    >>> gpu_amount({"GPU": 1.5})
    Refused(1.5)
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Refused({self.value!r})"


def _refuse(value: Any) -> None:
    """What a refused task runs instead of its function: raises the error of _requests."""
    parse_gpu_amount(value)
    raise InvalidRequestError(f"GPU={value!r} is not a valid request")  # pragma: no cover


def _amount(value: Any) -> Fraction | int | Refused:
    try:
        amount = parse_gpu_amount(value)
    except InvalidRequestError:
        return Refused(value)
    # A whole number of devices as a plain int: the ledger's whole-device path then does
    # integer arithmetic only (Fraction's operators are Python code, run for every task).
    return amount.numerator if amount.denominator == 1 else amount


_cached_amount = functools.lru_cache(maxsize=1024)(_amount)


def gpu_amount(restrictions: dict | None) -> Fraction | int | Refused | None:
    """The GPU amount a task requests, exact (an int when whole), None if it asks none, or
    :class:`Refused` if the amount is not valid.

    Examples
    --------
    >>> gpu_amount({"GPU": 0.1}), gpu_amount({"GPU": 2}), gpu_amount({"A": 1})
    (Fraction(1, 10), 2, None)
    """
    if not restrictions:
        return None
    value = restrictions.get(GPU)
    if value is None:
        return None
    try:
        return _cached_amount(value)
    except TypeError:  # unhashable
        return _amount(value)


class ConstrainedIndex:
    """Dask's queue of resource-restricted tasks, grouped by their restrictions, with the
    time each task started waiting.

    When the head of Dask's queue does not fit, the worker looks for the first task behind
    it that does. Tasks with the same restrictions fit or not together, so it is enough to
    look at the first task of each group: a few groups, not the whole queue (sorting a
    queue of 10,000 tasks on every step would make draining it quadratic).

    Each group is in Dask's order (priority, then arrival); entries are plain tuples, so
    task states are never compared. The index is kept only while it is needed: it is built
    from Dask's queue the first time the head does not fit (:meth:`activate`) and dropped when
    the queue empties, so a worker whose work always fits pays nothing for it.

    A task's wait (the aging clock) starts when it is indexed: when it enters the queue while
    the index is active, else when the index is activated, the first moment anything in the
    queue could not start (until then the queue ran in Dask's order, passing nobody). It is
    the task's own: arrivals and other tasks starting do not reset it.

    Examples
    --------
    >>> class Task:
    ...     def __init__(self, resource_restrictions, priority):
    ...         self.resource_restrictions, self.priority = resource_restrictions, priority
    >>> index = ConstrainedIndex()
    >>> index.activate([], now=0.0)
    >>> big = Task(resource_restrictions={"GPU": 2}, priority=(0, 1))
    >>> small = Task(resource_restrictions={"GPU": 1}, priority=(0, 2))
    >>> later = Task(resource_restrictions={"GPU": 1}, priority=(0, 3))
    >>> for ts, now in ((later, 1.0), (big, 2.0), (small, 3.0)):
    ...     index.add(ts, now)
    >>> index.first(lambda ts: ts.resource_restrictions["GPU"] == 1) is small
    True
    >>> index.oldest_waiting(since=2.5, eligible=lambda ts: True) is later
    True
    >>> index.oldest_waiting(since=2.5, eligible=lambda ts: ts is not later) is big
    True
    >>> index.discard(small)
    >>> index.first(lambda ts: ts.resource_restrictions["GPU"] == 1) is later
    True
    >>> len(index)
    2
    """

    __slots__ = ("_entries", "_groups", "_seq", "_waiting", "active")

    def __init__(self) -> None:
        self._groups: dict[tuple, SortedList] = {}
        #: per group, its tasks in the order they were indexed -> when (oldest first)
        self._waiting: dict[tuple, dict[TaskState, float]] = {}
        self._entries: dict[TaskState, tuple[tuple, tuple]] = {}
        self._seq = itertools.count()
        #: whether the index follows Dask's queue now (see activate)
        self.active = False

    def activate(self, queued: Iterable[TaskState], now: float) -> None:
        """Start following Dask's queue, whose tasks (in Dask's order) are ``queued``; their
        wait starts ``now``."""
        self.active = True
        for ts in queued:
            self.add(ts, now)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, ts: TaskState, now: float) -> None:
        if ts in self._entries:
            return
        restrictions = ts.resource_restrictions
        group_key = tuple(sorted(restrictions.items())) if restrictions else ()
        entry = (ts.priority or (), next(self._seq), ts)
        group = self._groups.get(group_key)
        if group is None:
            group = self._groups[group_key] = SortedList()
            self._waiting[group_key] = {}
        group.add(entry)
        self._waiting[group_key][ts] = now
        self._entries[ts] = (group_key, entry)

    def discard(self, ts: TaskState) -> None:
        found = self._entries.pop(ts, None)
        if found is None:
            return
        group_key, entry = found
        group = self._groups[group_key]
        group.remove(entry)
        del self._waiting[group_key][ts]
        if not group:
            del self._groups[group_key], self._waiting[group_key]

    def clear(self) -> None:
        """Forget every task and stop following the queue."""
        self._groups.clear()
        self._waiting.clear()
        self._entries.clear()
        self.active = False

    def heads(self) -> Iterator[TaskState]:
        """The first task of each group, in no particular order."""
        for group in list(self._groups.values()):
            yield group[0][2]

    def first(
        self, fits: Callable[[TaskState], bool], *, live: Callable[[TaskState], bool] | None = None
    ) -> TaskState | None:
        """The task first in Dask's order among the groups whose first task ``fits``.

        Entries that are no longer ``live`` (left Dask's queue without a transition we saw)
        are dropped on the way.
        """
        best: tuple | None = None
        for group in list(self._groups.values()):
            entry = group[0]
            if live is not None:
                while not live(entry[2]):
                    self.discard(entry[2])
                    if not group:
                        break
                    entry = group[0]
                else:
                    if (best is None or entry < best) and fits(entry[2]):
                        best = entry
                continue
            if (best is None or entry < best) and fits(entry[2]):
                best = entry
        return None if best is None else best[2]

    def oldest_waiting(
        self,
        since: float,
        eligible: Callable[[TaskState], bool],
        *,
        live: Callable[[TaskState], bool] | None = None,
    ) -> TaskState | None:
        """The task that has waited longest, among those waiting since ``since`` or before
        in the groups whose longest-waiting task is ``eligible`` (one call per group: its
        tasks share their restrictions). Entries no longer ``live`` are dropped."""
        best: TaskState | None = None
        best_since = since
        for waiting in list(self._waiting.values()):
            while waiting:
                ts, started = next(iter(waiting.items()))
                if live is None or live(ts):
                    if started <= best_since and eligible(ts):
                        best, best_since = ts, started
                    break
                self.discard(ts)
        return best


@dataclass
class DevicesFreed(StateMachineEvent):
    """Devices came free outside a transition (an actor's last method returned, or the
    worker's GPU count grew): start what waits for them."""

    __slots__ = ()


def _handle_devices_freed(self: WorkerState, ev: DevicesFreed) -> Any:
    return self._ensure_computing()


_dask_internals.register_event_handler(DevicesFreed, _handle_devices_freed)


class GPUAdmission(WorkerState):
    """Per-device admission for Dask's worker state machine (a mixin, no state of its own).

    ``_gpu`` (a class attribute, set by :func:`admission_class`) is the worker's
    :class:`~dask_gpuresources.worker.WorkerDevices`. These methods run for every task on
    the worker's event loop, so each does as little as it can for tasks that ask no GPU.
    """

    __slots__ = ()
    _gpu: WorkerDevices

    def _resource_restrictions_satisfied(self, ts: TaskState) -> bool:
        restrictions = ts.resource_restrictions
        if not restrictions:
            return True
        gpu = self._gpu
        protected = gpu.protected
        if protected is not None and ts is not protected and gpu.conflicts(restrictions):
            return False  # held back for a request past its aging limit
        # _fits_now, inlined: this runs for every restricted task the worker starts
        amount = gpu_amount(restrictions)
        if amount is None:
            return super()._resource_restrictions_satisfied(ts)
        if amount.__class__ is Refused:
            return True
        available = self.available_resources
        for resource, needed in restrictions.items():
            if resource != GPU and available[resource] < needed:
                return False
        return gpu.can_place(amount)

    #: Whether a task may start now: its resources free and no protected request it would
    #: pass (the name the worker's device state asks by; Dask asks the private one).
    fits = _resource_restrictions_satisfied

    def _fits_now(self, ts: TaskState) -> bool:
        """Whether ``ts``'s resources are free now (protection aside)."""
        restrictions = ts.resource_restrictions
        if not restrictions:
            return True
        amount = gpu_amount(restrictions)
        if amount is None:
            return super()._resource_restrictions_satisfied(ts)
        if amount.__class__ is Refused:
            return True  # it starts at once, only to fail
        available = self.available_resources
        for resource, needed in restrictions.items():
            if resource != GPU and available[resource] < needed:
                return False
        # The ledger, never Dask's float sum, decides for GPU.
        return self._gpu.can_place(amount)

    def _acquire_resources(self, ts: TaskState) -> None:
        restrictions = ts.resource_restrictions
        amount = gpu_amount(restrictions) if restrictions else None
        if amount is None:
            super()._acquire_resources(ts)
        elif amount.__class__ is Refused:
            # Nothing is booked or leased; the task fails when it runs.
            _dask_internals.run_instead(ts, _refuse, amount.value)
            return
        else:
            available = self.available_resources
            for resource, needed in restrictions.items():
                if resource != GPU:
                    available[resource] -= needed
            self._gpu.acquire(ts, amount)
        if ts.annotations or amount:
            self._gpu.route(ts, amount)

    def _release_resources(self, ts: TaskState) -> None:
        restrictions = ts.resource_restrictions
        amount = gpu_amount(restrictions) if restrictions else None
        if amount is None:
            super()._release_resources(ts)
            return
        if amount.__class__ is Refused:
            return  # acquired nothing
        available = self.available_resources
        for resource, needed in restrictions.items():
            if resource != GPU:
                available[resource] += needed
        self._gpu.release(ts, amount, actor=ts.key in self.actors)

    def handle_stimulus(self, *stims: StateMachineEvent) -> Any:
        for stim in stims:
            if type(stim) is ExecuteSuccessEvent and stim.key in self.actors:
                ts = self.tasks.get(stim.key)
                if ts is not None and ts.state == "cancelled":
                    # An actor whose construction finished after it was cancelled: Dask
                    # drops it now, but its instance lingers in the worker's execute task
                    # for a moment; its devices stay held until it is collected.
                    restrictions = ts.resource_restrictions
                    amount = gpu_amount(restrictions) if restrictions else None
                    if amount and amount.__class__ is not Refused:
                        self._gpu.watch_instance(stim.key, stim.value)
        return super().handle_stimulus(*stims)

    def _transition(self, ts: TaskState, finish: Any, *args: Any, stimulus_id: str) -> Any:
        start = ts.state
        gpu = self._gpu
        queue = gpu.queue
        if not queue.active:
            result = super()._transition(ts, finish, *args, stimulus_id=stimulus_id)
        else:
            if finish == "constrained":
                # Indexed before the transition: entering the queue also starts what fits,
                # and that choice must already see this task.
                queue.add(ts, time())
            result = super()._transition(ts, finish, *args, stimulus_id=stimulus_id)
            if ts.state == "constrained":
                queue.add(ts, time())
            elif start == "constrained" or finish == "constrained":
                queue.discard(ts)
                if ts is gpu.protected:
                    gpu.protected = None
                if not self.constrained:
                    queue.clear()
                    gpu.protected = None
        key = ts.key
        if start == "executing" and ts.state in ("cancelled", "released"):
            # A cancelled isolated task: end its child now, so that its devices come back
            # at once instead of when the task would have finished.
            gpu.cancelled(key)
        # The common case, answered without another call: no actor of ours ends here.
        if not gpu.actors or key not in gpu.actors:
            return result
        if ts.state == "memory" and key in self.actors:
            return result  # alive (constructed, or a no-op transition)
        if gpu.actor_gone(key):
            # Its devices are free now: start what waits for them in this same stimulus.
            return merge_recs_instructions(result, self._ensure_computing())
        return result

    def _next_ready_task(self) -> TaskState | None:
        gpu = self._gpu
        constrained = self.constrained
        if gpu.queue.active and constrained:
            # A request past its aging limit starts as soon as it fits, before anything else.
            protected = gpu.protect(self)
            if protected is not None and self._fits_now(protected):
                self._take_constrained(protected)
                return protected
        # Dask's own choice: the head of the constrained heap when it fits (asking
        # _resource_restrictions_satisfied above), else a ready task.
        ts = super()._next_ready_task()
        if ts is not None or not constrained:
            return ts
        # The head does not fit and nothing else is ready: a task behind it whose resources
        # are free starts (no head-of-line blocking, GPU or not).
        candidate = gpu.pick_constrained(self)
        if candidate is not None:
            self._take_constrained(candidate)
        return candidate

    def _take_constrained(self, ts: TaskState) -> None:
        constrained = self.constrained
        if ts is constrained.peek():
            constrained.pop()  # keeps the heap free of stale entries
        else:
            constrained.discard(ts)


def admission_class(base: type[WorkerState], devices: WorkerDevices) -> type[WorkerState]:
    """The class a worker's ``WorkerState`` becomes: ``base`` with GPU admission, bound to
    this worker's ``devices`` (one class per worker: the state is a class attribute because
    ``WorkerState`` has ``__slots__``)."""
    if issubclass(base, GPUAdmission):
        base = next(b for b in base.__mro__ if not issubclass(b, GPUAdmission))
    return type(f"GPU{base.__name__}", (GPUAdmission, base), {"__slots__": (), "_gpu": devices})
