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
    index that names no device.
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


def _text(value: str | bytes) -> str:
    # nvidia-ml-py before 11.515 returned bytes for names and UUIDs.
    return value.decode() if isinstance(value, bytes) else value


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
    memory_used, utilization
        Initial readings per device index; 0 for devices not listed. Change them with
        :meth:`set_memory_used` and :meth:`set_utilization`.
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
        memory_used: Mapping[int, int] | None = None,
        utilization: Mapping[int, int] | None = None,
        process_memory: Mapping[int, int] | None = None,
    ) -> None:
        _check_distinct(devices)
        self._devices = sorted(devices, key=lambda d: d.index)
        self._unavailable = unavailable
        self._memory_used = dict(memory_used or {})
        self._utilization = dict(utilization or {})
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

    def set_memory_used(self, index: int, value: int) -> None:
        """Make later :meth:`memory_used` calls for `index` return `value` bytes."""
        self._check_index(index)
        self._memory_used[index] = value

    def set_utilization(self, index: int, value: int) -> None:
        """Make later :meth:`utilization` calls for `index` return `value` percent."""
        self._check_index(index)
        self._utilization[index] = value

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

    indices = {str(d.index) for d in devices}
    mig_uuids = [m.uuid for d in devices for m in d.mig]
    known = [e for e in visible if _known(e, indices, list(uuid_index), mig_uuids)]
    unknown = tuple(e for e in visible if e not in known)
    reason = None
    if not known:
        reason = (
            f"CUDA_VISIBLE_DEVICES={','.join(visible)!r} names no device NVML reports "
            f"(NVML reports {len(devices)} GPU{'' if len(devices) == 1 else 's'})"
        )
    return Detection(tuple(known), reason=reason, uuid_index=uuid_index, unknown=unknown)


def _known(entry: str, indices: set[str], gpu_uuids: list[str], mig_uuids: list[str]) -> bool:
    if entry.startswith("GPU-"):
        return entry in gpu_uuids or sum(u.startswith(entry) for u in gpu_uuids) == 1
    if entry.startswith("MIG-"):
        return entry in mig_uuids
    return entry in indices


_default: RealNVML | None = None
_default_lock = threading.Lock()


def default_backend() -> NVMLBackend:
    """The process-wide :class:`RealNVML`, created on first call."""
    global _default
    with _default_lock:
        if _default is None:
            _default = RealNVML()
        return _default
