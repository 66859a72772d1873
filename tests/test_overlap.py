"""Workers of one host that hand out the same physical devices: noticed, warned, refused.

The scheduler learns a worker's devices from the ``gpuresources_devices`` handler (called
here through the scheduler RPC, as the worker plugin does at setup) and from heartbeats.
"""

from __future__ import annotations

import logging

import dask.config
import pytest
from distributed import Event, Worker, get_worker
from distributed.utils_test import async_poll_for, captured_logger, gen_cluster

import dask_gpuresources as gr
from dask_gpuresources.cli import _status_lines
from dask_gpuresources.scheduler import GPUSchedulerPlugin, Overlap, overlaps

TWO_GPU_WORKERS = [("127.0.0.1", 2, {"resources": {"GPU": 2}})] * 2
# Only the handler tells the scheduler about devices (not the heartbeats' periodic check).
NO_PERIODIC = {"gpuresources.scheduler.rebalance-interval": 0}


def where(hold=None):
    if hold is not None:
        Event(hold).wait()
    return get_worker().address, gr.get_gpu_ids()


async def report(c, worker, tokens, uuids=None):
    await c.scheduler.gpuresources_devices(
        worker=worker.address, tokens=tokens, uuids=uuids or [None] * len(tokens)
    )


def _lists(value):
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


async def events(c):
    """The scheduler's "gpuresources" events (with lists: msgpack hands back tuples)."""
    return [_lists(msg) for _, msg in await c.get_events("gpuresources")]


# -- the pure computation ---------------------------------------------------------------------


def test_same_ids_on_different_hosts_do_not_overlap():
    workers = {
        "tcp://10.0.0.1:1": ("10.0.0.1", ["0", "1", "2", "3"], [None] * 4),
        "tcp://10.0.0.2:1": ("10.0.0.2", ["0", "1", "2", "3"], [None] * 4),
        "tcp://10.0.0.3:1": ("10.0.0.3", ["0", "1", "2", "3"], [None] * 4),
    }
    assert overlaps(workers) == []


def test_overlap_pairs_in_report_order():
    workers = {
        "tcp://h:3": ("h", ["0", "1"], [None, None]),
        "tcp://h:1": ("h", ["2", "3"], [None, None]),
        "tcp://h:2": ("h", ["1", "2"], []),  # uuids missing: unknown
    }
    assert overlaps(workers) == [
        Overlap("h", "tcp://h:3", "tcp://h:2", (("1", "1"),)),
        Overlap("h", "tcp://h:1", "tcp://h:2", (("2", "2"),)),
    ]


def test_uuids_decide_when_both_are_known():
    same_token_other_gpu = {
        "tcp://h:1": ("h", ["0"], ["GPU-aaaa"]),
        "tcp://h:2": ("h", ["0"], ["GPU-bbbb"]),
    }
    assert overlaps(same_token_other_gpu) == []
    other_token_same_gpu = {
        "tcp://h:1": ("h", ["0"], ["GPU-aaaa"]),
        "tcp://h:2": ("h", ["GPU-aaaa"], ["GPU-aaaa"]),
    }
    assert overlaps(other_token_same_gpu)[0].shared == (("0", "GPU-aaaa"),)


# -- the scheduler plugin ----------------------------------------------------------------------


@gen_cluster(client=True, nthreads=TWO_GPU_WORKERS, config=NO_PERIODIC)
async def test_overlap_warns_once_with_event_and_table(c, s, a, b):
    # Both workers declare GPU=2 without CUDA_VISIBLE_DEVICES: both hand out devices 0, 1.
    # Their plugins report that when they start; reported again, nothing more is said.
    with captured_logger("distributed.gpuresources", level=logging.WARNING) as log:
        await c.register_plugin(GPUSchedulerPlugin())
        plugin = s.plugins["gpuresources"]
        await async_poll_for(lambda: len(plugin._devices) == 2, timeout=10)
        await report(c, a, ["0", "1"])
        await report(c, b, ["0", "1"])
        await async_poll_for(lambda: all(w["devices"] for w in plugin.table().values()), 10)
        table = plugin.table()
    first, second = plugin._devices  # in the order their plugins reported
    text = log.getvalue()
    assert text.count("use the same physical GPUs twice") == 1, text
    assert f"{first} and {second} both hand out GPU device(s) 0, 1" in text
    assert "CUDA_VISIBLE_DEVICES=0,1 dask worker ..." in text
    assert "CUDA_VISIBLE_DEVICES=2,3 dask worker ..." in text
    (event,) = await events(c)
    assert event["action"] == "overlapping-devices"
    assert event["host"] == "127.0.0.1" and event["policy"] == "warn"
    devices = [["0", "0"], ["1", "1"]]
    assert event["overlaps"] == [{"workers": [first, second], "devices": devices}]
    assert table[a.address]["overlap"] == [b.address]
    assert table[b.address]["overlap"] == [a.address]
    assert table[b.address]["refused"] is False
    assert table[b.address]["gpus"] == 2
    assert table[a.address]["devices"]["0"]["shared_with"] == [b.address]
    # warn changes nothing about placement: both workers still take GPU tasks
    assert s.resources["GPU"] == {a.address: 2, b.address: 2}


