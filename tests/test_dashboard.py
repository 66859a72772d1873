"""The dashboard page: its components built on live clusters and checked through their
sources, the page and its navigation link served over HTTP, and the missing-dependency line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from distributed import Event
from distributed.utils_test import async_poll_for, gen_cluster

import dask_gpuresources as gr
from dask_gpuresources import dashboard

pytest.importorskip("bokeh")

from dask_gpuresources.dashboard import (  # noqa: E402
    COLORS,
    DeviceBars,
    DeviceGrid,
    GPUAllocations,
    HolderTable,
)


def hold(name):
    Event(name).wait()
    return gr.get_gpu_ids()


class Keeper:
    def __init__(self):
        self.ids = gr.get_gpu_ids()


async def _drawn(component, ready, timeout=10):
    """Update ``component`` until ``ready(component)``: the page reads heartbeats."""

    def shown():
        component.update()
        return ready(component)

    await async_poll_for(shown, timeout=timeout)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 4, {"resources": {"GPU": 3}})])
async def test_every_holder_is_its_own_segment(c, s, a):
    await gr.install(c)
    plugin = s.plugins["gpuresources"]
    ev = Event()
    actor = await c.submit(Keeper, actor=True, resources={"GPU": 1})
    halves = [
        c.submit(hold, ev.name, key=k, resources={"GPU": 0.5})
        for k in ("<script>alert(1)</script>", "half-b")
    ]
    await async_poll_for(lambda: len(a.state.executing) == 2, timeout=10)

    page = GPUAllocations(s, plugin)
    await _drawn(page, lambda p: len(p.bars.source.data["key"]) == 3)
    seg = page.bars.source.data
    assert page.source is page.bars.source
    by_key = {k: i for i, k in enumerate(seg["key"])}
    i, j = by_key["<script>alert(1)</script>"], by_key["half-b"]
    # The two halves share one device's bar, side by side: [0, 0.5] and [0.5, 1].
    assert seg["device"][i] == seg["device"][j]
    assert sorted([(seg["left"][i], seg["right"][i]), (seg["left"][j], seg["right"][j])]) == [
        (0.0, 0.5),
        (0.5, 1.0),
    ]
    assert seg["kind"][i] == seg["kind"][j] == "task"
    assert seg["holder"][i] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    (k,) = [n for n, kind in enumerate(seg["kind"]) if kind == "actor"]
    assert seg["key"][k] == actor.key and (seg["left"][k], seg["right"][k]) == (0.0, 1)
    assert seg["device"][k] != seg["device"][i]

    ground = page.bars.background.data
    assert ground["device"] == [0, 1, 2]  # every device has a bar, in order
    assert ground["row"] == [f"{a.address} #{d}" for d in range(3)]
    # Bokeh draws the last factor at the top: device 0 is the last one.
    assert page.bars.root.y_range.factors == [f"{a.address} #{d}" for d in (2, 1, 0)]
    free = ground["device"].index(({0, 1, 2} - {seg["device"][i], seg["device"][k]}).pop())
    assert ground["holders"][free] == "free" and ground["held"][free] == 0
    assert ground["color"][free] == COLORS["free"]
    assert "<script>" not in "".join(ground["holders"] + seg["holder"])

    # The legend: a swatch of each colour and its label, in order, drawn even for colours
    # nothing on the page has now (Bokeh's own legend draws no swatch for those).
    legend = page.bars.legend.text
    labels = ["task", "actor", "free", "also handed out by another worker"]
    kinds = ["task", "actor", "free", "overlap"]
    assert [legend.index(label) for label in labels] == sorted(legend.index(x) for x in labels)
    assert all(f"background:{COLORS[kind]}" in legend for kind in kinds)
    assert page.bars.legend in page.root.children

    # The text lists every holder in full, held devices first, escaped.
    text = page.text.root.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; (task, 0.5)" in text
    assert f"{actor.key} (actor, 1)" in text and "half-b (task, 0.5)" in text
    assert "<script>" not in text
    assert [r["held"] for r in page.text.rows] == [1.0, 1.0, 0.0]

    # The grid: one cell per device, coloured by the share held.
    grid = page.grid.source.data
    assert grid["worker"] == [a.address] * 3 and grid["device"] == [0, 1, 2]
    assert sorted(grid["held"]) == [0, 1.0, 1.0]
    await ev.set()
    await c.gather(halves)
    del actor


@gen_cluster(
    client=True,
    nthreads=[
        ("127.0.0.1", 2, {"resources": {"GPU": 2}}),
        ("127.0.0.1", 2, {"resources": {"GPU": 2}}),
    ],
)
async def test_grid_has_a_row_per_worker_and_a_column_per_device(c, s, a, b):
    await gr.install(c)
    plugin = s.plugins["gpuresources"]
    ev = Event()
    quarter = c.submit(hold, ev.name, key="quarter", resources={"GPU": 0.25}, workers=[b.address])
    await async_poll_for(lambda: len(b.state.executing) == 1, timeout=10)
    grid = DeviceGrid(s, plugin)
    await _drawn(grid, lambda g: 0.25 in g.source.data["held"])
    data = grid.source.data
    first, second = sorted([a.address, b.address])
    assert list(zip(data["worker"], data["device"], strict=True)) == [
        (first, 0),
        (first, 1),
        (second, 0),
        (second, 1),
    ]
    cell = data["held"].index(0.25)
    assert data["worker"][cell] == b.address and "quarter (task, 0.25)" in data["holders"][cell]
    assert grid.root.y_range.factors == [second, first]  # the first worker at the top
    assert (grid.root.x_range.start, grid.root.x_range.end) == (-0.5, 1.5)
    assert grid.mapper.low == 0 and grid.mapper.high == 1
    await ev.set()
    await quarter


def _table(workers, devices, held=()):
    """An allocation table shaped like the scheduler plugin's ``table()``."""
    held = set(held)
    out = {}
    for w in range(workers):
        addr = f"tcp://10.0.{w // 250}.{w % 250}:4000"
        out[addr] = {
            "gpus": devices,
            "executing": 0,
            "overlap": [],
            "refused": False,
            "devices": {
                str(d): {
                    "token": f"{w}-{d}",
                    "uuid": None,
                    "shared_with": [],
                    "holders": (
                        [{"key": f"train-{w}-{d}", "kind": "task", "amount": 1}]
                        if (w, d) in held
                        else []
                    ),
                    "memory_used": None,
                    "memory_total": None,
                    "utilization": None,
                }
                for d in range(devices)
            },
        }
    return out


