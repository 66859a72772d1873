"""Admission on a worker: no queued task idles a device that fits another, none starves, and
amounts that are not valid are refused on every path.

Each test failed on the code before its fix (see the commit that added it).
"""

from __future__ import annotations

import asyncio
import time

import dask
import pytest
from distributed import Client, Event, LocalCluster
from distributed.utils_test import async_poll_for, gen_cluster

import dask_gpuresources as gr
from dask_gpuresources.exceptions import InvalidRequestError
from dask_gpuresources.worker import GPUWorkerPlugin, devices_of

TIMEOUT = 20  # bound on every wait for something that must happen


def ids(*_):
    return gr.get_gpu_ids()


def hold(name):
    """Hold the task's devices until the distributed Event ``name`` is set (longer than
    any wait of the tests: a hold that gives up would free its devices and hide a hang)."""
    if not Event(name).wait(3 * TIMEOUT):
        raise TimeoutError(name)
    return gr.get_gpu_ids()


def timed(seconds):
    """Sleep ``seconds`` on the task's devices; when it started and ended (wall clock)."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


class Holder:
    """A Dask actor: holds its devices from construction until it goes away."""

    def ping(self):
        return True


def _wait_until(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def _queued(dask_worker):
    return sorted(str(ts.key) for ts in dask_worker.state.constrained)


# -- a task whose resources are free never waits behind one that cannot start ----------------


def test_a_task_asking_only_free_resources_passes_a_gpu_task_waiting_for_an_actor():
    # Worker processes (Nanny): GPU=1 and MEM=1; an actor holds the device, a GPU task waits
    # for it (forever: actors never drain). A task asking only MEM must start at once. Before
    # the fix the worker's pick of constrained work gave up whenever the head asked for a GPU
    # and every device was taken: MEM waited as long as the actor lived.
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=4,
            processes=True,
            resources={"GPU": 1, "MEM": 1},
            dashboard_address=":0",
            scheduler_port=0,
        ) as cluster,
        Client(cluster) as client,
    ):
        gr.install(client)
        actor = client.submit(Holder, actor=True, resources={"GPU": 1}).result(timeout=TIMEOUT)
        assert actor.ping().result(timeout=TIMEOUT)
        waiting = client.submit(ids, resources={"GPU": 1}, pure=False)
        _wait_until(lambda: waiting.key in str(client.run(_queued)))
        # behind the GPU task in Dask's order (a lower priority), as a later arrival is
        memory_only = client.submit(ids, resources={"MEM": 1}, priority=-1, pure=False)
        assert memory_only.result(timeout=TIMEOUT) == []
        assert waiting.status == "pending"
        del actor
        assert waiting.result(timeout=TIMEOUT) == [0]


@gen_cluster(
    client=True,
    nthreads=[("", 4)],
    worker_kwargs={"resources": {"GPU": 2, "MEM": 2}},
    config={"gpuresources.worker.bypass-limit": "50ms"},
    timeout=90,
)
async def test_aging_holds_back_only_what_asks_for_the_same_resources(c, s, a):
    # A GPU=2 request past its aging limit waits for a running task to drain: GPU work is
    # held back for it, a task asking only for MEM (free) is not.
    await gr.install(c)
    first = c.submit(hold, "first", resources={"GPU": 1}, pure=False)
    await async_poll_for(lambda: any(ts.key == first.key for ts in a.state.executing), TIMEOUT)
    big = c.submit(ids, resources={"GPU": 2}, pure=False)
    await async_poll_for(lambda: any(ts.key == big.key for ts in a.state.constrained), TIMEOUT)
    await asyncio.sleep(0.2)  # past the aging limit
    small = c.submit(ids, resources={"GPU": 1}, priority=-1, pure=False)
    memory_only = c.submit(ids, resources={"MEM": 1}, priority=-1, pure=False)
    assert await asyncio.wait_for(memory_only, TIMEOUT) == []
    assert not small.done()
    await Event("first").set()
    assert await asyncio.wait_for(big, TIMEOUT) == [0, 1]
    assert len(await asyncio.wait_for(small, TIMEOUT)) == 1


# -- aging that arrivals cannot reset --------------------------------------------------------

AGING = 1.0  # seconds: the aging limit the bound test sets
SMALL = 0.3  # seconds each task of the stream runs
STREAM = 8.0  # seconds the stream of small, higher-priority tasks lasts


@gen_cluster(
    client=True,
    nthreads=[("", 4)],
    worker_kwargs={"resources": {"GPU": 2}},
    config={"gpuresources.worker.bypass-limit": f"{AGING}s"},
    timeout=120,
)
async def test_a_large_request_waits_at_most_its_aging_limit_plus_a_running_task(c, s, a):
    # A stream of GPU=1 tasks of higher priority keeps both devices busy; a GPU=2 request
    # queued among them must start within the bound docs/concepts.md gives: the aging limit
    # plus the longest task running on the devices it needs. Before the fix the guard
    # followed the head of the queue only (here always a small task, which then fit), so
    # the large request waited until the stream ended.
    await gr.install(c)
    limit = dask.utils.parse_timedelta(dask.config.get("gpuresources.worker.bypass-limit"))
    assert limit == AGING
    stream = []
    stream_start = time.monotonic()

    async def feed():
        while time.monotonic() - stream_start < STREAM:
            stream.append(c.submit(timed, SMALL, resources={"GPU": 1}, priority=10, pure=False))
            await asyncio.sleep(SMALL / 4)

    feeding = asyncio.create_task(feed())
    await async_poll_for(lambda: len(a.state.executing) == 2, TIMEOUT)
    queued_at = time.time()
    big = c.submit(timed, 0, resources={"GPU": 2}, pure=False)
    await async_poll_for(lambda: any(ts.key == big.key for ts in a.state.constrained), TIMEOUT)
    big_start, _ = await asyncio.wait_for(big, TIMEOUT + STREAM)
    await asyncio.wait_for(feeding, TIMEOUT + STREAM)
    ends = [end for _, end in await asyncio.wait_for(c.gather(stream), TIMEOUT + STREAM)]
    # Structural: it started while the stream still ran, not once it ended.
    assert big_start < max(ends)
    # The bound, from config (a generous allowance for a loaded machine's scheduling delays,
    # still well below the stream's length).
    waited = big_start - queued_at
    assert waited <= limit + SMALL + 3.0, (waited, limit + SMALL)


# -- invalid amounts refused on every path (worker plugin alone) -----------------------------


def _book(dask_worker):
    devices = devices_of(dask_worker)
    return (
        dask_worker.state.available_resources.get("GPU"),
        {d: sorted(map(str, h)) for d, h in devices.ledger.holders().items()},
    )


def test_worker_plugin_alone_refuses_an_invalid_amount():
    # No scheduler plugin (the setup GPUWorkerPlugin's docstring shows): GPU=1.5 must fail
    # with the error of _requests, lease nothing and leave Dask's book alone. Before the
    # fix it fell through to Dask's float book and ran with no lease next to two GPU=1 tasks
    # (the ledger's sync then overwrote the book).
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=4,
            processes=True,
            resources={"GPU": 2},
            dashboard_address=":0",
            scheduler_port=0,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(GPUWorkerPlugin())
        invalid = client.submit(ids, resources={"GPU": 1.5}, pure=False)
        first = client.submit(hold, "one", resources={"GPU": 1}, pure=False)
        second = client.submit(hold, "two", resources={"GPU": 1}, pure=False)
        with pytest.raises(InvalidRequestError, match=r"got 1\.5; use resources=\{'GPU': 1\}"):
            invalid.result(timeout=TIMEOUT)
        _wait_until(lambda: _book_of(client)[0] == 0)
        available, holders = _book_of(client)
        assert sorted(h for hs in holders.values() for h in hs) == sorted([first.key, second.key])
        Event("one", client=client).set()
        Event("two", client=client).set()
        assert sorted(first.result(timeout=TIMEOUT) + second.result(timeout=TIMEOUT)) == [0, 1]
        # the worker stays usable, its book exact
        assert client.submit(ids, resources={"GPU": 2}, pure=False).result(timeout=TIMEOUT) == [
            0,
            1,
        ]
        assert _book_of(client) == (2, {0: [], 1: []})


def _book_of(client):
    ((available, holders),) = client.run(_book).values()
    return available, {int(d): h for d, h in holders.items()}
