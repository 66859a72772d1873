from __future__ import annotations

import psutil
import pytest

from dask_gpuresources._nvml import FakeNVML


def pytest_collection_modifyitems(config, items):
    try:
        from dask_gpuresources._nvml import RealNVML

        RealNVML().devices()
        have_gpu = True
    except Exception:
        have_gpu = False
    if have_gpu:
        return
    skip = pytest.mark.skip(reason="needs a real NVIDIA GPU with NVML (none found here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fake_nvml():
    """An NVML backend that reports four 16 GiB GPUs."""
    return FakeNVML.with_gpus(4)


@pytest.fixture
def alive():
    """``alive(pid)``: whether a process runs (a zombie, or one that exits meanwhile, does not)."""

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return alive
