"""GPU detection behind one small interface.

:class:`NVMLBackend` is what the rest of the package asks: which GPUs (and MIG instances)
exist, and how busy they are. Two backends implement it:

- :class:`RealNVML` talks to NVML through ``pynvml`` (from nvidia-ml-py), imported lazily
  and initialised once per process. When NVML cannot be used it raises
  :class:`NVMLUnavailable` with the reason, and remembers that reason.
- :class:`FakeNVML` answers from a list of :class:`GPUDevice` given to it. Tests and users
  pass it in wherever a backend is accepted; nothing in the package patches NVML.

:func:`detect` turns a backend's answer and the worker's ``CUDA_VISIBLE_DEVICES`` into a
:class:`Detection`: the devices the worker may use, as ``CUDA_VISIBLE_DEVICES`` entries, or
zero devices with the reason why. It never raises for a missing GPU or a missing NVML.

:func:`reading` and :func:`uuid_of` take such an entry (a *token*) and answer for the device
it names, found the way CUDA and ``distributed.diagnostics.nvml`` find it: by index, by GPU
UUID (or a unique abbreviation of one), or by MIG UUID. A slot number or the integer id
``get_gpu_ids()`` reports is not a device index in general, so readings go by token.

NVML numbers devices in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``; CUDA agrees
with that numbering only under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Detection",
    "FakeNVML",
    "GPUDevice",
    "MIGDevice",
    "NVMLBackend",
    "NVMLUnavailable",
    "RealNVML",
    "default_backend",
    "detect",
    "reading",
    "uuid_of",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MIGDevice:
    """One MIG instance of a GPU.

    Parameters
    ----------
    uuid
        The instance's UUID, ``"MIG-..."``, usable as a ``CUDA_VISIBLE_DEVICES`` entry.
    memory_total
        The instance's memory in bytes.
    """

    uuid: str
    memory_total: int = 0


@dataclass(frozen=True)
class GPUDevice:
    """One physical GPU as NVML reports it.

    Parameters
    ----------
    index
        NVML's index for the device (PCI bus order).
    uuid
        The device's UUID, ``"GPU-..."``.
    name
        The product name, e.g. ``"NVIDIA A100-SXM4-40GB"``.
    memory_total
        The device's memory in bytes.
    mig
        The device's MIG instances; empty when MIG mode is off.
    """

    index: int
    uuid: str
    name: str = "fake"
    memory_total: int = 0
    mig: tuple[MIGDevice, ...] = ()


class NVMLUnavailable(RuntimeError):
    """NVML cannot answer; ``reason`` says why (no nvidia-ml-py, no driver, ...)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self):
        return type(self), (self.reason,)


class NVMLBackend(Protocol):
    """What the package asks of NVML.

    Every method raises :class:`NVMLUnavailable` when NVML cannot answer, including for an
    index that names no device; only :meth:`read` answers ``{}`` for a device NVML does not
    have.
    """

    def devices(self) -> list[GPUDevice]:
        """All physical GPUs, in index order, with their MIG instances."""
        ...

    def memory_used(self, index: int) -> int:
        """Bytes of memory in use on the GPU with this index."""
        ...

    def utilization(self, index: int) -> int:
        """Percent of the last sample period the GPU with this index was busy."""
        ...

    def process_memory(self, pid: int) -> int:
        """Bytes of GPU memory the process ``pid`` holds, summed over all GPUs."""
        ...

    def read(self, token: str) -> dict[str, Any]:
        """The readings of the device `token` names, ``{}`` if none; see :func:`reading`."""
        ...


def _text(value: str | bytes) -> str:
    # nvidia-ml-py before 11.515 returned bytes for names and UUIDs.
    return value.decode() if isinstance(value, bytes) else value


def _unless_unsupported(nvml: Any, query: Any, handle: Any) -> Any:
    # As distributed.diagnostics.nvml: a reading the device does not offer is None.
    try:
        return query(handle)
    except nvml.NVMLError_NotSupported:
        return None


def _is_index(token: str) -> bool:
    # As _devices: isascii() too, since str.isdigit() accepts digits int() refuses.
    return token.isascii() and token.isdigit()


