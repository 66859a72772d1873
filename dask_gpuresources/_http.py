"""The scheduler's HTTP side: ``/api/v1/gpu_allocations`` and Prometheus gauges.

- ``GET /api/v1/gpu_allocations`` returns the allocation table as JSON (workers are asked
  now): ``{"workers": {addr: {"gpus", "executing", "overlap", "refused", "devices": {id:
  {"holders": [{"key", "kind", "amount"}], "shared_with", ...}}}}}``; ``overlap`` names the
  other workers of the host that hand out the same physical devices.
- Gauges named ``dask_gpuresources_*`` join the scheduler's ``/metrics`` (the process-wide
  ``prometheus_client`` registry that Dask serves), labelled by ``worker`` and ``device``, read
  from the workers' last heartbeats. ``prometheus_client`` stays optional: without it Dask's
  ``/metrics`` already says so, and nothing here fails.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Any

from distributed.http.utils import RequestHandler

__all__ = ["METRICS", "ROUTE", "bokeh_pages", "install_routes"]

logger = logging.getLogger("distributed.gpuresources")

ROUTE = "/api/v1/gpu_allocations"

#: name -> help text of each gauge (labels: worker, and device where per device)
METRICS = {
    "dask_gpuresources_worker_gpus": "GPUs a worker declares.",
    "dask_gpuresources_device_held": "Fraction of a device held by tasks and actors (0-1).",
    "dask_gpuresources_device_holders": "Tasks and actors holding a share of a device.",
    "dask_gpuresources_device_memory_used_bytes": "Device memory in use (NVML).",
    "dask_gpuresources_device_utilization_percent": "Device utilization (NVML).",
    "dask_gpuresources_device_shared_with": (
        "Other workers of the same host that hand out this physical device too (0 unless "
        "workers overlap)."
    ),
}

_plugins: weakref.WeakSet = weakref.WeakSet()
_collector_registered = False


def bokeh_pages(scheduler: Any) -> Any:
    """Dask's Bokeh dashboard application on the scheduler's HTTP server, or None.

    Dask mounts its Bokeh pages as one more application of that server; without a dashboard
    there is none, and nothing here imports Bokeh.
    """
    apps = getattr(getattr(scheduler, "http_application", None), "applications", ())
    return next((a for a in apps if "BokehTornado" in type(a).__name__), None)


class AllocationsHandler(RequestHandler):
    """``GET /api/v1/gpu_allocations``."""

    async def get(self) -> None:
        plugin = self.extra["plugin"]
        table = await plugin.table_handler(refresh=True)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps({"scheduler": plugin.scheduler.address, "workers": table}))


class _Collector:
    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        families = {
            "dask_gpuresources_worker_gpus": GaugeMetricFamily(
                "dask_gpuresources_worker_gpus",
                METRICS["dask_gpuresources_worker_gpus"],
                labels=["worker"],
            )
        }
        for name in list(METRICS)[1:]:
            families[name] = GaugeMetricFamily(name, METRICS[name], labels=["worker", "device"])
        for plugin in list(_plugins):
            if plugin.scheduler is None:
                continue
            table = plugin.table()  # from the workers' last heartbeats
            for addr, worker in table.items():
                families["dask_gpuresources_worker_gpus"].add_metric([addr], worker["gpus"])
                for device, info in worker["devices"].items():
                    labels = [addr, device]
                    held = sum(h["amount"] for h in info["holders"])
                    families["dask_gpuresources_device_held"].add_metric(labels, held)
                    families["dask_gpuresources_device_holders"].add_metric(
                        labels, len(info["holders"])
                    )
                    families["dask_gpuresources_device_shared_with"].add_metric(
                        labels, len(info.get("shared_with") or ())
                    )
                    if info.get("memory_used") is not None:
                        families["dask_gpuresources_device_memory_used_bytes"].add_metric(
                            labels, info["memory_used"]
                        )
                    if info.get("utilization") is not None:
                        families["dask_gpuresources_device_utilization_percent"].add_metric(
                            labels, info["utilization"]
                        )
        yield from families.values()


def install_routes(scheduler: Any, plugin: Any) -> None:
    """Add the JSON route to ``scheduler``'s HTTP server and our gauges to ``/metrics``."""
    global _collector_registered
    app = getattr(scheduler, "http_application", None)
    if app is not None:
        app.add_handlers(
            r".*",
            [(ROUTE, AllocationsHandler, {"dask_server": scheduler, "extra": {"plugin": plugin}})],
        )
    _plugins.add(plugin)
    if not _collector_registered:
        try:
            import prometheus_client
        except ImportError:
            return  # Dask's /metrics explains how to get metrics; nothing to add
        prometheus_client.REGISTRY.register(_Collector())
        _collector_registered = True
