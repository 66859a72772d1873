from __future__ import annotations

import ctypes
import os
import pickle
import sys
import types

import pytest

from dask_gpuresources._devices import physical_ids
from dask_gpuresources._nvml import (
    Detection,
    FakeNVML,
    GPUDevice,
    MIGDevice,
    NVMLUnavailable,
    RealNVML,
    default_backend,
    detect,
)

pynvml = pytest.importorskip("pynvml")

MIG_0 = "MIG-11111111-0a1b-5c2d-9e3f-4a5b6c7d8e9f"
MIG_1 = "MIG-22222222-0a1b-5c2d-9e3f-4a5b6c7d8e9f"


def _nvml_library_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


HAVE_NVML = _nvml_library_loads()


@pytest.fixture
def four_gpus() -> FakeNVML:
    return FakeNVML.with_gpus(4)


@pytest.fixture
def mig_and_plain() -> FakeNVML:
    """GPU 0 split into two MIG instances, GPU 1 a plain GPU."""
    return FakeNVML(
        [
            GPUDevice(
                index=0,
                uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000",
                name="NVIDIA A100-SXM4-40GB",
                memory_total=40 * 2**30,
                mig=(MIGDevice(MIG_0, 20 * 2**30), MIGDevice(MIG_1, 20 * 2**30)),
            ),
            GPUDevice(
                index=1,
                uuid="GPU-bbbbbbbb-0000-0000-0000-000000000000",
                name="NVIDIA A100-SXM4-40GB",
                memory_total=40 * 2**30,
            ),
        ]
    )


@pytest.fixture
def no_library() -> FakeNVML:
    return FakeNVML(unavailable="NVML could not start: NVML Shared Library Not Found")


# --- FakeNVML ------------------------------------------------------------------------------


def test_with_gpus(four_gpus):
    devices = four_gpus.devices()
    assert [d.index for d in devices] == [0, 1, 2, 3]
    assert devices[2].uuid == "GPU-00000002-fake-0000-0000-000000000000"
    assert {d.memory_total for d in devices} == {16 * 2**30}
    assert all(d.mig == () for d in devices)


def test_fake_readings_are_settable(four_gpus):
    assert four_gpus.memory_used(3) == 0
    assert four_gpus.utilization(3) == 0
    four_gpus.set_memory_used(3, 5 * 2**30)
    four_gpus.set_utilization(3, 87)
    assert four_gpus.memory_used(3) == 5 * 2**30
    assert four_gpus.utilization(3) == 87
    assert four_gpus.memory_used(2) == 0


def test_fake_initial_readings():
    nvml = FakeNVML(
        [GPUDevice(0, "GPU-a"), GPUDevice(1, "GPU-b")], memory_used={1: 10}, utilization={0: 50}
    )
    assert (nvml.memory_used(0), nvml.memory_used(1)) == (0, 10)
    assert (nvml.utilization(0), nvml.utilization(1)) == (50, 0)


def test_fake_unknown_index(four_gpus):
    with pytest.raises(NVMLUnavailable, match=r"no GPU has index 7; this FakeNVML has \[0, 1"):
        four_gpus.memory_used(7)


def test_fake_unavailable_raises_everywhere(no_library):
    for call in (no_library.devices, lambda: no_library.memory_used(0)):
        with pytest.raises(NVMLUnavailable) as info:
            call()
        assert info.value.reason == "NVML could not start: NVML Shared Library Not Found"


def test_fake_rejects_duplicate_devices():
    with pytest.raises(ValueError, match="got 'GPU-a' twice"):
        FakeNVML([GPUDevice(0, "GPU-a"), GPUDevice(1, "GPU-a")])
    with pytest.raises(ValueError, match="got 0 twice"):
        FakeNVML([GPUDevice(0, "GPU-a"), GPUDevice(0, "GPU-b")])


def test_unavailable_pickles():
    err = pickle.loads(pickle.dumps(NVMLUnavailable("no driver")))
    assert isinstance(err, NVMLUnavailable)
    assert err.reason == str(err) == "no driver"


# --- detect with everything visible --------------------------------------------------------


def test_detect_four_gpus(four_gpus):
    found = detect(four_gpus, None)
    assert found.tokens == ("0", "1", "2", "3")
    assert found.count == 4
    assert found.reason is None
    assert found.unknown == ()
    assert found.uuid_index["GPU-00000003-fake-0000-0000-000000000000"] == 3