@pytest.mark.parametrize("workers, devices", [(64, 8), (1, 512), (512, 1)])
def test_page_stays_readable_at_512_devices(workers, devices):
    table = _table(workers, devices, held=[(0, 0), (workers - 1, devices - 1)])
    grid, bars, text = DeviceGrid(None, None), DeviceBars(None, None), HolderTable(None, None)
    for part in (grid, bars, text):
        part.update(table)
    assert len(grid.source.data["held"]) == 512  # the grid shows every device
    assert sum(grid.source.data["held"]) == 2
    assert len(grid.root.y_range.factors) == workers
    assert grid.root.height <= 900
    assert grid.root.x_range.end == devices - 0.5
    assert grid.root.yaxis[0].visible == (workers <= 48)  # else the hover names the worker
    # Bars for the first devices only, and the title says so.
    assert len(bars.background.data["row"]) == 128
    assert "first 128 of 512 devices" in bars.root.title.text
    # The text lists the held devices first.
    assert [r["held"] for r in text.rows[:3]] == [1, 1, 0]
    assert "train-0-0 (task, 1)" in text.root.text
    assert f"train-{workers - 1}-{devices - 1} (task, 1)" in text.root.text
    assert "256 more free or held devices" in text.root.text


def test_shared_device_is_red_and_names_the_other_worker():
    table = _table(2, 1)
    first, second = sorted(table)
    table[first]["devices"]["0"]["shared_with"] = [second]
    table[first]["overlap"] = [second]
    bars, text = DeviceBars(None, None), HolderTable(None, None)
    bars.update(table)
    text.update(table)
    assert bars.background.data["color"] == [COLORS["overlap"], COLORS["free"]]
    assert bars.background.data["overlap"][0] == f"also handed out by {second}"
    assert f"also handed out by {second}" in text.root.text


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})],
    scheduler_kwargs={"dashboard": True, "dashboard_address": ":0"},
)
async def test_page_is_served_and_named_in_the_navigation(c, s, a):
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError

    await gr.install(c)
    http = AsyncHTTPClient()
    base = f"http://127.0.0.1:{s.http_server.port}"
    page = (await http.fetch(base + "/gpu-allocations")).body.decode()
    assert "gpu-allocations" in page and "Bokeh" in page
    link = '<a href="gpu-allocations">GPU allocations</a>'
    assert link in page
    # Dask's own pages link it too, with their own names unchanged.
    status = (await http.fetch(base + "/status")).body.decode()
    assert link in status and '<a href="status">Status</a>' in status

    dashboard.uninstall_page(s)
    with pytest.raises(HTTPClientError) as info:
        await http.fetch(base + "/gpu-allocations")
    assert info.value.code == 404
    status = (await http.fetch(base + "/status")).body.decode()
    assert "gpu-allocations" not in status

    from distributed.dashboard.components.scheduler import env

    assert env.filters["title"]("gpu-allocations") == "Gpu-Allocations"  # Jinja's own again

    assert dashboard.install_page(s, s.plugins["gpuresources"])
    assert link in (await http.fetch(base + "/gpu-allocations")).body.decode()


