"""The Ray-style facade on real Dask clusters (GPUs declared), with Ray's GPU scenarios.

Most tests connect with ``init(address=...)`` to an in-process cluster whose workers declare
0, 5 and 10 GPUs; actors there use thread isolation where a test makes many of them (a child
process per actor would only slow the test), and process isolation where that is the point.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
import time

import psutil
import pytest
from distributed import Scheduler, SpecCluster, Worker

import dask_gpuresources as ray

HETERO = [0, 5, 10]


def make_cluster(gpus_per_worker, threads=None):
    workers = {
        f"w{i}-gpu{g}": {
            "cls": Worker,
            "options": {"nthreads": threads or max(g, 2), "resources": {"GPU": g}},
        }
        for i, g in enumerate(gpus_per_worker)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0", "port": 0}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING)


@pytest.fixture
def cluster():
    with make_cluster(HETERO) as c:
        ray.init(address=c.scheduler_address)
        try:
            yield c
        finally:
            ray.shutdown()


@pytest.fixture
def one_gpu():
    with make_cluster([1]) as c:
        ray.init(address=c.scheduler_address)
        try:
            yield c
        finally:
            ray.shutdown()


@ray.remote(num_gpus=1, isolation="thread")
class Holder:
    def __init__(self):
        self.ids = ray.get_gpu_ids()

    def where(self):
        ctx = ray.get_runtime_context()
        assert ray.get_gpu_ids() == self.ids
        return ctx.get_node_id(), tuple(self.ids), ctx.get_actor_id()


@ray.remote(num_gpus=1)
def task_interval(hold=0.05):
    ids = ray.get_gpu_ids()
    start = time.monotonic()
    time.sleep(hold)
    return ray.get_runtime_context().get_node_id(), tuple(ids), start, time.monotonic()


def test_one_actor_per_device_then_the_next_waits(cluster):
    actors = [Holder.remote() for _ in range(15)]
    placed = ray.get([a.where.remote() for a in actors], timeout=60)
    pairs = [(node, ids) for node, ids, _ in placed]
    assert len(set(pairs)) == 15 and all(len(ids) == 1 for _, ids in pairs)
    per_worker = collections.Counter(node for node, _ in pairs)
    assert sorted(per_worker.values()) == [5, 10]
    assert ray.available_resources()["GPU"] == 0

    extra = Holder.remote()
    waiting = extra.where.remote()  # returns at once although the actor cannot exist yet
    ready, not_ready = ray.wait([waiting], timeout=1)
    assert ready == [] and not_ready == [waiting]

    node, ids, _ = placed[3]
    ray.kill(actors[3])
    assert ray.get(waiting, timeout=30)[:2] == (node, ids)  # it took the freed device


def test_two_and_one_gpu_actors_fill_every_device_without_sharing(cluster):
    TwoGPU = Holder.options(num_gpus=2)
    twos = [TwoGPU.remote() for _ in range(5)]
    ones = [Holder.remote() for _ in range(5)]
    placed = ray.get([a.where.remote() for a in twos + ones], timeout=60)
    held = [(node, i) for node, ids, _ in placed for i in ids]
    assert len(held) == 15 and len(set(held)) == 15
    assert all(len(ids) == 2 for _, ids, _ in placed[:5])


def test_tasks_beside_live_actors_never_get_their_devices(cluster):
    actors = [Holder.remote() for _ in range(6)]
    held = {(node, ids[0]) for node, ids, _ in ray.get([a.where.remote() for a in actors])}
    results = ray.get([task_interval.remote() for _ in range(60)], timeout=120)
    used = collections.defaultdict(list)
    for node, ids, start, end in results:
        assert len(ids) == 1 and (node, ids[0]) not in held
        used[node, ids[0]].append((start, end))
    for device, intervals in used.items():
        intervals.sort()
        for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
            assert start >= end, f"two tasks held {device} at once"


def test_creating_and_killing_an_actor_repeatedly_never_stalls(one_gpu):
    for _ in range(5):
        actor = Holder.remote()
        assert ray.get(actor.where.remote(), timeout=20)[1] == (0,)
        ray.kill(actor)
    assert ray.get(task_interval.remote(0), timeout=20)[1] == (0,)


def test_infeasible_requests_raise_at_remote(cluster):
    with pytest.raises(ray.InfeasibleRequestError, match=r"GPU=11.*has GPU=10"):
        Holder.options(num_gpus=11).remote()
    with pytest.raises(ray.InfeasibleRequestError, match="GPU=16"):
        task_interval.options(num_gpus=16).remote()
    # nothing was leased: the cluster is whole
    assert ray.available_resources()["GPU"] == 15


def test_bad_options_name_the_value_and_a_correct_call(cluster):
    with pytest.raises(ray.InvalidRequestError, match=r"got 1.5; use"):
        task_interval.options(num_gpus=1.5)
    with pytest.raises(ray.InvalidRequestError, match="num_gpus and num_cpus"):
        ray.remote(resources={"GPU": 1})(task_interval._function)
    with pytest.raises(TypeError, match="try 'task_interval.remote\\(\\)'"):
        task_interval()
    with pytest.raises(TypeError, match="unknown option"):
        ray.remote(num_gpu=1)
    assert ray.get(task_interval.remote(0))[1]  # still usable


def boom(kind):
    raise kind("from the task")


def add(a, b):
    return a + b


def total(values, extra):
    return sum(values) + extra["x"]


def test_get_errors_timeouts_refs_and_put(cluster):
    f = ray.remote(boom)
    with pytest.raises(KeyError, match="from the task"):
        ray.get(f.remote(KeyError))
    slow = ray.remote(time.sleep).remote(5)
    with pytest.raises(ray.GetTimeoutError) as info:
        ray.get(slow, timeout=0.2)
    assert isinstance(info.value, TimeoutError)

    radd = ray.remote(add)
    one = radd.remote(1, 2)
    nested = ray.remote(total).remote([one, ray.put(10)], {"x": radd.remote(one, 1)})
    assert ray.get(nested) == 3 + 10 + 4

    refs = [radd.remote(i, i) for i in range(5)]
    ready, not_ready = ray.wait(refs, num_returns=5, timeout=30)
    assert ray.get(ready) == [0, 2, 4, 6, 8] and not_ready == []
    with pytest.raises(ValueError, match="num_returns must be between 0 and"):
        ray.wait(refs, num_returns=6)
    with pytest.raises(TypeError, match="get\\(\\) takes ObjectRefs"):
        ray.get([1, 2])


def test_init_rules():
    with pytest.raises(RuntimeError, match="not initialised"):
        ray.get_runtime_context()  # the driver: fine
        ray.cluster_resources()
    with make_cluster([2]) as c:
        with pytest.raises(ValueError, match="num_gpus and num_cpus must not be provided"):
            ray.init(num_gpus=2, address=c.scheduler_address)
        ray.init(address=c.scheduler_address)
        try:
            assert ray.is_initialized()
            with pytest.raises(RuntimeError, match="already called"):
                ray.init(address=c.scheduler_address)
            info = ray.init(address=c.scheduler_address, ignore_reinit_error=True)
            assert info.num_gpus == 2
            assert ray.cluster_resources() == {"CPU": 2.0, "GPU": 2.0}
        finally:
            ray.shutdown()
    assert not ray.is_initialized()
    with pytest.raises(ValueError, match=r"got 1.5; use num_gpus=1 or num_gpus=2"):
        ray.init(num_gpus=1.5)


@ray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def incr(self, by=1):
        self.n += by
        return self.n


def test_actor_methods_run_one_at_a_time_in_call_order(cluster):
    c = Counter.remote()
    refs = [c.incr.remote() for _ in range(50)]
    assert ray.get(refs) == list(range(1, 51))


def rendezvous(me, other, folder):
    open(os.path.join(folder, me), "w").close()
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(folder, other)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@ray.remote(num_gpus=1)
class Meeter:
    def meet(self, me, other, folder):
        return rendezvous(me, other, folder)

    def where(self):
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), ray.get_gpu_ids()


def test_isolated_actors_on_one_worker_run_concurrently_and_see_only_their_device(alive):
    with make_cluster([2]) as c:
        ray.init(address=c.scheduler_address)
        try:
            a, b = Meeter.remote(), Meeter.remote()
            (pa, env_a, ids_a), (pb, env_b, ids_b) = ray.get([a.where.remote(), b.where.remote()])
            assert {env_a, env_b} == {"0", "1"} and [int(env_a)] == ids_a and [int(env_b)] == ids_b
            assert len({pa, pb, os.getpid()}) == 3
            folder = tempfile.mkdtemp()
            # each method waits for the other: both return True only if they ran at once
            assert ray.get([a.meet.remote("a", "b", folder), b.meet.remote("b", "a", folder)]) == [
                True,
                True,
            ]
            ray.kill(a)
            deadline = time.monotonic() + 10
            while alive(pa):
                assert time.monotonic() < deadline, "the killed actor's process is still alive"
                time.sleep(0.05)
            with pytest.raises(ray.ActorDiedError, match="is dead"):
                ray.get(a.where.remote())
            assert ray.available_resources()["GPU"] == 1
        finally:
            ray.shutdown()


def call_through(handle):
    return ray.get(handle.incr.remote(10))


def test_handles_travel_to_tasks(cluster):
    c = Counter.remote()
    assert ray.get(c.incr.remote()) == 1
    assert ray.get(ray.remote(call_through).remote(c)) == 11
    assert ray.get(c.incr.remote()) == 12


def test_runtime_context_in_tasks_actors_and_driver(cluster):
    ctx = ray.get_runtime_context()
    assert ctx.get_node_id() is None and ctx.get_task_id() is None

    @ray.remote(num_gpus=0.5)
    def where():
        c = ray.get_runtime_context()
        return c.get_node_id(), c.get_task_id(), c.get_actor_id(), c.get_accelerator_ids()

    ref = where.remote()
    node, task, actor, acc = ray.get(ref)
    assert task == ref.task_id() and actor is None and len(acc["GPU"]) == 1
    assert node in {w.address for w in cluster.workers.values()}
    h = Holder.remote()
    node, ids, actor_id = ray.get(h.where.remote())
    assert actor_id.startswith("Holder-")


def test_a_dead_workers_actor_raises_and_its_devices_come_back(cluster):
    actor = Holder.remote()
    node, ids, _ = ray.get(actor.where.remote())
    (worker,) = [w for w in cluster.workers.values() if w.address == node]
    cluster.sync(worker.close)
    with pytest.raises(ray.ActorDiedError, match="is dead"):
        ray.get(actor.where.remote(), timeout=30)
    remaining = ray.cluster_resources()["GPU"]
    deadline = time.monotonic() + 10
    while ray.available_resources()["GPU"] != remaining:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_dropping_the_last_handle_frees_the_actors_gpu(one_gpu):
    import gc

    actor = Holder.remote()
    assert ray.get(actor.where.remote(), timeout=20)[1] == (0,)
    assert ray.available_resources()["GPU"] == 0
    del actor
    gc.collect()
    # the device comes back without kill(): a task can have it
    assert ray.get(task_interval.remote(0), timeout=20)[1] == (0,)
    deadline = time.monotonic() + 10
    while ray.available_resources()["GPU"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _worker_pids():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_embedded_cluster_splits_devices_over_worker_processes():
    """init(num_gpus=2, n_workers=2): two worker processes, each with its own device."""
    before = _worker_pids()
    ray.init(num_gpus=2, n_workers=2, dashboard=False)
    try:

        def where():
            ctx = ray.get_runtime_context()
            return ctx.get_node_id(), os.environ.get("CUDA_VISIBLE_DEVICES"), ray.get_gpu_ids()

        f = ray.remote(num_gpus=1, isolation="thread")(where)
        seen = set()
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            seen |= {
                (n, env, tuple(ids)) for n, env, ids in ray.get([f.remote() for _ in range(8)])
            }
        assert ray.cluster_resources()["GPU"] == 2
        assert {(env, ids) for _, env, ids in seen} == {("0", (0,)), ("1", (1,))}
        assert len({node for node, _, _ in seen}) == 2
        assert len(_worker_pids() - before) >= 2
    finally:
        ray.shutdown()
    deadline = time.monotonic() + 30
    while _worker_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _worker_pids() - before


def test_embedded_cluster_that_fails_to_start_leaves_no_process():
    before = _worker_pids()
    with pytest.raises(RuntimeError, match="not_an_option"):
        ray.init(num_gpus=1, scheduler_options={"not_an_option": 1})
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while _worker_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _worker_pids() - before
