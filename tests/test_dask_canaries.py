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
    from dask_gpuresources._dask_internals import actor_address, actor_status, actor_worker_lost

    proxy = await c.submit(_Actor, actor=True, workers=[a.address])
    assert actor_address(proxy) == a.address
    assert actor_status(proxy) == "finished"
    await a.close()
    deadline = asyncio.get_running_loop().time() + 10
    while actor_status(proxy) != "error":
        assert asyncio.get_running_loop().time() < deadline, actor_status(proxy)
        await asyncio.sleep(0.02)
    with pytest.raises(RuntimeError, match="Worker holding Actor was lost") as info:
        await proxy._future
    assert actor_worker_lost(info.value)


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

    from dask_gpuresources._dask_internals import (
        move_actor,
        moves_in_flight,
        request_move,
        steal_confirmed,
        stealing_extension,
    )

    event = Event()
    blocker = c.submit(event.wait, 30, resources={"GPU": 1}, workers=[a.address], pure=False)
    actor = c.submit(_Actor, actor=True, resources={"GPU": 1}, workers=[a.address])
    while actor.key not in a.state.tasks or a.state.tasks[actor.key].state != "constrained":
        await asyncio.sleep(0.01)
    ts = s.tasks[actor.key]
    stealing = stealing_extension(s)
    request_move(stealing, ts, s.workers[a.address], s.workers[b.address])
    # followed until the victim answers (moves_in_flight)
    assert moves_in_flight(stealing)[ts]["thief"] is s.workers[b.address]
    proxy = await asyncio.wait_for(actor, 30)
    assert await proxy.ping()
    assert ts not in moves_in_flight(stealing)
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


# -- the scheduler-side touch-points of _dask_internals ---------------------------------------


async def _until(condition, what, timeout=20):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _restricted(ts):
    return bool(ts.resource_restrictions)


@gen_cluster(client=True, nthreads=[("", 1), ("", 1)], worker_kwargs={"resources": {"GPU": 1}})
async def test_the_scheduler_asks_its_instance_for_valid_workers(c, s, a, b):
    # Why placement narrows the workers by wrapping valid_workers on the instance
    # (wrap_scheduler_method), and reads Dask's own answer through dask_valid_workers.
    from dask_gpuresources._dask_internals import dask_valid_workers, wrap_scheduler_method

    asked = []

    def only_b(original, ts):
        asked.append(ts.key)
        valid = original(ts)
        return {s.workers[b.address]} if _restricted(ts) else valid

    undo = wrap_scheduler_method(s, "valid_workers", only_b)
    futures = [c.submit(lambda i: i, i, resources={"GPU": 1}) for i in range(4)]
    who = await c.who_has(await c.gather(futures) and futures)
    assert {w for ws in who.values() for w in ws} == {b.address}
    assert {f.key for f in futures} <= set(asked)
    ts = s.tasks[futures[0].key]
    assert dask_valid_workers(s, ts) == {s.workers[a.address], s.workers[b.address]}
    undo()
    assert "valid_workers" not in s.__dict__


@gen_cluster(client=True, nthreads=[("", 1)] * 3)
async def test_workers_to_close_is_asked_on_the_instance_and_through_its_handler(c, s, a, b, w3):
    # Why a GPU actor's worker survives scale-down: retire_workers(n=...) calls the
    # instance's workers_to_close, and adaptive asks the RPC handler bound to it at start.
    from dask_gpuresources._dask_internals import wrap_scheduler_method

    original_handler = s.handlers["workers_to_close"]

    def never_a(original, *args, **kwargs):
        return [w for w in original(*args, **kwargs) if w != a.address]

    undo = wrap_scheduler_method(s, "workers_to_close", never_a)
    assert a.address not in s.workers_to_close(n=3)
    assert a.address not in await c.scheduler.workers_to_close(n=3)
    retired = await c.retire_workers(n=2, close_workers=False)
    assert retired and a.address not in retired  # two chosen, less a if it was one
    undo()
    assert "workers_to_close" not in s.__dict__
    assert s.handlers["workers_to_close"] == original_handler


