"""A page of the scheduler's Bokeh dashboard: every device of every worker, and its holders.

``/gpu-allocations`` (linked from the dashboard's navigation bar once the scheduler plugin
starts) draws one bar per device: the share held (0 to 1), coloured by who holds it (tasks,
actors, both), with the holder keys on hover, and NVML's memory and utilization where NVML
sees the device. It updates twice a second from the workers' heartbeats. A device that
another worker of the same host hands out too (the same physical device used twice) is drawn
in red, with the other workers named in the table and on hover.

Task keys are user input: the hover text is built from HTML-escaped keys.
"""

from __future__ import annotations

import html
import logging
from typing import Any

from bokeh.layouts import column
from bokeh.models import (
    ColumnDataSource,
    DataTable,
    HoverTool,
    NumberFormatter,
    Range1d,
    TableColumn,
)
from bokeh.plotting import figure
from distributed.dashboard.components import DashboardComponent

from ._http import bokeh_pages

__all__ = ["GPUAllocations", "ROUTE", "install_page"]

logger = logging.getLogger("distributed.gpuresources")

ROUTE = "/gpu-allocations"
COLORS = {
    "free": "#d9d9d9",
    "task": "#1f77b4",
    "actor": "#ff7f0e",
    "both": "#9467bd",
    "overlap": "#d62728",  # the device is handed out by another worker of the host as well
}


class GPUAllocations(DashboardComponent):
    """Held share per device, per worker, with holders on hover."""

    def __init__(self, scheduler: Any, plugin: Any, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.plugin = plugin
        self.source = ColumnDataSource(
            {
                "row": [],
                "worker": [],
                "device": [],
                "held": [],
                "kind": [],
                "color": [],
                "holders": [],
                "holders_text": [],
                "memory": [],
                "utilization": [],
                "overlap": [],
            },
            name="gpu-allocations-source",
        )
        self.root = figure(
            title="GPU allocations (share of each device held)",
            y_range=[],
            x_range=Range1d(0, 1),
            height=300,
            sizing_mode="stretch_width",
            tools="",
            toolbar_location=None,
            **kwargs,
        )
        self.root.hbar(y="row", right="held", height=0.8, color="color", source=self.source, left=0)
        self.root.add_tools(
            HoverTool(
                tooltips="""
                <div><b>@worker</b> device @device</div>
                <div>held: @held{0.00} (@kind)</div>
                <div>@holders{safe}</div>
                <div>@memory @utilization</div>
                <div>@overlap</div>
                """
            )
        )
        self.root.xaxis.axis_label = "share held"
        # The same rows as text (the table renders keys as text, never as HTML).
        self.table = DataTable(
            source=self.source,
            columns=[
                TableColumn(field="worker", title="worker"),
                TableColumn(field="device", title="device", width=60),
                TableColumn(
                    field="held", title="held", formatter=NumberFormatter(format="0.00"), width=60
                ),
                TableColumn(field="holders_text", title="holders (key, kind, share)"),
                TableColumn(field="memory", title="memory"),
                TableColumn(field="utilization", title="utilization"),
                TableColumn(field="overlap", title="also handed out by"),
            ],
            index_position=None,
            sizing_mode="stretch_width",
            height=200,
        )

    def update(self) -> None:
        """Refresh the bars from the workers' last heartbeats."""
        table = self.plugin.table()  # from the workers' last heartbeats
        data: dict[str, list] = {name: [] for name in self.source.data}
        for addr, worker in sorted(table.items()):
            for device, info in sorted(worker["devices"].items(), key=lambda kv: int(kv[0])):
                holders = info["holders"]
                kinds = {h["kind"] for h in holders}
                kind = "free" if not kinds else "both" if len(kinds) > 1 else kinds.pop()
                data["row"].append(f"{addr} #{device}")
                data["worker"].append(addr)
                data["device"].append(device)
                data["held"].append(min(sum(h["amount"] for h in holders), 1.0))
                data["kind"].append(kind)
                shared = info.get("shared_with") or []
                data["color"].append(COLORS["overlap"] if shared else COLORS[kind])
                refused = " (its GPUs are refused here)" if worker.get("refused") else ""
                data["overlap"].append(
                    f"also handed out by {', '.join(shared)}{refused}" if shared else ""
                )
                data["holders_text"].append(
                    "; ".join(f"{h['key']} ({h['kind']}, {h['amount']:g})" for h in holders)
                    or "free"
                )
                data["holders"].append(
                    "<br>".join(
                        f"{html.escape(str(h['key']))} ({h['kind']}, {h['amount']:g})"
                        for h in holders
                    )
                    or "free"
                )
                used = info.get("memory_used")
                data["memory"].append("" if used is None else f"memory {used / 2**30:.1f} GiB")
                util = info.get("utilization")
                data["utilization"].append("" if util is None else f"utilization {util}%")
        self.root.y_range.factors = data["row"]
        self.root.height = max(150, 30 * len(data["row"]) + 60)
        self.table.height = max(80, 28 * len(data["row"]) + 30)
        self.source.data = data


def _page(plugin: Any) -> Any:
    def gpu_allocations_doc(scheduler: Any, extra: dict, doc: Any) -> None:
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env

        component = GPUAllocations(scheduler, plugin)
        component.update()
        doc.title = "Dask: GPU allocations"
        doc.add_root(column(component.root, component.table, sizing_mode="stretch_width"))
        doc.add_periodic_callback(component.update, 500)
        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
        doc.theme = BOKEH_THEME

    return gpu_allocations_doc


def install_page(scheduler: Any, plugin: Any) -> bool:
    """Serve :data:`ROUTE` on the scheduler's dashboard and link it in the navigation bar."""
    dask_pages = bokeh_pages(scheduler)
    if dask_pages is None:
        return False
    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables
    from tornado.ioloop import IOLoop

    variables = template_variables(scheduler)  # shared by every page: the navigation bar
    if "gpu-allocations" not in variables["pages"]:
        variables["pages"].append("gpu-allocations")
    bokeh_app = BokehApplication(
        {ROUTE: _page(plugin)},
        scheduler,
        prefix=getattr(dask_pages, "_prefix", "") or "",  # the scheduler's http_prefix
        template_variables=variables,
    )
    scheduler.http_application.add_application(bokeh_app)
    bokeh_app.initialize(IOLoop.current())
    return True
