"""The pool of warm isolated children: what a child's death or a cancel may not do to the next task.

Each test drives the pool through real Dask (``gen_cluster`` with declared GPUs and the
plugin installed) or through :class:`~dask_gpuresources._isolation.IsolatedExecutor`'s own
methods, and each failed against the pool as it was before its fix.
"""

from __future__ import annotations

import os
import signal
import threading

import dask
import psutil
import pytest
from distributed.utils_test import async_poll_for, gen_cluster

import dask_gpuresources as gr
from dask_gpuresources._isolation import EXECUTOR_NAME, IsolatedExecutor, IsolatedRun

PROCESS = {"isolation": "process"}
ONE_GPU = [("127.0.0.1", 1, {"resources": {"GPU": 1}})]


def where():
    """Which process ran the task and what it was told."""
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


def executor_of(worker):
    return worker.executors[EXECUTOR_NAME]


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def idle_pids(executor):
    return [row["pid"] for row in executor.children() if row["state"] == "idle"]


def exited(pid):
    """Whether ``pid``, a child of this process, has exited (it is left to be reaped).

    Not ``alive()``: a killed process shows as a zombie while its other threads still exit.
    """
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


async def kill_idle_child(executor):
    """SIGKILL the one idle child, as the OOM killer would, and wait until it has exited."""
    (pid,) = idle_pids(executor)
    os.kill(pid, signal.SIGKILL)
    await async_poll_for(lambda: exited(pid), timeout=10)
    return pid


@gen_cluster(client=True, nthreads=ONE_GPU)
async def test_a_child_that_died_idle_is_replaced_not_blamed(c, s, a):
    await gr.install(c)
    executor = executor_of(a)
    with dask.annotate(**PROCESS):
        first, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
        dead = await kill_idle_child(executor)
        assert dead == first
        # the next task gets a fresh child, not the corpse, and succeeds
        pid, env = await c.submit(where, resources={"GPU": 1}, pure=False)
    assert env == "0" and pid != first
    assert executor.crashed == 0 and executor.started == 2
    assert first not in [row["pid"] for row in executor.children()]
    # ... and the dead child was reaped, not left a zombie of the worker
    assert not psutil.pid_exists(first)


@gen_cluster(client=True, nthreads=ONE_GPU)
async def test_reap_discards_a_child_that_died_idle(c, s, a):
    # idle-timeout is a minute: only its death makes this child stale
    await gr.install(c)
    executor = executor_of(a)
    with dask.annotate(**PROCESS):
        await c.submit(where, resources={"GPU": 1}, pure=False)
    dead = await kill_idle_child(executor)
    assert executor.reap() == 1
    assert executor.children() == [] and not psutil.pid_exists(dead)


@pytest.mark.parametrize("when", ["abort-then-checkin", "checkin-before-the-kill"])
def test_a_cancel_racing_completion_never_pools_a_killed_child(when):
    """abort() takes the child of a task whose result is in hand; the pool must not keep it.

    ``abort-then-checkin``: the cancel lands after the child answered, before the checkin.
    ``checkin-before-the-kill``: abort() has found the child, the checkin runs, then the
    kill lands.
    """

    @gen_cluster(client=True, nthreads=ONE_GPU)
    async def run(c, s, a):
        await gr.install(c)
        executor = executor_of(a)
        checkin = executor._checkin
        raced = []

        def checkin_racing_a_cancel(child, run):
            raced.append(child.pid)
            if when == "abort-then-checkin":
                executor.abort(run.key, "was cancelled")
                checkin(child, run)
                return
            killing, checked_in = threading.Event(), threading.Event()
            kill = child.kill

            def held_kill():  # the kill waits until the checkin is over
                killing.set()
                checked_in.wait(5)
                kill()

            child.kill = held_kill
            aborter = threading.Thread(target=executor.abort, args=(run.key, "was cancelled"))
            aborter.start()
            assert killing.wait(5)
            try:
                checkin(child, run)
            finally:
                checked_in.set()
                aborter.join(5)

        executor._checkin = checkin_racing_a_cancel
        with dask.annotate(**PROCESS):
            first, _ = await c.submit(where, resources={"GPU": 1}, pure=False)
            del executor._checkin
            assert raced == [first]
            await async_poll_for(lambda: not alive(first), timeout=10)
            # the killed child is not in the pool: the next task gets a live one
            pid, env = await c.submit(where, resources={"GPU": 1}, pure=False)
        assert env == "0" and pid != first
        assert first not in [row["pid"] for row in executor.children()]
        assert executor.crashed == 0

    run()