@gen_cluster(client=True, nthreads=[("", 1)], worker_kwargs={"resources": {"GPU": 2}})
async def test_worker_set_resources_reaches_the_schedulers_set_resources_handler(c, s, a):
    # Why placement learns of a runtime capacity change by wrapping that handler
    # (wrap_scheduler_handler), which is Scheduler.add_resources.
    from dask_gpuresources._dask_internals import wrap_scheduler_handler

    seen = []

    def seeing(original, **msg):
        seen.append(msg)
        return original(**msg)

    undo = wrap_scheduler_handler(s, "set_resources", seeing)
    await a.set_resources(GPU=3)
    await _until(lambda: seen, "the set_resources message")
    assert seen[0]["worker"] == a.address and seen[0]["resources"] == {"GPU": 3}
    assert s.workers[a.address].resources == {"GPU": 3}
    assert s.resources["GPU"][a.address] == 3
    undo()
    assert s.handlers["set_resources"] == s.add_resources
    assert wrap_scheduler_handler(s, "no-such-handler", seeing) is None


@gen_cluster(client=True, nthreads=[("", 1), ("", 1)], worker_kwargs={"resources": {"GPU": 1}})
async def test_stealing_only_steals_what_put_key_in_stealable_puts_there(c, s, a, b):
    # Why GPU tasks are kept out of occupancy stealing through put_key_in_stealable
    # (keep_out_of_stealing), and taken out later by remove_from_stealing.
    from distributed import Event

    from dask_gpuresources._dask_internals import (
        keep_out_of_stealing,
        remove_from_stealing,
        stealing_extension,
    )

    stealing = stealing_extension(s)
    assert stealing is s.extensions["stealing"]
    event = Event()
    undo = keep_out_of_stealing(stealing, _restricted)
    kept = c.submit(event.wait, 30, resources={"GPU": 1}, workers=[a.address], pure=False)
    free = c.submit(event.wait, 30, workers=[a.address], pure=False)
    await _until(
        lambda: all(
            s.tasks.get(f.key) and s.tasks[f.key].state == "processing" for f in (kept, free)
        ),
        "both tasks processing",
    )
    assert s.tasks[kept.key] not in stealing.key_stealable
    ts = s.tasks[free.key]
    assert ts in stealing.key_stealable
    remove_from_stealing(stealing, ts)
    assert ts not in stealing.key_stealable
    undo()
    assert "put_key_in_stealable" not in stealing.__dict__
    await event.set()
    await c.gather([kept, free])


@gen_cluster(client=True, nthreads=[("", 2), ("", 2)], worker_kwargs={"resources": {"GPU": 1}})
async def test_a_worker_given_no_capacity_is_not_chosen_and_released_tasks_are_placed_again(
    c, s, a, b
):
    # Why refusing a worker's GPUs (overlap: raise) sets both books (set_worker_capacity)
    # and sends its queued GPU tasks back (release_tasks): they land on the other worker.
    from distributed import Event

    from dask_gpuresources._dask_internals import release_tasks, set_worker_capacity

    event = Event()
    blockers = [
        c.submit(event.wait, 30, resources={"GPU": 1}, workers=[w.address], pure=False)
        for w in (a, b)
    ]
    await _until(lambda: len(a.state.executing) == len(b.state.executing) == 1, "both busy")
    queued = c.submit(lambda: "ran", resources={"GPU": 1}, pure=False)
    await _until(
        lambda: queued.key in s.tasks and s.tasks[queued.key].processing_on is not None,
        "the queued task",
    )
    victim = s.tasks[queued.key].processing_on.address
    (other,) = {a.address, b.address} - {victim}
    set_worker_capacity(s, victim, "GPU", 0)
    assert s.workers[victim].resources["GPU"] == 0 and s.resources["GPU"][victim] == 0
    release_tasks(s, [queued.key], stimulus_id="canary")
    await _until(
        lambda: (ws := s.tasks[queued.key].processing_on) is not None and ws.address == other,
        "the task placed on the other worker",
    )
    await event.set()
    assert await asyncio.wait_for(queued, 20) == "ran"
    assert (await c.who_has([queued]))[queued.key] == (other,)
    set_worker_capacity(s, victim, "GPU", 1)
    await c.gather(blockers)