def test_available():
    assert dashboard.available() is None


@pytest.mark.parametrize(
    "hidden, expected",
    [
        (
            ["bokeh", "prometheus_client"],
            "bokeh and prometheus_client are not installed: no GPU allocations page and no "
            "dask_gpuresources_* metrics; pip install bokeh prometheus_client",
        ),
        (
            ["prometheus_client"],
            "prometheus_client is not installed: no dask_gpuresources_* metrics; "
            "pip install bokeh prometheus_client",
        ),
    ],
)
def test_missing_dependencies_are_one_log_line(hidden, expected):
    """Without Bokeh (or prometheus_client) the scheduler says what to install, once."""
    code = (
        "import sys\n"
        f"for name in {hidden!r}:\n"
        "    sys.modules[name] = None  # not importable\n"
        "from distributed import Client, LocalCluster\n"
        "import dask_gpuresources as gr\n"
        "from dask_gpuresources import dashboard\n"
        "print(dashboard.available())\n"
        "with LocalCluster(n_workers=1, processes=False, dashboard_address=':0',\n"
        "                  resources={'GPU': 1}) as cluster, Client(cluster) as client:\n"
        "    s = cluster.scheduler\n"
        "    plugin = type('Plugin', (), {'table': staticmethod(lambda: {})})()\n"
        "    print(dashboard.install_page(s, plugin), dashboard.install_page(s, plugin))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == expected
    logged = [line for line in done.stderr.splitlines() if "pip install bokeh" in line]
    assert len(logged) == 1 and logged[0].endswith(f"WARNING - {expected}"), done.stderr
    with_bokeh = "bokeh" not in hidden
    assert lines[1] == f"{with_bokeh} {with_bokeh}"


def test_no_dashboard_no_bokeh():
    """A scheduler without Dask's dashboard never imports Bokeh.

    Bokeh's modules would double a small scheduler's heap, which every full garbage
    collection walks: that was a measurable share of the plugin's per-task cost.
    """
    code = (
        "import sys\n"
        "from distributed import Client, LocalCluster\n"
        "import dask_gpuresources as gr\n"
        "from dask_gpuresources import dashboard\n"
        "with LocalCluster(n_workers=1, processes=False, dashboard_address=None,\n"
        "                  resources={'GPU': 1}) as cluster, Client(cluster) as client:\n"
        "    gr.install(client)\n"
        "    print(dashboard.available())\n"
        "    print(dashboard.install_page(cluster.scheduler, None))\n"
        "    print(client.submit(gr.get_gpu_ids, resources={'GPU': 1}).result())\n"
        "    print(sorted(m for m in sys.modules if m.split('.')[0] == 'bokeh'"
        " or m == 'dask_gpuresources._dashboard_page')[:3])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:4] == ["None", "False", "[0]", "[]"], done.stdout
    assert "pip install" not in done.stderr


def test_components_are_listed():
    assert {"GPUAllocations", "DeviceGrid", "DeviceBars", "HolderTable"} <= set(dir(dashboard))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        dashboard.Nope  # noqa: B018


# -- the HTTP side's switches and its undoing --------------------------------------------------


async def _get(url):
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError

    try:
        response = await AsyncHTTPClient().fetch(url)
    except HTTPClientError as e:
        return e.code, ""
    return response.code, response.body.decode()


DASHBOARD = {"dashboard": True, "dashboard_address": ":0"}


@gen_cluster(
    client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})], scheduler_kwargs=DASHBOARD
)
async def test_json_route_is_off_like_dasks_own_api(c, s, a):
    await gr.install(c)
    base = f"http://127.0.0.1:{s.http_server.port}"
    assert (await _get(base + "/api/v1/gpu_allocations"))[0] == 404
    assert (await _get(base + "/gpu-allocations"))[0] == 200


