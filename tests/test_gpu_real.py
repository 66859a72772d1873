"""The plugin on a real GPU, through real ``dask scheduler`` and ``dask worker`` processes.

Written for a machine with one NVIDIA GPU (an H200 in the project's device checks) and
correct on more: every worker here is given the first GPU NVML lists, by index or by UUID.
Every test carries the ``gpu`` marker and is skipped where NVML finds no GPU (conftest.py);
``scripts/gpu-check.sh`` runs them. PyTorch and CuPy are each used where installed; a test
that needs one that is missing is skipped with that reason. TensorFlow is not tested here
(the device image has none; the TensorFlow examples are checked on CPU by
tests/test_examples.py).

What tests/test_gpu_isolation.py already covers (in-process clusters) is not repeated:
an isolated task's device count through one library, and a recycled child's own memory going
back. Here:

- NVML detection by a preloaded ``dask worker`` with no declared count, and the device's
  memory gauge on the scheduler's ``/metrics``;
- what torch and CuPy each see in an isolated ``GPU=1`` task, and its ``CUDA_VISIBLE_DEVICES``;
- four ``GPU=0.25`` isolated tasks holding memory on the one device at the same time;
- 8 GiB left behind by a task going back to the device (``max_calls=1``, and
  ``gpuresources.isolation.recycle-gpu-memory``), read from NVML for the whole device;
- a worker whose ``CUDA_VISIBLE_DEVICES`` is the GPU's UUID.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import dask
import pytest
from distributed import Client

import dask_gpuresources as gr
from dask_gpuresources._nvml import RealNVML

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

GiB = 2**30
LIBRARIES = ("torch", "cupy")


def _first_device():
    try:
        devices = RealNVML().devices()
    except Exception:
        return None, 0
    return (devices[0] if devices else None), len(devices)


DEVICE, N_DEVICES = _first_device()  # None where NVML finds no GPU (every test is skipped)


def needs(library):
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed here")


def any_library():
    for library in LIBRARIES:
        if importlib.util.find_spec(library) is not None:
            return library
    pytest.skip("needs PyTorch or CuPy to allocate GPU memory")


# -- real processes ----------------------------------------------------------------------------


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@contextmanager
def cluster(tmp_path, *, worker_args=(), worker_env=None, nthreads=1):
    """A ``dask scheduler`` and one ``dask worker``, both with ``--preload dask_gpuresources``.

    ``worker_env`` is added to the worker's environment, from which ``CUDA_VISIBLE_DEVICES``
    is removed first. Yields ``(client, dashboard_port)``; the logs are in ``tmp_path``.
    """
    sched_file = tmp_path / "scheduler.json"
    procs = []

    def spawn(name, args, env):
        log = open(tmp_path / f"{name}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "dask", *args, "--preload", "dask_gpuresources"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        log.close()

    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    # The processes import the package from where this test run imports it, and this module
    # (Dask pickles the task functions below by reference; the isolated children inherit it).
    paths = [Path(gr.__file__).resolve().parent.parent, Path(__file__).resolve().parent]
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [env.get("PYTHONPATH")])])
    try:
        spawn(
            "scheduler",
            ["scheduler", "--port", "0", "--dashboard-address", "127.0.0.1:0"]
            + ["--scheduler-file", str(sched_file)],
            env,
        )
        wait_until(sched_file.exists, 60, "the scheduler file")
        spawn(
            "worker",
            ["worker", "--scheduler-file", str(sched_file), "--no-dashboard"]
            + ["--nthreads", str(nthreads), *worker_args],
            {**env, **(worker_env or {})},
        )
        with Client(scheduler_file=str(sched_file), timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
            port = client.scheduler_info()["services"]["dashboard"]
            yield client, port
    except BaseException:
        for log in sorted(tmp_path.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-4000:]}")
        raise
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=30)


def pinned():
    """A worker environment that gives the worker the first GPU alone, by index."""
    return {"CUDA_VISIBLE_DEVICES": str(DEVICE.index)}


def worker_resources(client):
    (info,) = client.scheduler_info()["workers"].values()
    return info["resources"]


# -- task functions (they run in worker processes and isolated children) ----------------------


def sees(library):
    """What a task sees: its process, the library's device count, its lease."""
    if library == "torch":
        import torch

        count = torch.cuda.device_count()
    else:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    return {
        "pid": os.getpid(),
        "count": count,
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "ids": gr.get_gpu_ids(),
    }


def allocate(library, nbytes, *, leak=False):
    """Allocate and touch ``nbytes`` on the task's device; with ``leak``, keep it referenced
    for the life of the process."""
    if library == "torch":
        import torch

        block = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
    else:
        import cupy

        block = cupy.ones(nbytes, dtype=cupy.uint8)
        cupy.cuda.runtime.deviceSynchronize()
    if leak:
        sys.modules[library].__dict__.setdefault("_gpu_check_leak", []).append(block)
    return block


def device_uuid(library):
    """The UUID the library reports for its device 0 (PyTorch), or None."""
    if library != "torch":
        return None
    import torch

    return str(torch.cuda.get_device_properties(0).uuid)


