"""The lease invariant under faults, each test a path that once broke it.

A device is never held by two holders at once, every lease comes back whatever happens to
its holder, and nothing waits forever while a device that fits it is free. Each test here
failed on the code before its fix (see the commit that added it).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import weakref
from fractions import Fraction

import dask
import pytest
from distributed import Client, Event, LocalCluster, Reschedule, Worker, WorkerPlugin
from distributed.utils_test import async_poll_for, captured_logger, gen_cluster

import dask_gpuresources as gr
from dask_gpuresources.exceptions import DeviceCountError

TIMEOUT = 20  # bound on every wait for something that must happen


def ids(*_):
    return gr.get_gpu_ids()


def hold(name):
    """Hold the task's devices until the distributed Event ``name`` is set."""
    if not Event(name).wait(TIMEOUT):
        raise TimeoutError(name)
    return gr.get_gpu_ids()


class Holder:
    """A Dask actor that holds its devices from construction until it goes away."""

    def ping(self):
        return True


class SlowHolder:
    def __init__(self, name):
        Event(name).wait(TIMEOUT)


_attempts: dict[str, int] = {}


class RescheduledOnce:
    def __init__(self, name):
        _attempts[name] = _attempts.get(name, 0) + 1
        if _attempts[name] == 1:
            raise Reschedule()


async def _executing(worker, key):
    await async_poll_for(lambda: any(ts.key == key for ts in worker.state.executing), TIMEOUT)


# -- 1. float drift --------------------------------------------------------------------------


@gen_cluster(client=True, nthreads=[("", 4)], worker_kwargs={"resources": {"GPU": 1}})
async def test_fractions_coming_and_going_leave_whole_gpu_work_runnable(c, s, a):
    await gr.install(c)
    small = c.submit(hold, "small", resources={"GPU": 0.1}, pure=False)
    large = c.submit(hold, "large", resources={"GPU": 0.2}, pure=False)
    await _executing(a, small.key)
    await _executing(a, large.key)
    # 0.2 finishes first: Dask's float books would read 1 - 0.1 - 0.2 + 0.2 + 0.1 free
    await Event("large").set()
    await large
    await Event("small").set()
    await small
    assert a.state.available_resources["GPU"] == 1
    whole = c.submit(ids, resources={"GPU": 1}, pure=False)
    assert await asyncio.wait_for(whole, TIMEOUT) == [0]


# -- 2. actors that never construct ----------------------------------------------------------


def test_actor_cancelled_while_constructing_gives_its_gpu_back():
    # Worker processes under a Nanny (Dask's scheduler keeps an actor cancelled while
    # processing in its worker's actor set, which gen_cluster's final validation rejects).
    with LocalCluster(
        n_workers=1, threads_per_worker=2, resources={"GPU": 1}, dashboard_address=":0"
    ) as cluster:
        with Client(cluster) as client:
            gr.install(client)
            actor = client.submit(SlowHolder, "ctor", actor=True, resources={"GPU": 1})
            _wait_until(lambda: client.processing() and any(client.processing().values()))
            _wait_until(lambda: _is_executing(client, actor.key))
            client.cancel(actor)
            Event("ctor", client=client).set()  # the constructor returns after the cancel
            task = client.submit(ids, resources={"GPU": 1}, pure=False)
            assert task.result(timeout=TIMEOUT) == [0]
            (table,) = gr.allocations(client).values()
            assert table == {0: {}}


def _one_gpu_in_process():
    """One in-process worker declaring GPU=1, two threads (module state shared with it)."""
    return LocalCluster(
        n_workers=1,
        processes=False,
        threads_per_worker=2,
        resources={"GPU": 1},
        dashboard_address=":0",
    )


_instances: list = []  # weak references to SlowInstance objects (in-process workers)


class SlowInstance:
    """Constructs once the Event ``name`` is set; a weak reference to it is kept above."""

    def __init__(self, name):
        Event(name).wait(TIMEOUT)
        _instances.append(weakref.ref(self))


class WatchStarts(WorkerPlugin):
    """Notes, as each task starts executing, whether a SlowInstance is still alive."""

    name = "watch-starts"

    def __init__(self):
        self.starts = {}

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing":
            self.starts[key] = any(ref() is not None for ref in _instances)


