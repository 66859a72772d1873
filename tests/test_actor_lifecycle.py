"""An isolated actor ends cleanly in every state: constructing, idle, in a call.

Each test runs on ``init()``'s cluster, whose worker is a separate process, through the public
API only, and failed on the code before the isolated actor became one state machine on the
worker's event loop (see the commit that added it).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

import dask_gpuresources as gr
from dask_gpuresources.exceptions import ActorDiedError

TIMEOUT = 20  # bound on every wait for something that must happen


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(predicate, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


@pytest.fixture
def cluster(monkeypatch):
    # Workers inherit the environment: a short grace keeps the SIGTERM-ignoring test quick.
    monkeypatch.setenv("DASK_GPURESOURCES__ISOLATION__KILL_GRACE_PERIOD", "1s")
    gr.init(num_gpus=1)
    try:
        yield
    finally:
        gr.shutdown()


@gr.remote(num_gpus=1)  # isolated: GPU actors run in a child process by default
class Worker:
    def __init__(self, started=None, ignore_sigterm=False):
        if ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if started is not None:  # a slow constructor: says it began, then never returns
            with open(started, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)

    def pid(self):
        return os.getpid()

    def work(self, started):
        with open(started, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)


@gr.remote(num_gpus=1, isolation="thread")
def device_and_alive(pid):
    """The device this task leased, and whether ``pid`` still ran when it started."""
    return gr.get_gpu_ids(), _alive(pid)


def _pid_in(path):
    _wait_for(lambda: os.path.exists(path) and open(path).read(), path)
    return int(open(path).read())


@pytest.mark.parametrize("end", ["kill", "del"])
def test_ending_an_actor_mid_call_answers_the_call_and_later_actors_work(cluster, tmp_path, end):
    # Before: the child's socket was closed from a thread while the event loop still polled
    # it; the call never answered, and the next isolated actor hung on its first call.
    started = str(tmp_path / "started")
    actor = Worker.remote()
    gr.get(actor.pid.remote(), timeout=TIMEOUT)
    call = actor.work.remote(started)
    pid = _pid_in(started)
    if end == "kill":
        gr.kill(actor)
    else:
        del actor
    with pytest.raises(ActorDiedError, match="killed or released"):
        gr.get(call, timeout=TIMEOUT)
    _wait_for(lambda: not _alive(pid), f"the killed actor's child {pid} to end")

    later = Worker.remote()
    assert gr.get(later.pid.remote(), timeout=TIMEOUT) != pid
    gr.kill(later)
    assert gr.get(device_and_alive.remote(pid), timeout=TIMEOUT) == ([0], False)


def test_a_child_that_dies_while_idle_ends_the_hold_at_once(cluster):
    # Before: the actor kept device 0 while its handle lived; the task below waited forever.
    actor = Worker.remote()
    pid = gr.get(actor.pid.remote(), timeout=TIMEOUT)
    os.kill(pid, signal.SIGKILL)
    assert gr.get(device_and_alive.remote(pid), timeout=TIMEOUT) == ([0], False)
    with pytest.raises(ActorDiedError, match=rf"pid {pid}.*SIGKILL") as info:
        gr.get(actor.pid.remote(), timeout=TIMEOUT)
    assert info.value.actor == actor._key and info.value.worker.startswith("tcp://")
    del actor  # its release after its death frees nothing twice
    assert gr.get(device_and_alive.remote(pid), timeout=TIMEOUT) == ([0], False)


def test_a_child_that_dies_in_a_call_fails_the_call_and_ends_the_hold(cluster, tmp_path):
    started = str(tmp_path / "started")
    actor = Worker.remote()
    call = actor.work.remote(started)
    pid = _pid_in(started)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ActorDiedError, match=rf"pid {pid}.*SIGKILL"):
        gr.get(call, timeout=TIMEOUT)
    assert gr.get(device_and_alive.remote(pid), timeout=TIMEOUT) == ([0], False)
    with pytest.raises(ActorDiedError, match="SIGKILL"):
        gr.get(actor.pid.remote(), timeout=TIMEOUT)


@pytest.mark.parametrize(
    "end, ignore_sigterm",
    [("kill", False), ("kill", True), ("del", False)],
    ids=["kill-sigterm", "kill-sigkill", "del"],
)
def test_ending_an_actor_during_a_slow_constructor_ends_the_child_and_frees_the_device(
    cluster, tmp_path, end, ignore_sigterm
):
    # Before: the child ran its constructor to the end (here: never) and kept device 0.
    # A child that ignores SIGTERM gets SIGKILL after kill-grace-period (1 s here); the
    # device is free once the process is gone, never before (the task sees it dead).
    started = str(tmp_path / "started")
    actor = Worker.remote(started, ignore_sigterm)
    pid = _pid_in(started)
    if end == "kill":
        gr.kill(actor)
    else:
        del actor
    assert gr.get(device_and_alive.remote(pid), timeout=TIMEOUT) == ([0], False)
    assert not _alive(pid)


class Unpicklable(Exception):
    def __init__(self, text):
        super().__init__(text)
        self.lock = threading.Lock()  # no pickle for this


@gr.remote(num_gpus=1)  # isolated
def fails_after_unpicklable(how):
    try:
        raise Unpicklable("the first failure")
    except Unpicklable as first:
        if how == "cause":
            raise KeyError("the second failure") from first
        raise KeyError("the second failure")  # noqa: B904 (the implicit __context__)


@pytest.mark.parametrize("how", ["context", "cause"])
def test_an_isolated_error_chained_to_an_unpicklable_one_keeps_its_type(cluster, how):
    # Before: RuntimeError("unpicklable exception in the child: ...").
    with pytest.raises(KeyError, match="the second failure") as info:
        gr.get(fails_after_unpicklable.remote(how), timeout=TIMEOUT)
    chained = info.value.__cause__ if how == "cause" else info.value.__context__
    assert "Unpicklable: the first failure" in str(chained)