@gen_cluster(client=True, nthreads=[("", 1)], worker_kwargs={"resources": {"gpu": 2}})
async def test_a_renamed_worker_resource_is_what_placement_sees(c, s, a):
    # Why 'gpu' (from DASK_DISTRIBUTED__WORKER__RESOURCES__GPU) is renamed on the scheduler
    # with remove_resources/add_resources (rename_worker_resource).
    from dask_gpuresources._dask_internals import dask_valid_workers, rename_worker_resource

    future = c.submit(lambda: 1, resources={"GPU": 1}, pure=False)
    await _until(
        lambda: future.key in s.tasks and s.tasks[future.key].state == "no-worker", "no-worker"
    )
    ts = s.tasks[future.key]
    assert not dask_valid_workers(s, ts)
    rename_worker_resource(s, a.address, "gpu", "GPU")
    assert s.workers[a.address].resources == {"GPU": 2}
    assert s.resources["GPU"] == {a.address: 2} and not s.resources.get("gpu")
    assert dask_valid_workers(s, ts) == {s.workers[a.address]}
    await c.cancel(future)


@gen_cluster(client=True, nthreads=[("", 1)], worker_kwargs={"resources": {"GPU": 1}})
async def test_restrictions_set_in_update_graph_are_placed_by_and_fail_task_ends_the_wait(c, s, a):
    # Why a rejected request is given an impossible restriction at submission
    # (set_task_restrictions) and then failed with our error once it waits (fail_task).
    from distributed import SchedulerPlugin

    from dask_gpuresources._dask_internals import fail_task, set_task_restrictions

    class Impossible(SchedulerPlugin):
        def update_graph(self, scheduler, *, tasks, **kwargs):
            for key in tasks:
                set_task_restrictions(scheduler.tasks[key], {"GPU": float("inf")})

    await c.register_plugin(Impossible(), name="canary-impossible")
    future = c.submit(lambda: 1, resources={"GPU": 1}, pure=False)
    await _until(
        lambda: future.key in s.tasks and s.tasks[future.key].state == "no-worker", "no-worker"
    )
    fail_task(s, future.key, ValueError("canary says no"), stimulus_id="canary")
    with pytest.raises(ValueError, match="canary says no"):
        await asyncio.wait_for(future, 10)


# -- the worker-side touch-points used outside _dask_internals --------------------------------


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_the_heartbeats_memory_is_the_monitors_get_process_memory(c, s, a):
    # Why isolated children's memory is counted by replacing Worker.monitor's
    # get_process_memory (count_in_process_memory): the scheduler's view comes from it.
    from dask_gpuresources._dask_internals import count_in_process_memory

    extra = 1 << 50  # a petabyte: no process measures that much by itself
    undo = count_in_process_memory(a, lambda: extra)
    assert a.monitor.get_process_memory() >= extra
    a.monitor.update()  # what the monitor's periodic callback does
    await a.heartbeat()
    assert s.workers[a.address].memory.process >= extra
    undo()
    assert "get_process_memory" not in a.monitor.__dict__
    assert a.monitor.get_process_memory() < extra


def _secedes(event):
    from distributed import secede

    secede()
    event.wait(30)


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_a_seceded_task_leaves_executing_for_long_running(c, s, a):
    # Why tasks running when the plugin installs are found in executing | long_running.
    from distributed import Event

    event = Event()
    future = c.submit(_secedes, event, pure=False)
    await _until(
        lambda: a.state.tasks.get(future.key) in a.state.long_running, "the task in long_running"
    )
    assert a.state.tasks[future.key] not in a.state.executing
    await event.set()
    await future


class _Made:
    pass


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_an_actors_instance_reaches_the_state_machine_in_execute_success_event(c, s, a):
    # Why admission watches an actor's instance from the ExecuteSuccessEvent of its key.
    from distributed.worker_state_machine import ExecuteSuccessEvent

    seen = []
    handle = a.handle_stimulus

    def watching(*stims):
        seen.extend(s for s in stims if type(s) is ExecuteSuccessEvent)
        return handle(*stims)

    a.handle_stimulus = watching
    try:
        actor = await c.submit(_Made, actor=True)
    finally:
        del a.handle_stimulus
    (event,) = [e for e in seen if e.key == actor.key]
    assert event.value is a.state.actors[actor.key]