@pytest.mark.parametrize(
    "config",
    [
        {"gpuresources.scheduler.http.api": True},
        {
            "distributed.scheduler.http.routes": [
                "distributed.http.scheduler.api",
                "distributed.http.scheduler.prometheus",
                "distributed.http.health",
            ]
        },
    ],
    ids=["ours", "dasks"],
)
def test_json_route_follows_its_switch(config):
    @gen_cluster(
        client=True,
        nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})],
        scheduler_kwargs=DASHBOARD,
        config=config,
    )
    async def run(c, s, a):
        await gr.install(c)
        code, body = await _get(f"http://127.0.0.1:{s.http_server.port}/api/v1/gpu_allocations")
        assert code == 200
        assert json.loads(body)["workers"][a.address]["gpus"] == 1

    run()


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})],
    scheduler_kwargs=DASHBOARD,
    config={"gpuresources.scheduler.http.api": True},
)
async def test_close_undoes_the_route_the_page_and_the_gauges(c, s, a):
    from distributed.dashboard.components.scheduler import env
    from prometheus_client import REGISTRY, generate_latest

    jinja_title = env.filters["title"]
    await gr.install(c)
    plugin = s.plugins["gpuresources"]
    base = f"http://127.0.0.1:{s.http_server.port}"
    assert (await _get(base + "/api/v1/gpu_allocations"))[0] == 200
    assert (await _get(base + "/gpu-allocations"))[0] == 200
    assert b"dask_gpuresources_worker_gpus" in generate_latest(REGISTRY)

    await plugin.close()
    assert (await _get(base + "/api/v1/gpu_allocations"))[0] == 404
    assert (await _get(base + "/gpu-allocations"))[0] == 404
    assert "gpu-allocations" not in (await _get(base + "/status"))[1]
    assert b"dask_gpuresources_" not in generate_latest(REGISTRY)
    assert env.filters["title"] is jinja_title
    for name in ("gpuresources_allocations", "gpuresources_table"):
        assert name not in s.handlers or s.handlers[name] != getattr(plugin, name, None)
    assert "valid_workers" not in s.__dict__ and "workers_to_close" not in s.__dict__

    # and started again in the same process: everything is back, once
    await c.unregister_scheduler_plugin("gpuresources")
    await gr.install(c)
    assert (await _get(base + "/api/v1/gpu_allocations"))[0] == 200
    assert (await _get(base + "/gpu-allocations"))[0] == 200
    status = (await _get(base + "/status"))[1]
    assert status.count('<a href="gpu-allocations">GPU allocations</a>') == 1
    assert generate_latest(REGISTRY).count(b"# TYPE dask_gpuresources_worker_gpus gauge") == 1
    task = c.submit(gr.get_gpu_ids, resources={"GPU": 1}, pure=False)
    assert await task == [0]


def _count_questions(*workers):
    asked = []
    for w in workers:
        handler = w.handlers["gpuresources"]

        def counting(*args, _handler=handler, _w=w, **kwargs):
            asked.append(_w.address)
            return _handler(*args, **kwargs)

        w.handlers["gpuresources"] = counting
    return asked


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})] * 2,
    scheduler_kwargs=DASHBOARD,
    config={"gpuresources.scheduler.http.api": True},
)
async def test_json_route_answers_from_heartbeats_and_rate_limits_refresh(c, s, a, b):
    await gr.install(c)
    asked = _count_questions(a, b)
    url = f"http://127.0.0.1:{s.http_server.port}/api/v1/gpu_allocations"
    for _ in range(5):
        code, body = await _get(url)
        assert code == 200 and set(json.loads(body)["workers"]) == {a.address, b.address}
    assert asked == []  # from the heartbeats: the workers are not asked
    await asyncio.gather(*(_get(url + "?refresh=1") for _ in range(10)))
    assert sorted(asked) == sorted([a.address, b.address])
    await _get(url + "?refresh=1")  # within a second of the last: the same answer
    assert len(asked) == 2


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})] * 2)
async def test_table_requests_at_once_share_one_question_to_each_worker(c, s, a, b):
    await gr.install(c)
    plugin = s.plugins["gpuresources"]
    asked = _count_questions(a, b)
    tables = await asyncio.gather(*(plugin.table_handler(refresh=True) for _ in range(50)))
    assert all(t.keys() == {a.address, b.address} for t in tables)
    assert sorted(asked) == sorted([a.address, b.address])
    await plugin.table_handler(refresh=True)  # a later request asks again
    assert len(asked) == 4