def test_no_task_starts_on_a_cancelled_actors_device_while_its_instance_lives():
    # The constructor of an actor cancelled meanwhile finishes; Dask drops the instance, but
    # the worker's execute task still holds it until its stimulus returns. The soak saw a
    # GPU task start on that device 0.26 ms before the instance was collected.
    _instances.clear()
    watch = WatchStarts()
    with _one_gpu_in_process() as cluster:
        with Client(cluster) as client:
            gr.install(client)
            client.register_plugin(watch)
            (worker,) = cluster.workers.values()
            actor = client.submit(SlowInstance, "ctor-alive", actor=True, resources={"GPU": 1})
            _wait_until(lambda: _is_executing(client, actor.key))
            client.cancel(actor)
            task = client.submit(ids, resources={"GPU": 1}, pure=False)
            _wait_until(lambda: task.key in worker.state.tasks)
            Event("ctor-alive", client=client).set()  # the constructor returns after the cancel
            assert task.result(timeout=TIMEOUT) == [0]
            started_while_alive = worker.plugins["watch-starts"].starts[task.key]
    assert len(_instances) == 1  # the constructor did finish
    assert not started_while_alive


_kept: list = []  # strong references: instances something else keeps alive


class KeptInstance:
    """Constructs once the Event ``name`` is set, and stays referenced from ``_kept``."""

    def __init__(self, name):
        Event(name).wait(TIMEOUT)
        _kept.append(self)


def test_a_cancelled_actors_instance_kept_alive_gives_its_device_back_after_the_limit(
    monkeypatch,
):
    # The devices of a constructor that finished after its cancel stay held while its
    # instance lives; one that something keeps alive for good must not hold them forever.
    from dask_gpuresources import worker as worker_module

    monkeypatch.setattr(worker_module, "LINGER_LIMIT", 1.0)
    _kept.clear()
    logger = logging.getLogger("distributed.gpuresources")
    with _one_gpu_in_process() as cluster:
        with Client(cluster) as client, captured_logger(logger) as log:
            gr.install(client)
            (worker,) = cluster.workers.values()
            actor = client.submit(KeptInstance, "ctor-kept", actor=True, resources={"GPU": 1})
            _wait_until(lambda: _is_executing(client, actor.key))
            client.cancel(actor)
            task = client.submit(ids, resources={"GPU": 1}, pure=False)
            _wait_until(lambda: task.key in worker.state.tasks)
            started = time.monotonic()
            Event("ctor-kept", client=client).set()  # the constructor returns after the cancel
            assert task.result(timeout=TIMEOUT) == [0]
            waited = time.monotonic() - started
            (table,) = gr.allocations(client).values()
            assert table == {0: {}}
        assert len(_kept) == 1  # still alive: only the limit gave the device back
        assert waited >= 0.9, waited
        assert "still referenced after 1 s; its GPUs are given back now" in log.getvalue()
    _kept.clear()


def _is_executing(client, key):
    def executing(dask_worker):
        return [ts.key for ts in dask_worker.state.executing]

    return any(key in keys for keys in client.run(executing).values())


def _wait_until(condition):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(condition)
        time.sleep(0.02)


@gen_cluster(client=True, nthreads=[("", 2)], worker_kwargs={"resources": {"GPU": 1}})
async def test_actor_whose_constructor_reschedules_gets_the_gpu_on_its_next_try(c, s, a):
    await gr.install(c)
    actor = c.submit(RescheduledOnce, "resched", actor=True, resources={"GPU": 1})
    proxy = await asyncio.wait_for(actor, TIMEOUT)
    assert _attempts["resched"] == 2
    assert (await gr.allocations(c))[a.address] == {0: {actor.key: 1.0}}
    del proxy, actor
    task = c.submit(ids, resources={"GPU": 1}, pure=False)
    assert await asyncio.wait_for(task, TIMEOUT) == [0]


@gen_cluster(client=True, nthreads=[("", 2)], worker_kwargs={"resources": {"GPU": 1}})
async def test_actor_whose_constructor_fails_gives_its_gpu_back(c, s, a):
    await gr.install(c)
    actor = c.submit(Holder, "unexpected argument", actor=True, resources={"GPU": 1})
    with pytest.raises(TypeError):
        await asyncio.wait_for(actor, TIMEOUT)
    # the erred actor's future is still held here: its devices come back all the same
    task = c.submit(ids, resources={"GPU": 1}, pure=False)
    assert await asyncio.wait_for(task, TIMEOUT) == [0]


