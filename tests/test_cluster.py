"""The plugins on real Dask clusters (gen_cluster / LocalCluster); GPUs are declared."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

import dask
import pytest
from distributed import Event, Nanny, Worker
from distributed.utils_test import async_poll_for, captured_logger, gen_cluster

import dask_gpuresources as gr
from dask_gpuresources._nvml import FakeNVML


def gpu_task(x, hold=None):
    """Record where and when the task ran and which devices it owned."""
    from distributed import Event, get_worker

    start = time.monotonic()
    ids = gr.get_gpu_ids()
    if hold is not None:
        Event(hold).wait()
    elif x:
        time.sleep(x)
    return get_worker().address, ids, start, time.monotonic()


def assert_no_overlap(results, share=1.0):
    """No device is held by more than 1/share tasks at any instant."""
    per_device = defaultdict(list)
    for addr, ids, start, end in results:
        for i in ids:
            per_device[addr, i].append((start, end))
    limit = round(1 / share)
    for device, intervals in per_device.items():
        events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
        running = 0
        for _, step in events:
            running += step
            assert running <= limit, f"device {device} held by {running} tasks at once"


def assert_load_follows_tasks(s):
    """The scheduler plugin's GPU load per worker is the sum over the tasks processing there."""
    plugin = s.plugins["gpuresources"]
    plugin._follow_moves()
    expected = defaultdict(int)
    for key, (addr, units) in plugin._processing.items():
        assert s.tasks[key].processing_on.address == addr, key
        expected[addr] += units
    assert {a: v for a, v in plugin._load.items() if v} == dict(expected)


def _moved_to(s, worker):
    ws = s.workers[worker.address]
    return any(ts.processing_on is ws for ts in s.tasks.values())


async def leases(c):
    return await gr.allocations(c)


HETERO = [
    ("127.0.0.1", 2, {"resources": {"GPU": 0}}),
    ("127.0.0.1", 3, {"resources": {"GPU": 2}}),
    ("127.0.0.1", 5, {"resources": {"GPU": 4}}),
]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 2, {"resources": {"GPU": 2}})])
async def test_ids_in_submit_map_delayed(c, s, a):
    await gr.install(c)
    one = await c.submit(gpu_task, 0, resources={"GPU": 1})
    assert one[1] in ([0], [1])
    two = await c.submit(gpu_task, 0, resources={"GPU": 2}, pure=False)
    assert two[1] == [0, 1]
    mapped = await c.gather(c.map(gpu_task, [0.05] * 4, resources={"GPU": 1}, pure=False))
    assert sorted(len(r[1]) for r in mapped) == [1, 1, 1, 1]
    none = await c.submit(gpu_task, 0, pure=False)
    assert none[1] == []

    with dask.annotate(resources={"GPU": 1}):
        d = dask.delayed(gpu_task)(0, dask_key_name="delayed-gpu")
    addr, ids, *_ = await c.compute(d, optimize_graph=False)
    assert addr == a.address
    assert len(ids) == 1

    with pytest.raises(gr.NoLeaseError, match="outside a Dask task"):
        gr.get_gpu_ids()
    assert await leases(c) == {a.address: {0: {}, 1: {}}}


@gen_cluster(client=True, nthreads=HETERO)
async def test_overlapping_tasks_never_share_a_device(c, s, cpu, w2, w4):
    await gr.install(c)
    amounts = [1, 2, 1, 1, 4, 1, 2, 1, 1, 1, 2, 1] * 3
    futures = [
        c.submit(gpu_task, 0.02 * (i % 4), resources={"GPU": n}, pure=False)
        for i, n in enumerate(amounts)
    ]
    results = await c.gather(futures)
    for n, (addr, ids, _, _) in zip(amounts, results, strict=True):
        assert addr != cpu.address
        assert len(ids) == n == len(set(ids))
        assert set(ids) <= set(range(4 if addr == w4.address else 2))
    assert_no_overlap(results)
    assert {r[0] for r in results} == {w2.address, w4.address}


@gen_cluster(client=True, nthreads=[("127.0.0.1", 12, {"resources": {"GPU": 2}})])
async def test_fractions_pack_onto_one_device(c, s, a):
    await gr.install(c)
    ev = Event("release-quarters")
    futures = c.map(
        gpu_task, range(5), hold="release-quarters", resources={"GPU": 0.25}, pure=False
    )
    await async_poll_for(lambda: len(a.state.executing) == 5, timeout=10)
    table = await leases(c)
    counts = sorted(len(holders) for holders in table[a.address].values())
    assert counts == [1, 4], table  # the fullest device that fits first, never above 1
    await ev.set()
    results = await c.gather(futures)
    assert_no_overlap(results, share=0.25)

    # Thousands of 0.1 requests leave no float drift behind.
    many = await c.gather(c.map(gpu_task, [0] * 200, resources={"GPU": 0.1}, pure=False))
    assert_no_overlap(many, share=0.1)
    ledger = a.plugins["gpuresources"].ledger
    assert ledger.free() == (1, 1) and len(ledger) == 0


