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
    reading,
    uuid_of,
)

pynvml = pytest.importorskip("pynvml")

MIG_0 = "MIG-11111111-0a1b-5c2d-9e3f-4a5b6c7d8e9f"
MIG_1 = "MIG-22222222-0a1b-5c2d-9e3f-4a5b6c7d8e9f"
GPU_0 = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
GPU_1 = "GPU-bbbbbbbb-0000-0000-0000-000000000000"
GiB = 2**30


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
                uuid=GPU_0,
                name="NVIDIA A100-SXM4-40GB",
                memory_total=40 * 2**30,
                mig=(MIGDevice(MIG_0, 20 * 2**30), MIGDevice(MIG_1, 20 * 2**30)),
            ),
            GPUDevice(
                index=1,
                uuid=GPU_1,
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
    # MIG instances have no physical index: their ids come after every GPU's, so no id is
    # handed out twice (this gave [0, 1, 1], issue item 9).
    assert physical_ids(found.tokens, found.uuid_index) == [2, 3, 1]


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


# --- readings by device token ---------------------------------------------------------------


@pytest.fixture
def busy_mig_and_plain() -> FakeNVML:
    """As ``mig_and_plain``, with a different reading on every device and instance.

    No reading equals another, so a reading taken from the wrong device (by slot number, or by
    the integer id ``get_gpu_ids()`` reports) fails the tests below.
    """
    return FakeNVML(
        [
            GPUDevice(
                index=0,
                uuid=GPU_0,
                name="NVIDIA A100-SXM4-40GB",
                memory_total=40 * GiB,
                mig=(MIGDevice(MIG_0, 10 * GiB), MIGDevice(MIG_1, 30 * GiB)),
            ),
            GPUDevice(index=1, uuid=GPU_1, name="NVIDIA H100", memory_total=80 * GiB),
        ],
        memory_used={0: 9 * GiB, 1: 7 * GiB, MIG_0: 3 * GiB, MIG_1: 5 * GiB},
        utilization={0: 11, GPU_1: 22},
    )


def test_reading_by_index(busy_mig_and_plain):
    assert reading(busy_mig_and_plain, "1") == {
        "uuid": GPU_1,
        "name": "NVIDIA H100",
        "index": 1,
        "memory_used": 7 * GiB,
        "memory_total": 80 * GiB,
        "utilization": 22,
    }
    assert reading(busy_mig_and_plain, "0")["memory_used"] == 9 * GiB


@pytest.mark.parametrize("token", [GPU_1, "GPU-bbbb"])
def test_reading_by_gpu_uuid(busy_mig_and_plain, token):
    assert reading(busy_mig_and_plain, token) == reading(busy_mig_and_plain, "1")


def test_reading_a_mig_instance_reads_its_own_memory_and_its_gpus_utilization(
    busy_mig_and_plain,
):
    assert reading(busy_mig_and_plain, MIG_1) == {
        "uuid": MIG_1,
        "name": "NVIDIA A100-SXM4-40GB",
        "index": 0,
        "memory_used": 5 * GiB,
        "memory_total": 30 * GiB,
        "utilization": 11,
    }
    assert reading(busy_mig_and_plain, MIG_0)["memory_used"] == 3 * GiB


def test_readings_follow_the_tokens_not_the_slots(busy_mig_and_plain):
    # A worker with CUDA_VISIBLE_DEVICES="1,MIG_1,GPU-aaaa": slot 0 is GPU 1, slot 1 a MIG
    # instance of GPU 0, slot 2 GPU 0 itself. Reading by slot or by id reads other devices.
    tokens = detect(busy_mig_and_plain, ["1", MIG_1, "GPU-aaaa"]).tokens
    assert tokens == ("1", MIG_1, "GPU-aaaa")
    got = [(reading(busy_mig_and_plain, t)["memory_used"]) for t in tokens]
    assert got == [7 * GiB, 5 * GiB, 9 * GiB]
    assert [uuid_of(busy_mig_and_plain, t) for t in tokens] == [GPU_1, MIG_1, GPU_0]


def test_readings_of_every_detected_device(busy_mig_and_plain):
    tokens = detect(busy_mig_and_plain, None).tokens
    assert tokens == (MIG_0, MIG_1, "1")
    assert [reading(busy_mig_and_plain, t)["memory_used"] for t in tokens] == [
        3 * GiB,
        5 * GiB,
        7 * GiB,
    ]
    assert [uuid_of(busy_mig_and_plain, t) for t in tokens] == [MIG_0, MIG_1, GPU_1]


@pytest.mark.parametrize(
    "token",
    ["2", "17", "GPU-cccc", "GPU-", "MIG-33333333", "MIG-GPU-aaaaaaaa/1/0", "x", ""],
)
def test_reading_a_device_nvml_does_not_know(busy_mig_and_plain, token):
    # A logical device (declared, not detected) or a UUID from another machine.
    assert reading(busy_mig_and_plain, token) == {}
    assert uuid_of(busy_mig_and_plain, token) is None


def test_reading_an_ambiguous_abbreviation_reads_nothing(four_gpus):
    assert reading(four_gpus, "GPU-0000000") == {}
    assert uuid_of(four_gpus, "GPU-0000000") is None
    assert uuid_of(four_gpus, "GPU-00000002") == "GPU-00000002-fake-0000-0000-000000000000"


def test_reading_without_nvml(no_library):
    with pytest.raises(NVMLUnavailable) as info:
        reading(no_library, "0")
    assert info.value.reason == "NVML could not start: NVML Shared Library Not Found"
    assert uuid_of(no_library, "0") is None


def test_reading_takes_a_token_not_an_int(four_gpus):
    with pytest.raises(TypeError) as info:
        reading(four_gpus, 1)
    assert str(info.value) == (
        "reading takes a CUDA_VISIBLE_DEVICES entry as a string, got 1; use reading(backend, '1')"
    )
    with pytest.raises(TypeError, match=r"uuid_of takes .*, got 1; use uuid_of\(backend, '1'\)"):
        uuid_of(four_gpus, 1)


def test_fake_readings_settable_by_uuid(busy_mig_and_plain):
    busy_mig_and_plain.set_memory_used(MIG_0, 1234)
    busy_mig_and_plain.set_memory_used(GPU_0, 99)
    busy_mig_and_plain.set_utilization(GPU_0, 55)
    assert reading(busy_mig_and_plain, MIG_0)["memory_used"] == 1234
    assert reading(busy_mig_and_plain, MIG_0)["utilization"] == 55
    # a GPU's UUID and its index name one device
    assert busy_mig_and_plain.memory_used(0) == 99
    assert busy_mig_and_plain.utilization(0) == 55
    assert reading(busy_mig_and_plain, MIG_1)["memory_used"] == 5 * GiB


def test_fake_utilization_of_a_mig_instance_is_refused(busy_mig_and_plain):
    with pytest.raises(ValueError) as info:
        busy_mig_and_plain.set_utilization(MIG_1, 50)
    assert str(info.value) == (
        f"NVML has no utilization per MIG instance, got {MIG_1!r}; set its GPU's: "
        "set_utilization(0, 50)"
    )
    with pytest.raises(ValueError, match="NVML has no utilization per MIG instance"):
        FakeNVML(busy_mig_and_plain.devices(), utilization={MIG_0: 1})


def test_fake_readings_for_unknown_devices_are_refused(busy_mig_and_plain):
    with pytest.raises(NVMLUnavailable, match=r"no device is 'GPU-cccc'; this FakeNVML has"):
        busy_mig_and_plain.set_memory_used("GPU-cccc", 1)
    with pytest.raises(NVMLUnavailable, match=r"no GPU has index 5; this FakeNVML has \[0, 1\]"):
        busy_mig_and_plain.set_memory_used(5, 1)
    with pytest.raises(ValueError) as info:
        FakeNVML([GPUDevice(0, "GPU-a")], memory_used={3: 1})
    assert str(info.value) == (
        "FakeNVML readings must name a device it has (an index, a GPU UUID or a MIG UUID), "
        "got 3; use e.g. memory_used={0: 2**30}"
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
    # readings by token find the same device by index and by (abbreviated) UUID
    by_index = reading(default_backend(), str(device.index))
    assert by_index["uuid"] == device.uuid
    assert by_index["memory_total"] == device.memory_total
    assert reading(default_backend(), device.uuid[:12])["uuid"] == device.uuid
    assert uuid_of(default_backend(), device.uuid) == device.uuid
    for mig in device.mig:
        assert reading(default_backend(), mig.uuid)["memory_total"] == mig.memory_total


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


def _fake_pynvml(
    *, init_error: int | None = None, mig: bool = True, gpu_utilization: bool = True
) -> types.ModuleType:
    """Two GPUs: 0 with MIG slots [instance, empty, instance], 1 without MIG support.

    Every device has its own memory reading; MIG instances have no utilization (as in NVML),
    and with ``gpu_utilization=False`` neither do the GPUs. Names and UUIDs come back as
    bytes, and UUIDs are taken as bytes only, as in nvidia-ml-py before 11.515.
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
    uuids = {
        ("gpu", 0): "GPU-0000",
        ("gpu", 1): "GPU-1111",
        ("mig", 0): "MIG-0000",
        ("mig", 2): "MIG-2222",
    }
    used = {("gpu", 0): 1, ("gpu", 1): 3, ("mig", 0): 5, ("mig", 2): 6}
    module.nvmlInit = nvmlInit
    module.nvmlDeviceGetCount = lambda: 2

    def nvmlDeviceGetHandleByIndex(i):
        if i not in gpus:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpus[i]

    def nvmlDeviceGetHandleByUUID(uuid):
        if not isinstance(uuid, bytes):
            raise TypeError("bytes or integer address expected instead of str instance")
        for handle, known in uuids.items():
            if known.encode() == uuid:
                return handle
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUtilizationRates(h):
        if h[0] == "mig" or not gpu_utilization:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return types.SimpleNamespace(gpu=17 if h == ("gpu", 0) else 42)

    def nvmlDeviceGetIndex(h):
        if h[0] == "mig":
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return h[1]

    def nvmlDeviceGetName(h):
        return b"NVIDIA A100-SXM4-40GB MIG 3g.20gb" if h[0] == "mig" else b"NVIDIA A100-SXM4-40GB"

    module.nvmlDeviceGetHandleByIndex = nvmlDeviceGetHandleByIndex
    module.nvmlDeviceGetHandleByUUID = nvmlDeviceGetHandleByUUID
    module.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = lambda h: gpus[0]
    module.nvmlDeviceGetIndex = nvmlDeviceGetIndex
    module.nvmlDeviceGetUUID = lambda h: uuids[h].encode()
    module.nvmlDeviceGetName = nvmlDeviceGetName
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=(10 if h[0] == "mig" else 40) * GiB, used=used[h] * GiB
    )
    module.nvmlDeviceGetUtilizationRates = nvmlDeviceGetUtilizationRates

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
            mig=(MIGDevice("MIG-0000", 10 * 2**30), MIGDevice("MIG-2222", 10 * 2**30)),
        ),
        GPUDevice(index=1, uuid="GPU-1111", name="NVIDIA A100-SXM4-40GB", memory_total=40 * 2**30),
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


@pytest.mark.parametrize("token", ["1", "GPU-1111", "GPU-1"])
def test_real_nvml_reading_a_gpu(monkeypatch, token):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    assert reading(RealNVML(), token) == {
        "uuid": "GPU-1111",
        "name": "NVIDIA A100-SXM4-40GB",
        "index": 1,
        "memory_used": 3 * GiB,
        "memory_total": 40 * GiB,
        "utilization": 42,
    }


def test_real_nvml_reading_a_mig_instance(monkeypatch):
    # By UUID, as distributed.diagnostics.nvml does: its own memory, its GPU's utilization.
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    backend = RealNVML()
    assert reading(backend, "MIG-2222") == {
        "uuid": "MIG-2222",
        "name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb",
        "index": 0,
        "memory_used": 6 * GiB,
        "memory_total": 10 * GiB,
        "utilization": 17,
    }
    assert reading(backend, "MIG-0000")["memory_used"] == 5 * GiB
    assert reading(backend, "0")["memory_used"] == 1 * GiB
    # The tokens detect() gives: ids [2, 3, 1] are no device indices, the tokens are.
    tokens = detect(backend, None).tokens
    assert [uuid_of(backend, t) for t in tokens] == ["MIG-0000", "MIG-2222", "GPU-1111"]
    assert [reading(backend, t)["memory_used"] for t in tokens] == [5 * GiB, 6 * GiB, 3 * GiB]


def test_real_nvml_reading_that_is_not_supported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(gpu_utilization=False))
    assert reading(RealNVML(), "MIG-0000")["utilization"] is None
    assert reading(RealNVML(), "1")["utilization"] is None


@pytest.mark.parametrize("token", ["2", "GPU-2222", "GPU-", "GPU-1111-and-more", "MIG-1111", "x"])
def test_real_nvml_reading_a_device_it_does_not_know(monkeypatch, token):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    assert reading(RealNVML(), token) == {}
    assert uuid_of(RealNVML(), token) is None


def test_real_nvml_reading_when_nvml_fails(monkeypatch):
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    def lost(handle):
        raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)

    fake.nvmlDeviceGetMemoryInfo = lost
    with pytest.raises(NVMLUnavailable) as info:
        reading(RealNVML(), "GPU-1111")
    assert info.value.reason == "NVML could not read device 'GPU-1111': GPU is lost"
    assert uuid_of(RealNVML(), "GPU-1111") is None
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert uuid_of(RealNVML(), "0") is None


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
