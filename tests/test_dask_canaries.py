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
