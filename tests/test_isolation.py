"""Isolated GPU tasks: child processes bound to their lease, on real Dask clusters.

GPUs are declared, not real: what is checked is what each child process is told
(``CUDA_VISIBLE_DEVICES``), which process ran what, and that children come and go as promised.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tempfile
import threading
import time

import dask
import psutil
import pytest
from distributed import Client, LocalCluster, Nanny
from distributed.utils_test import async_poll_for, captured_logger, gen_cluster

import dask_gpuresources as gr
from dask_gpuresources._isolation import EXECUTOR_NAME
from dask_gpuresources._nvml import FakeNVML

PROCESS = {"isolation": "process"}
ONE_WORKER_4_GPUS = [("127.0.0.1", 4, {"resources": {"GPU": 4}})]


def where(x=0, hold=None):
    """Which process ran the task, what it was told, and what get_gpu_ids() says.

    ``hold``: a path; the task waits until it exists (a child process has no Dask client
    for a ``distributed.Event``).
    """
    if hold is not None:
        deadline = time.monotonic() + 30
        while not os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.01)
    elif x:
        time.sleep(x)
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), gr.get_gpu_ids()


def executor_of(worker):
    return worker.executors[EXECUTOR_NAME]


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def no_leases(c):
    table = await gr.allocations(c)
    return all(not holders for devices in table.values() for holders in devices.values())


@gen_cluster(client=True, nthreads=ONE_WORKER_4_GPUS)
async def test_child_sees_exactly_its_lease(c, s, a):
    await gr.install(c)
    hold = os.path.join(tempfile.mkdtemp(), "go")
    with dask.annotate(**PROCESS):
        whole = c.map(where, range(4), hold=hold, resources={"GPU": 1}, pure=False)
        await async_poll_for(lambda: len(executor_of(a).children()) == 4, timeout=20)
        open(hold, "w").close()
        whole = await c.gather(whole)
        two = await c.submit(where, resources={"GPU": 2}, pure=False)
        half = await c.gather(c.map(where, range(2), resources={"GPU": 0.5}, pure=False))

    # four concurrent 1-GPU tasks: four children, one device each, none the worker itself
    assert sorted(env for _, env, _ in whole) == ["0", "1", "2", "3"]
    assert all(env == str(ids[0]) and len(ids) == 1 for _, env, ids in whole)
    assert len({pid for pid, _, _ in whole}) == 4
    assert os.getpid() not in {pid for pid, _, _ in whole}
    # a 2-GPU task's child sees both of its devices, in order
    pid, env, ids = two
    assert env == ",".join(map(str, ids)) and len(ids) == 2
    # fractional tasks: one device each, the one their lease names
    for _, env, ids in half:
        assert len(ids) == 1 and env == str(ids[0])
    assert await no_leases(c)


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 2, {"resources": {"GPU": 2}})],
    Worker=Nanny,
    worker_kwargs={"env": {"CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb"}},
)
async def test_uuid_tokens_reach_the_child_under_a_nanny(c, s, a):
    # A Nanny's worker process is daemonic: multiprocessing could not start children there.
    await gr.install(c)
    with dask.annotate(**PROCESS):
        results = await c.gather(c.map(where, [0.3, 0.3], resources={"GPU": 1}, pure=False))
    assert sorted(env for _, env, _ in results) == ["GPU-aaaa", "GPU-bbbb"]
    assert sorted(ids[0] for _, _, ids in results) == [0, 1]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 2, {"resources": {"GPU": 1}})])
async def test_children_are_reused_per_device_set(c, s, a):
    await gr.install(c)
    with dask.annotate(**PROCESS):
        pids = [(await c.submit(where, resources={"GPU": 1}, pure=False))[0] for _ in range(4)]
    assert len(set(pids)) == 1
    assert executor_of(a).started == 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})])
async def test_max_calls_recycles_the_child(c, s, a):
    await gr.install(c)
    with dask.annotate(isolation="process", max_calls=2):
        pids = [(await c.submit(where, resources={"GPU": 1}, pure=False))[0] for _ in range(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    await async_poll_for(lambda: not alive(pids[0]) and not alive(pids[2]), timeout=10)
    with dask.annotate(isolation="process", max_calls=1):
        ones = [(await c.submit(where, resources={"GPU": 1}, pure=False))[0] for _ in range(3)]
    assert len(set(ones)) == 3


def crash(how):
    if how == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif how == "exit":
        os._exit(3)
    elif how == "sys.exit":
        sys.exit(4)
    time.sleep(60)


@pytest.mark.parametrize("how, code", [("segfault", -signal.SIGSEGV), ("exit", 3), ("sys.exit", 4)])
def test_a_crash_fails_only_its_task(how, code):
    @gen_cluster(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})])
    async def run(c, s, a):
        await gr.install(c)
        with dask.annotate(**PROCESS):
            with captured_logger("distributed.gpuresources") as log:
                future = c.submit(crash, how, resources={"GPU": 1}, pure=False)
                with pytest.raises(gr.IsolatedTaskError) as info:
                    await future
            err = info.value
            assert err.exitcode == code and err.devices == ("0",) and err.worker == a.address
            assert f"exit code {code}" in str(err) and "CUDA_VISIBLE_DEVICES='0'" in str(err)
            assert "died running task" in log.getvalue()
            assert await no_leases(c)
            # the worker carries on: the device is free and the next task gets a fresh child
            pid, env, ids = await c.submit(where, resources={"GPU": 1}, pure=False)
            assert (env, ids) == ("0", [0]) and pid != err.pid
        assert a.status.name == "running"
        assert executor_of(a).crashed == 1

    run()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})])
async def test_cancelling_ends_the_child_and_frees_the_device(c, s, a):
    await gr.install(c)
    with dask.annotate(**PROCESS):
        future = c.submit(where, 60, resources={"GPU": 1}, pure=False)
        await async_poll_for(lambda: executor_of(a).children(), timeout=10)
        await async_poll_for(lambda: executor_of(a).children()[0]["state"] == "running", 10)
        (child,) = executor_of(a).children()
        await future.cancel()
    await async_poll_for(lambda: not alive(child["pid"]), timeout=10)
    await async_poll_for(lambda: not a.state.executing, timeout=10)
    assert await no_leases(c)
    with dask.annotate(**PROCESS):
        pid, env, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
    assert env == "0" and pid != child["pid"]


def fails_with_value_error():
    def inner():
        raise ValueError("no such layer: 'dense_7'")

    inner()


def big_array(n):
    import numpy as np

    return np.arange(n, dtype="float64")


def total(x):
    return float(x.sum()), os.getpid()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 2, {"resources": {"GPU": 1}})])
async def test_results_errors_and_dependencies_travel_intact(c, s, a):
    pytest.importorskip("numpy")
    await gr.install(c)
    with dask.annotate(**PROCESS):
        bad = c.submit(fails_with_value_error, resources={"GPU": 1}, pure=False)
        with pytest.raises(ValueError, match="dense_7") as info:
            await bad
        # the child's own frames are in the traceback the client sees
        names = []
        tb = info.value.__traceback__
        while tb is not None:
            names.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        assert names[-2:] == ["fails_with_value_error", "inner"]

        n = 4_000_000  # 32 MB
        arr = c.submit(big_array, n, resources={"GPU": 1}, pure=False)
        got = await arr
        assert got.shape == (n,) and got[-1] == n - 1
        s_, pid = await c.submit(total, arr, resources={"GPU": 1}, pure=False)
        assert s_ == n * (n - 1) / 2 and pid != os.getpid()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 2, {"resources": {"GPU": 2}})])
async def test_thread_is_the_default(c, s, a):
    await gr.install(c)
    pid, env, ids = await c.submit(where, resources={"GPU": 1}, pure=False)
    assert pid == os.getpid() and len(ids) == 1
    with dask.annotate(**PROCESS):
        pid, _, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
    assert pid != os.getpid()


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 2, {"resources": {"GPU": 2}})],
    config={"gpuresources.isolation.mode": "process"},
)
async def test_config_isolates_gpu_tasks_only(c, s, a):
    await gr.install(c)
    pid, env, ids = await c.submit(where, resources={"GPU": 1}, pure=False)
    assert pid != os.getpid() and env == str(ids[0])
    pid, env, ids = await c.submit(where, pure=False)
    assert pid == os.getpid() and ids == []
    # a task annotated thread stays in the worker; one annotated process without a GPU
    # is isolated and sees no device
    with dask.annotate(isolation="thread"):
        pid, _, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
    assert pid == os.getpid()
    with dask.annotate(**PROCESS):
        pid, env, ids = await c.submit(where, pure=False)
    assert pid != os.getpid() and env == "" and ids == []


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})])
async def test_bad_isolation_options_are_rejected_at_submission(c, s, a):
    await gr.install(c)
    with dask.annotate(isolation="proc"):
        future = c.submit(where, resources={"GPU": 1}, pure=False)
    with pytest.raises(gr.InvalidRequestError, match="got 'proc'; use dask.annotate"):
        await future
    with dask.annotate(isolation="process", max_calls=-1):
        future = c.submit(where, resources={"GPU": 1}, pure=False)
    with pytest.raises(gr.InvalidRequestError, match=r"max_calls must be .* got -1"):
        await future
    # nothing leaked: the cluster goes on
    with dask.annotate(**PROCESS):
        _, env, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
    assert env == "0"
    assert await no_leases(c)


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})],
    config={"gpuresources.isolation.idle-timeout": "200ms"},
)
async def test_idle_children_are_reaped(c, s, a):
    await gr.install(c)
    with dask.annotate(**PROCESS):
        pid, _, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
    await async_poll_for(lambda: not alive(pid), timeout=10)
    assert executor_of(a).children() == [] and executor_of(a).reaped >= 1


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})],
    config={"gpuresources.isolation.recycle-gpu-memory": "1 GiB"},
)
async def test_a_child_holding_gpu_memory_is_recycled(c, s, a):
    nvml = FakeNVML.with_gpus(1)
    await c.register_plugin(gr.GPUWorkerPlugin(nvml=nvml))
    with dask.annotate(**PROCESS):
        first, _, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
        again, _, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
        assert first == again  # nothing held: the child stays warm
        executor_of(a)._nvml.set_process_memory(first, 3 * 2**30)
        with captured_logger("distributed.gpuresources", level=logging.INFO) as log:
            third, _, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
            fourth, _, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
    assert third == first != fourth
    assert f"Recycling isolated child pid {first}" in log.getvalue()
    assert "3072 MiB of GPU memory" in log.getvalue()


def child_facts():
    seen = {}

    def in_a_thread():
        seen["ids"] = gr.get_gpu_ids()

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join()
    return "distributed" in sys.modules, seen["ids"], gr.get_gpu_ids()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})])
async def test_child_stays_light_and_threads_see_the_lease(c, s, a):
    await gr.install(c)
    # child_facts is pickled by value (its module imports distributed; it must not be
    # imported in the child for this check to mean anything)
    fn = type(child_facts)(child_facts.__code__, {"gr": gr, "threading": threading, "sys": sys})
    with dask.annotate(**PROCESS):
        loaded, in_thread, ids = await c.submit(fn, resources={"GPU": 1}, pure=False)
    assert not loaded
    assert in_thread == ids == [0]


def test_no_orphans_after_a_process_cluster_closes():
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            resources={"GPU": 2},
            dashboard_address=":0",
            scheduler_port=0,
        ) as cluster,
        Client(cluster) as client,
    ):
        gr.install(client)
        with dask.annotate(**PROCESS):
            results = client.gather(client.map(where, [0.5] * 4, resources={"GPU": 1}, pure=False))
        pids = {pid for pid, _, _ in results}
        workers = set(client.run(os.getpid).values())
        assert pids and not pids & workers
        for pid in pids:
            assert psutil.Process(pid).ppid() in workers
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})])
async def test_worker_close_ends_children(c, s, a):
    await gr.install(c)
    with dask.annotate(**PROCESS):
        pid, _, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
        running = c.submit(where, 60, resources={"GPU": 1}, pure=False)
        await async_poll_for(lambda: len(executor_of(a).children()) == 1, timeout=10)
        await async_poll_for(lambda: executor_of(a).children()[0]["state"] == "running", 10)
    await a.close()
    assert not alive(pid)
    del running
    await asyncio.sleep(0)


def test_wire_format_round_trips_and_keeps_main_by_value():
    """Messages to children: one pickle plus out-of-band buffers, framed for two reads.

    The standard pickler is tried first (fast); anything of ``__main__`` and anything only
    cloudpickle can pickle goes by value, since a child cannot import the driver's script.
    """
    import socket
    import types

    from dask_gpuresources._wire import dumps as _dumps
    from dask_gpuresources._wire import loads as _loads
    from dask_gpuresources._wire import recv as _recv
    from dask_gpuresources._wire import send as _send

    np = pytest.importorskip("numpy")
    in_main = types.FunctionType((lambda x: x + 1).__code__, {"__name__": "__main__"}, "inc")
    in_main.__module__ = "__main__"
    big = np.arange(100_000, dtype="int64")  # an out-of-band buffer, over one write
    message = ("run", {"k": b"v" * 10}, big, in_main, lambda y: y * 2)

    frames = _dumps(message)
    assert len(frames) == 2 and b"cloudpickle" in bytes(frames[0])
    assert b"cloudpickle" not in bytes(_dumps(("ok", [1, 2], {"a": (3,)}))[0])

    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender = threading.Thread(target=_send, args=(ours, frames))
        sender.start()
        op, data, array, fn, fn2 = _loads(_recv(theirs))
        sender.join()
        _send(ours, _dumps(("small", 1)))
        assert _loads(_recv(theirs)) == ("small", 1)
    assert op == "run" and data == {"k": b"v" * 10}
    assert (array == big).all() and array.flags.writeable
    assert fn(1) == 2 and fn2(2) == 4
