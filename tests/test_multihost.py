"""Several hosts on one machine (network namespaces, see ``tests/_netns.py``).

The scheduler runs on host A (198.51.100.1), GPU workers on hosts B and C (.2, .3), each
``--resources GPU=4`` handing out the same device ids 0-3, and the driver on A: a Python
process started in A's namespace that prints its findings as JSON. Needs root and iproute2;
skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _certs import certificates  # noqa: E402
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
        cert, key = tls[host]
        tls_args = ["--tls-ca-file", tls["ca"], "--tls-cert", cert, "--tls-key", key]
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
A, B, C = "198.51.100.1", "198.51.100.2", "198.51.100.3"
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


DROP = (
    PRELUDE
    + """
import pathlib

control = pathlib.Path(os.environ["MULTIHOST_CONTROL"])
GO = str(control / "go")

@ray.remote(num_gpus=1)
def hold(path):
    # runs until the test has cut host C off (a file on the one real machine), then returns
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

def table():
    return client.sync(client.scheduler.gpuresources_allocations_table, refresh=False)

def holders_on(host_ip, kind):
    return sorted(
        h["key"]
        for addr, w in table().items() if host(addr) == host_ip
        for d in w["devices"].values() for h in d["holders"] if h["kind"] == kind
    )

client = connect(2)
holders = [Holder.remote() for _ in range(2)]  # 3 of 4 GPUs each: one per host
places = ray.get([h.where.remote() for h in holders], timeout=60)
on = {host(node): h for h, (node, _) in zip(holders, places)}
refs = [hold.remote(GO) for _ in range(2)]  # each host's last free GPU
deadline = time.monotonic() + 60
while not (holders_on(C, "task") and holders_on(B, "task")):
    if time.monotonic() > deadline:
        raise TimeoutError(f"no GPU task running on both hosts: {table()}")
    time.sleep(0.2)
before = {"c_actors": holders_on(C, "actor"), "c_tasks": holders_on(C, "task")}
(control / "ready").write_text(json.dumps(before))
deadline = time.monotonic() + 60
while not os.path.exists(GO):
    if time.monotonic() > deadline:
        raise TimeoutError("the test never cut host C off")
    time.sleep(0.05)
t0 = time.monotonic()
tasks = ray.get(refs, timeout=90)
tasks_done = time.monotonic() - t0
try:
    ray.get(on[C].ping.remote(), timeout=60)
    c_actor = "answered"
except Exception as err:
    c_actor = type(err).__name__ + ": " + str(err)
c_actor_done = time.monotonic() - t0
b_actor = ray.get(on[B].ping.remote(), timeout=30)
deadline = time.monotonic() + 30
while any(host(a) == C for a in table()) and time.monotonic() < deadline:
    time.sleep(0.2)
# the table comes from heartbeats: the tasks that returned leave it with B's next one
deadline = time.monotonic() + 10
while len(holders_on(B, "actor") + holders_on(B, "task")) > 3 and time.monotonic() < deadline:
    time.sleep(0.2)
after = {
    "workers": sorted(table()),
    "c_actors": holders_on(C, "actor"),
    "c_tasks": holders_on(C, "task"),
    "b_holders": holders_on(B, "actor") + holders_on(B, "task"),
}
print(json.dumps({
    "before": before, "after": after, "tasks": tasks, "tasks_done": tasks_done,
    "c_actor": c_actor, "c_actor_done": c_actor_done, "b_actor": b_actor,
    "scheduler_workers": sorted(client.scheduler_info(n_workers=-1)["workers"]),
}))
ray.shutdown()
"""
)


@pytest.mark.parametrize("how", ["link-down", "killed"])
def test_host_c_drops_off(bed, how):
    # a worker whose link is down is only noticed by its missing heartbeats
    address = start_cluster(bed, scheduler_env={"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s"})
    control = bed.log_dir / "control"
    control.mkdir()
    driver = bed.popen(
        "a",
        [sys.executable, "-c", DROP],
        name="driver",
        env={"MULTIHOST_ADDRESS": address, "MULTIHOST_CONTROL": str(control)},
    )
    ready = wait_for(
        lambda: (control / "ready").exists() or driver.poll() is not None,
        timeout=120,
        what="the driver's tasks and actors on both hosts",
    )
    assert ready and driver.poll() is None, bed.log("a-driver")[-4000:]
    before = json.loads((control / "ready").read_text())
    assert len(before["c_actors"]) == 3 and len(before["c_tasks"]) == 1, before
    if how == "link-down":
        bed.link("c", up=False)
    else:
        assert bed.kill_host("c")
        assert not bed.pids("c")
    (control / "go").write_text("")
    driver.wait(180)
    out = bed.log("a-driver")
    assert driver.returncode == 0, out[-6000:]
    result = json.loads(out.strip().splitlines()[-1])
    after = result["after"]
    # C is gone from the cluster and from the allocation table: its leases ended
    assert all(C not in w for w in result["scheduler_workers"]), result
    assert all(C not in w for w in after["workers"]), result
    assert after["c_actors"] == [] and after["c_tasks"] == []
    # the task that ran on C ran again on B, on B's device that its actor leaves free
    nodes = [node for node, _ in result["tasks"]]
    assert all(B in node for node in nodes), result["tasks"]
    assert all(len(ids) == 1 and ids[0] in {0, 1, 2, 3} for _, ids in result["tasks"])
    # the actor on C is dead, and says so; the one on B still answers
    assert result["c_actor"].startswith("ActorDiedError"), result["c_actor"]
    assert result["b_actor"] == "pong"
    assert len(after["b_holders"]) == 3, after  # B's actor, its 3 devices; the tasks returned
    # bounded: the worker TTL (5 s), then the rerun
    assert result["tasks_done"] < 60 and result["c_actor_done"] < 90, result


def http_routes() -> list[str]:
    """The scheduler's HTTP routes: Dask's defaults plus its JSON API (and ours if listed)."""
    import dask
    import distributed  # noqa: F401 (loads distributed's config defaults)

    from dask_gpuresources import _http

    routes = list(dask.config.get("distributed.scheduler.http.routes"))
    routes.append("distributed.http.scheduler.api")
    if hasattr(_http, "routes"):  # the JSON route as a Dask route module
        routes.append("dask_gpuresources._http")
    return routes


PAGE_AND_ROUTE = """
import json, time, urllib.request
from bokeh.client import pull_session