class RealNVML:
    """The NVML backend, through ``pynvml`` from nvidia-ml-py.

    ``pynvml`` is imported and ``nvmlInit()`` called on first use, once per process: a forked
    child initialises again, as NVML requires. A failure to import or initialise is kept
    and raised again as :class:`NVMLUnavailable` without retrying. Use
    :func:`default_backend` for the process-wide instance.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._failure: str | None = None
        self._pynvml: Any = None

    def _nvml(self) -> Any:
        """The initialised ``pynvml`` module, or raise the (cached) reason it cannot be."""
        with self._lock:
            if self._failure is not None:
                raise NVMLUnavailable(self._failure)
            if self._pid == os.getpid():
                return self._pynvml
            try:
                import pynvml
            except ImportError:
                raise self._failed("nvidia-ml-py is not installed") from None
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as err:
                raise self._failed(f"NVML could not start: {err}") from err
            self._pynvml = pynvml
            self._pid = os.getpid()
            return pynvml

    def _failed(self, reason: str) -> NVMLUnavailable:
        # Kept for good: a process without nvidia-ml-py or a driver will not gain one.
        self._failure = reason
        logger.info("NVML is unavailable, so no GPU is detected: %s", reason)
        return NVMLUnavailable(reason)

    def devices(self) -> list[GPUDevice]:
        nvml = self._nvml()
        try:
            return [self._device(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
        except nvml.NVMLError as err:
            raise NVMLUnavailable(f"NVML could not list the GPUs: {err}") from err

    def _device(self, nvml: Any, index: int) -> GPUDevice:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        return GPUDevice(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            memory_total=self._memory_total(nvml, handle),
            mig=self._mig_devices(nvml, handle),
        )

    @staticmethod
    def _memory_total(nvml: Any, handle: Any) -> int:
        try:
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        except nvml.NVMLError_NotSupported:
            return 0

    def _mig_devices(self, nvml: Any, handle: Any) -> tuple[MIGDevice, ...]:
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError_NotSupported:
            return ()  # GPUs without MIG support
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            return ()
        try:
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
        except nvml.NVMLError_NotSupported:
            return ()
        instances = []
        for slot in range(slots):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except (nvml.NVMLError_NotFound, nvml.NVMLError_NotSupported):
                continue  # an unpopulated slot
            instances.append(
                MIGDevice(
                    uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                    memory_total=self._memory_total(nvml, mig),
                )
            )
        return tuple(instances)

    def memory_used(self, index: int) -> int:
        nvml = self._nvml()
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        except nvml.NVMLError as err:
            raise NVMLUnavailable(f"NVML could not read memory of GPU {index}: {err}") from err

    def utilization(self, index: int) -> int:
        nvml = self._nvml()
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            return int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError as err:
            raise NVMLUnavailable(f"NVML could not read utilization of GPU {index}: {err}") from err

    def read(self, token: str) -> dict[str, Any]:
        nvml = self._nvml()
        try:
            handle = self._handle(nvml, token)
            if handle is None:
                return {}
            # NVML keeps no utilization per MIG instance; its GPU's is the closest reading.
            gpu = (
                nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
                if token.startswith("MIG-")
                else handle
            )
            memory = _unless_unsupported(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
            busy = _unless_unsupported(nvml, nvml.nvmlDeviceGetUtilizationRates, gpu)
            name = _unless_unsupported(nvml, nvml.nvmlDeviceGetName, handle)
            return {
                "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
                "name": "" if name is None else _text(name),
                "index": int(nvml.nvmlDeviceGetIndex(gpu)),
                "memory_used": None if memory is None else int(memory.used),
                "memory_total": None if memory is None else int(memory.total),
                "utilization": None if busy is None else int(busy.gpu),
            }
        except nvml.NVMLError as err:
            raise NVMLUnavailable(f"NVML could not read device {token!r}: {err}") from err

    @staticmethod
    def _handle(nvml: Any, token: str) -> Any:
        """NVML's handle for the device `token` names, ``None`` when NVML has none."""
        if _is_index(token):
            if int(token) >= nvml.nvmlDeviceGetCount():
                return None  # a logical device, declared beyond those NVML has
            return nvml.nvmlDeviceGetHandleByIndex(int(token))
        if not token.startswith(("GPU-", "MIG-")):
            return None
        try:
            # bytes: nvidia-ml-py before 11.515 takes nothing else, later ones take both
            return nvml.nvmlDeviceGetHandleByUUID(token.encode())
        except (nvml.NVMLError_NotFound, nvml.NVMLError_InvalidArgument):
            if not token.startswith("GPU-"):
                return None
        # NVML wants the whole UUID; CUDA also takes a unique abbreviation of a GPU's.
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        matches = [h for h in handles if _text(nvml.nvmlDeviceGetUUID(h)).startswith(token)]
        return matches[0] if len(matches) == 1 else None

    def process_memory(self, pid: int) -> int:
        nvml = self._nvml()
        total = 0
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    # usedGpuMemory is None where the driver cannot tell (some containers)
                    if process.pid == pid and process.usedGpuMemory:
                        total += int(process.usedGpuMemory)
        except nvml.NVMLError as err:
            raise NVMLUnavailable(f"NVML could not list the processes on the GPUs: {err}") from err
        return total