@gen_cluster(client=True, nthreads=[("127.0.0.1", 6, {"resources": {"GPU": 2}})])
async def test_admission_is_per_device(c, s, a):
    """Two half-free devices do not make a free device (Dask's sum would say they do)."""
    await gr.install(c)
    events = {name: Event(name) for name in ("h0", "h1", "h2")}
    halves = {
        name: c.submit(gpu_task, 0, hold=name, resources={"GPU": 0.5}, pure=False)
        for name in events
    }
    await async_poll_for(lambda: len(a.state.executing) == 3, timeout=10)
    table = (await leases(c))[a.address]
    full = next(d for d, h in table.items() if len(h) == 2)
    await events[next(n for n, f in halves.items() if f.key in table[full])].set()
    await async_poll_for(lambda: len(a.state.executing) == 2, timeout=10)
    whole = c.submit(gpu_task, 0, resources={"GPU": 1}, pure=False)
    await asyncio.sleep(0.5)
    assert whole.status == "pending"  # 0.5 + 0.5 free, but on different devices
    for ev in events.values():
        await ev.set()
    addr, ids, *_ = await whole
    assert len(ids) == 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 4, {"resources": {"GPU": 2}})])
async def test_waiting_request_does_not_block_smaller_ones(c, s, a):
    await gr.install(c)
    hold = Event("hold-one")
    blocker = c.submit(gpu_task, 0, hold="hold-one", resources={"GPU": 1}, pure=False)
    await async_poll_for(lambda: len(a.state.executing) == 1, timeout=10)
    big = c.submit(gpu_task, 0, resources={"GPU": 2}, pure=False)
    await async_poll_for(lambda: big.key in a.state.tasks, timeout=10)
    small = c.submit(gpu_task, 0, resources={"GPU": 1}, pure=False)
    addr, ids, *_ = await asyncio.wait_for(small, 10)
    assert blocker.status == "pending" and big.status == "pending"
    await hold.set()
    assert (await big)[1] == [0, 1]


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 4, {"resources": {"GPU": 2}})],
    config={"gpuresources.worker.bypass-limit": "300ms"},
)
async def test_a_large_request_does_not_starve(c, s, a):
    await gr.install(c)
    hold = Event("hold-first")
    first = c.submit(gpu_task, 0, hold="hold-first", resources={"GPU": 1}, pure=False)
    await async_poll_for(lambda: len(a.state.executing) == 1, timeout=10)
    big = c.submit(gpu_task, 0, resources={"GPU": 2}, pure=False)
    await async_poll_for(lambda: big.key in a.state.tasks, timeout=10)
    smalls = c.map(gpu_task, [0.1] * 30, resources={"GPU": 1}, pure=False)
    await asyncio.sleep(0.5)
    await hold.set()
    _, _, big_start, _ = await big
    ends = [r[3] for r in await c.gather(smalls)]
    # After the bypass limit the worker drains devices for the large request instead of
    # letting the stream of small ones pass it forever.
    assert big_start < max(ends)
    await first


@gen_cluster(client=True, nthreads=HETERO)
async def test_infeasible_requests_fail_fast(c, s, *workers):
    await gr.install(c)
    start = time.monotonic()
    with pytest.raises(gr.InfeasibleRequestError, match=r"GPU=5.*has GPU=4") as info:
        await c.submit(gpu_task, 0, resources={"GPU": 5}, pure=False)
    assert time.monotonic() - start < 5
    assert info.value.requested == "5" and info.value.largest == 4
    # A dependent of an infeasible task fails with it; the cluster stays usable.
    bad = c.submit(gpu_task, 0, resources={"GPU": 8}, pure=False)
    dependent = c.submit(lambda r: r, bad, resources={"GPU": 1})
    with pytest.raises(gr.InfeasibleRequestError):
        await dependent
    assert len((await c.submit(gpu_task, 0, resources={"GPU": 4}, pure=False))[1]) == 4
    assert all(not h for d in (await leases(c)).values() for h in d.values())


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_gpu_request_on_cluster_without_gpus(c, s, a):
    await gr.install(c)
    with pytest.raises(gr.InfeasibleRequestError, match="no worker in the cluster declares"):
        await c.submit(gpu_task, 0, resources={"GPU": 0.5}, pure=False)
    assert await c.submit(lambda: 1) == 1


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})],
    config={"gpuresources.infeasible": "wait"},
)
async def test_infeasible_wait_mode_logs_once_and_waits(c, s, a):
    await gr.install(c)
    with captured_logger("distributed.gpuresources", level=logging.WARNING) as log:
        futures = c.map(gpu_task, [0, 0], resources={"GPU": 2}, pure=False)
        await async_poll_for(lambda: "Waiting for a worker" in log.getvalue(), 10)
    assert log.getvalue().count("Waiting for a worker") == 1
    assert all(f.status == "pending" for f in futures)
    async with Worker(s.address, nthreads=2, resources={"GPU": 2}):
        results = await c.gather(futures)
    assert [sorted(r[1]) for r in results] == [[0, 1], [0, 1]]