def test_detect_expands_mig_instances(mig_and_plain):
    found = detect(mig_and_plain, None)
    assert found.tokens == (MIG_0, MIG_1, "1")
    assert found.count == 3
    assert dict(found.uuid_index) == {
        "GPU-aaaaaaaa-0000-0000-0000-000000000000": 0,
        "GPU-bbbbbbbb-0000-0000-0000-000000000000": 1,
    }
    # MIG instances have no physical index: get_gpu_ids() gives their slot.
    assert physical_ids(found.tokens, found.uuid_index) == [0, 1, 1]


def test_detect_no_gpu():
    found = detect(FakeNVML(), None)
    assert found.count == 0
    assert found.reason == "NVML reports no GPU"


def test_detect_without_library_gives_zero_with_reason(no_library):
    found = detect(no_library, None)
    assert found == Detection((), reason="NVML could not start: NVML Shared Library Not Found")
    assert found.count == 0
    # A visible list changes nothing when NVML cannot answer.
    assert detect(no_library, ["0", "1"]).reason == found.reason


# --- detect with CUDA_VISIBLE_DEVICES set ----------------------------------------------------


def test_detect_empty_visible_list(four_gpus):
    found = detect(four_gpus, [])
    assert found.tokens == ()
    assert found.reason == "CUDA_VISIBLE_DEVICES is empty"


def test_detect_subset_by_index_keeps_order(four_gpus):
    found = detect(four_gpus, ["3", "1"])
    assert found.tokens == ("3", "1")
    assert found.reason is None
    assert physical_ids(found.tokens, found.uuid_index) == [3, 1]


def test_detect_subset_by_uuid(four_gpus):
    uuid_2 = "GPU-00000002-fake-0000-0000-000000000000"
    found = detect(four_gpus, [uuid_2, "GPU-00000000"])
    assert found.tokens == (uuid_2, "GPU-00000000")
    assert found.unknown == ()
    assert physical_ids(found.tokens, found.uuid_index) == [2, 0]


def test_detect_ambiguous_uuid_abbreviation_is_unknown(four_gpus):
    found = detect(four_gpus, ["GPU-0000000", "1"])
    assert found.tokens == ("1",)
    assert found.unknown == ("GPU-0000000",)


def test_detect_mig_by_uuid(mig_and_plain):
    found = detect(mig_and_plain, [MIG_1, "1"])
    assert found.tokens == (MIG_1, "1")
    assert found.unknown == ()


def test_detect_drops_unknown_entries(four_gpus):
    found = detect(four_gpus, ["7", "2", "GPU-ffffffff", "MIG-ffffffff"])
    assert found.tokens == ("2",)
    assert found.unknown == ("7", "GPU-ffffffff", "MIG-ffffffff")
    assert found.reason is None


def test_detect_nothing_known(four_gpus):
    found = detect(four_gpus, ["7", "9"])
    assert found.count == 0
    assert found.unknown == ("7", "9")
    assert (
        found.reason
        == "CUDA_VISIBLE_DEVICES='7,9' names no device NVML reports (NVML reports 4 GPUs)"
    )


# --- RealNVML ------------------------------------------------------------------------------


@pytest.mark.skipif(HAVE_NVML, reason="this machine has an NVML library")
def test_real_nvml_without_library():
    backend = RealNVML()
    with pytest.raises(NVMLUnavailable) as info:
        backend.devices()
    assert info.value.reason == "NVML could not start: NVML Shared Library Not Found"
    with pytest.raises(NVMLUnavailable):
        backend.memory_used(0)
    found = detect(backend, None)
    assert found.count == 0
    assert found.reason == "NVML could not start: NVML Shared Library Not Found"


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_NVML, reason="needs an NVIDIA driver (libnvidia-ml.so.1)")
def test_real_nvml_with_gpu():
    found = detect(default_backend(), None)
    assert found.count > 0, found.reason
    device = default_backend().devices()[0]
    assert device.uuid.startswith("GPU-")
    assert device.memory_total > 0
    assert 0 <= default_backend().utilization(device.index) <= 100