class FakeNVML:
    """An NVML backend that answers from the devices it is given.

    Parameters
    ----------
    devices
        The GPUs to report, with distinct indices and UUIDs.
    unavailable
        When given, every method raises ``NVMLUnavailable(unavailable)``, as
        :class:`RealNVML` does on a machine without NVML.
    memory_used
        Initial bytes in use per device; 0 for devices not listed. A key is a GPU's index or
        UUID, or a MIG instance's UUID (an instance's memory is its own). Change them with
        :meth:`set_memory_used`.
    utilization
        Initial percent busy per GPU, keyed by index or UUID; 0 for GPUs not listed. A MIG
        instance reports its GPU's, as NVML keeps none per instance. Change them with
        :meth:`set_utilization`.
    process_memory
        Initial GPU memory per process id; 0 for processes not listed. Change it with
        :meth:`set_process_memory`.

    Examples
    --------
    >>> nvml = FakeNVML.with_gpus(2)
    >>> [d.index for d in nvml.devices()]
    [0, 1]
    >>> nvml.devices()[1].uuid
    'GPU-00000001-fake-0000-0000-000000000000'
    >>> nvml.set_memory_used(1, 2**30)
    >>> nvml.memory_used(1)
    1073741824
    >>> nvml.set_utilization("GPU-00000001-fake-0000-0000-000000000000", 35)
    >>> reading(nvml, "1")["utilization"]
    35
    >>> FakeNVML(unavailable="nvidia-ml-py is not installed").devices()
    Traceback (most recent call last):
    ...
    dask_gpuresources._nvml.NVMLUnavailable: nvidia-ml-py is not installed
    """

    def __init__(
        self,
        devices: Sequence[GPUDevice] = (),
        *,
        unavailable: str | None = None,
        memory_used: Mapping[int | str, int] | None = None,
        utilization: Mapping[int | str, int] | None = None,
        process_memory: Mapping[int, int] | None = None,
    ) -> None:
        _check_distinct(devices)
        self._devices = sorted(devices, key=lambda d: d.index)
        self._unavailable = unavailable
        # Keyed by GPU index, or by MIG UUID for an instance's memory.
        self._memory_used: dict[int | str, int] = {}
        self._utilization: dict[int | str, int] = {}
        for readings, initial, what, example in (
            (self._memory_used, memory_used, "memory_used", "2**30"),
            (self._utilization, utilization, "utilization", "50"),
        ):
            for device, value in (initial or {}).items():
                key = self._key(device, mig=what == "memory_used")
                if key is None:
                    raise ValueError(
                        "FakeNVML readings must name a device it has (an index, a GPU UUID "
                        f"or a MIG UUID), got {device!r}; use e.g. {what}={{0: {example}}}"
                    )
                readings[key] = value
        self._process_memory = dict(process_memory or {})

    @classmethod
    def with_gpus(cls, n: int, *, memory_total: int = 16 * 2**30) -> FakeNVML:
        """A fake with `n` plain GPUs, indices ``0 .. n-1``, each of `memory_total` bytes."""
        return cls(
            [
                GPUDevice(
                    index=i,
                    uuid=f"GPU-{i:08d}-fake-0000-0000-000000000000",
                    memory_total=memory_total,
                )
                for i in range(n)
            ]
        )

    def devices(self) -> list[GPUDevice]:
        self._check_available()
        return list(self._devices)

    def memory_used(self, index: int) -> int:
        self._check_index(index)
        return self._memory_used.get(index, 0)

    def utilization(self, index: int) -> int:
        self._check_index(index)
        return self._utilization.get(index, 0)

    def read(self, token: str) -> dict[str, Any]:
        self._check_available()
        found = _find(self._devices, token)
        if found is None:
            return {}
        gpu, mig = found
        return {
            "uuid": gpu.uuid if mig is None else mig.uuid,
            "name": gpu.name,
            "index": gpu.index,
            "memory_used": self._memory_used.get(gpu.index if mig is None else mig.uuid, 0),
            "memory_total": gpu.memory_total if mig is None else mig.memory_total,
            "utilization": self._utilization.get(gpu.index, 0),
        }

    def set_memory_used(self, device: int | str, value: int) -> None:
        """Make later readings of `device` (an index, GPU UUID or MIG UUID) say `value` bytes."""
        self._memory_used[self._known_key(device, mig=True)] = value

    def set_utilization(self, device: int | str, value: int) -> None:
        """Make later readings of GPU `device` (an index or UUID) say `value` percent busy.

        Its MIG instances report it too: NVML keeps no utilization per instance.
        """
        self._utilization[self._known_key(device, mig=False)] = value

    def process_memory(self, pid: int) -> int:
        self._check_available()
        return self._process_memory.get(pid, 0)

    def set_process_memory(self, pid: int, value: int) -> None:
        """Make later :meth:`process_memory` calls for `pid` return `value` bytes."""
        self._check_available()
        self._process_memory[pid] = value

    def _check_available(self) -> None:
        if self._unavailable is not None:
            raise NVMLUnavailable(self._unavailable)

    def _check_index(self, index: int) -> None:
        self._check_available()
        if all(d.index != index for d in self._devices):
            known = [d.index for d in self._devices]
            raise NVMLUnavailable(f"no GPU has index {index}; this FakeNVML has {known}")

    def _known_key(self, device: int | str, *, mig: bool) -> int | str:
        self._check_available()
        if isinstance(device, int):
            self._check_index(device)
        key = self._key(device, mig=mig)
        if key is None:
            known = [d.uuid for d in self._devices]
            raise NVMLUnavailable(f"no device is {device!r}; this FakeNVML has {known}")
        return key

    def _key(self, device: int | str, *, mig: bool) -> int | str | None:
        """Where the readings of `device` are kept: its GPU index, or its MIG UUID."""
        if isinstance(device, bool) or not isinstance(device, (int, str)):
            return None
        found = _find(self._devices, str(device))
        if found is None:
            return None
        gpu, instance = found
        if instance is None:
            return gpu.index
        if not mig:
            raise ValueError(
                f"NVML has no utilization per MIG instance, got {device!r}; set its GPU's: "
                f"set_utilization({gpu.index}, 50)"
            )
        return instance.uuid


