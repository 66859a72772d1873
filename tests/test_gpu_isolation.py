"""Isolation on a real GPU: what CUDA libraries see, and GPU memory really coming back.

Every test here carries the ``gpu`` marker: it runs where NVML finds a GPU (see
``scripts/gpu-check.sh``) and is skipped elsewhere. PyTorch or CuPy, whichever is
installed, allocates the memory.
"""

from __future__ import annotations

import os
import time

import dask
import pytest
from distributed.utils_test import gen_cluster

import dask_gpuresources as gr
from dask_gpuresources._nvml import RealNVML

pytestmark = pytest.mark.gpu

PROCESS = {"isolation": "process"}


def _gpu_count() -> int:
    try:
        return len(RealNVML().devices())
    except Exception:
        return 0


N = max(_gpu_count(), 1)
ALL_GPUS = [("127.0.0.1", N, {"resources": {"GPU": N}})]


def _library():
    try:
        import torch

        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    try:
        import cupy  # noqa: F401

        return "cupy"
    except ImportError:
        pytest.skip("needs PyTorch or CuPy with CUDA to allocate GPU memory")


def what_cuda_sees(library):
    if library == "torch":
        import torch

        return os.getpid(), torch.cuda.device_count(), gr.get_gpu_ids()
    import cupy

    return os.getpid(), cupy.cuda.runtime.getDeviceCount(), gr.get_gpu_ids()


def allocate(library, nbytes):
    """Allocate ``nbytes`` on the task's device and return, keeping the library's cache."""
    if library == "torch":
        import torch

        block = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        block.fill_(1)
        torch.cuda.synchronize()
    else:
        import cupy

        block = cupy.ones(nbytes, dtype=cupy.uint8)
        cupy.cuda.runtime.deviceSynchronize()
    del block  # freed to the library's caching allocator, not to the device
    return os.getpid(), gr.get_gpu_ids()


@gen_cluster(client=True, nthreads=ALL_GPUS, timeout=120)
async def test_isolated_task_sees_one_device(c, s, a):
    library = _library()
    await gr.install(c)
    with dask.annotate(**PROCESS):
        futures = c.map(what_cuda_sees, [library] * N, resources={"GPU": 1}, pure=False)
        results = await c.gather(futures)
    for _, count, ids in results:
        assert count == 1 and len(ids) == 1


@gen_cluster(client=True, nthreads=ALL_GPUS, timeout=180)
async def test_gpu_memory_comes_back_after_recycling(c, s, a):
    library = _library()
    nvml = RealNVML()
    await gr.install(c)
    nbytes = 512 * 2**20
    with dask.annotate(**PROCESS):
        pid, (device,) = await c.submit(allocate, library, nbytes, resources={"GPU": 1})
    # warm child: the library's cache still holds the memory after the task returned
    assert nvml.process_memory(pid) >= nbytes
    used_while_held = nvml.memory_used(device)

    with dask.annotate(isolation="process", max_calls=1):
        pid2, (device2,) = await c.submit(
            allocate, library, nbytes, resources={"GPU": 1}, pure=False
        )
    deadline = time.monotonic() + 30
    while nvml.process_memory(pid2) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert nvml.process_memory(pid2) == 0  # recycled: its memory went back to the device
    if device2 == device:
        assert nvml.memory_used(device) <= used_while_held


@gen_cluster(
    client=True,
    nthreads=ALL_GPUS,
    timeout=180,
    config={"gpuresources.isolation.recycle-gpu-memory": "256 MiB"},
)
async def test_child_holding_memory_is_recycled_with_nvml(c, s, a):
    library = _library()
    await gr.install(c)
    with dask.annotate(**PROCESS):
        pid, _ = await c.submit(allocate, library, 512 * 2**20, resources={"GPU": 1}, pure=False)
        pid2, _ = await c.submit(allocate, library, 1024, resources={"GPU": 1}, pure=False)
    assert pid2 != pid