# -- 3. the worker plugin registered again ---------------------------------------------------


@gen_cluster(client=True, nthreads=[])
async def test_registering_the_worker_plugin_again_keeps_leases_and_children(c, s):
    plugin = gr.GPUWorkerPlugin(detect=True)
    async with Worker(s.address, nthreads=2, resources={"GPU": 1}, plugins={plugin}) as w:
        actor = await c.submit(Holder, actor=True, resources={"GPU": 1})
        assert await actor.ping()
        before = w.plugins["gpuresources"]
        # The scheduler plugin registers the worker plugin: Dask replaces the preload's one.
        await gr.install(c)
        await async_poll_for(lambda: w.plugins.get("gpuresources") is not before, TIMEOUT)
        assert (await gr.allocations(c))[w.address] == {0: {actor._key: 1.0}}
        task = c.submit(ids, resources={"GPU": 1}, pure=False)
        await asyncio.sleep(0.5)  # a GPU task must not start while the actor holds device 0
        assert not task.done()
        del actor
        gc.collect()
        assert await asyncio.wait_for(task, TIMEOUT) == [0]


@gen_cluster(client=True, nthreads=[])
async def test_registering_the_worker_plugin_again_does_not_kill_isolated_tasks(c, s):
    plugin = gr.GPUWorkerPlugin(detect=True)
    async with Worker(s.address, nthreads=2, resources={"GPU": 1}, plugins={plugin}) as w:
        await gr.install(c)
        with dask.annotate(isolation="process"):
            task = c.submit(_sleep_then_ids, 1.5, resources={"GPU": 1}, pure=False)
        await _executing(w, task.key)
        before = w.plugins["gpuresources"]
        await w.plugin_add(gr.GPUWorkerPlugin())  # Dask replaces a plugin of the same name
        assert w.plugins["gpuresources"] is not before
        assert await asyncio.wait_for(task, TIMEOUT) == [0]


def _sleep_then_ids(seconds):
    time.sleep(seconds)
    return gr.get_gpu_ids()


# -- 4. the starvation guard -----------------------------------------------------------------


@gen_cluster(
    client=True,
    nthreads=[("", 4)],
    worker_kwargs={"resources": {"GPU": 2}},
    config={"gpuresources.worker.bypass-limit": "50ms"},
)
async def test_request_that_waits_for_an_actor_does_not_freeze_smaller_work(c, s, a):
    await gr.install(c)
    actor = await c.submit(Holder, actor=True, resources={"GPU": 1})
    table = (await gr.allocations(c))[a.address]
    held = [d for d, holders in table.items() if actor._key in holders]
    big = c.submit(ids, resources={"GPU": 2}, pure=False)
    await async_poll_for(lambda: any(ts.key == big.key for ts in a.state.constrained), TIMEOUT)
    await asyncio.sleep(0.2)  # past the bypass limit
    smalls = c.map(ids, range(4), resources={"GPU": 1}, pure=False)
    results = await asyncio.wait_for(c.gather(smalls), TIMEOUT)
    assert all(r == [1 - held[0]] for r in results)
    assert not big.done()
    del actor
    gc.collect()
    assert await asyncio.wait_for(big, TIMEOUT) == [0, 1]


def started(tag):
    return tag, time.monotonic()