def _check_distinct(devices: Sequence[GPUDevice]) -> None:
    seen: set[object] = set()
    for device in devices:
        for key in (device.index, device.uuid, *(m.uuid for m in device.mig)):
            if key in seen:
                raise ValueError(
                    f"FakeNVML devices must have distinct indices and UUIDs, got {key!r} "
                    f"twice; use e.g. FakeNVML.with_gpus({len(devices)})"
                )
            seen.add(key)


@dataclass(frozen=True)
class Detection:
    """The GPUs a worker may use, as found by :func:`detect`.

    Parameters
    ----------
    tokens
        One ``CUDA_VISIBLE_DEVICES`` entry per usable device, in slot order.
    reason
        Why no device was found; ``None`` when some were.
    uuid_index
        GPU UUID to NVML index for every GPU NVML reports, for
        :func:`dask_gpuresources._devices.physical_ids`.
    unknown
        Entries of ``CUDA_VISIBLE_DEVICES`` that name no device NVML knows; they were
        dropped from `tokens`.
    """

    tokens: tuple[str, ...]
    reason: str | None = None
    uuid_index: Mapping[str, int] = field(default_factory=dict, hash=False)
    unknown: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        """The number of usable devices."""
        return len(self.tokens)


def detect(backend: NVMLBackend, visible: list[str] | None) -> Detection:
    """Find the GPUs a worker may use.

    Parameters
    ----------
    backend
        Where to ask, e.g. :func:`default_backend` or a :class:`FakeNVML`.
    visible
        The worker's ``CUDA_VISIBLE_DEVICES``, from
        :func:`dask_gpuresources._devices.visible_devices`.

    Returns
    -------
    Detection
        With `visible` ``None``: one token per GPU (its index), or one per MIG instance (its
        UUID) for a GPU in MIG mode. With a list: the entries NVML knows (an existing index, a
        GPU UUID or unique abbreviation of one, a MIG instance's UUID), as given and in the
        given order; the others go to ``unknown``. No tokens and a ``reason`` when `visible`
        is empty, nothing matched, or NVML is unavailable.

    Notes
    -----
    CUDA itself stops reading ``CUDA_VISIBLE_DEVICES`` at the first entry it cannot use; this
    function keeps the entries after it, since a child process given only those sees them.

    Examples
    --------
    >>> detect(FakeNVML.with_gpus(2), None).tokens
    ('0', '1')
    >>> d = detect(FakeNVML.with_gpus(2), ["1", "7"])
    >>> d.tokens, d.unknown
    (('1',), ('7',))
    >>> detect(FakeNVML(unavailable="nvidia-ml-py is not installed"), None)
    Detection(tokens=(), reason='nvidia-ml-py is not installed', uuid_index={}, unknown=())
    """
    if visible is not None and not visible:
        return Detection((), reason="CUDA_VISIBLE_DEVICES is empty")
    try:
        devices = backend.devices()
    except NVMLUnavailable as err:
        return Detection((), reason=err.reason)
    uuid_index = {d.uuid: d.index for d in devices}
    if visible is None:
        tokens = tuple(
            token
            for d in devices
            for token in ([m.uuid for m in d.mig] if d.mig else [str(d.index)])
        )
        reason = None if tokens else "NVML reports no GPU"
        return Detection(tokens, reason=reason, uuid_index=uuid_index)

    known = [e for e in visible if _find(devices, e) is not None]
    unknown = tuple(e for e in visible if e not in known)
    reason = None
    if not known:
        reason = (
            f"CUDA_VISIBLE_DEVICES={','.join(visible)!r} names no device NVML reports "
            f"(NVML reports {len(devices)} GPU{'' if len(devices) == 1 else 's'})"
        )
    return Detection(tuple(known), reason=reason, uuid_index=uuid_index, unknown=unknown)