base = "http://198.51.100.1:8787"
route = json.loads(urllib.request.urlopen(base + "/api/v1/gpu_allocations", timeout=30).read())
deadline = time.monotonic() + 60
while True:  # the page's document, as a browser's session gets it: one bar per device
    with pull_session(url=base + "/gpu-allocations") as session:
        bars = session.document.get_model_by_name("gpu-allocations-devices")
        workers = " ".join(bars.data["worker"])
    if ("198.51.100.2" in workers and "198.51.100.3" in workers) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({"route": route, "page_has": [h for h in ("198.51.100.2", "198.51.100.3")
                                               if h in workers]}))
"""


def test_cli_cluster_over_three_hosts(bed):
    def cli(host, *args):
        env = {"DASK_GPURESOURCES_STATE_DIR": str(bed.log_dir / f"state-{host}")}
        if host == "a":
            env["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"] = json.dumps(http_routes())
        return [sys.executable, "-m", "dask", "gpuresources", *args], env

    argv, env = cli("a", "start", "--head", "--num-gpus=0", "--host", A)
    head = bed.run("a", argv, timeout=150, env=env)
    assert head.returncode == 0, head.stdout + head.stderr
    assert f"Scheduler: {SCHEDULER}" in head.stdout, head.stdout
    joins = []
    for host in "bc":
        argv, env = cli(host, "start", "--address", SCHEDULER, "--num-gpus=4")
        joins.append(bed.popen(host, argv, name="start", env=env))
    for host, join in zip("bc", joins, strict=True):
        join.wait(150)
        assert join.returncode == 0, bed.log(f"{host}-start")
    # status asked from B: both GPU hosts, devices 0-3 each, no overlap across hosts
    argv, env = cli("b", "status", "--address", SCHEDULER, "--json")
    table = json.loads(bed.run("b", argv, timeout=60, env=env).stdout)
    gpu_workers = {a: w for a, w in table["workers"].items() if w["gpus"]}
    assert sorted(a.split("://")[1].rsplit(":", 1)[0] for a in gpu_workers) == [B, C], table
    for worker in gpu_workers.values():
        assert sorted(worker["devices"], key=int) == ["0", "1", "2", "3"]
        assert worker["overlap"] == []
    assert table["totals"]["gpus"] == 8
    argv, env = cli("a", "status")
    text = bed.run("a", argv, timeout=60, env=env).stdout
    assert f"tcp://{B}:" in text and f"tcp://{C}:" in text and "WARNING" not in text, text
    # the JSON route and the page on A
    seen = bed.python("a", PAGE_AND_ROUTE, timeout=120)
    route_hosts = sorted({a.split("://")[1].rsplit(":", 1)[0] for a in seen["route"]["workers"]})
    assert B in route_hosts and C in route_hosts, seen["route"]
    assert seen["page_has"] == [B, C]
    # stop on each host ends what start started there, and only that
    for host in "cba":
        argv, env = cli(host, "stop")
        assert bed.run(host, argv, timeout=60, env=env).returncode == 0
        wait_for(lambda h=host: not bed.pids(h), timeout=30, what=f"host {host} stopped")
        assert all(bed.pids(h) for h in "abc".replace(host, "") if h < host)


def test_the_same_cluster_with_tls_between_hosts(bed):
    tls = certificates(bed.log_dir, {"a": A, "b": B, "c": C})
    address = start_cluster(bed, tls=tls)
    assert address.startswith("tls://")
    env = {"MULTIHOST_ADDRESS": address, "MULTIHOST_TLS": json.dumps(tls)}
    result = bed.python("a", SPREAD, timeout=120, env=env)
    check_spread(result, protocol="tls")
    # a client without the certificates is not let in
    refused = bed.python(
        "a",
        "import json\nfrom distributed import Client\ntry:\n"
        f"    Client({address!r}, timeout=5).close(); print(json.dumps('connected'))\n"
        "except Exception as err:\n    print(json.dumps(type(err).__name__))",
        timeout=60,
    )
    assert refused != "connected"
