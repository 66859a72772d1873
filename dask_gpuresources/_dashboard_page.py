"""The Bokeh side of :mod:`dask_gpuresources.dashboard` (imported only where a page is served).

Each component is a Dask ``DashboardComponent``: built with the scheduler and the scheduler
plugin, ``update(table)`` redraws it from the plugin's allocation table (``plugin.table()``
when no table is given). :class:`GPUAllocations` reads the table once per refresh and feeds
the three others.
"""

from __future__ import annotations

import html
from typing import Any

from bokeh.layouts import column
from bokeh.models import (
    CDSView,
    ColorBar,
    ColumnDataSource,
    Div,
    FactorRange,
    GroupFilter,
    HoverTool,
    LinearColorMapper,
    Range1d,
)
from bokeh.palettes import Blues9
from bokeh.plotting import figure
from distributed.dashboard.components import DashboardComponent

from ._dashboard_names import COLORS, LABELS, ROUTE, TITLE

__all__ = ["DeviceBars", "DeviceGrid", "GPUAllocations", "HolderTable", "make_application"]

#: bars drawn at most (the grid shows every device; the text lists every held one)
MAX_BARS = 128
#: devices listed at most in the text, held devices first
MAX_TEXT_ROWS = 256
#: above this many workers the grid's worker labels are left to the hover
MAX_GRID_LABELS = 48
#: light (nothing held) to dark (the whole device held)
GRID_PALETTE = list(reversed(Blues9))


def _devices(table: dict) -> list[tuple[str, int, dict, dict]]:
    """``(worker, device index, device info, worker info)`` in page order: workers sorted,
    devices ascending."""
    rows = []
    for addr, worker in sorted(table.items()):
        for device, info in sorted(worker["devices"].items(), key=lambda kv: int(kv[0])):
            rows.append((addr, int(device), info, worker))
    return rows


def _held(info: dict) -> float:
    return min(sum(h["amount"] for h in info["holders"]), 1.0)


def _holder_line(holder: dict) -> str:
    return f"{holder['key']} ({holder['kind']}, {holder['amount']:g})"


def _holders_html(info: dict) -> str:
    lines = [html.escape(_holder_line(h)) for h in info["holders"]]
    return "<br>".join(lines) or "free"


def _shared_text(info: dict, worker: dict) -> str:
    shared = info.get("shared_with") or []
    if not shared:
        return ""
    refused = " (its GPUs are refused here)" if worker.get("refused") else ""
    return f"also handed out by {', '.join(shared)}{refused}"