gate = threading.Event()


def state_of(worker, key):
    ts = worker.state.tasks.get(key)
    return None if ts is None else ts.state


def wait_for_gate():
    return gate.wait(30)


@gen_cluster(client=True, nthreads=ONE_GPU)
async def test_a_cancelled_thread_task_does_not_fail_a_later_isolated_one(c, s, a):
    await gr.install(c)
    executor = executor_of(a)
    gate.clear()
    try:
        # a thread task, cancelled while it runs: the plugin tells the isolated executor
        future = c.submit(wait_for_gate, key="reused-key", resources={"GPU": 1})
        await async_poll_for(lambda: state_of(a, "reused-key") == "executing", timeout=10)
        await future.cancel()
        await async_poll_for(lambda: state_of(a, "reused-key") == "cancelled", timeout=10)
    finally:
        gate.set()
    del future
    await async_poll_for(lambda: "reused-key" not in a.state.tasks, timeout=10)
    await async_poll_for(lambda: "reused-key" not in s.tasks, timeout=10)
    # the same key, isolated this time, runs
    with dask.annotate(**PROCESS):
        pid, env = await c.submit(where, key="reused-key", resources={"GPU": 1})
    assert env == "0" and pid != os.getpid()
    assert executor._aborted == {}


def test_cancel_records_are_kept_only_for_the_executors_own_tasks():
    executor = IsolatedExecutor(
        resolve=lambda key: IsolatedRun(key, (), (), 0),
        worker_address=lambda: "tcp://127.0.0.1:1",
        max_workers=1,
        idle_timeout=0,
    )
    try:
        # keys it never ran: nothing recorded, however many
        for i in range(1000):
            assert executor.abort(("thread-task", i), "was cancelled") is False
        assert executor._aborted == {}

        # a task queued behind another one and cancelled before it starts fails as cancelled
        release = threading.Event()
        first = executor.submit(lambda call, data: release.wait(10), Spec("first"), {})
        queued = executor.submit(lambda call, data: call(data), Spec("queued"), {})
        assert executor.abort("queued", "was cancelled") is False
        assert "queued" in executor._aborted
        release.set()
        assert first.result(10) is True
        with pytest.raises(gr.IsolatedTaskError, match="was cancelled"):
            queued.result(10)
        assert executor._aborted == {}

        # a cancelled task that ended without asking for a child leaves no record behind
        release.clear()
        first = executor.submit(lambda call, data: release.wait(10), Spec("first"), {})
        skipped = executor.submit(lambda call, data: "never ran", Spec("again"), {})
        assert executor.abort("again", "was cancelled") is False
        release.set()
        assert first.result(10) is True and skipped.result(10) == "never ran"
        assert executor._aborted == {}
        # ... so a later task with that key runs
        later = executor.submit(lambda call, data: call(data), Spec("again", where), {})
        pid, env = later.result(30)
        assert pid != os.getpid() and env == ""
    finally:
        executor.shutdown(wait=True)


class Spec:
    """What Dask hands the executor: a task with a ``key`` that runs on ``data``."""

    def __init__(self, key, fn=None):
        self.key = key
        self.fn = fn

    def __call__(self, data):
        return self.fn()


def test_a_child_let_go_of_while_starting_leaves_quietly(capfd):
    # A worker SIGKILLed while its children start (the soak's worker kills) used to leave one
    # BrokenPipeError traceback per child on the worker's stderr.
    from dask_gpuresources._isolation import _Child

    children = [_Child(("0",), preload=()) for _ in range(3)]
    for child in children:
        child.sock.close()  # before the child says it is ready
    for child in children:
        assert child.proc.wait(timeout=30) == 0
    assert "Traceback" not in capfd.readouterr().err