def _find(devices: Sequence[GPUDevice], token: str) -> tuple[GPUDevice, MIGDevice | None] | None:
    """The GPU, and MIG instance if any, that `token` names among `devices`; ``None`` if none.

    An index names the GPU with that NVML index; a ``GPU-`` UUID the GPU with that UUID, or
    the only one whose UUID starts with it; a ``MIG-`` UUID the instance with exactly that
    UUID.
    """
    if _is_index(token):
        return next(((d, None) for d in devices if d.index == int(token)), None)
    if token.startswith("MIG-"):
        return next(((d, m) for d in devices for m in d.mig if m.uuid == token), None)
    if token.startswith("GPU-"):
        matches = [d for d in devices if d.uuid == token] or [
            d for d in devices if d.uuid.startswith(token)
        ]
        return (matches[0], None) if len(matches) == 1 else None
    return None


def reading(backend: NVMLBackend, token: str) -> dict[str, Any]:
    """NVML's readings for the device a ``CUDA_VISIBLE_DEVICES`` entry names.

    Parameters
    ----------
    backend
        Where to ask, e.g. :func:`default_backend` or a :class:`FakeNVML`.
    token
        One of a worker's device tokens (:attr:`Detection.tokens`): an index in NVML's
        numbering (``"1"``), a GPU's UUID or a unique abbreviation of it (``"GPU-8f3e"``), or
        a MIG instance's UUID (``"MIG-..."``). Never a slot number or a ``get_gpu_ids()`` id:
        those are indices only for a worker whose tokens are all indices.

    Returns
    -------
    dict
        ``{}`` when NVML knows no device by `token` (a logical device declared beyond those
        detected, a UUID from another machine, an ambiguous abbreviation). Otherwise:

        - ``"uuid"`` (str): the device's whole UUID, a MIG instance's own for a ``MIG-`` token;
        - ``"name"`` (str): its product name;
        - ``"index"`` (int): NVML's index of the physical GPU, for a MIG instance its GPU's;
        - ``"memory_used"``, ``"memory_total"`` (int bytes): the device's memory, a MIG
          instance's own;
        - ``"utilization"`` (int percent): how busy the GPU was; for a MIG instance its GPU's,
          as NVML keeps none per instance.

        A reading the device does not offer (NVML says "not supported") is ``None``.

    Raises
    ------
    NVMLUnavailable
        NVML cannot answer at all (no library, no driver, a GPU lost).
    TypeError
        `token` is not a string.

    Examples
    --------
    >>> mig = MIGDevice("MIG-0a1", memory_total=5 * 2**30)
    >>> nvml = FakeNVML(
    ...     [GPUDevice(0, "GPU-0a", mig=(mig,)), GPUDevice(1, "GPU-1b")],
    ...     memory_used={"MIG-0a1": 2**30, 1: 7 * 2**30},
    ...     utilization={0: 30, 1: 60},
    ... )
    >>> reading(nvml, "1")["memory_used"], reading(nvml, "GPU-1b")["memory_used"]
    (7516192768, 7516192768)
    >>> reading(nvml, "MIG-0a1")  # doctest: +NORMALIZE_WHITESPACE
    {'uuid': 'MIG-0a1', 'name': 'fake', 'index': 0, 'memory_used': 1073741824,
     'memory_total': 5368709120, 'utilization': 30}
    >>> reading(nvml, "7")
    {}
    >>> reading(nvml, 1)  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    TypeError: reading takes a CUDA_VISIBLE_DEVICES entry as a string, got 1;
    use reading(backend, '1')
    """
    _check_token(token, "reading")
    return backend.read(token)