def hold_together(library, nbytes, barrier, name, n):
    """Allocate, then wait (bounded) until ``n`` tasks have allocated; report what was seen."""
    block = allocate(library, nbytes)
    Path(barrier, name).touch()
    deadline = time.monotonic() + 120
    while len(os.listdir(barrier)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    together = len(os.listdir(barrier)) >= n
    token = os.environ["CUDA_VISIBLE_DEVICES"]
    nvml = RealNVML()
    (device,) = [d for d in nvml.devices() if token in (str(d.index), d.uuid)]
    used = nvml.memory_used(device.index)  # all n blocks are on the device now
    del block
    return {
        "together": together,
        "pid": os.getpid(),
        "visible": token,
        "ids": gr.get_gpu_ids(),
        "library_uuid": device_uuid(library),
        "nvml_uuid": device.uuid,
        "used": used,
    }


def leak(library, nbytes, index):
    """Leave ``nbytes`` allocated in this process; its pid and the device's used memory."""
    allocate(library, nbytes, leak=True)
    return os.getpid(), RealNVML().memory_used(index)


# -- tests -------------------------------------------------------------------------------------


def test_undeclared_worker_detects_the_gpu_and_metrics_show_its_memory(tmp_path):
    with cluster(tmp_path) as (client, port):
        # no --resources: the preload's NVML detection sizes the worker
        assert worker_resources(client) == {"GPU": N_DEVICES}
        ids = client.submit(gr.get_gpu_ids, resources={"GPU": 1}, pure=False).result(timeout=60)
        assert ids == [DEVICE.index] if N_DEVICES == 1 else len(ids) == 1

        # the gauges come from the worker's heartbeats: poll the scheduler's /metrics
        line = re.compile(
            r'^dask_gpuresources_device_memory_used_bytes\{device="0",worker="[^"]+"\} (\S+)$',
            re.M,
        )
        url = f"http://127.0.0.1:{port}/metrics"
        found = []

        def gauge_present():
            found[:] = line.findall(urllib.request.urlopen(url, timeout=10).read().decode())
            return bool(found)

        wait_until(gauge_present, 60, f"dask_gpuresources_device_memory_used_bytes at {url}")
        (value,) = found
        assert 0 <= float(value) <= DEVICE.memory_total  # NVML's reading, in bytes


@pytest.mark.parametrize("library", LIBRARIES)
def test_isolated_task_sees_one_device_in_its_library(tmp_path, library):
    needs(library)
    with cluster(tmp_path, worker_env=pinned()) as (client, _):
        with dask.annotate(isolation="process"):
            seen = client.submit(sees, library, resources={"GPU": 1}, pure=False).result(
                timeout=120
            )
    assert seen["count"] == 1
    assert seen["ids"] == [DEVICE.index]
    # the child's CUDA_VISIBLE_DEVICES is the lease's device, as the worker names it
    assert seen["visible"] == str(DEVICE.index)


def test_four_quarter_tasks_share_the_device_at_once(tmp_path):
    library = any_library()
    nvml = RealNVML()
    baseline = nvml.memory_used(DEVICE.index)
    barrier = tempfile.mkdtemp(dir=tmp_path)
    with cluster(tmp_path, worker_env=pinned(), nthreads=4) as (client, _):
        with dask.annotate(isolation="process"):
            futures = [
                client.submit(
                    hold_together, library, GiB, barrier, str(i), 4, resources={"GPU": 0.25}
                )
                for i in range(4)
            ]
            results = [f.result(timeout=180) for f in futures]
    assert all(r["together"] for r in results), results  # all four held the device at once
    assert len({r["pid"] for r in results}) == 4  # in four processes
    assert {r["visible"] for r in results} == {str(DEVICE.index)}
    assert all(r["ids"] == [DEVICE.index] for r in results)
    assert {r["nvml_uuid"] for r in results} == {DEVICE.uuid}
    if library == "torch":
        (library_uuid,) = {r["library_uuid"] for r in results}
        assert library_uuid.lower() in DEVICE.uuid.lower(), (library_uuid, DEVICE.uuid)
    # each read the device's memory after all four had allocated
    assert min(r["used"] for r in results) >= baseline + 4 * GiB


@pytest.mark.parametrize("how", ["max_calls=1", "recycle-gpu-memory"])
def test_leaked_gpu_memory_goes_back_to_the_device(tmp_path, how):
    library = any_library()
    nvml = RealNVML()
    index = DEVICE.index
    worker_env = pinned()
    annotations = {"isolation": "process"}
    if how == "max_calls=1":
        annotations["max_calls"] = 1
    else:
        # the worker recycles a child still holding more than this after its task
        worker_env["DASK_GPURESOURCES__ISOLATION__RECYCLE_GPU_MEMORY"] = "1 GiB"
    with cluster(tmp_path, worker_env=worker_env) as (client, _):
        baseline = nvml.memory_used(index)
        with dask.annotate(**annotations):
            future = client.submit(leak, library, 8 * GiB, index, resources={"GPU": 1}, pure=False)
            pid, used_while_held = future.result(timeout=120)
        assert used_while_held >= baseline + 8 * GiB
        wait_until(
            lambda: nvml.memory_used(index) <= baseline + GiB,
            60,
            f"device {index}'s used memory back within 1 GiB of {baseline} bytes "
            f"(child {pid} left 8 GiB; {how})",
        )
        assert nvml.process_memory(pid) == 0


def test_worker_listing_the_gpu_by_uuid(tmp_path):
    library = any_library()
    env = {"CUDA_VISIBLE_DEVICES": DEVICE.uuid}
    with cluster(tmp_path, worker_env=env, nthreads=2) as (client, _):
        assert worker_resources(client) == {"GPU": 1}
        in_thread = client.submit(gr.get_gpu_ids, resources={"GPU": 1}, pure=False)
        assert in_thread.result(timeout=60) == [DEVICE.index]  # the UUID's physical index
        with dask.annotate(isolation="process"):
            seen = client.submit(sees, library, resources={"GPU": 1}, pure=False).result(
                timeout=120
            )
    assert seen["ids"] == [DEVICE.index]
    assert seen["visible"] == DEVICE.uuid  # the child is given the token the worker has
    assert seen["count"] == 1