async def _coroutine_task(event):
    await event.wait(30)


def _sync_task(event):
    event.wait(30)


@gen_cluster(client=True, nthreads=[("", 2)])
async def test_a_coroutine_tasks_run_spec_says_is_coro(c, s, a):
    # Why an isolated GPU task that is a coroutine function stays on the worker's loop: the
    # worker's TaskState.run_spec tells (Task.is_coro).
    from distributed import Event

    event = Event()
    futures = [c.submit(f, event, pure=False) for f in (_coroutine_task, _sync_task)]
    await _until(lambda: all(f.key in a.state.tasks for f in futures), "both tasks")
    assert [a.state.tasks[f.key].run_spec.is_coro for f in futures] == [True, False]
    await event.set()
    await c.gather(futures)


@gen_cluster(client=True, nthreads=[], scheduler_kwargs={"dashboard": True, "http_prefix": "/x"})
async def test_dask_pages_serve_under_the_schedulers_http_prefix(c, s):
    # Why the GPU page is made with dashboard_prefix(dask's BokehTornado): Dask's own pages
    # live under the scheduler's http_prefix.
    pytest.importorskip("bokeh")
    from dask_gpuresources._dask_internals import dashboard_prefix
    from dask_gpuresources._http import bokeh_pages

    pages = bokeh_pages(s)
    assert pages is not None and pages in s.http_application.applications
    assert dashboard_prefix(pages).strip("/") == "x"


@gen_cluster(client=True, nthreads=[("", 1)], worker_kwargs={"resources": {"A": 1}})
async def test_a_workers_state_machine_runs_as_a_subclass_that_decides_admission(c, s, a):
    # Why admission can be a subclass swapped in at install (set_state_class): the worker
    # asks its state machine, through the instance, whether a restricted task may start.
    from dask_gpuresources._dask_internals import set_state_class

    asked = []

    class Asked(type(a.state)):
        __slots__ = ()

        def _resource_restrictions_satisfied(self, ts):
            asked.append(ts.key)
            return super()._resource_restrictions_satisfied(ts)

    original = type(a.state)
    set_state_class(a.state, Asked)
    try:
        assert await c.submit(lambda: 1, key="restricted", resources={"A": 1}) == 1
        assert "restricted" in asked
    finally:
        set_state_class(a.state, original)
    with pytest.raises(TypeError, match="does not extend"):
        set_state_class(a.state, type("Other", (), {}))


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_worker_metrics_executors_and_methods_can_be_added_and_undone(c, s, a):
    # Why the heartbeat carries our metric (set_worker_metric), an annotated task runs on our
    # executor (set_worker_executor) and Worker.set_resources can be wrapped through the
    # instance (replace_worker_method), each undone at close.
    from concurrent.futures import ThreadPoolExecutor

    import dask

    from dask_gpuresources._dask_internals import (
        replace_worker_method,
        set_worker_executor,
        set_worker_metric,
    )

    undo_metric = set_worker_metric(a, "canary", lambda worker: worker.address)
    await a.heartbeat()
    assert s.workers[a.address].metrics["canary"] == a.address

    pool = ThreadPoolExecutor(1, thread_name_prefix="canary-pool")
    undo_executor = set_worker_executor(a, "canary", pool)
    import threading

    with dask.annotate(executor="canary"):
        name = await c.submit(lambda: threading.current_thread().name, pure=False)
    assert name.startswith("canary-pool")

    called = []
    original = a.set_resources

    async def set_resources(**resources):
        called.append(resources)
        return await original(**resources)

    undo_method = replace_worker_method(a, "set_resources", set_resources)
    await a.set_resources(X=1)
    assert called == [{"X": 1}]
    assert s.workers[a.address].resources.get("X") == 1

    for undo in (undo_metric, undo_executor, undo_method):
        undo()
    await a.heartbeat()
    assert "canary" not in s.workers[a.address].metrics
    assert "canary" not in a.executors
    assert "set_resources" not in vars(a)
    pool.shutdown()