@pytest.mark.parametrize(
    "value, message",
    [
        (-1, "must be zero or more, got -1"),
        (1.5, "above 1 must be a whole number, got 1.5; use resources={'GPU': 1} or"),
        ("two", "must be a number, got 'two'"),
    ],
)
def test_invalid_requests_are_rejected(value, message):
    @gen_cluster(client=True, nthreads=[("127.0.0.1", 2, {"resources": {"GPU": 2}})])
    async def run(c, s, a):
        await gr.install(c)
        with pytest.raises(gr.InvalidRequestError) as info:
            await c.submit(gpu_task, 0, resources={"GPU": value}, pure=False)
        assert message in str(info.value)
        assert (await c.submit(gpu_task, 0, resources={"GPU": 1}, pure=False))[1] in ([0], [1])
        assert len(a.plugins["gpuresources"].ledger) == 0

    run()


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 2, {"resources": {"gpu": 2}})],
)
async def test_lowercase_gpu_resource_from_env_vars(c, s, a):
    await gr.install(c)
    assert s.workers[a.address].resources == {"GPU": 2}
    assert a.state.total_resources == {"GPU": 2}
    ids = await c.gather(c.map(gpu_task, [0.05] * 4, resources={"GPU": 1}, pure=False))
    assert_no_overlap(ids)
    lower = await c.submit(gpu_task, 0, resources={"gpu": 2}, pure=False)
    assert lower[1] == [0, 1]


@gen_cluster(client=True, nthreads=[])
async def test_worker_detects_gpus_with_nvml(c, s):
    await gr.install(c)
    plugin = gr.GPUWorkerPlugin(detect=True, nvml=FakeNVML.with_gpus(3))
    async with Worker(s.address, nthreads=3, plugins={plugin}) as w:
        assert s.workers[w.address].resources == {"GPU": 3}
        results = await c.gather(c.map(gpu_task, [0.05] * 6, resources={"GPU": 1}, pure=False))
        assert {r[1][0] for r in results} <= {0, 1, 2}

    with captured_logger("distributed.gpuresources", level=logging.INFO) as log:
        plugin = gr.GPUWorkerPlugin(detect=True, nvml=FakeNVML(unavailable="no NVML here"))
        async with Worker(s.address, nthreads=1, plugins={plugin}) as w:
            # a worker with no GPU stays as Dask made it
            assert s.workers[w.address].resources == {}
    assert log.getvalue().count("no NVML here") == 1

    with captured_logger("distributed.gpuresources", level=logging.WARNING) as log:
        plugin = gr.GPUWorkerPlugin(detect=True, nvml=FakeNVML.with_gpus(2))
        async with Worker(s.address, nthreads=1, resources={"GPU": 4}, plugins={plugin}) as w:
            assert s.workers[w.address].resources == {"GPU": 4}
    assert "declares GPU=4 but NVML sees 2 device(s)" in log.getvalue()


