"""The scheduler's HTTP side: ``/api/v1/gpu_allocations`` and Prometheus gauges.

- ``GET /api/v1/gpu_allocations`` returns the allocation table as JSON, from the workers'
  heartbeats (``?refresh=1`` asks them now, rate-limited): ``{"workers": {addr: {"gpus",
  "executing", "overlap", "refused", "devices": {id: {"holders": [{"key", "kind",
  "amount"}], "shared_with", ...}}}}}``; ``overlap`` names the
  other workers of the host that hand out the same physical devices. Like Dask's own
  ``/api/v1`` routes it is off unless turned on (:func:`json_route_enabled`).
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

__all__ = [
    "METRICS",
    "ROUTE",
    "bokeh_pages",
    "install_routes",
    "json_route_enabled",
    "uninstall_routes",
]

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
_collector: Any = None
#: the module in Dask's ``distributed.scheduler.http.routes`` that turns on its ``/api/v1``
DASK_API_ROUTES = "distributed.http.scheduler.api"


def json_route_enabled() -> bool:
    """Whether :data:`ROUTE` is served: ``gpuresources.scheduler.http.api`` when it is true
    or false; when it is null (the default), whenever Dask serves its own ``/api/v1`` routes
    (``distributed.http.scheduler.api`` in ``distributed.scheduler.http.routes``).

    Examples
    --------
    >>> import dask
    >>> with dask.config.set({"gpuresources.scheduler.http.api": True}):
    ...     json_route_enabled()
    True
    """
    import dask.config

    from . import _config

    setting = _config.get("gpuresources.scheduler.http.api")
    if setting is not None:
        return bool(setting)
    return DASK_API_ROUTES in (dask.config.get("distributed.scheduler.http.routes", []) or [])


def bokeh_pages(scheduler: Any) -> Any:
    """Dask's Bokeh dashboard application on the scheduler's HTTP server, or None.

    Dask mounts its Bokeh pages as one more application of that server; without a dashboard
    there is none, and nothing here imports Bokeh.
    """
    apps = getattr(getattr(scheduler, "http_application", None), "applications", ())
    return next((a for a in apps if "BokehTornado" in type(a).__name__), None)


#: ``?refresh=1`` asks the workers at most this often; requests in between get that answer
REFRESH_INTERVAL = 1.0


class AllocationsHandler(RequestHandler):
    """``GET /api/v1/gpu_allocations``: from the workers' last heartbeats; ``?refresh=1``
    asks them now, at most once per :data:`REFRESH_INTERVAL` (requests in between, and those
    arriving while the workers are asked, share one answer)."""

    async def get(self) -> None:
        plugin = self.extra["plugin"]
        refresh = self.get_argument("refresh", "0").lower() in ("1", "true", "yes")
        if refresh:
            table = await plugin.table_handler(refresh=True, max_age=REFRESH_INTERVAL)
        else:
            table = plugin.table()
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
    """Add the JSON route (when :func:`json_route_enabled`) to ``scheduler``'s HTTP server
    and our gauges to ``/metrics``."""
    global _collector
    app = getattr(scheduler, "http_application", None)
    if app is not None and json_route_enabled():
        app.add_handlers(
            r".*",
            [(ROUTE, AllocationsHandler, {"dask_server": scheduler, "extra": {"plugin": plugin}})],
        )
    _plugins.add(plugin)
    if _collector is None:
        try:
            import prometheus_client
        except ImportError:
            return  # Dask's /metrics explains how to get metrics; nothing to add
        _collector = _Collector()
        prometheus_client.REGISTRY.register(_collector)


def _serves(rule: Any, plugin: Any) -> bool:
    """Whether a Tornado routing rule is (or nests) ``plugin``'s JSON route."""
    target = rule.target
    if getattr(target, "rules", None) is not None:  # a host rule holding a router
        return any(_serves(r, plugin) for r in target.rules)
    return (
        target is AllocationsHandler
        and (rule.target_kwargs or {}).get("extra", {}).get("plugin") is plugin
    )


def uninstall_routes(scheduler: Any, plugin: Any) -> None:
    """Undo :func:`install_routes`: the JSON route, and the gauges once no plugin is left."""
    global _collector
    app = getattr(scheduler, "http_application", None)
    router = getattr(app, "default_router", None)
    if router is not None:
        router.rules[:] = [r for r in router.rules if not _serves(r, plugin)]
    _plugins.discard(plugin)
    if _collector is not None and not _plugins:
        import prometheus_client

        try:
            prometheus_client.REGISTRY.unregister(_collector)
        except KeyError:  # unregistered by someone else
            pass
        _collector = None