@gen_cluster(client=True, nthreads=TWO_GPU_WORKERS, config=NO_PERIODIC)
async def test_disjoint_devices_and_distinct_uuids_do_not_warn(c, s, a, b):
    await c.register_plugin(GPUSchedulerPlugin())
    plugin = s.plugins["gpuresources"]
    await async_poll_for(lambda: len(plugin._devices) == 2, timeout=10)
    before = len(await events(c))
    with captured_logger("distributed.gpuresources", level=logging.WARNING) as log:
        await report(c, a, ["0", "1"])
        await report(c, b, ["2", "3"])
        assert plugin.table()[b.address]["overlap"] == []
        # the same indices, but NVML says they are other GPUs (containers of one host)
        await report(c, a, ["0", "1"], ["GPU-aaaa", "GPU-bbbb"])
        await report(c, b, ["0", "1"], ["GPU-cccc", "GPU-dddd"])
        assert plugin.table()[a.address]["overlap"] == []
    assert log.getvalue() == ""
    assert len(await events(c)) == before
    # one UUID in common is one device used twice: a new overlap on the host, a new warning
    with captured_logger("distributed.gpuresources", level=logging.WARNING) as log:
        await report(c, b, ["0", "1"], ["GPU-cccc", "GPU-bbbb"])
    first, second = plugin._devices
    assert f"{first} and {second} both hand out GPU device(s) 1" in log.getvalue()
    assert plugin.table()[a.address]["overlap"] == [b.address]


@gen_cluster(
    client=True,
    nthreads=[
        ("127.0.0.1", 2, {"resources": {"GPU": 2}}),
        ("127.0.0.2", 2, {"resources": {"GPU": 2}}),
    ],
    config=NO_PERIODIC,
)
async def test_same_ids_on_two_hosts_do_not_warn(c, s, a, b):
    assert s.workers[a.address].host != s.workers[b.address].host
    with captured_logger("distributed.gpuresources", level=logging.WARNING) as log:
        await c.register_plugin(GPUSchedulerPlugin())
        plugin = s.plugins["gpuresources"]
        await async_poll_for(lambda: len(plugin._devices) == 2, timeout=10)
        await report(c, a, ["0", "1"])
        await report(c, b, ["0", "1"])
        table = plugin.table()
    assert log.getvalue() == ""
    assert await events(c) == []
    assert table[a.address]["overlap"] == table[b.address]["overlap"] == []


@gen_cluster(client=True, nthreads=TWO_GPU_WORKERS)
async def test_overlap_found_from_heartbeats(c, s, a, b):
    await gr.install(c)
    plugin = s.plugins["gpuresources"]
    await async_poll_for(lambda: len(plugin._devices) == 2, timeout=10)
    # What a worker whose plugin does not report at setup leaves: only its heartbeats
    # carry its devices ({"devices": [{"id", "token", "uuid", ...}]}).
    plugin._devices.clear()
    plugin._shared.clear()
    plugin._warned_hosts.clear()
    with captured_logger("distributed.gpuresources", level=logging.WARNING) as log:
        await async_poll_for(lambda: plugin.table()[b.address]["overlap"], timeout=10)
    assert log.getvalue().count("use the same physical GPUs twice") == 1
    assert plugin.table()[a.address]["overlap"] == [b.address]
    assert plugin._devices[a.address] == ("127.0.0.1", ("0", "1"), (None, None))


@gen_cluster(
    client=True,
    nthreads=TWO_GPU_WORKERS,
    config={**NO_PERIODIC, "gpuresources.scheduler.overlap": "ignore"},
)
async def test_ignore_says_nothing_but_the_table_shows_it(c, s, a, b):
    with captured_logger("distributed.gpuresources", level=logging.WARNING) as log:
        await c.register_plugin(GPUSchedulerPlugin())
        await report(c, a, ["0", "1"])
        await report(c, b, ["1"])
    assert log.getvalue() == ""
    assert await events(c) == []
    plugin = s.plugins["gpuresources"]
    await async_poll_for(lambda: all(w["devices"] for w in plugin.table().values()), 10)
    table = plugin.table()
    assert table[b.address]["overlap"] == [a.address]
    assert table[a.address]["devices"]["1"]["shared_with"] == [b.address]
    assert table[a.address]["devices"]["0"]["shared_with"] == []


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 2, {"resources": {"GPU": 2}})],
    config={**NO_PERIODIC, "gpuresources.scheduler.overlap": "raise"},
)
async def test_raise_refuses_the_gpus_of_a_worker_that_joins_later(c, s, a):
    await c.register_plugin(GPUSchedulerPlugin())
    plugin = s.plugins["gpuresources"]
    with captured_logger("distributed.gpuresources", level=logging.ERROR) as log:
        async with Worker(s.address, nthreads=2, resources={"GPU": 2}) as b:
            await async_poll_for(lambda: b.address in plugin._refused, timeout=10)
            text = log.getvalue()
            assert f"Refusing the GPUs of worker {b.address}" in text
            assert f"which {a.address} on host 127.0.0.1 hands out too" in text
            assert "CUDA_VISIBLE_DEVICES=2,3 dask worker ..." in text
            (event,) = await events(c)
            assert event["action"] == "refused-gpus"
            assert event["worker"] == b.address and event["overlaps"] == [a.address]
            assert s.resources["GPU"] == {a.address: 2, b.address: 0}
            table = plugin.table()
            assert table[b.address]["refused"] is True and table[b.address]["gpus"] == 0
            assert table[a.address]["refused"] is False and table[a.address]["gpus"] == 2
            results = await c.gather(c.map(where, [None] * 6, resources={"GPU": 1}, pure=False))
            assert {addr for addr, _ in results} == {a.address}
            assert await c.submit(lambda: 1, workers=[b.address]) == 1  # other work: yes

            # once the earlier worker is gone, the later one hands out its GPUs
            await a.close()
            await async_poll_for(lambda: s.resources["GPU"].get(b.address) == 2, timeout=10)
            assert plugin.table()[b.address]["refused"] is False
            assert plugin.table()[b.address]["overlap"] == []
            assert (await c.submit(where, resources={"GPU": 2}, pure=False))[0] == b.address


