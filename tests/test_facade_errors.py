"""The facade's errors, contexts and init's cluster, tried as a user would (issue 20, items 8,
9, 10 and 12): every cluster here is ``init()``'s, whose workers are separate processes."""

from __future__ import annotations

import os
import signal
import time

import dask
import distributed
import pytest

import dask_gpuresources as gr


@pytest.fixture
def cluster():
    """``init()``'s cluster with 2 GPUs in one worker process; shut down after the test."""
    gr.init(num_gpus=2, dashboard=False)
    try:
        yield distributed.default_client()
    finally:
        gr.shutdown()


@gr.remote(num_gpus=1)
def gpu_ids():
    return gr.get_gpu_ids()


@gr.remote(num_gpus=1, isolation="thread")
def crash():
    os._exit(3)


def test_init_cluster_survives_restart_and_a_crashing_task():
    # One try per task: the crash fails at once, rather than after killing four workers.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        gr.init(num_gpus=2, dashboard=False)
    try:
        client = distributed.default_client()
        assert gr.get(gpu_ids.remote(), timeout=60) in ([0], [1])
        client.restart(timeout=60)
        assert gr.get(gpu_ids.remote(), timeout=60) in ([0], [1])
        with pytest.raises(distributed.KilledWorker):
            gr.get(crash.remote(), timeout=60)
        client.wait_for_workers(1, timeout=60)
        assert gr.get(gpu_ids.remote(), timeout=60) in ([0], [1])
        assert gr.cluster_resources()["GPU"] == 2
    finally:
        gr.shutdown()


@gr.remote(num_gpus=1, isolation="thread")
class Slow:
    def __init__(self, seconds=0):
        time.sleep(seconds)

    def pid(self):
        return os.getpid()

    def wait(self, seconds):
        time.sleep(seconds)
        return seconds

    def fail(self):
        raise ValueError("boom from the actor")

    def gate(self, name):
        return distributed.Event(name).wait(20)  # False when nobody set it in time


def test_calls_on_an_actor_killed_in_its_constructor_raise_actor_died(cluster):
    actor = Slow.remote(3)
    early = actor.pid.remote()  # waits for the constructor
    gr.kill(actor)
    for ref in (early, actor.pid.remote()):
        with pytest.raises(gr.ActorDiedError, match="killed before its constructor returned"):
            gr.get(ref, timeout=30)


def test_calls_on_an_actor_whose_worker_died_raise_promptly_naming_the_worker(cluster):
    actor = Slow.remote()
    pid = gr.get(actor.pid.remote(), timeout=60)
    (address,) = cluster.scheduler_info()["workers"]
    running = actor.wait.remote(60)
    os.kill(pid, signal.SIGKILL)
    # Dask's connect timeout is 30 s: a call that waits for it runs out of this bound.
    for ref in (running, actor.pid.remote()):
        with pytest.raises(gr.ActorDiedError, match=f"on worker {address} .*its worker died"):
            gr.get(ref, timeout=10)


class PlainHolder:
    def ids(self):
        return gr.get_gpu_ids()


def test_get_gpu_ids_in_a_plain_dask_actors_method_returns_its_devices(cluster):
    first = cluster.submit(PlainHolder, actor=True, resources={"GPU": 1}).result(timeout=60)
    second = cluster.submit(PlainHolder, actor=True, resources={"GPU": 1}).result(timeout=60)
    assert sorted(first.ids().result(timeout=60) + second.ids().result(timeout=60)) == [0, 1]


@gr.remote
def identity(x):
    return x


def test_a_task_on_an_actor_calls_ref_is_sent_without_waiting_and_fails_with_it(cluster):
    actor = Slow.remote()
    gr.get(actor.pid.remote(), timeout=60)
    # .remote() must return while the actor call still waits for this event: were it to
    # wait for the call, the event would be set too late and the call would answer False.
    ref = identity.remote([actor.gate.remote("item-10")])
    distributed.Event("item-10").set()
    assert gr.get(ref, timeout=60) == [True]
    failing = identity.remote(actor.fail.remote())  # raises nothing here
    after = identity.remote(failing)
    for ref in (failing, after):
        with pytest.raises(ValueError, match="boom from the actor"):
            gr.get(ref, timeout=60)


@gr.remote(num_gpus=1, isolation="thread")
def ids_in_threads():
    import contextvars
    import threading

    answers = {}

    def ask(name):
        try:
            answers[name] = gr.get_gpu_ids()
        except gr.NoLeaseError as exc:
            answers[name] = str(exc)

    copied = threading.Thread(target=contextvars.copy_context().run, args=(ask, "copied"))
    plain = threading.Thread(target=ask, args=("plain",))
    for thread in (copied, plain):
        thread.start()
        thread.join(30)
    return gr.get_gpu_ids(), answers


def test_get_gpu_ids_in_a_thread_a_thread_mode_task_started(cluster):
    ids, answers = gr.get(ids_in_threads.remote(), timeout=60)
    assert len(ids) == 1
    assert answers["copied"] == ids  # a thread in a copy of the task's context
    assert "contextvars.copy_context().run" in answers["plain"]  # says why and how


def _lease_size(block):
    import numpy as np

    return np.full(block.shape, len(gr.get_gpu_ids()))  # distinct dtypes below: distinct keys


def test_annotated_dask_array_blocks_hold_a_gpu_as_the_quickstart_says(cluster):
    import dask.array as da

    with dask.annotate(resources={"GPU": 1}):
        fused = da.ones(8, chunks=2).map_blocks(_lease_size, dtype=int)
    # What the docs warn of: the default optimization drops the annotation (plain Dask too).
    assert fused.compute().tolist() == [0] * 8
    with dask.annotate(resources={"GPU": 1}):
        kept = da.ones(8, chunks=2).map_blocks(_lease_size, dtype="int32")
    assert kept.compute(optimize_graph=False).tolist() == [1] * 8
    whole = da.ones(8, chunks=2).map_blocks(_lease_size, dtype=float)
    assert cluster.compute(whole, resources={"GPU": 1}).result(timeout=60).tolist() == [1] * 8
