"""The dashboard page's component, built on a live cluster and checked through its source."""

from __future__ import annotations

import pytest
from distributed import Event
from distributed.utils_test import async_poll_for, gen_cluster

import dask_gpuresources as gr

pytest.importorskip("bokeh")

from dask_gpuresources.dashboard import COLORS, GPUAllocations  # noqa: E402


def hold(name):
    Event(name).wait()
    return gr.get_gpu_ids()


class Keeper:
    def __init__(self):
        self.ids = gr.get_gpu_ids()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 3, {"resources": {"GPU": 3}})])
async def test_component_shows_holders_escaped(c, s, a):
    await gr.install(c)
    plugin = s.plugins["gpuresources"]
    ev = Event()
    actor = await c.submit(Keeper, actor=True, resources={"GPU": 1})
    evil = c.submit(hold, ev.name, key="<script>alert(1)</script>", resources={"GPU": 0.5})
    await async_poll_for(lambda: len(a.state.executing) == 1, timeout=10)

    component = GPUAllocations(s, plugin)

    def shown():
        component.update()
        return sorted(component.source.data["kind"]) == ["actor", "free", "task"]

    await async_poll_for(shown, timeout=10)  # the page reads the workers' heartbeats
    data = component.source.data
    by_kind = {k: i for i, k in enumerate(data["kind"])}
    task = by_kind["task"]
    assert data["held"][task] == 0.5
    assert "&lt;script&gt;alert(1)&lt;/script&gt; (task, 0.5)" == data["holders"][task]
    assert "<script>" not in "".join(data["holders"])
    assert data["holders"][by_kind["actor"]].endswith("(actor, 1)")
    assert data["holders"][by_kind["free"]] == "free" and data["held"][by_kind["free"]] == 0
    assert data["color"][by_kind["actor"]] == COLORS["actor"]
    assert component.root.y_range.factors == data["row"] and len(data["row"]) == 3
    assert all(r.startswith(f"{a.address} #") for r in data["row"])
    await ev.set()
    await evil
    del actor


def test_no_dashboard_no_bokeh():
    """A scheduler without Dask's dashboard gets no page and never imports Bokeh.

    Bokeh's modules would double a small scheduler's heap, which every full garbage
    collection walks: that was a measurable share of the plugin's per-task cost.
    """
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from distributed import Client, LocalCluster\n"
        "import dask_gpuresources as gr\n"
        "with LocalCluster(n_workers=1, processes=False, dashboard_address=None,\n"
        "                  resources={'GPU': 1}) as cluster, Client(cluster) as client:\n"
        "    gr.install(client)\n"
        "    print(client.submit(gr.get_gpu_ids, resources={'GPU': 1}).result())\n"
        "    print(sorted(m for m in sys.modules if m.split('.')[0] == 'bokeh'"
        " or m == 'dask_gpuresources.dashboard')[:3])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[0]", "[]"], done.stdout