@gen_cluster(
    client=True,
    nthreads=[("", 1)],
    worker_kwargs={"resources": {"GPU": 2}},
    config={"gpuresources.worker.bypass-limit": "50ms"},
)
async def test_work_passing_a_blocked_request_starts_in_dask_order(c, s, a):
    # Requests of different sizes queue behind a GPU=2 that waits for an actor: those that
    # pass it start in Dask's priority order across sizes, and none is left indexed.
    await gr.install(c)
    actor = await c.submit(Holder, actor=True, resources={"GPU": 1})
    big = c.submit(ids, resources={"GPU": 2}, pure=False, priority=100)
    await async_poll_for(lambda: any(ts.key == big.key for ts in a.state.constrained), TIMEOUT)
    hold_first = c.submit(hold, "passing", resources={"GPU": 0.5}, pure=False, priority=50)
    await _executing(a, hold_first.key)
    amounts = [1, 0.5, 0.25, 1, 0.5, 0.25, 1, 0.5]
    futures = [
        c.submit(started, i, resources={"GPU": x}, pure=False, priority=i)
        for i, x in enumerate(amounts)
    ]
    doomed = c.submit(started, "doomed", resources={"GPU": 1}, pure=False, priority=-1)
    await async_poll_for(lambda: len(a.state.constrained) == len(amounts) + 2, TIMEOUT)
    await c.cancel(doomed)
    await Event("passing").set()
    results = await asyncio.wait_for(c.gather(futures), TIMEOUT)
    order = [tag for tag, _ in sorted(results, key=lambda r: r[1])]
    assert order == sorted(range(len(amounts)), reverse=True)
    assert not big.done()
    devices = a.extensions["gpuresources"]
    assert [ts.key for ts in devices.queue.heads()] == [big.key]
    del actor
    gc.collect()
    assert await asyncio.wait_for(big, TIMEOUT) == [0, 1]
    await async_poll_for(lambda: len(devices.queue) == 0, TIMEOUT)


@gen_cluster(
    client=True,
    nthreads=[("", 4)],
    worker_kwargs={"resources": {"GPU": 2}},
    config={"gpuresources.worker.bypass-limit": "50ms"},
)
async def test_request_that_running_tasks_make_room_for_is_not_starved(c, s, a):
    await gr.install(c)
    first = c.submit(hold, "first", resources={"GPU": 1}, pure=False)
    await _executing(a, first.key)
    big = c.submit(ids, resources={"GPU": 2}, pure=False)
    await async_poll_for(lambda: any(ts.key == big.key for ts in a.state.constrained), TIMEOUT)
    await asyncio.sleep(0.2)  # past the bypass limit: smaller work is held back now
    later = c.submit(ids, 0, resources={"GPU": 1}, pure=False)
    await asyncio.sleep(0.2)
    assert not later.done()
    await Event("first").set()
    assert await asyncio.wait_for(big, TIMEOUT) == [0, 1]
    assert len(await asyncio.wait_for(later, TIMEOUT)) == 1


# -- 10, 11. Dask stays Dask; GPU count changed at run time ----------------------------------


@gen_cluster(client=True, nthreads=[])
async def test_worker_without_gpus_keeps_the_resources_dask_gave_it(c, s):
    await gr.install(c)
    async with Worker(s.address, nthreads=1, resources={"A": 2}) as w:
        await async_poll_for(lambda: "gpuresources" in w.plugins, TIMEOUT)
        assert w.state.total_resources == {"A": 2}
        assert s.workers[w.address].resources == {"A": 2}
    async with Worker(s.address, nthreads=1) as w:
        await async_poll_for(lambda: "gpuresources" in w.plugins, TIMEOUT)
        assert w.state.total_resources == {}


@gen_cluster(client=True, nthreads=[("", 4)], worker_kwargs={"resources": {"GPU": 1}})
async def test_set_resources_resizes_the_devices(c, s, a):
    await gr.install(c)
    await a.set_resources(GPU=2)
    assert await asyncio.wait_for(c.submit(ids, resources={"GPU": 2}), TIMEOUT) == [0, 1]
    first = c.submit(hold, "one", resources={"GPU": 1}, pure=False)
    second = c.submit(hold, "two", resources={"GPU": 1}, pure=False)
    await _executing(a, first.key)
    await _executing(a, second.key)
    # Shrinking while both devices are held: device 1 leaves once it comes free.
    await a.set_resources(GPU=1)
    await Event("one").set()
    await Event("two").set()
    assert sorted([*await first, *await second]) == [0, 1]
    assert await asyncio.wait_for(c.submit(ids, 3, resources={"GPU": 1}), TIMEOUT) == [0]
    assert (await gr.allocations(c))[a.address] == {0: {}}
    with pytest.raises(DeviceCountError, match=r"got GPU=1\.5; use set_resources\(GPU=1\)"):
        await a.set_resources(GPU=1.5)
    assert a.state.total_resources["GPU"] == 1


# -- 12. config defaults that vanish ---------------------------------------------------------


