"""The preload path with real `dask scheduler` and `dask worker` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from distributed import Client

import dask_gpuresources as gr

pytestmark = pytest.mark.slow


def spawn(args, tmp_path, name, env=None):
    log = open(tmp_path / f"{name}.log", "w")
    full_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    full_env.update(env or {})
    return subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=full_env,
    )


def dask_cmd(*args):
    return [sys.executable, "-m", "dask", *args]


def test_preloads_equip_scheduler_and_workers(tmp_path):
    # Local, so that it travels by value: the cluster cannot import this test module.
    def where_and_ids(delay):
        import time

        from distributed import get_worker

        import dask_gpuresources as gr

        time.sleep(delay)
        return get_worker().address, gr.get_gpu_ids()

    sched_file = tmp_path / "scheduler.json"
    procs = [
        spawn(
            dask_cmd(
                "scheduler",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(sched_file),
                "--preload",
                "dask_gpuresources",
            ),
            tmp_path,
            "scheduler",
        )
    ]
    try:
        deadline = time.monotonic() + 30
        while not sched_file.exists():
            assert time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.1)
        worker = [
            "worker",
            "--scheduler-file",
            str(sched_file),
            "--no-dashboard",
            "--nthreads",
            "4",
        ]
        # Declared, with the worker preload.
        procs.append(
            spawn(
                dask_cmd(*worker, "--resources", "GPU=2", "--preload", "dask_gpuresources"),
                tmp_path,
                "w-declared",
            )
        )
        # Declared, restricted to devices 2 and 3, without the worker preload: the scheduler
        # preload equips it anyway.
        procs.append(
            spawn(
                dask_cmd(*worker, "--resources", "GPU=2"),
                tmp_path,
                "w-masked",
                env={"CUDA_VISIBLE_DEVICES": "2,3"},
            )
        )
        # Undeclared, with the worker preload: NVML is absent here, so GPU=0 and a log line.
        procs.append(
            spawn(dask_cmd(*worker, "--preload", "dask_gpuresources"), tmp_path, "w-detect")
        )
        with Client(scheduler_file=str(sched_file), timeout=30) as client:
            client.wait_for_workers(3, timeout=60)
            resources = {
                w["id"]: w["resources"] for w in client.scheduler_info()["workers"].values()
            }
            # the worker that finds no GPU has no GPU resource at all, as Dask made it
            assert sorted(r.get("GPU", -1) for r in resources.values()) == [-1, 2, 2]
            results = client.gather(
                client.map(where_and_ids, [0.3] * 16, resources={"GPU": 1}, pure=False)
            )
            by_worker = {}
            for addr, ids in results:
                assert len(ids) == 1
                by_worker.setdefault(addr, set()).update(ids)
            assert sorted(map(sorted, by_worker.values())) == [[0, 1], [2, 3]]
            with pytest.raises(gr.InfeasibleRequestError, match="GPU=3"):
                client.submit(where_and_ids, 0, resources={"GPU": 3}, pure=False).result()
            table = gr.allocations(client)
            assert sorted(map(sorted, table.values())) == [[0, 1], [2, 3]]
        detect_log = (tmp_path / "w-detect.log").read_text()
        assert "No GPUs detected, so this worker offers no GPU" in detect_log
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
