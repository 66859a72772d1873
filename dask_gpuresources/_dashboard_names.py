"""The dashboard page's names and colours, shared by :mod:`.dashboard` (no Bokeh) and
:mod:`._dashboard_page` (the Bokeh components), so that neither imports the other for them."""

from __future__ import annotations

__all__ = ["COLORS", "INSTALL_HINT", "LABELS", "PAGE", "ROUTE", "TITLE"]

PAGE = "gpu-allocations"
ROUTE = "/" + PAGE
#: the page's name in the dashboard's navigation bar and in its browser tab
TITLE = "GPU allocations"
INSTALL_HINT = "pip install bokeh prometheus_client"
#: the legend: who holds a segment of a device, and what a device's bar is drawn over
COLORS = {
    "task": "#1f77b4",
    "actor": "#ff7f0e",
    "free": "#d9d9d9",
    "overlap": "#d62728",  # the device is handed out by another worker of the host as well
}
LABELS = {
    "task": "task",
    "actor": "actor",
    "free": "free",
    "overlap": "also handed out by another worker",
}
