"""The "GPU allocations" page of the scheduler's Bokeh dashboard, at ``/gpu-allocations``.

The page (linked as "GPU allocations" in the dashboard's navigation bar once the scheduler
plugin starts) shows, from the workers' last heartbeats, twice a second:

- a grid with one row per worker and one column per device index, coloured by the share of
  the device that is held (0 to 1): the overview that stays readable at hundreds of devices;
- one bar per device, devices in order from worker to worker and from device 0 at the top,
  in which every holder (a running task or a live actor) is its own segment: two ``0.5``
  tasks on a device are two halves, each with its key on hover, and a legend names the
  colours (task, actor, free, and a device another worker of the host hands out too);
- the same as text: every holder's full key, kind and share, NVML's memory and utilization
  where NVML sees the device, and the other workers that hand out the same device.

Task keys are user input: the text and the hover are built from HTML-escaped keys.

This module imports neither Bokeh nor ``prometheus_client``: :func:`available` says whether
they can be used, and the page's components (:class:`GPUAllocations`, :class:`DeviceGrid`,
:class:`DeviceBars`, :class:`HolderTable`) are loaded on first use, so that a scheduler
without Dask's dashboard never pays for Bokeh's modules.
"""

from __future__ import annotations

import importlib.util
import logging
import weakref
from typing import TYPE_CHECKING, Any

from ._dashboard_names import COLORS, INSTALL_HINT, LABELS, PAGE, ROUTE, TITLE

if TYPE_CHECKING:  # loaded on first use (module __getattr__ below)
    from ._dashboard_page import DeviceBars, DeviceGrid, GPUAllocations, HolderTable

__all__ = [
    "COLORS",
    "INSTALL_HINT",
    "LABELS",
    "PAGE",
    "ROUTE",
    "TITLE",
    "DeviceBars",
    "DeviceGrid",
    "GPUAllocations",
    "HolderTable",
    "available",
    "install_page",
    "uninstall_page",
]

logger = logging.getLogger("distributed.gpuresources")

_COMPONENTS = {"GPUAllocations", "DeviceGrid", "DeviceBars", "HolderTable"}
# scheduler -> the Bokeh application serving the page there
_pages: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_missing_logged = False


def __getattr__(name: str) -> Any:
    if name in _COMPONENTS:
        from . import _dashboard_page

        return getattr(_dashboard_page, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _COMPONENTS)


def available() -> str | None:
    """Why the page and the metrics cannot be served here, or None when they can.

    The page needs Bokeh (the release Dask's dashboard accepts) and the ``/metrics`` gauges
    need ``prometheus_client``; both are dependencies of this package, so this says what is
    wrong with an environment that lacks them anyway. Nothing is imported to find out.

    Returns
    -------
    str or None
        One line naming what is missing and the command that installs it; None when both
        are there.

    Examples
    --------
    >>> available() is None  # bokeh and prometheus_client are installed
    True
    """
    missing = [n for n in ("bokeh", "prometheus_client") if importlib.util.find_spec(n) is None]
    if missing:
        off = {"bokeh": f"no {TITLE} page", "prometheus_client": "no dask_gpuresources_* metrics"}
        verb = "is" if len(missing) == 1 else "are"
        return (
            f"{' and '.join(missing)} {verb} not installed: "
            f"{' and '.join(off[n] for n in missing)}; {INSTALL_HINT}"
        )
    from importlib.metadata import PackageNotFoundError, version

    from distributed.versions import BOKEH_REQUIREMENT

    try:
        bokeh_version = version("bokeh")
    except PackageNotFoundError:  # importable but not installed as a distribution
        return None
    if not BOKEH_REQUIREMENT.specifier.contains(bokeh_version, prereleases=True):
        return (
            f"Dask's dashboard needs {BOKEH_REQUIREMENT}, not bokeh {bokeh_version}: no "
            f"{TITLE} page; pip install '{BOKEH_REQUIREMENT}' prometheus_client"
        )
    return None


def _log_missing(reason: str) -> None:
    global _missing_logged
    if not _missing_logged:
        _missing_logged = True
        logger.warning(reason)


def install_page(scheduler: Any, plugin: Any) -> bool:
    """Serve :data:`ROUTE` on ``scheduler``'s dashboard and link it in the navigation bar.

    ``plugin`` is the scheduler plugin whose ``table()`` the page draws. A scheduler that
    serves no Bokeh dashboard gets nothing (and Bokeh is not imported); when the dashboard's
    dependencies are missing, one warning says what to install. Installing twice on one
    scheduler replaces the first page.

    Returns
    -------
    bool
        Whether the page is served.
    """
    from ._http import bokeh_pages

    dask_pages = bokeh_pages(scheduler)
    if dask_pages is None:
        reason = available()
        if reason is not None and getattr(scheduler, "http_application", None) is not None:
            _log_missing(reason)  # Dask serves its "install bokeh" page instead of its own
        return False
    if (reason := available()) is not None:  # Bokeh is there; prometheus_client is not
        _log_missing(reason)
    uninstall_page(scheduler)
    try:
        from ._dashboard_page import make_application
    except ImportError as e:
        _log_missing(f"the {TITLE} page cannot be served ({e}); {INSTALL_HINT}")
        return False
    from distributed.dashboard.scheduler import template_variables
    from tornado.ioloop import IOLoop

    from . import _dask_internals

    variables = template_variables(scheduler)  # shared by every page: the navigation bar
    if PAGE not in variables["pages"]:
        variables["pages"].append(PAGE)
    _install_title()
    app = make_application(
        scheduler,
        plugin,
        prefix=_dask_internals.dashboard_prefix(dask_pages),
        template_variables=variables,
    )
    scheduler.http_application.add_application(app)
    app.initialize(IOLoop.current())
    app.start()  # Bokeh's session cleanup: a closed tab's document stops updating
    _pages[scheduler] = app
    return True


def uninstall_page(scheduler: Any) -> None:
    """Undo :func:`install_page`: the route, the navigation link, the Bokeh application."""
    app = _pages.pop(scheduler, None)
    if app is None:
        return
    applications = getattr(scheduler.http_application, "applications", [])
    if app in applications:
        applications.remove(app)
    app.stop()
    from distributed.dashboard.scheduler import template_variables

    pages = template_variables(scheduler)["pages"]
    if PAGE in pages:
        pages.remove(PAGE)
    if not _pages:
        _uninstall_title()


# Dask's navigation bar writes each page's route through Jinja's ``title`` filter
# ("gpu-allocations" would read "Gpu-Allocations"), and its template takes no other name.
# The dashboard's Jinja environment gets a ``title`` filter that names this page and leaves
# every other value to the original filter; it is put back when no page is served.
def _install_title() -> None:
    from distributed.dashboard.components.scheduler import env

    current = env.filters["title"]
    if getattr(current, "__wrapped__", None) is None:
        env.filters["title"] = _title_filter(current)


def _uninstall_title() -> None:
    from distributed.dashboard.components.scheduler import env

    original = getattr(env.filters["title"], "__wrapped__", None)
    if original is not None:
        env.filters["title"] = original


def _title_filter(original: Any) -> Any:
    def title(value: Any) -> Any:
        return TITLE if value == PAGE else original(value)

    title.__wrapped__ = original  # type: ignore[attr-defined]
    return title