@gen_cluster(client=True, nthreads=TWO_GPU_WORKERS, config=NO_PERIODIC)
async def test_raise_sends_gpu_tasks_already_placed_elsewhere(c, s, a, b):
    await c.register_plugin(GPUSchedulerPlugin())  # warns: both hand out 0, 1
    plugin = s.plugins["gpuresources"]
    await async_poll_for(lambda: len(plugin._devices) == 2, timeout=10)
    first, later = (a, b) if next(iter(plugin._devices)) == a.address else (b, a)
    ev = Event()
    held = c.map(where, [ev.name] * 4, resources={"GPU": 1}, pure=False)
    await async_poll_for(lambda: len(a.state.executing) == len(b.state.executing) == 2, 10)

    with dask.config.set({"gpuresources.scheduler.overlap": "raise"}):
        with captured_logger("distributed.gpuresources", level=logging.ERROR) as log:
            await report(c, later, ["0", "1"])
    assert f"Refusing the GPUs of worker {later.address}" in log.getvalue()
    assert "2 GPU task(s) sent there go elsewhere" in log.getvalue()
    assert s.resources["GPU"][later.address] == 0
    await ev.set()
    results = await c.gather(held)
    assert {addr for addr, _ in results} == {first.address}


@gen_cluster(client=True, nthreads=TWO_GPU_WORKERS, config=NO_PERIODIC)
async def test_removed_worker_is_forgotten(c, s, a, b):
    await c.register_plugin(GPUSchedulerPlugin())
    plugin = s.plugins["gpuresources"]
    await report(c, a, ["0", "1"])
    await report(c, b, ["0", "1"])
    await async_poll_for(lambda: len(plugin._devices) == 2, timeout=10)
    assert plugin.table()[a.address]["overlap"] == [b.address]
    await b.close()
    await async_poll_for(lambda: b.address not in s.workers, timeout=10)
    assert plugin.table()[a.address]["overlap"] == []
    assert b.address not in plugin._devices and b.address not in plugin._shared


@gen_cluster(client=True, nthreads=[], config={"gpuresources.scheduler.overlap": "always"})
async def test_bad_overlap_setting_is_refused_at_start(c, s):
    with pytest.raises(ValueError, match="must be 'warn', 'raise' or 'ignore', got 'always'"):
        await c.register_plugin(GPUSchedulerPlugin())


# -- where operators see it ---------------------------------------------------------------------


@gen_cluster(client=True, nthreads=TWO_GPU_WORKERS, config=NO_PERIODIC)
async def test_status_and_dashboard_show_the_overlap(c, s, a, b):
    await gr.install(c)
    plugin = s.plugins["gpuresources"]
    await report(c, a, ["0", "1"])
    await report(c, b, ["1"])  # only device 1 of a is b's as well
    await async_poll_for(lambda: all(w["devices"] for w in plugin.table().values()), 10)

    table = {"scheduler": s.address, "workers": plugin.table()}
    table["totals"] = {"workers": 2, "gpus": 4, "gpus_held": 0}
    text = "\n".join(_status_lines(table))
    assert f"hands out the same physical GPUs as {b.address}" in text
    assert f"device 1: free  [also handed out by {b.address}]" in text
    assert "device 0: free\n" in text

    pytest.importorskip("bokeh")
    from dask_gpuresources.dashboard import COLORS, GPUAllocations

    component = GPUAllocations(s, plugin)
    component.update()
    data = component.bars.background.data  # one row per device
    rows = {(w, d): i for i, (w, d) in enumerate(zip(data["worker"], data["device"], strict=True))}
    shared = rows[a.address, 1]
    assert data["overlap"][shared] == f"also handed out by {b.address}"
    assert data["color"][shared] == COLORS["overlap"]
    assert data["overlap"][rows[a.address, 0]] == ""
    assert data["color"][rows[a.address, 0]] == COLORS["free"]
