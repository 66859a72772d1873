"""The cluster-wide allocation table: who holds which share of which device, from the
workers' heartbeats or asked now; one table for the JSON route, the dashboard page, the
Prometheus gauges and ``dask gpuresources status``.

:class:`AllocationTable` is part of :class:`~dask_gpuresources.scheduler.GPUSchedulerPlugin`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ._names import GPU, PLUGIN_NAME

logger = logging.getLogger("distributed.gpuresources")

__all__ = ["AllocationTable"]


class AllocationTable:
    """The scheduler plugin's allocation table and the handlers that serve it."""

    def _heartbeat_snapshots(self) -> dict[str, dict]:
        """Each worker's snapshot as its last heartbeat carried it."""
        out = {}
        for addr, ws in self.scheduler.workers.items():
            snap = ws.metrics.get(PLUGIN_NAME)
            if isinstance(snap, dict):
                out[addr] = snap
        return out

    async def _snapshots(self, refresh: bool, max_age: float = 0.0) -> dict[str, dict]:
        """Worker snapshots: asked now with ``refresh`` (heartbeat ones where a worker
        does not answer), else from the heartbeats.

        Callers that ask while a round of questions is under way share it: a hundred
        dashboard or ``status`` requests at once cost the workers one message each, not a
        hundred. With ``max_age``, an answer younger than that many seconds is reused.
        """
        out = self._heartbeat_snapshots()
        if refresh and self.scheduler.workers:
            fresh_enough = (
                self._refreshing is not None
                and self._refreshing.done()
                and time.monotonic() - self._refreshed_at < max_age
            )
            if not fresh_enough and (self._refreshing is None or self._refreshing.done()):
                self._refreshed_at = time.monotonic()
                self._refreshing = asyncio.ensure_future(
                    self.scheduler.broadcast(
                        msg={"op": PLUGIN_NAME},
                        workers=list(self.scheduler.workers),
                        on_error="return",
                    )
                )
            fresh = await asyncio.shield(self._refreshing)
            out.update(
                (a, snap)
                for a, snap in fresh.items()
                if isinstance(snap, dict) and a in self.scheduler.workers
            )
        return out

    def table(self, snapshots: dict[str, dict] | None = None) -> dict:
        """The allocation table as plain data (JSON route, ``status``, metrics).

        ``{worker: {"gpus": n, "executing": n, "overlap": [worker, ...], "refused": bool,
        "devices": {id: {"token": str, "uuid": str|None, "shared_with": [worker, ...],
        "holders": [{"key", "kind": "task"|"actor", "amount"}], "memory_used": bytes|None,
        "utilization": percent|None}}}}``

        ``overlap`` lists the other workers of the host that hand out some of the same
        physical devices, ``shared_with`` those per device; ``refused`` is true while the
        worker's GPUs are refused for it (``gpuresources.scheduler.overlap: raise``; its
        ``gpus`` is then 0).
        """
        if snapshots is None:
            snapshots = self._heartbeat_snapshots()
        self._sync_devices()
        out = {}
        for addr, ws in self.scheduler.workers.items():
            snap = snapshots.get(addr) or {}
            actors = set(snap.get("actors", ()))
            shared = self._shared.get(addr, {})
            out[addr] = {
                "gpus": ws.resources.get(GPU, 0),
                "executing": snap.get("executing", 0),
                "overlap": sorted({w for others in shared.values() for w in others}),
                "refused": addr in self._refused,
                "devices": {
                    str(d["id"]): {
                        "token": d.get("token"),
                        "uuid": d.get("uuid"),
                        "shared_with": sorted(shared.get(str(d.get("token")), ())),
                        "holders": [
                            {
                                "key": key,
                                "kind": "actor" if key in actors else "task",
                                "amount": share,
                            }
                            for key, share in d["holders"].items()
                        ],
                        "memory_used": d.get("memory_used"),
                        "memory_total": d.get("memory_total"),
                        "utilization": d.get("utilization"),
                    }
                    for d in snap.get("devices", ())
                },
            }
        return out

    async def table_handler(self, refresh: bool = True, max_age: float = 0.0) -> dict:
        """:meth:`table`, with the workers asked now (``refresh``; an answer younger than
        ``max_age`` seconds is reused) or from heartbeats."""
        return self.table(await self._snapshots(refresh, max_age))

    async def allocations_handler(self, refresh: bool = True) -> dict:
        """``{worker: {device id: {holder key: share}}}`` for every worker with devices.

        With ``refresh`` the workers are asked now; otherwise the table is the one their
        last heartbeats carried.
        """
        return {
            addr: {int(d["id"]): dict(d["holders"]) for d in snap["devices"]}
            for addr, snap in (await self._snapshots(refresh)).items()
            if addr in self.scheduler.workers and snap.get("devices")
        }
