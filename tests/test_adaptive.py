"""Clusters that grow and shrink: GPU work submitted before any worker is up waits for the
workers that join, and scale-down never closes a worker that hosts a GPU actor."""

from __future__ import annotations

import asyncio
import time

import pytest
from distributed import Worker
from distributed.utils_test import async_poll_for, gen_cluster

import dask_gpuresources as gr

TIMEOUT = 30


def ids():
    return gr.get_gpu_ids()


class Holder:
    def ping(self):
        return True


@gen_cluster(client=True, nthreads=[])
async def test_gpu_tasks_submitted_before_any_worker_wait_for_one(c, s):
    await gr.install(c)
    task = c.submit(ids, resources={"GPU": 1}, pure=False)
    await async_poll_for(lambda: task.key in s.tasks, TIMEOUT)
    await async_poll_for(lambda: s.tasks[task.key].state == "no-worker", TIMEOUT)
    assert task.status == "pending"
    async with Worker(s.address, nthreads=1, resources={"GPU": 1}):
        assert await asyncio.wait_for(task, TIMEOUT) == [0]
    # once workers exist, a request none of them can hold still raises at once
    async with Worker(s.address, nthreads=1, resources={"GPU": 1}):
        with pytest.raises(gr.InfeasibleRequestError):
            await asyncio.wait_for(c.submit(ids, resources={"GPU": 2}, pure=False), TIMEOUT)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})] * 3)
async def test_scale_down_keeps_the_workers_of_gpu_actors(c, s, a, b, w3):
    await gr.install(c)
    actor = await c.submit(Holder, actor=True, resources={"GPU": 1})
    assert await actor.ping()
    host = next(w for w in (a, b, w3) if w.state.actors)
    others = {w.address for w in (a, b, w3)} - {host.address}
    # what Adaptive asks (over RPC) and what retire_workers(n=...) uses
    assert set(await c.scheduler.workers_to_close(n=3)) == others
    assert set(s.workers_to_close(n=3)) == others
    names = await c.scheduler.workers_to_close(n=3, attribute="name")
    assert host.name not in names and len(names) == 2
    await c.retire_workers(n=3)  # the scheduler chooses: all it may
    await async_poll_for(lambda: set(s.workers) == {host.address}, TIMEOUT)
    assert await actor.ping()


def test_an_adaptive_local_cluster_scales_from_zero_and_keeps_its_actor():
    from distributed import Client, LocalCluster

    def workers_become(cluster, n):
        deadline = time.monotonic() + TIMEOUT
        while len(cluster.scheduler.workers) != n:
            assert time.monotonic() < deadline, f"adaptive never reached {n} workers"
            time.sleep(0.05)

    with (
        LocalCluster(
            n_workers=0,
            threads_per_worker=1,
            processes=False,
            resources={"GPU": 1},
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        gr.install(client)
        adapt = {"interval": "100ms", "wait_count": 2}
        cluster.adapt(minimum=0, maximum=2, **adapt)
        # submitted with no worker up: the cluster scales up for it instead of failing it
        task = client.submit(ids, resources={"GPU": 1}, pure=False)
        assert task.result(timeout=TIMEOUT) == [0]
        actor = client.submit(Holder, actor=True, resources={"GPU": 1}).result(timeout=TIMEOUT)
        assert actor.ping().result(timeout=TIMEOUT)
        cluster.adapt(minimum=2, maximum=2, **adapt)
        workers_become(cluster, 2)
        # idle again, down to zero allowed: scale-down closes every worker but the actor's
        cluster.adapt(minimum=0, maximum=2, **adapt)
        workers_become(cluster, 1)
        (remaining,) = cluster.scheduler.workers.values()
        assert remaining.actors
        assert actor.ping().result(timeout=TIMEOUT)
        time.sleep(1)  # ten more adaptive rounds: the actor's worker stays
        assert len(cluster.scheduler.workers) == 1 and actor.ping().result(timeout=TIMEOUT)
