"""Nested calls, async, cancel, wait and the package's names, on ``init(num_gpus=...)``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest

import dask_gpuresources as gr


@pytest.fixture(scope="module")
def session():
    gr.init(num_gpus=2, num_cpus=4, dashboard=False)
    try:
        yield
    finally:
        gr.shutdown()


def double(x):
    return 2 * x


def nested(x):
    # runs in the worker process: .remote() goes through the worker's own client
    inner = gr.remote(double)
    return gr.get(inner.remote(x), timeout=30) + 1


def test_remote_inside_a_task_in_a_worker_process(session):
    f = gr.remote(nested)
    assert gr.get(f.remote(5), timeout=60) == 11
    assert gr.get([f.remote(i) for i in range(3)], timeout=60) == [1, 3, 5]


def nested_on_a_gpu(x):
    # runs in an isolated child (num_gpus=1 runs isolated): no worker in this process, so
    # .remote() goes through a client the child connects to the worker's scheduler
    inner = gr.remote(double)
    return gr.get(inner.remote(x), timeout=30) + 1, gr.get_gpu_ids()


class NestingActor:
    def call(self, x):
        return gr.get(gr.remote(double).remote(x), timeout=30)


def test_remote_inside_an_isolated_task_and_actor(session):
    f = gr.remote(num_gpus=1)(nested_on_a_gpu)
    results = gr.get([f.remote(1), f.remote(2)], timeout=60)
    assert [value for value, _ in results] == [3, 5]
    assert all(len(ids) == 1 and ids[0] in (0, 1) for _, ids in results)
    actor = gr.remote(num_gpus=1)(NestingActor).remote()
    assert gr.get(actor.call.remote(4), timeout=60) == 8
    gr.kill(actor)


class Unpickled:
    """An argument that records where it was unpickled (process and thread)."""

    def __init__(self, size):
        self.blob = b"x" * size

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.where = [*state.get("where", ()), (os.getpid(), threading.current_thread().name)]


class Where:
    def where(self, arg):
        return arg.where, len(arg.blob), os.getpid()


def test_actor_arguments_are_unpickled_where_the_method_runs(session):
    # Never on the worker's event loop: a call carrying model weights would stall it.
    isolated = gr.remote(num_gpus=1)(Where).remote()
    where, size, child = gr.get(isolated.where.remote(Unpickled(8 << 20)), timeout=60)
    assert size == 8 << 20
    assert [pid for pid, _ in where] == [child]  # once, in the actor's child: not the worker
    threaded = gr.remote(num_gpus=1, isolation="thread")(Where).remote()
    where, size, _ = gr.get(threaded.where.remote(Unpickled(1 << 20)), timeout=60)
    assert len(where) == 1 and where[0][1].startswith("actor-"), where  # the actor's thread
    gr.kill(isolated)
    gr.kill(threaded)


async def async_double(x):
    await asyncio.sleep(0.01)
    return 2 * x


@gr.remote
class AsyncActor:
    async def twice(self, x):
        await asyncio.sleep(0.01)
        return 2 * x


def test_async_functions_and_actor_methods_run(session):
    assert gr.get(gr.remote(async_double).remote(4), timeout=30) == 8
    actor = AsyncActor.remote()
    assert gr.get(actor.twice.remote(3), timeout=30) == 6


def test_refs_are_awaitable_and_get_in_a_loop_points_at_await(session):
    f = gr.remote(double)

    async def main():
        value = await f.remote(21)
        with pytest.raises(RuntimeError, match="await"):
            gr.get(f.remote(1))
        return value

    assert asyncio.run(main()) == 42


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def test_cancel_a_queued_task_and_a_running_isolated_one(session):
    hold = gr.remote(num_gpus=2)(sleep_then)
    running = hold.remote(60, "held")
    deadline = time.monotonic() + 30
    while gr.available_resources()["GPU"] != 0:
        assert time.monotonic() < deadline, "the holding task never started"
        time.sleep(0.05)
    queued = gr.remote(num_gpus=1)(sleep_then).remote(0, "queued")
    gr.cancel(queued)
    with pytest.raises(gr.TaskCancelledError):
        gr.get(queued, timeout=30)
    gr.cancel(running, force=True)
    with pytest.raises(gr.TaskCancelledError):
        gr.get(running, timeout=30)
    # the child was ended and its devices came back
    assert gr.get(gr.remote(num_gpus=2)(sleep_then).remote(0, "next"), timeout=30) == "next"


def test_wait_returns_as_soon_as_enough_are_ready(session):
    f = gr.remote(sleep_then)
    slow, fast = f.remote(30, "slow"), f.remote(0, "fast")
    start = time.monotonic()
    ready, not_ready = gr.wait([slow, fast], num_returns=1, timeout=20)
    assert ready == [fast] and not_ready == [slow]
    assert time.monotonic() - start < 10
    ready, not_ready = gr.wait([slow], timeout=0.2)
    assert ready == [] and not_ready == [slow]
    gr.cancel(slow)


def test_the_package_lists_its_public_names():
    code = (
        "import dask_gpuresources as gr; names = dir(gr); "
        "missing = [n for n in gr.__all__ if n not in names]; "
        "assert not missing, missing; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.stdout.strip() == "ok", out.stderr
    assert {"cancel", "TaskCancelledError"} <= set(gr.__all__)
