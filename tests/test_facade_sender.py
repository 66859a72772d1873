"""The facade's client side: one ordered sender, errors on their own refs, actor calls.

These run on ``init(num_gpus=...)``: the embedded cluster's worker is a separate process, so
what crosses the process boundary (pickling, nested calls) is tested for real.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import distributed
import pytest

import dask_gpuresources as gr


@pytest.fixture(scope="module")
def session():
    gr.init(num_gpus=2, num_cpus=4, dashboard=False)
    try:
        yield
    finally:
        gr.shutdown()


def one():
    return 1


def plus_one(x):
    return x + 1


def identity(x):
    return x


def test_dependent_calls_never_leave_out_of_order(session, monkeypatch):
    f, g = gr.remote(one), gr.remote(plus_one)
    for _ in range(10):
        assert gr.get(g.remote(f.remote()), timeout=30) == 2
    # Widen the window in which the background sender has taken a batch but not yet sent
    # it: a get() that flushes meanwhile must not overtake it.
    client = distributed.default_client()
    real_map = client.map

    def slow_map(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.2)
        return real_map(*args, **kwargs)

    monkeypatch.setattr(client, "map", slow_map)
    for _ in range(3):
        a = f.remote()
        time.sleep(0.05)  # the sender's timer has fired: it is sending [a]
        assert gr.get(g.remote(a), timeout=30) == 2


def test_calls_from_many_threads_keep_each_threads_order(session):
    f, g = gr.remote(one), gr.remote(plus_one)
    errors = []

    def chain():
        try:
            for _ in range(20):
                ref = f.remote()
                for _ in range(3):
                    ref = g.remote(ref)
                assert gr.get(ref, timeout=30) == 4
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=chain) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_an_unpicklable_argument_fails_only_its_own_ref(session):
    f = gr.remote(identity)
    good_before = f.remote(1)
    bad = f.remote(threading.Lock())
    good_after = f.remote(2)
    with pytest.raises(TypeError, match="pickle"):
        gr.get(bad, timeout=30)
    assert gr.get([good_before, good_after], timeout=30) == [1, 2]
    # the sender is alive: a later call leaves on its own, without a get() to push it
    later = f.remote(3)
    deadline = time.monotonic() + 30
    while not later.done():
        assert time.monotonic() < deadline, "a later .remote() was never sent"
        time.sleep(0.01)
    assert gr.get(later) == 3
    # a call that depends on the failed one fails with the same error
    with pytest.raises(TypeError, match="pickle"):
        gr.get(gr.remote(plus_one).remote(bad), timeout=30)


def test_an_unpicklable_function_fails_its_refs_and_nothing_else(session):
    lock = threading.Lock()

    def closes_over_a_lock():
        return lock is not None

    with pytest.raises(TypeError, match="pickle"):
        gr.get(gr.remote(closes_over_a_lock).remote(), timeout=30)
    assert gr.get(gr.remote(one).remote(), timeout=30) == 1


@gr.remote
class Echo:
    def __init__(self):
        self.calls = 0

    def echo(self, x):
        self.calls += 1
        return x

    def count(self):
        return self.calls

    def wait_for(self, path):
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                return "timed out"
            time.sleep(0.01)
        return "saw it"


def test_an_unpicklable_actor_argument_fails_only_that_call(session):
    actor = Echo.remote()
    assert gr.get(actor.echo.remote(1), timeout=30) == 1
    bad = actor.echo.remote(threading.Lock())
    with pytest.raises(TypeError, match="pickle"):
        gr.get(bad, timeout=30)
    # later calls on the handle still run, in order
    refs = [actor.echo.remote(i) for i in range(5)]
    assert gr.get(refs, timeout=30) == list(range(5))
    assert gr.get(actor.count.remote(), timeout=30) == 6


def touch_after(path, seconds):
    time.sleep(seconds)
    open(path, "w").close()
    return path


def test_a_ref_passed_to_an_actor_is_not_resolved_in_the_driver(session):
    actor = Echo.remote()
    gr.get(actor.count.remote(), timeout=30)
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "flag")
    slow = gr.remote(touch_after).remote(path, 3)
    start = time.monotonic()
    ref = actor.echo.remote(slow)
    assert time.monotonic() - start < 1, ".remote() waited for the argument's producer"
    assert gr.get(ref, timeout=30) == path


def test_an_actor_waiting_on_what_is_submitted_after_it_does_not_deadlock(session):
    actor = Echo.remote()
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "flag")
    gate = gr.remote(touch_after).remote(path, 0)
    waiting = actor.wait_for.remote(path)
    # the actor's call takes a ref: it is sent once the ref is ready, and after the one above
    after = actor.echo.remote(gate)
    assert gr.get([waiting, after], timeout=30) == ["saw it", path]


@gr.remote(num_gpus=1)
class Tally:
    """Hosted in an isolated child process (the default for GPU actors)."""

    def __init__(self):
        self.seen = []

    def add(self, i):
        self.seen.append(i)
        return i

    def pid(self):
        return os.getpid()

    def log(self):
        return self.seen


def test_isolated_actor_runs_each_callers_calls_in_order_from_many_threads(session):
    # Calls travel over several connections and can reach the worker out of order; each
    # caller's calls still run in the order it made them, in the child, one at a time.
    t = Tally.remote()
    assert gr.get(t.pid.remote(), timeout=60) != os.getpid()
    per_thread = {}
    errors = []

    def caller(n):
        try:
            refs = [t.add.remote((n, i)) for i in range(100)]
            per_thread[n] = gr.get(refs, timeout=60)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(90)
    assert not errors, errors
    seen = gr.get(t.log.remote(), timeout=60)
    assert len(seen) == 400
    for n in range(4):
        assert per_thread[n] == [(n, i) for i in range(100)]
        assert [s for s in seen if s[0] == n] == per_thread[n]  # in the child, in order
    gr.kill(t)
