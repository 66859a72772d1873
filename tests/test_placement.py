"""Placement never leaves a GPU request where it cannot run while a device that fits it is
free elsewhere: on clusters whose workers are separate processes (Nanny), through the
public API."""

from __future__ import annotations

import contextlib
import time

import dask
import pytest
from distributed import Client, Event, LocalCluster, wait

import dask_gpuresources as gr

TIMEOUT = 60


class Holder:
    """An actor that keeps its devices; constructs once the Event ``gate`` is set."""

    def __init__(self, gate=None):
        if gate is not None:
            Event(gate).wait(TIMEOUT)
        self.ids = gr.get_gpu_ids()

    def gpu_ids(self):
        return self.ids


def _wait_until(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(0.05)


@contextlib.contextmanager
def _two_workers(gpus, threads):
    """Two Nanny workers declaring ``GPU=gpus`` each, plugins installed. Both are on one
    host and hand out the same devices: the overlap warning is not what is tested."""
    with dask.config.set({"gpuresources.scheduler.overlap": "ignore"}):
        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=threads,
                resources={"GPU": gpus},
                dashboard_address=":0",
            ) as cluster,
            Client(cluster) as client,
        ):
            gr.install(client)
            yield cluster, client


@pytest.fixture
def two_workers_of_five():
    with _two_workers(5, 8) as (_, client):
        yield client


def _holders(client, futures):
    return {client.who_has(f)[f.key][0] for f in futures}


def test_small_actors_go_to_the_free_device_beside_a_stranded_large_one(two_workers_of_five):
    client = two_workers_of_five
    large = [client.submit(Holder, actor=True, resources={"GPU": 2}, pure=False) for _ in range(4)]
    wait(large, timeout=TIMEOUT)
    # Four devices of each worker held: a fifth 2-GPU actor fits nowhere and waits.
    fifth = client.submit(Holder, actor=True, resources={"GPU": 2}, pure=False)
    _wait_until(lambda: any(fifth.key in keys for keys in client.processing().values()))
    small = [client.submit(Holder, actor=True, resources={"GPU": 1}, pure=False) for _ in range(2)]
    # Each worker has one free device that the waiting 2-GPU actor can never use.
    wait(small, timeout=TIMEOUT)
    assert len(_holders(client, small)) == 2
    assert fifth.status == "pending"


def test_a_request_stranded_behind_new_actor_holds_moves_to_a_free_device(two_workers_of_five):
    client = two_workers_of_five
    gate = Event("construct", client=client)
    # While their constructors run, the scheduler cannot tell these from tasks that end.
    large = [
        client.submit(Holder, "construct", actor=True, resources={"GPU": 2}, pure=False)
        for _ in range(4)
    ]
    _wait_until(lambda: sum(map(len, client.processing().values())) == 4)
    fifth = client.submit(Holder, actor=True, resources={"GPU": 2}, pure=False)
    first = client.submit(Holder, actor=True, resources={"GPU": 1}, pure=False)
    wait(first, timeout=TIMEOUT)
    second = client.submit(Holder, actor=True, resources={"GPU": 1}, pure=False)
    _wait_until(lambda: any(second.key in keys for keys in client.processing().values()))
    (queued_on,) = (w for w, keys in client.processing().items() if second.key in keys)
    assert queued_on == client.who_has(first)[first.key][0]  # placed by backlog, then
    gate.set()
    wait(large, timeout=TIMEOUT)
    # Its worker's devices are all held by actors now, while the other worker has a free
    # one (the 2-GPU actor waiting there cannot use it): the next tick moves it there.
    wait(second, timeout=TIMEOUT)
    assert client.who_has(second)[second.key][0] != queued_on
    assert second.result().gpu_ids().result() == [4]
    assert fifth.status == "pending"


def _ids():
    return gr.get_gpu_ids()


@pytest.mark.parametrize("name", ["gpuresources-again", None])
def test_the_scheduler_plugin_registered_again_keeps_the_actors_holds(name):
    from dask_gpuresources.scheduler import GPUSchedulerPlugin

    with _two_workers(1, 4) as (cluster, client):
        actor = client.submit(Holder, actor=True, resources={"GPU": 1}, pure=False)
        wait(actor, timeout=TIMEOUT)
        again = GPUSchedulerPlugin()
        if name is None:
            # Under its own name Dask replaces it (and warns that it does).
            again.idempotent = False
            with pytest.warns(UserWarning, match="already contains a plugin"):
                client.register_plugin(again)
        else:
            client.register_plugin(again, name=name)
        plugins = [
            p for p in cluster.scheduler.plugins.values() if isinstance(p, GPUSchedulerPlugin)
        ]
        newest = cluster.scheduler.plugins[name or "gpuresources"]  # a copy of `again`
        assert [p for p in plugins if p._rebalancer is not None] == [newest]
        # One device is held by the actor: both tasks run on the other one, in turn
        # (before, the new instance saw two free devices and sent one task to wait
        # beside the actor for good).
        tasks = [client.submit(_ids, resources={"GPU": 1}, pure=False) for _ in range(2)]
        wait(tasks, timeout=TIMEOUT)
        held = client.who_has(actor)[actor.key][0]
        assert held not in {client.who_has(t)[t.key][0] for t in tasks}


@gr.remote(num_gpus=1)  # isolated: the actor lives in a child process of its worker
class _Isolated:
    def pid(self):
        import os

        return os.getpid()


def _no_actor_hold_counted(dask_scheduler):
    return not dask_scheduler.plugins["gpuresources"]._actor_holds


def _where():
    from distributed import get_worker

    time.sleep(0.3)
    return get_worker().address


def test_a_dead_actor_childs_devices_count_free_in_placement_at_once():
    # The worker ends the hold of an isolated actor whose child died, but the actor's key
    # stays in memory while its handle lives: before, the scheduler went on counting the
    # device held, so every GPU task went to the other worker while this one sat idle.
    import os
    import signal

    from dask_gpuresources.exceptions import ActorDiedError

    with _two_workers(1, 2) as (cluster, client):
        gr.init(address=cluster.scheduler_address)
        try:
            actor = _Isolated.remote()
            pid = gr.get(actor.pid.remote(), timeout=TIMEOUT)
            os.kill(pid, signal.SIGKILL)

            def dead():
                try:
                    gr.get(actor.pid.remote(), timeout=TIMEOUT)
                except ActorDiedError:
                    return True
                return False

            _wait_until(dead)
            _wait_until(
                lambda: (
                    not any(
                        holders
                        for devices in gr.allocations(client).values()
                        for holders in devices.values()
                    )
                )
            )
            # the worker's report has reached the scheduler: no actor hold is counted there
            _wait_until(
                lambda: client.run_on_scheduler(_no_actor_hold_counted),
                timeout=10,
            )
            futures = [client.submit(_where, resources={"GPU": 1}, pure=False) for _ in range(8)]
            assert set(client.gather(futures)) == set(cluster.scheduler.workers)
        finally:
            gr.shutdown()
