"""Behavioural canaries: what distributed does that the design relies on (or works around).

Each test pins one behaviour of distributed, not our code. When a release changes it, the
test fails with the assumption in its name, and ``_dask_internals`` (and DESIGN.md's "Facts
about Dask") need a review.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
from distributed import Worker, WorkerPlugin
from distributed.utils_test import gen_cluster
from distributed.worker_state_machine import TaskState, WorkerState

from dask_gpuresources._admission import DevicesFreed


def test_dask_books_fractional_resources_as_floats_that_drift():
    # Why GPU admission is the ledger's alone: Dask's sum drifts below 1.
    state = WorkerState(resources={"GPU": 1}, nthreads=2)
    small, large = TaskState("small"), TaskState("large")
    small.resource_restrictions = {"GPU": 0.1}
    large.resource_restrictions = {"GPU": 0.2}
    state._acquire_resources(small)
    state._acquire_resources(large)
    state._release_resources(large)
    state._release_resources(small)
    assert state.available_resources["GPU"] == 0.9999999999999999
    whole = TaskState("whole")
    whole.resource_restrictions = {"GPU": 1}
    assert not WorkerState._resource_restrictions_satisfied(state, whole)


def test_our_event_reaches_the_state_machine():
    state = WorkerState(resources={"GPU": 1}, nthreads=1)
    instructions = state.handle_stimulus(DevicesFreed(stimulus_id="canary"))
    assert instructions == []


class _Counting(WorkerPlugin):
    name = "canary"
    idempotent = True

    def __init__(self, log):
        self.log = log

    def setup(self, worker):
        self.log.append(("setup", id(self)))

    def teardown(self, worker):
        self.log.append(("teardown", id(self)))


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_a_plugin_added_again_under_its_name_replaces_the_first(c, s, a):
    # Why device state lives in worker.extensions, not in the plugin instance.
    log = []
    first, second = _Counting(log), _Counting(log)
    await a.plugin_add(first)
    await a.plugin_add(second)
    assert log == [("setup", id(first)), ("teardown", id(first)), ("setup", id(second))]
    assert a.plugins["canary"] is second


class _Closes:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


@gen_cluster(client=True, nthreads=[])
async def test_worker_close_closes_its_extensions(c, s):
    async with Worker(s.address, nthreads=1) as w:
        extension = w.extensions["canary"] = _Closes()
    assert extension.closed


class _Actor:
    def ping(self):
        return True


@gen_cluster(client=True, nthreads=[("", 2)], worker_kwargs={"resources": {"GPU": 1}})
async def test_dask_frees_an_actors_resources_once_it_is_constructed(c, s, a):
    # Why an actor's lifetime hold on its devices is ours to keep.
    actor = await c.submit(_Actor, actor=True, resources={"GPU": 1})
    assert await actor.ping()
    assert a.state.available_resources["GPU"] == 1
    assert actor.key in a.state.actors
    del actor
    gc.collect()  # the proxy and its future hold each other
    for _ in range(200):
        if not a.state.actors:
            break
        await asyncio.sleep(0.02)
    assert not a.state.actors  # the key leaves the live actors when released


@gen_cluster(client=True, nthreads=[("", 2)])
async def test_an_actor_proxy_holds_its_own_future_on_the_key(c, s, a):
    # Why a dropped facade handle releases its proxy's future (release_actor_proxy): after a
    # method call the proxy sits in a reference cycle, and its future keeps the actor wanted.
    from distributed import Future

    from dask_gpuresources._dask_internals import release_actor_proxy

    proxy = await c.submit(_Actor, actor=True)
    assert await proxy.ping()
    assert isinstance(proxy._future, Future) and proxy._future.key == proxy.key
    release_actor_proxy(proxy)
    assert proxy._future._cleared


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_a_cancelled_future_says_why(c, s, a):
    # What TaskCancelledError quotes: the message Dask puts in FutureCancelledError.
    from distributed import Event
    from distributed.client import FutureCancelledError

    event = Event()
    future = c.submit(event.wait, 30)
    await c.cancel(future, reason="canary", msg="its input was lost")
    assert future.status == "cancelled"
    with pytest.raises(FutureCancelledError) as info:
        await future
    assert info.value.msg == "its input was lost"
    await event.set()


@gen_cluster(client=True, nthreads=[("", 1), ("", 1)])
async def test_an_actor_proxy_knows_its_worker_and_its_future_errs_when_that_worker_dies(
    c, s, a, b
):
    # What ActorDiedError names (actor_address), and what ends a facade call to a dead worker
    # at once instead of after Dask's 30 s connect timeout (actor_status in actor_caller).
    from dask_gpuresources._dask_internals import actor_address, actor_status

    proxy = await c.submit(_Actor, actor=True, workers=[a.address])
    assert actor_address(proxy) == a.address
    assert actor_status(proxy) == "finished"
    await a.close()
    deadline = asyncio.get_running_loop().time() + 10
    while actor_status(proxy) != "error":
        assert asyncio.get_running_loop().time() < deadline, actor_status(proxy)
        await asyncio.sleep(0.02)
    with pytest.raises(RuntimeError, match="Worker holding Actor was lost"):
        await proxy._future


class _Finds:
    def where(self):
        from distributed import get_worker
        from distributed.worker import thread_state

        from dask_gpuresources._dask_internals import running_actor_key

        return thread_state.key, running_actor_key(get_worker())


@gen_cluster(client=True, nthreads=[("", 2)])
async def test_a_plain_actor_method_runs_under_the_name_class_method_and_is_found(c, s, a):
    # Why get_gpu_ids() in a plain Dask actor's method looks for the actor
    # (running_actor_key): the thread's key is "Class.method", not the actor's key.
    one = await c.submit(_Finds, actor=True)
    two = await c.submit(_Finds, actor=True)
    assert await one.where() == ("Finds.where", one.key)  # Dask's key_split drops the "_"
    assert await two.where() == ("Finds.where", two.key)


@gen_cluster(client=True, nthreads=[("", 1), ("", 1)], worker_kwargs={"resources": {"GPU": 1}})
async def test_stealing_an_actor_logs_confirm_and_leaves_it_in_the_victims_actors(c, s, a, b):
    # Why placement follows a move by the "confirm" event (steal_confirmed) and records a
    # moved actor on its new worker itself (move_actor).
    from distributed import Event

    from dask_gpuresources._dask_internals import move_actor, steal_confirmed

    event = Event()
    blocker = c.submit(event.wait, 30, resources={"GPU": 1}, workers=[a.address], pure=False)
    actor = c.submit(_Actor, actor=True, resources={"GPU": 1}, workers=[a.address])
    while actor.key not in a.state.tasks or a.state.tasks[actor.key].state != "constrained":
        await asyncio.sleep(0.01)
    ts = s.tasks[actor.key]
    s.extensions["stealing"].move_task_request(ts, s.workers[a.address], s.workers[b.address])
    proxy = await asyncio.wait_for(actor, 30)
    assert await proxy.ping()
    confirmed = [m for _, m in s.get_events("stealing") if steal_confirmed(m) == actor.key]
    assert len(confirmed) == 1
    assert ts in s.workers[a.address].actors and ts not in s.workers[b.address].actors
    move_actor(ts, s.workers[a.address], s.workers[b.address])
    await event.set()
    await blocker


# -- what admission relies on (dask_gpuresources._admission) ---------------------------------


def _pinned():
    return 42


def test_the_state_machine_chooses_work_through_next_ready_task_and_satisfied():
    # Why admission overrides _next_ready_task and _resource_restrictions_satisfied (and
    # reads the constrained heap with peek, sorted, discard, pop and `in`).
    from distributed.worker_state_machine import ComputeTaskEvent

    asked = []

    class Spy(WorkerState):
        __slots__ = ()

        def _resource_restrictions_satisfied(self, ts):
            asked.append(ts.key)
            return ts.key != "blocked"

    state = Spy(resources={"GPU": 2}, nthreads=2)
    state.handle_stimulus(
        ComputeTaskEvent.dummy(
            "blocked", resource_restrictions={"GPU": 1}, priority=(0,), stimulus_id="a"
        )
    )
    blocked = state.tasks["blocked"]
    assert blocked.state == "constrained" and asked == ["blocked"]
    assert blocked in state.constrained and state.constrained.peek() is blocked
    assert blocked.resource_restrictions == {"GPU": 1} and isinstance(blocked.priority, tuple)
    # Dask's own choice stops at a head that does not fit: nothing behind it starts.
    state.handle_stimulus(
        ComputeTaskEvent.dummy(
            "behind", resource_restrictions={"GPU": 1}, priority=(1,), stimulus_id="b"
        )
    )
    assert state.tasks["behind"].state == "constrained"
    assert [ts.key for ts in state.constrained.sorted()] == ["blocked", "behind"]
    behind = state.tasks["behind"]
    state.constrained.discard(behind)
    assert behind not in state.constrained and state.constrained.pop() is blocked


def test_an_actor_construction_ends_with_execute_success_carrying_the_instance():
    # Why admission's handle_stimulus can watch a cancelled actor's instance (its value).
    from distributed.worker_state_machine import ComputeTaskEvent, ExecuteSuccessEvent

    state = WorkerState(resources={"GPU": 1}, nthreads=1)
    state.handle_stimulus(
        ComputeTaskEvent.dummy(
            "actor", actor=True, resource_restrictions={"GPU": 1}, stimulus_id="a"
        )
    )
    instance = _Actor()
    state.handle_stimulus(ExecuteSuccessEvent.dummy("actor", instance, stimulus_id="b"))
    assert state.actors["actor"] is instance
    assert state.available_resources["GPU"] == 1  # given back once constructed


@gen_cluster(client=True, nthreads=[("", 2)])
async def test_a_seceded_task_moves_from_executing_to_long_running(c, s, a):
    # Why leases for running tasks are taken from executing | long_running.
    from distributed import Event, secede

    event = Event("seceded")

    def leaves_the_pool():
        secede()
        Event("seceded").wait(30)
        return True

    future = c.submit(leaves_the_pool)
    for _ in range(500):
        if any(ts.key == future.key for ts in a.state.long_running):
            break
        await asyncio.sleep(0.02)
    assert any(ts.key == future.key for ts in a.state.long_running)
    assert not any(ts.key == future.key for ts in a.state.executing)
    await event.set()
    assert await future


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_the_worker_runs_the_run_spec_it_finds_when_the_task_starts(c, s, a):
    # Why run_instead works: Worker.execute reads ts.run_spec when the task starts, and
    # run_spec.is_coro tells async tasks (never isolated) from sync ones.
    from distributed import Event

    from dask_gpuresources._dask_internals import run_instead

    async def coroutine():
        return True

    assert await c.submit(coroutine) is True
    event = Event("gate")
    gate = c.submit(event.wait, 30)  # takes the worker's only thread
    follower = c.submit(lambda: "own")
    for _ in range(500):
        if follower.key in a.state.tasks and gate.key in {ts.key for ts in a.state.executing}:
            break
        await asyncio.sleep(0.02)
    ts = a.state.tasks[follower.key]
    assert ts.run_spec.is_coro is False
    run_instead(ts, _pinned)
    await event.set()
    assert await follower == 42
    assert await gate
