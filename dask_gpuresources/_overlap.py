"""Workers of one host that hand out the same physical devices: how the scheduler notices
them (the devices workers report when their plugin starts and in every heartbeat), warns
once per host, or refuses the later worker's GPUs (``gpuresources.scheduler.overlap``).

:class:`OverlapChecks` is part of :class:`~dask_gpuresources.scheduler.GPUSchedulerPlugin`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from distributed.comm import get_address_host

from . import _config, _dask_internals
from ._names import GPU, PLUGIN_NAME

logger = logging.getLogger("distributed.gpuresources")

__all__ = ["OVERLAP_POLICIES", "Overlap", "OverlapChecks", "overlaps"]

OVERLAP_POLICIES = ("warn", "raise", "ignore")


class Overlap(NamedTuple):
    """Two workers of one host that hand out the same physical devices.

    ``first`` reported its devices before ``second``; ``shared`` pairs the device tokens
    (``CUDA_VISIBLE_DEVICES`` entries) of ``first`` and ``second`` that name one device.
    """

    host: str
    first: str
    second: str
    shared: tuple[tuple[str, str], ...]


def _is_uuid(token: str) -> bool:
    return token.startswith(("GPU-", "MIG-"))


def _same_device(a: tuple[str, str | None], b: tuple[str, str | None]) -> bool:
    (token_a, uuid_a), (token_b, uuid_b) = a, b
    if uuid_a and uuid_b:
        # NVML's UUIDs decide: two containers of one host may both call different GPUs "0"
        return uuid_a == uuid_b
    if token_a == token_b:
        return True
    # an abbreviated UUID in CUDA_VISIBLE_DEVICES names the device whose UUID it begins
    return bool(
        (uuid_a and _is_uuid(token_b) and uuid_a.startswith(token_b))
        or (uuid_b and _is_uuid(token_a) and uuid_b.startswith(token_a))
    )


def overlaps(
    workers: Mapping[str, tuple[str, Sequence[str], Sequence[str | None]]],
) -> list[Overlap]:
    """The pairs of workers of one host whose devices are the same physical devices.

    Parameters
    ----------
    workers
        ``{address: (host, tokens, uuids)}`` in the order the workers reported their
        devices: ``tokens`` are the worker's ``CUDA_VISIBLE_DEVICES`` entries (``"0"``,
        ``"GPU-8f3e..."``), ``uuids`` NVML's UUID of each device, ``None`` where unknown.
        Two devices are one when both UUIDs are known and equal, or, where a UUID is
        unknown, when the tokens are equal (or one is the beginning of the other's UUID).

    Returns
    -------
    list of Overlap
        One per overlapping pair, the earlier worker first; ``[]`` when none overlap.

    Examples
    --------
    >>> overlaps({
    ...     "tcp://10.0.0.1:4001": ("10.0.0.1", ["0", "1"], [None, None]),
    ...     "tcp://10.0.0.1:4002": ("10.0.0.1", ["1", "2"], [None, None]),
    ...     "tcp://10.0.0.2:4001": ("10.0.0.2", ["0", "1"], [None, None]),
    ... })  # doctest: +NORMALIZE_WHITESPACE
    [Overlap(host='10.0.0.1', first='tcp://10.0.0.1:4001', second='tcp://10.0.0.1:4002',
             shared=(('1', '1'),))]

    NVML's UUIDs tell devices apart that share a token, and join devices named differently:

    >>> overlaps({
    ...     "tcp://h:1": ("h", ["0", "1"], ["GPU-aaaa", "GPU-bbbb"]),
    ...     "tcp://h:2": ("h", ["0", "GPU-aa"], ["GPU-cccc", None]),
    ... })  # doctest: +NORMALIZE_WHITESPACE
    [Overlap(host='h', first='tcp://h:1', second='tcp://h:2', shared=(('0', 'GPU-aa'),))]
    """
    by_host: dict[str, list[tuple[str, list[tuple[str, str | None]]]]] = {}
    for addr, (host, tokens, uuids) in workers.items():
        uuids = (list(uuids) + [None] * len(tokens))[: len(tokens)]
        by_host.setdefault(host, []).append((addr, list(zip(tokens, uuids, strict=True))))
    out = []
    for host, members in by_host.items():
        for i, (first, devices_a) in enumerate(members):
            for second, devices_b in members[i + 1 :]:
                shared = tuple(
                    (a[0], b[0]) for a in devices_a for b in devices_b if _same_device(a, b)
                )
                if shared:
                    out.append(Overlap(host, first, second, shared))
    return out


def _device_names(shared: Sequence[tuple[str, str]]) -> str:
    return ", ".join(a if a == b else f"{a} (= {b})" for a, b in shared)


_OVERLAP_FIX = (
    "Give each worker its own devices with CUDA_VISIBLE_DEVICES, e.g. "
    "`CUDA_VISIBLE_DEVICES=0,1 dask worker ...` and `CUDA_VISIBLE_DEVICES=2,3 dask worker "
    "...`, or start the workers with dask_gpuresources.init(num_gpus=...) or "
    "`dask gpuresources start --nworkers N`, which split the devices among them"
)


class OverlapChecks:
    """The scheduler plugin's record of each worker's devices, and what it does about
    workers of one host that overlap."""

    def devices_handler(
        self, worker: str, tokens: list[str], uuids: list[str | None] | None = None
    ) -> None:
        """Record the devices ``worker`` hands out and check its host for overlap.

        ``tokens`` are the worker's ``CUDA_VISIBLE_DEVICES`` entries, one per device it
        hands out; ``uuids`` NVML's UUID of each, ``None`` where unknown. A worker the
        scheduler does not know yet is checked once it is added.
        """
        tokens = [str(t) for t in tokens]
        uuids = list(uuids or ())
        uuids = [None if u is None else str(u) for u in uuids[: len(tokens)]]
        uuids += [None] * (len(tokens) - len(uuids))
        ws = self.scheduler.workers.get(worker) if self.scheduler is not None else None
        host = ws.host if ws is not None else get_address_host(worker)
        # a worker that reports again keeps its place in the order (who came first)
        self._devices[worker] = (host, tuple(tokens), tuple(uuids))
        if ws is not None:
            self._check_host(host)

    def _record_from_heartbeat(self, addr: str, ws: Any) -> None:
        snap = ws.metrics.get(PLUGIN_NAME)
        if not isinstance(snap, dict):
            return
        devices = snap.get("devices")
        if devices:
            self._devices[addr] = (
                ws.host,
                tuple(str(d.get("token", d.get("id"))) for d in devices),
                tuple(d.get("uuid") for d in devices),
            )
            self._check_host(ws.host)

    def _sync_devices(self) -> None:
        """Record the devices of workers that only their heartbeats told about."""
        devices = self._devices
        for addr, ws in self.scheduler.workers.items():
            if addr not in devices:
                self._record_from_heartbeat(addr, ws)
        for addr in list(self._refused):
            # a worker that sets its resources again gets its GPUs refused again
            ws = self.scheduler.workers.get(addr)
            if ws is not None and ws.resources.get(GPU, 0):
                self._refused[addr] = ws.resources[GPU]
                self._set_gpu_capacity(addr, 0)

    def _check_host(self, host: str, gone: str | None = None) -> None:
        """Recompute which workers of ``host`` share devices; warn or refuse (policy)."""
        workers = self.scheduler.workers
        members = {
            addr: record
            for addr, record in self._devices.items()
            if record[0] == host and addr != gone and addr in workers
        }
        for addr in list(self._shared):
            if addr in members or addr == gone:
                del self._shared[addr]
        found = overlaps(members)
        for pair in found:
            for me, other, mine in (
                (pair.first, pair.second, 0),
                (pair.second, pair.first, 1),
            ):
                shared = self._shared.setdefault(me, {})
                for tokens in pair.shared:
                    shared.setdefault(tokens[mine], []).append(other)
        if not found:
            self._warned_hosts.discard(host)  # resolved: a later overlap here warns again
        policy = _config.get("gpuresources.scheduler.overlap")
        if policy == "raise":
            self._refuse_later_workers(host, members, found)
        elif found and policy != "ignore" and host not in self._warned_hosts:
            self._warned_hosts.add(host)
            text = "; ".join(
                f"{p.first} and {p.second} both hand out GPU device(s) {_device_names(p.shared)}"
                for p in found
            )
            logger.warning(
                "Workers on host %s use the same physical GPUs twice: %s. %s "
                "(gpuresources.scheduler.overlap: raise refuses the later worker's GPUs, "
                "ignore silences this).",
                host,
                text,
                _OVERLAP_FIX,
            )
            self.scheduler.log_event(
                PLUGIN_NAME,
                {
                    "action": "overlapping-devices",
                    "host": host,
                    "policy": policy,
                    "overlaps": [
                        {"workers": [p.first, p.second], "devices": [list(d) for d in p.shared]}
                        for p in found
                    ],
                    "fix": _OVERLAP_FIX,
                },
            )
        if policy != "raise":
            for addr in [a for a in self._refused if a in members]:
                self._restore_gpus(addr)

    def _refuse_later_workers(self, host: str, members: Mapping, found: list[Overlap]) -> None:
        # In the order workers came, a worker whose devices overlap those of an earlier
        # worker that still hands out its GPUs is refused; one that overlaps only refused
        # workers keeps (or gets back) its GPUs.
        earlier: dict[str, list[Overlap]] = {}
        for pair in found:
            earlier.setdefault(pair.second, []).append(pair)
        refused: set[str] = set()
        for addr in members:
            pairs = [p for p in earlier.get(addr, ()) if p.first not in refused]
            if not pairs:
                if addr in self._refused:
                    self._restore_gpus(addr)
                continue
            refused.add(addr)
            if addr in self._refused:
                continue
            others = [p.first for p in pairs]
            devices = _device_names([d for p in pairs for d in p.shared])
            ws = self.scheduler.workers[addr]
            self._refused[addr] = ws.resources.get(GPU, 0)
            self._set_gpu_capacity(addr, 0)
            released = self._release_gpu_tasks(addr)
            logger.error(
                "Refusing the GPUs of worker %s: it hands out GPU device(s) %s, which %s on "
                "host %s hands out too (gpuresources.scheduler.overlap: raise). No GPU task "
                "is placed there%s. %s.",
                addr,
                devices,
                " and ".join(others),
                host,
                f"; {released} GPU task(s) sent there go elsewhere" if released else "",
                _OVERLAP_FIX,
            )
            self.scheduler.log_event(
                PLUGIN_NAME,
                {
                    "action": "refused-gpus",
                    "host": host,
                    "worker": addr,
                    "overlaps": others,
                    "devices": [list(d) for p in pairs for d in p.shared],
                    "fix": _OVERLAP_FIX,
                },
            )

    def _set_gpu_capacity(self, addr: str, value: float) -> None:
        # The scheduler places by scheduler.resources[GPU][addr] (and ws.resources); the
        # worker's own bookkeeping and the used resources stay as they are.
        _dask_internals.set_worker_capacity(self.scheduler, addr, GPU, value)
        self._stale.add(addr)

    def _restore_gpus(self, addr: str) -> None:
        capacity = self._refused.pop(addr, None)
        if capacity is None:
            return
        self._set_gpu_capacity(addr, capacity)
        logger.info("Worker %s hands out its %g GPU(s) again", addr, capacity)

    def _release_gpu_tasks(self, addr: str) -> int:
        """Send the GPU tasks placed on ``addr`` back to be placed elsewhere."""
        keys = [
            key
            for key in self._processing
            if (ts := self.scheduler.tasks.get(key)) is not None
            and ts.processing_on is not None
            and ts.processing_on.address == addr
            and not ts.actor
        ]
        if keys:
            _dask_internals.release_tasks(
                self.scheduler, keys, stimulus_id=f"gpuresources-overlap-{addr}"
            )
        return len(keys)