class DeviceGrid(DashboardComponent):
    """Workers by device index, each cell coloured by the share of the device held.

    One row per worker (the first at the top), one column per device index; hover names the
    worker, the device and its holders. A device another worker of the host also hands out
    is outlined in red.
    """

    def __init__(self, scheduler: Any, plugin: Any, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.plugin = plugin
        self.source = ColumnDataSource(
            {
                "worker": [],
                "device": [],
                "held": [],
                "holders": [],
                "line": [],
                "overlap": [],
            },
            name="gpu-grid-source",
        )
        self.mapper = LinearColorMapper(palette=GRID_PALETTE, low=0, high=1)
        self.root = figure(
            title="Share of each device held (rows: workers, columns: device index)",
            name="gpu-grid",
            x_range=Range1d(-0.5, 0.5),
            y_range=FactorRange(),
            height=120,
            sizing_mode="stretch_width",
            tools="",
            toolbar_location=None,
            **kwargs,
        )
        self.root.rect(
            x="device",
            y="worker",
            width=0.92,
            height=0.9,
            source=self.source,
            fill_color={"field": "held", "transform": self.mapper},
            line_color="line",
            line_width=1.5,
        )
        self.root.add_layout(
            ColorBar(color_mapper=self.mapper, title="share held", width=10), "right"
        )
        self.root.add_tools(
            HoverTool(
                tooltips="""
                <div><b>@worker</b> device @device</div>
                <div>held: @held{0.00}</div>
                <div>@holders{safe}</div>
                <div>@overlap</div>
                """
            )
        )
        self.root.xaxis.axis_label = "device"
        self.root.xgrid.visible = False
        self.root.ygrid.visible = False

    def update(self, table: dict | None = None) -> None:
        """Redraw from ``table`` (the plugin's table when None)."""
        if table is None:
            table = self.plugin.table()
        data: dict[str, list] = {name: [] for name in self.source.data}
        for addr, device, info, worker in _devices(table):
            shared = _shared_text(info, worker)
            data["worker"].append(addr)
            data["device"].append(device)
            data["held"].append(_held(info))
            data["holders"].append(_holders_html(info))
            data["overlap"].append(shared)
            data["line"].append(COLORS["overlap"] if shared else "#bdbdbd")
        workers = sorted(table)
        width = max(data["device"], default=0) + 1
        self.root.y_range.factors = list(reversed(workers))  # the first worker at the top
        self.root.x_range.start, self.root.x_range.end = -0.5, width - 0.5
        self.root.yaxis.visible = len(workers) <= MAX_GRID_LABELS
        self.root.height = min(900, max(120, 22 * len(workers) + 80))
        if self.source.data != data:
            self.source.data = data


def _legend_html() -> str:
    """One swatch and label per colour of the bars, in :data:`COLORS` order."""
    items = [
        f'<span style="display:inline-block;margin-right:16px">'
        f'<span style="display:inline-block;width:14px;height:14px;vertical-align:middle;'
        f'margin-right:5px;background:{COLORS[kind]}"></span>{html.escape(LABELS[kind])}</span>'
        for kind in ("task", "actor", "free", "overlap")
    ]
    return f'<div class="gpu-allocations-legend">{"".join(items)}</div>'


class DeviceBars(DashboardComponent):
    """One bar per device, every holder its own segment, with a legend.

    ``background`` has a row per device (the bar's grey ground, red when another worker of
    the host hands the device out too); ``source`` a row per holder, from ``left`` to
    ``right`` along the device's share. Devices run from the first worker's device 0 at the
    top; at most :data:`MAX_BARS` bars are drawn (the grid shows every device).
    """

    def __init__(self, scheduler: Any, plugin: Any, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.plugin = plugin
        self.background = ColumnDataSource(
            {
                "row": [],
                "worker": [],
                "device": [],
                "held": [],
                "color": [],
                "holders": [],
                "memory": [],
                "utilization": [],
                "overlap": [],
            },
            name="gpu-allocations-devices",
        )
        self.source = ColumnDataSource(
            {
                "row": [],
                "worker": [],
                "device": [],
                "key": [],
                "holder": [],
                "kind": [],
                "amount": [],
                "left": [],
                "right": [],
            },
            name="gpu-allocations-source",
        )
        self.root = figure(
            title="Holders of each device (share of the device held)",
            name="gpu-bars",
            y_range=FactorRange(),
            x_range=Range1d(0, 1),
            height=150,
            sizing_mode="stretch_width",
            tools="",
            toolbar_location=None,
            **kwargs,
        )
        ground = self.root.hbar(
            y="row", left=0, right=1, height=0.8, color="color", source=self.background
        )
        renderers = {}
        for kind in ("task", "actor"):
            renderers[kind] = self.root.hbar(
                y="row",
                left="left",
                right="right",
                height=0.8,
                fill_color=COLORS[kind],
                line_color="white",
                line_width=2,
                source=self.source,
                view=CDSView(filter=GroupFilter(column_name="kind", group=kind)),
            )
        # The legend is HTML: Bokeh draws no swatch for a renderer with no rows (no task
        # running, no shared device), which is exactly when a newcomer reads the legend.
        self.legend = Div(
            text=_legend_html(),
            name="gpu-allocations-legend",
            sizing_mode="stretch_width",
        )
        self.root.add_tools(
            HoverTool(
                renderers=[renderers["task"], renderers["actor"]],
                tooltips="""
                <div><b>@holder{safe}</b></div>
                <div>@kind, share @amount{0.0000}</div>
                <div>@worker device @device</div>
                """,
            ),
            HoverTool(
                renderers=[ground],
                tooltips="""
                <div><b>@worker</b> device @device</div>
                <div>held: @held{0.00}</div>
                <div>@holders{safe}</div>
                <div>@memory @utilization</div>
                <div>@overlap</div>
                """,
            ),
        )
        self.root.xaxis.axis_label = "share of the device"

    def update(self, table: dict | None = None) -> None:
        """Redraw from ``table`` (the plugin's table when None)."""
        if table is None:
            table = self.plugin.table()
        ground: dict[str, list] = {name: [] for name in self.background.data}
        segments: dict[str, list] = {name: [] for name in self.source.data}
        devices = _devices(table)
        for addr, device, info, worker in devices[:MAX_BARS]:
            row = f"{addr} #{device}"
            shared = _shared_text(info, worker)
            ground["row"].append(row)
            ground["worker"].append(addr)
            ground["device"].append(device)
            ground["held"].append(_held(info))
            ground["color"].append(COLORS["overlap"] if shared else COLORS["free"])
            ground["holders"].append(_holders_html(info))
            used = info.get("memory_used")
            ground["memory"].append("" if used is None else f"memory {used / 2**30:.1f} GiB")
            util = info.get("utilization")
            ground["utilization"].append("" if util is None else f"utilization {util}%")
            ground["overlap"].append(shared)
            left = 0.0
            for holder in info["holders"]:
                segments["row"].append(row)
                segments["worker"].append(addr)
                segments["device"].append(device)
                segments["key"].append(str(holder["key"]))
                segments["holder"].append(html.escape(str(holder["key"])))
                segments["kind"].append(holder["kind"])
                segments["amount"].append(holder["amount"])
                segments["left"].append(left)
                left = min(left + holder["amount"], 1.0)
                segments["right"].append(left)
        shown = len(ground["row"])
        self.root.title.text = (
            "Holders of each device (share of the device held)"
            if shown == len(devices)
            else f"Holders of the first {shown} of {len(devices)} devices (the grid shows all)"
        )
        self.root.y_range.factors = list(reversed(ground["row"]))  # device 0 at the top
        self.root.height = max(150, 26 * shown + 110)
        if self.background.data != ground:
            self.background.data = ground
        if self.source.data != segments:
            self.source.data = segments


class HolderTable(DashboardComponent):
    """Every device as text, held devices first: full holder keys, never cut off."""

    def __init__(self, scheduler: Any, plugin: Any, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.plugin = plugin
        self.source = None  # the text is built from ``rows``
        self.root = Div(
            text="", name="gpu-allocations-holders", sizing_mode="stretch_width", **kwargs
        )
        self.rows: list[dict] = []

    def update(self, table: dict | None = None) -> None:
        """Redraw from ``table`` (the plugin's table when None)."""
        if table is None:
            table = self.plugin.table()
        devices = _devices(table)
        # Held devices first (stable: in page order), then the free ones.
        devices.sort(key=lambda d: not d[2]["holders"])
        self.rows = []
        for addr, device, info, worker in devices:
            used, total = info.get("memory_used"), info.get("memory_total")
            memory = "" if used is None else f"{used / 2**30:.1f} GiB"
            if memory and total:
                memory += f" of {total / 2**30:.1f} GiB"
            util = info.get("utilization")
            self.rows.append(
                {
                    "worker": addr,
                    "device": device,
                    "held": _held(info),
                    "holders": [_holder_line(h) for h in info["holders"]],
                    "memory": memory,
                    "utilization": "" if util is None else f"{util}%",
                    "overlap": _shared_text(info, worker),
                }
            )
        text = self._html(self.rows)
        if self.root.text != text:
            self.root.text = text

    @staticmethod
    def _html(rows: list[dict]) -> str:
        cell = 'style="padding: 2px 10px; vertical-align: top; border-bottom: 1px solid #eee"'
        head = "".join(
            f"<th {cell}>{t}</th>"
            for t in ("worker", "device", "held", "holders (key, kind, share)", "memory")
            + ("utilization", "also handed out by")
        )
        body = []
        for r in rows[:MAX_TEXT_ROWS]:
            holders = "<br>".join(html.escape(h) for h in r["holders"]) or "free"
            body.append(
                "<tr>"
                f"<td {cell}>{html.escape(r['worker'])}</td>"
                f"<td {cell}>{r['device']}</td>"
                f"<td {cell}>{r['held']:.2f}</td>"
                f'<td {cell} class="holders">{holders}</td>'
                f"<td {cell}>{r['memory']}</td>"
                f"<td {cell}>{r['utilization']}</td>"
                f"<td {cell}>{html.escape(r['overlap'])}</td>"
                "</tr>"
            )
        more = len(rows) - MAX_TEXT_ROWS
        tail = (
            f"<p>{more} more free or held devices: the grid shows them, and "
            "<code>dask gpuresources status</code> lists them all.</p>"
            if more > 0
            else ""
        )
        return (
            '<table style="border-collapse: collapse; font-size: 13px; width: 100%; '
            'overflow-wrap: anywhere; word-break: break-word">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{tail}"
        )


class GPUAllocations(DashboardComponent):
    """The whole page: the grid, the bars and the text, from one read of the table."""

    def __init__(self, scheduler: Any, plugin: Any, **kwargs: Any) -> None:
        self.scheduler = scheduler
        self.plugin = plugin
        self.grid = DeviceGrid(scheduler, plugin)
        self.bars = DeviceBars(scheduler, plugin)
        self.text = HolderTable(scheduler, plugin)
        self.root = column(
            self.grid.root,
            self.bars.legend,
            self.bars.root,
            self.text.root,
            sizing_mode="stretch_width",
            **kwargs,
        )

    @property
    def source(self) -> ColumnDataSource:
        """The bars' holder segments (one row per holder)."""
        return self.bars.source

    def update(self) -> None:
        """Redraw every part from the workers' last heartbeats."""
        table = self.plugin.table()
        self.grid.update(table)
        self.bars.update(table)
        self.text.update(table)


def _page(plugin: Any) -> Any:
    def gpu_allocations_doc(scheduler: Any, extra: dict, doc: Any) -> None:
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env

        page = GPUAllocations(scheduler, plugin)
        page.update()
        doc.title = f"Dask: {TITLE}"
        doc.add_root(page.root)
        doc.add_periodic_callback(page.update, 500)
        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
        doc.theme = BOKEH_THEME

    return gpu_allocations_doc


def make_application(scheduler: Any, plugin: Any, *, prefix: str, template_variables: dict) -> Any:
    """A Bokeh server application serving the page at ``ROUTE`` (not yet started)."""
    from distributed.dashboard.core import BokehApplication

    return BokehApplication(
        {ROUTE: _page(plugin)},
        scheduler,
        prefix=prefix,
        template_variables=template_variables,
    )