def test_default_backend_is_one_real_instance():
    assert isinstance(default_backend(), RealNVML)
    assert default_backend() is default_backend()


def test_real_nvml_without_nvidia_ml_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(NVMLUnavailable) as info:
        RealNVML().devices()
    assert info.value.reason == "nvidia-ml-py is not installed"


# A stand-in for the pynvml module: the real error classes, scripted devices.


def _error(code: int) -> Exception:
    return pynvml.NVMLError(code)


def _fake_pynvml(*, init_error: int | None = None, mig: bool = True) -> types.ModuleType:
    """Two GPUs: 0 with MIG slots [instance, empty, instance], 1 without MIG support.

    Names and UUIDs come back as bytes, as in nvidia-ml-py before 11.515.
    """
    module = types.ModuleType("pynvml")
    for name in dir(pynvml):
        if name.startswith("NVMLError") or name.startswith("NVML_"):
            setattr(module, name, getattr(pynvml, name))
    module.init_calls = 0

    def nvmlInit():
        module.init_calls += 1
        if init_error is not None:
            raise _error(init_error)

    gpus = {0: ("gpu", 0), 1: ("gpu", 1)}
    migs = {0: [("mig", 0), None, ("mig", 2)]}
    module.nvmlInit = nvmlInit
    module.nvmlDeviceGetCount = lambda: 2

    def nvmlDeviceGetHandleByIndex(i):
        if i not in gpus:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpus[i]

    module.nvmlDeviceGetHandleByIndex = nvmlDeviceGetHandleByIndex
    module.nvmlDeviceGetUUID = lambda h: f"{h[0].upper()}-{h[1]:04d}".encode()
    module.nvmlDeviceGetName = lambda h: b"NVIDIA A100-SXM4-40GB"
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=(10 if h[0] == "mig" else 40) * 2**30, used=3 * 2**30
    )
    module.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=42)

    def nvmlDeviceGetMigMode(h):
        if h[1] == 1:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if mig else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMigDeviceHandleByIndex(h, slot):
        handle = migs[h[1]][slot]
        if handle is None:
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        return handle

    module.nvmlDeviceGetMigMode = nvmlDeviceGetMigMode
    module.nvmlDeviceGetMaxMigDeviceCount = lambda h: len(migs[h[1]])
    module.nvmlDeviceGetMigDeviceHandleByIndex = nvmlDeviceGetMigDeviceHandleByIndex
    return module


def test_real_nvml_enumerates_gpus_and_mig(monkeypatch):
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    devices = RealNVML().devices()
    assert devices == [
        GPUDevice(
            index=0,
            uuid="GPU-0000",
            name="NVIDIA A100-SXM4-40GB",
            memory_total=40 * 2**30,
            mig=(MIGDevice("MIG-0000", 10 * 2**30), MIGDevice("MIG-0002", 10 * 2**30)),
        ),
        GPUDevice(index=1, uuid="GPU-0001", name="NVIDIA A100-SXM4-40GB", memory_total=40 * 2**30),
    ]


def test_real_nvml_with_mig_mode_off(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(mig=False))
    backend = RealNVML()
    assert [d.mig for d in backend.devices()] == [(), ()]
    assert detect(backend, None).tokens == ("0", "1")


def test_real_nvml_readings(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    backend = RealNVML()
    assert backend.memory_used(1) == 3 * 2**30
    assert backend.utilization(1) == 42
    with pytest.raises(NVMLUnavailable) as info:
        backend.memory_used(5)
    assert info.value.reason == "NVML could not read memory of GPU 5: Invalid Argument"


def test_real_nvml_initialises_once_per_process(monkeypatch):
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    backend = RealNVML()
    backend.devices()
    backend.devices()
    backend.utilization(0)
    assert fake.init_calls == 1
    # A forked child has another pid and must initialise NVML again.
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: -1)
        backend.devices()
    assert fake.init_calls == 2


def test_real_nvml_caches_a_failed_start(monkeypatch):
    fake = _fake_pynvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    backend = RealNVML()
    for _ in range(3):
        with pytest.raises(NVMLUnavailable) as info:
            backend.devices()
        assert info.value.reason == "NVML could not start: Driver Not Loaded"
    assert fake.init_calls == 1
    assert detect(backend, ["0"]) == Detection((), reason=info.value.reason)