@gen_cluster(client=True, nthreads=[])
async def test_declaring_more_than_visible_devices_fails_at_start(c, s, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    plugin = gr.GPUWorkerPlugin(detect=True, nvml=FakeNVML.with_gpus(4))
    with pytest.raises(RuntimeError, match="failed to start") as info:
        async with Worker(s.address, nthreads=1, resources={"GPU": 4}, plugins={plugin}):
            pass
    assert isinstance(info.value.__cause__, gr.DeviceCountError)
    assert "declared GPU=4, but CUDA_VISIBLE_DEVICES lists 2" in str(info.value.__cause__)
    assert not s.workers


@pytest.mark.slow
@gen_cluster(
    client=True,
    Worker=Nanny,
    nthreads=[("127.0.0.1", 2, {"resources": {"GPU": 2}, "env": {"CUDA_VISIBLE_DEVICES": "2,3"}})],
)
async def test_worker_maps_its_cuda_visible_devices(c, s, a):
    await gr.install(c)
    results = await c.gather(c.map(gpu_task, [0.2] * 4, resources={"GPU": 1}, pure=False))
    assert {r[1][0] for r in results} == {2, 3}
    assert (await c.submit(gpu_task, 0, resources={"GPU": 2}, pure=False))[1] == [2, 3]


@pytest.mark.slow
@gen_cluster(
    client=True,
    Worker=Nanny,
    nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})] * 2,
)
async def test_worker_killed_mid_task_loses_its_leases(c, s, a, b):
    await gr.install(c)
    hold = Event("hold-kill")
    future = c.submit(gpu_task, 0, hold="hold-kill", resources={"GPU": 1}, pure=False)
    await async_poll_for(lambda: any(ts.state == "processing" for ts in s.tasks.values()), 10)
    victim = s.tasks[future.key].processing_on.address
    await async_poll_for(
        lambda: (
            s.workers[victim].metrics.get("gpuresources", {}).get("devices", [{}])[0].get("holders")
        ),
        10,
    )
    nanny = a if a.worker_address == victim else b
    await hold.set()  # the retry must not block; the first run dies before returning
    await nanny.kill()
    addr, ids, *_ = await future
    assert ids == [0]
    table = await leases(c)
    assert victim not in table
    assert all(not holders for devices in table.values() for holders in devices.values())


@gen_cluster(client=True, nthreads=[("127.0.0.1", 4, {"resources": {"GPU": 2}})])
async def test_install_on_a_busy_cluster_reconciles_running_tasks(c, s, a):
    def ids_after(hold):
        Event(hold).wait()
        return gr.get_gpu_ids()

    hold = Event("hold-before-install")
    early = c.submit(ids_after, "hold-before-install", resources={"GPU": 1}, pure=False)
    await async_poll_for(lambda: len(a.state.executing) == 1, timeout=10)
    await gr.install(c)
    await gr.install(c)  # twice is harmless
    table = await leases(c)
    held = [d for d, h in table[a.address].items() if early.key in h]
    assert len(held) == 1
    later = await c.submit(gpu_task, 0, resources={"GPU": 1}, pure=False)
    assert later[1] != held
    await hold.set()
    assert await early == held


@gen_cluster(
    client=True,
    nthreads=[
        ("127.0.0.1", 8, {"resources": {"GPU": 1}}),
        ("127.0.0.1", 8, {"resources": {"GPU": 1}}),
        ("127.0.0.1", 8, {"resources": {"GPU": 8}}),
    ],
)
async def test_placement_follows_free_devices(c, s, a, b, big):
    await gr.install(c)
    results = await c.gather(c.map(gpu_task, [0.2] * 40, resources={"GPU": 1}, pure=False))
    per_worker = defaultdict(int)
    for addr, *_ in results:
        per_worker[addr] += 1
    # Stock Dask spreads by threads (about 13 each); devices are 1:1:8.
    assert per_worker[big.address] >= 28, dict(per_worker)
    assert_no_overlap(results)


async def _queue_then_add_idle_worker(c, s, a):
    """Queue 20 GPU tasks on the 1-GPU worker ``a``, then add an idle 4-GPU worker.

    While moved tasks run, and after all are done, the scheduler plugin's load follows the
    tasks. Returns the results, the added worker's address, and whether the plugin had
    nothing overloaded and no move pending once all were done.
    """
    await gr.install(c)
    futures = c.map(gpu_task, [0.2] * 20, resources={"GPU": 1}, pure=False)
    await async_poll_for(lambda: len(a.state.tasks) >= 20, timeout=10)
    async with Worker(s.address, nthreads=4, resources={"GPU": 4}) as w:
        await async_poll_for(lambda: _moved_to(s, w), timeout=10)
        assert_load_follows_tasks(s)
        results = await c.gather(futures)
        # Every moved task's load followed it and left with it: no worker keeps phantom
        # GPU work that would steer placement away from it.
        plugin = s.plugins["gpuresources"]
        plugin.rebalance()
        assert plugin._processing == {}
        assert plugin._load and set(plugin._load.values()) == {0}, plugin._load
        settled = not plugin._overloaded and not plugin._moving
        added = w.address
    assert_no_overlap(results)
    return results, added, settled