def test_plugins_work_when_the_config_defaults_were_reset():
    saved = dask.config.config.pop("gpuresources")
    try:
        with LocalCluster(
            n_workers=1, processes=False, resources={"GPU": 1}, dashboard_address=":0"
        ) as cluster:
            with Client(cluster) as client:
                gr.install(client)
                future = client.submit(ids, resources={"GPU": 1}, pure=False)
                assert future.result(timeout=TIMEOUT) == [0]
    finally:
        dask.config.config["gpuresources"] = saved


# -- 5, 6. facade actors in worker processes -------------------------------------------------


@gr.remote(num_gpus=1, isolation="thread")
class Busy:
    def work(self, started, release):
        open(started, "w").close()
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
        return time.time()


@gr.remote(num_gpus=1, isolation="thread")  # starts at once when its device is free
def stamp():
    return time.time(), gr.get_gpu_ids()


@gr.remote(num_gpus=0, isolation="process")
class ChildPid:
    def pid(self):
        return os.getpid()


class Marker:
    pass


@gr.remote(num_gpus=0, isolation="thread")
class Keeps:
    def __init__(self):
        self.marker = Marker()

    def ping(self):
        return True


@gr.remote(num_gpus=0)
def markers():
    gc.collect()
    return sum(type(o).__name__ == "Marker" for o in gc.get_objects())


def _wait_for_file(path):
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)


def test_killed_thread_actor_keeps_its_gpu_until_its_method_returns(tmp_path):
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    gr.init(num_gpus=1)
    try:
        actor = Busy.remote()
        actor.work.remote(started, release)
        _wait_for_file(started)
        gr.kill(actor)
        later = stamp.remote()
        ready, _ = gr.wait([later], timeout=1.0)
        assert not ready  # its method still runs on device 0
        released_at = time.time()
        open(release, "w").close()
        began, gpu_ids = gr.get(later, timeout=TIMEOUT)
        assert gpu_ids == [0]
        assert began >= released_at
    finally:
        gr.shutdown()


def test_actors_without_gpus_are_finalized_when_killed(alive):
    gr.init(num_gpus=1)
    try:
        isolated = ChildPid.remote()
        pid = gr.get(isolated.pid.remote(), timeout=TIMEOUT)
        assert pid != os.getpid() and alive(pid)
        gr.kill(isolated)
        deadline = time.monotonic() + TIMEOUT
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid)

        keeps = Keeps.remote()
        assert gr.get(keeps.ping.remote(), timeout=TIMEOUT)
        assert gr.get(markers.remote(), timeout=TIMEOUT) == 1
        gr.kill(keeps)
        deadline = time.monotonic() + TIMEOUT
        while gr.get(markers.remote(), timeout=TIMEOUT) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gr.get(markers.remote(), timeout=TIMEOUT) == 0
    finally:
        gr.shutdown()


def test_whole_amounts_and_fractions_share_one_representation():
    from dask_gpuresources._allocator import parse_gpu_amount

    assert parse_gpu_amount(0.33334) == parse_gpu_amount(Fraction(1, 3)) == Fraction(3333, 10000)
    assert 3 * parse_gpu_amount(1 / 3) <= 1


@gr.remote(num_gpus=1, isolation="thread")
class SlowToBuild:
    def __init__(self):
        time.sleep(0.5)

    def ping(self):
        return True


def _scheduler_state(key):
    def state(dask_scheduler, key=key):
        ts = dask_scheduler.tasks.get(key)
        return None if ts is None else ts.state

    return gr.api._client().run_on_scheduler(state)


def test_dropped_actor_with_a_call_goes_without_a_garbage_collection():
    # After a method call, Dask's actor proxy sits in a reference cycle: without the fix the
    # actor (and its GPU) stays wanted until the driver's garbage collector runs.
    gr.init(num_gpus=1)
    gc.disable()
    try:
        actor = SlowToBuild.remote()
        key = actor._key
        assert gr.get(actor.ping.remote(), timeout=TIMEOUT)
        del actor
        deadline = time.monotonic() + TIMEOUT
        while _scheduler_state(key) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _scheduler_state(key) is None
        assert gr.get(stamp.remote(), timeout=TIMEOUT)[1] == [0]
    finally:
        gc.enable()
        gr.shutdown()