def uuid_of(backend: NVMLBackend, token: str) -> str | None:
    """The whole UUID of the device `token` names, ``None`` when NVML cannot tell.

    Two tokens name one device exactly when their UUIDs are equal (``"0"``, ``"GPU-8f3e"``
    and the whole UUID may all be GPU 0). A MIG instance has its own UUID, not its GPU's.

    Parameters
    ----------
    backend
        Where to ask, e.g. :func:`default_backend` or a :class:`FakeNVML`.
    token
        As for :func:`reading`.

    Returns
    -------
    str or None
        The UUID; ``None`` when NVML knows no device by `token` or cannot answer at all.

    Raises
    ------
    TypeError
        `token` is not a string.

    Examples
    --------
    >>> nvml = FakeNVML.with_gpus(2)
    >>> uuid_of(nvml, "1")
    'GPU-00000001-fake-0000-0000-000000000000'
    >>> uuid_of(nvml, "GPU-00000001") == uuid_of(nvml, "1")
    True
    >>> uuid_of(nvml, "2") is None
    True
    >>> uuid_of(FakeNVML(unavailable="no driver"), "0") is None
    True
    """
    _check_token(token, "uuid_of")
    try:
        return backend.read(token).get("uuid")
    except NVMLUnavailable:
        return None


def _check_token(token: object, function: str) -> None:
    if not isinstance(token, str):
        raise TypeError(
            f"{function} takes a CUDA_VISIBLE_DEVICES entry as a string, got {token!r}; "
            f"use {function}(backend, {str(token)!r})"
        )


_default: RealNVML | None = None
_default_lock = threading.Lock()


def default_backend() -> NVMLBackend:
    """The process-wide :class:`RealNVML`, created on first call."""
    global _default
    with _default_lock:
        if _default is None:
            _default = RealNVML()
        return _default