@gen_cluster(client=True, nthreads=[("127.0.0.1", 8, {"resources": {"GPU": 1}})])
async def test_queued_work_moves_to_idle_devices(c, s, a):
    results, added, settled = await _queue_then_add_idle_worker(c, s, a)
    assert settled
    moved = sum(r[0] == added for r in results)
    assert moved >= 8, moved


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 8, {"resources": {"GPU": 1}})],
    # our placement and rebalancer off: only Dask's own work stealing moves GPU tasks
    config={
        "gpuresources.scheduler.placement": False,
        "gpuresources.scheduler.rebalance-interval": 0,
    },
)
async def test_load_follows_moves_without_placement(c, s, a):
    """Without our placement, Dask's own stealing moves GPU tasks; their load follows them."""
    results, added, _ = await _queue_then_add_idle_worker(c, s, a)
    assert any(r[0] == added for r in results)


def assert_index_agrees_with_scan(s):
    """Placement's index names the same least-backlog workers as a scan of all of them."""
    plugin = s.plugins["gpuresources"]
    every = {ws for ws in s.workers.values() if ws.resources.get("GPU")}
    for amount in (0.25, 0.5, 1, 2, 3, 4):
        units = round(amount * 10_000)
        indexed = plugin._least_backlog(units) or set()
        assert indexed & every == plugin._scan_least_backlog(every, units), amount


@gen_cluster(
    client=True,
    nthreads=[
        ("127.0.0.1", 8, {"resources": {"GPU": 1}}),
        ("127.0.0.1", 8, {"resources": {"GPU": 2}}),
        ("127.0.0.1", 8, {"resources": {"GPU": 4}}),
        ("127.0.0.1", 8, {"resources": {"GPU": 4}}),
    ],
    config={"gpuresources.scheduler.rebalance-interval": "1h"},
)
async def test_placement_index_follows_load_as_tasks_come_and_go(c, s, *workers):
    await gr.install(c)
    assert_index_agrees_with_scan(s)
    hold = Event()
    waves = []
    for amounts in ([1, 0.5, 0.25, 2], [1] * 9, [0.5] * 7 + [2, 4], [0.25] * 13):
        futures = [
            c.submit(gpu_task, 0, hold=hold.name, resources={"GPU": a}, pure=False) for a in amounts
        ]
        waves.append(futures)
        keys = [f.key for f in futures]
        await async_poll_for(
            lambda keys=keys: all(k in s.tasks and s.tasks[k].state == "processing" for k in keys),
            timeout=10,
        )
        assert_load_follows_tasks(s)
        assert_index_agrees_with_scan(s)
    # tasks leave: the index follows the load down
    await c.cancel(waves.pop(1))
    left = sum(len(wave) for wave in waves)
    await async_poll_for(lambda: len(s.plugins["gpuresources"]._processing) == left, timeout=10)
    assert_index_agrees_with_scan(s)
    await hold.set()
    await c.gather([f for wave in waves for f in wave])
    await async_poll_for(lambda: not s.plugins["gpuresources"]._processing, timeout=10)
    assert_index_agrees_with_scan(s)
    # a worker that sets its GPUs again is placed by its new count at once (no tick runs)
    await workers[1].set_resources(GPU=8)
    assert_index_agrees_with_scan(s)
    assert s.plugins["gpuresources"]._least_backlog(80_000) == {s.workers[workers[1].address]}
    # a worker that leaves leaves the index
    await workers[0].close()
    await async_poll_for(lambda: workers[0].address not in s.workers, timeout=10)
    assert workers[0].address not in s.plugins["gpuresources"]._levels_of
    assert_index_agrees_with_scan(s)


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 8, {"resources": {"GPU": 1}})],
    config={"gpuresources.scheduler.rebalance-interval": "1h"},
)
async def test_quick_ticks_never_send_an_idle_device_more_than_it_can_run(c, s, a):
    await gr.install(c)
    hold = Event()
    futures = c.map(gpu_task, [0] * 20, hold=hold.name, resources={"GPU": 1}, pure=False)
    await async_poll_for(lambda: len(a.state.tasks) >= 20, timeout=10)
    async with Worker(s.address, nthreads=4, resources={"GPU": 2}) as w:
        plugin = s.plugins["gpuresources"]
        stealing = s.extensions["stealing"]
        for _ in range(5):  # ticks in quick succession, before any move has settled
            plugin.rebalance()
        thieves = [m["thief"].address for m in stealing.in_flight.values()]
        assert thieves.count(w.address) == 2, thieves
        await hold.set()
        await c.gather(futures)
