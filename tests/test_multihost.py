"""Several hosts on one machine (network namespaces, see ``tests/_netns.py``).

The scheduler runs on host A (198.51.100.1), GPU workers on hosts B and C (.2, .3), each
``--resources GPU=4`` handing out the same device ids 0-3, and the driver on A: a Python
process started in A's namespace that prints its findings as JSON. Needs root and iproute2;
skipped with the reason elsewhere.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _netns import MultiHostBed, remove_stale, unavailable, wait_for  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

A, B, C = "198.51.100.1", "198.51.100.2", "198.51.100.3"
SCHEDULER = f"tcp://{A}:8786"
OVERLAP_WARNING = "use the same physical GPUs twice"


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"no multi-host test bed: {reason}")
    remove_stale()
    bed = MultiHostBed(log_dir=tmp_path_factory.mktemp("multihost")).create()
    try:
        yield bed
    finally:
        bed.close()
        wait_for(lambda: not bed.leftovers(), timeout=10, what="the test bed removed")


@pytest.fixture
def bed(testbed, tmp_path):
    """The test bed with no process running, logs in this test's ``tmp_path``."""
    testbed.log_dir = tmp_path
    yield testbed
    print(testbed.logs())  # pytest shows it when the test failed
    testbed.reset()


def start_cluster(bed, *, scheduler_env=None, tls=None, workers=("b", "c")) -> str:
    """``dask scheduler`` on A and ``dask worker`` on each of ``workers``; the address."""
    protocol = "tls" if tls else "tcp"
    address = f"{protocol}://{A}:8786"
    security = []
    if tls:
        security = ["--tls-ca-file", tls["ca"]]
    bed.dask(
        "a",
        [
            "scheduler",
            "--host",
            A,
            "--port",
            "8786",
            "--dashboard-address",
            ":8787",
            "--protocol",
            protocol,
            "--preload",
            "dask_gpuresources",
            *security,
            *(["--tls-cert", tls["a"][0], "--tls-key", tls["a"][1]] if tls else []),
        ],
        name="scheduler",
        env=scheduler_env,
    )
    for host in workers:
        start_worker(bed, host, address, tls=tls)
    return address


def start_worker(bed, host, address, *, name="worker", tls=None):
    ip = bed.hosts[host].ip
    tls_args = []
    if tls:
        tls_args = ["--tls-ca-file", tls["ca"], "--tls-cert", tls[host][0], "--tls-key", tls[host][1]]
    return bed.dask(
        host,
        [
            "worker",
            address,
            "--host",
            ip,
            "--resources",
            "GPU=4",
            "--nthreads",
            "4",
            "--no-nanny",  # one process per worker: the machine runs the whole bed on 2 cores
            "--preload",
            "dask_gpuresources",
            "--name",
            f"{host}-{name}",
            *tls_args,
        ],
        name=name,
    )


PRELUDE = """
import json, os, sys, time
import dask_gpuresources as ray
from distributed import get_client

ADDRESS = os.environ["MULTIHOST_ADDRESS"]
SECURITY = None
if os.environ.get("MULTIHOST_TLS"):
    from distributed.security import Security
    tls = json.loads(os.environ["MULTIHOST_TLS"])
    SECURITY = Security(
        tls_ca_file=tls["ca"], tls_client_cert=tls["a"][0], tls_client_key=tls["a"][1],
        require_encryption=True,
    )

def connect(n_workers):
    deadline = time.monotonic() + 60
    while True:  # the scheduler may still be starting
        try:
            ray.init(address=ADDRESS, security=SECURITY)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    client = get_client()
    client.wait_for_workers(n_workers, timeout=60)
    return client

def host(address):
    return address.split("://")[1].rsplit(":", 1)[0]

@ray.remote(num_gpus=3)
class Holder:
    def where(self):
        return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

    def ping(self):
        return "pong"

@ray.remote(num_gpus=1)
def where(seconds):
    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()
"""

SPREAD = (
    PRELUDE
    + """
client = connect(2)
workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
holders = [Holder.remote() for _ in range(2)]  # 3 of 4 GPUs each: one per host
actors = ray.get([h.where.remote() for h in holders], timeout=60)
for h in holders:
    ray.kill(h)
tasks = ray.get([where.remote(1.0) for _ in range(8)], timeout=90)
print(json.dumps({"workers": workers, "actors": actors, "tasks": tasks}))
ray.shutdown()
"""
)


def check_spread(result, protocol="tcp"):
    workers = result["workers"]
    assert sorted(w.split("://")[1].rsplit(":", 1)[0] for w in workers) == [B, C]
    assert all(w.startswith(f"{protocol}://") for w in workers)
    actor_nodes = [node for node, _ in result["actors"]]
    # two actors of 3 GPUs cannot share a 4-GPU host: one each, told apart by their node id
    assert sorted(actor_nodes) == workers
    for _, ids in result["actors"]:
        assert len(ids) == 3 and set(ids) <= {0, 1, 2, 3}, result["actors"]
    by_node = {}
    for node, ids in result["tasks"]:
        assert len(ids) == 1 and ids[0] in {0, 1, 2, 3}, result["tasks"]
        by_node.setdefault(node, []).extend(ids)
    # eight 1-second GPU=1 tasks over two 4-GPU hosts: both hosts run some, with ids 0-3
    assert sorted(by_node) == workers, result["tasks"]


def test_tasks_and_actors_spread_over_hosts_and_overlap_is_per_host(bed):
    address = start_cluster(bed)
    result = bed.python("a", SPREAD, timeout=120, env={"MULTIHOST_ADDRESS": address})
    check_spread(result)
    log = bed.log("a-scheduler")
    # B and C both hand out devices 0-3: right, they are different machines
    assert "hands out 4 GPU(s): 0,1,2,3" in bed.log("b-worker")
    assert "hands out 4 GPU(s): 0,1,2,3" in bed.log("c-worker")
    assert OVERLAP_WARNING not in log

    # a second worker on B declaring the same devices 0-3: that host uses them twice
    start_worker(bed, "b", address, name="second")
    text = wait_for(
        lambda: OVERLAP_WARNING in bed.log("a-scheduler") and bed.log("a-scheduler"),
        timeout=60,
        what="the scheduler's overlap warning",
    )
    (line,) = [ln for ln in text.splitlines() if OVERLAP_WARNING in ln]
    assert f"host {B}" in line and C not in line
    # the table names the pair on B and nothing on C; checking again does not warn again
    table = status_json(bed, address)
    on_b = sorted(w for w in table["workers"] if B in w)
    on_c = [w for w in table["workers"] if C in w]
    assert len(on_b) == 2 and len(on_c) == 1
    assert table["workers"][on_b[0]]["overlap"] == [on_b[1]]
    assert table["workers"][on_b[1]]["overlap"] == [on_b[0]]
    assert table["workers"][on_c[0]]["overlap"] == []
    assert bed.log("a-scheduler").count(OVERLAP_WARNING) == 1


def status_json(bed, address, host="a", env=None):
    result = bed.run(
        host,
        [sys.executable, "-m", "dask", "gpuresources", "status", "--address", address, "--json"],
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)
