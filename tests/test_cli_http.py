"""The CLI with real ``dask scheduler`` / ``dask worker`` processes; the JSON route and
``/metrics`` over HTTP on a live cluster."""

from __future__ import annotations

import json
import time
import urllib.request

import dask
import pytest
from _cli import cli
from click.testing import CliRunner
from distributed import Scheduler, SpecCluster, Worker

import dask_gpuresources as gr
from dask_gpuresources.cli import main


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DASK_GPURESOURCES_STATE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["start", "--head", "--num-gpus=1.5"], "must be a whole number of GPUs >= 0, got '1.5'"),
        (["start", "--head", "--num-gpus=-2"], "got '-2'; use --num-gpus=4"),
        (["start"], "give either --head"),
        (["status", "--address", "tcp://127.0.0.1:1"], "cannot reach a scheduler at"),
        (["status"], "no cluster started here"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(state_dir, args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_start_status_stop_with_real_processes(state_dir, alive):
    started = cli(
        "start", "--head", "--num-gpus=2", "--port=0", "--dashboard-address=:0", state_dir=state_dir
    )
    assert started.returncode == 0, started.stderr
    lines = started.stdout.splitlines()
    address = lines[0].split("Scheduler: ")[1]
    assert lines[1].startswith("Dashboard: http://")
    assert f"gr.init(address={address!r})" in started.stdout
    records = json.loads((state_dir / "processes.json").read_text())
    pids = [r["pid"] for r in records]
    assert sorted(r["kind"] for r in records) == ["scheduler", "worker"]

    again = cli("start", "--head", "--num-gpus=2", "--port=0", state_dir=state_dir)
    assert again.returncode == 2 and "already running" in again.stderr

    class Holder:  # defined here: the scheduler process cannot import this test module
        def ids(self):
            return gr.get_gpu_ids()

    gr.init(address=address)
    try:
        actor = gr.remote(num_gpus=1, isolation="thread")(Holder).remote()
        assert gr.get(actor.ids.remote()) == [0]
        status = cli("status", "--json", state_dir=state_dir)
        table = json.loads(status.stdout)
        (worker,) = table["workers"].values()
        assert worker["devices"]["0"]["holders"][0]["kind"] == "actor"
        assert worker["devices"]["1"]["holders"] == []
        assert table["totals"] == {"workers": 1, "gpus": 2, "gpus_held": 1.0}
        text = cli("status", state_dir=state_dir).stdout
        assert "1/2 GPUs held" in text and "(actor, 1)" in text and "device 1: free" in text
    finally:
        gr.shutdown()

    joined = cli("start", f"--address={address}", "--num-gpus=1", state_dir=state_dir)
    assert joined.returncode == 0, joined.stderr
    assert "GPUs in the cluster: 3" in joined.stdout
    table = json.loads(cli("status", "--json", state_dir=state_dir).stdout)
    assert table["totals"]["workers"] == 2 and table["totals"]["gpus"] == 3
    pids = [r["pid"] for r in json.loads((state_dir / "processes.json").read_text())]

    stopped = cli("stop", state_dir=state_dir)
    assert stopped.returncode == 0
    assert stopped.stdout.count("Stopped") == 3
    deadline = time.monotonic() + 20
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, "a started process outlived stop"
        time.sleep(0.1)
    assert "Nothing to stop" in cli("stop", state_dir=state_dir).stdout


class Holder:
    def ids(self):
        return gr.get_gpu_ids()


def test_json_route_and_metrics_over_http():
    pytest.importorskip("prometheus_client")
    with (
        dask.config.set({"gpuresources.scheduler.http.api": True}),
        SpecCluster(
            workers={"w": {"cls": Worker, "options": {"nthreads": 2, "resources": {"GPU": 2}}}},
            scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0", "port": 0}},
        ) as cluster,
    ):
        info = gr.init(address=cluster.scheduler_address)
        try:
            base = info.dashboard_url.rsplit("/status", 1)[0]
            actor = gr.remote(num_gpus=1, isolation="thread")(Holder).remote()
            gr.get(actor.ids.remote())
            doc = json.loads(
                urllib.request.urlopen(base + "/api/v1/gpu_allocations?refresh=1").read()
            )
            (worker,) = doc["workers"].values()
            (holder,) = worker["devices"]["0"]["holders"]
            assert holder["kind"] == "actor" and holder["amount"] == 1.0
            assert holder["key"].startswith("Holder-")

            deadline = time.monotonic() + 10
            while True:  # gauges come from heartbeats
                text = urllib.request.urlopen(base + "/metrics").read().decode()
                if 'dask_gpuresources_device_held{device="0"' in text and any(
                    line.startswith('dask_gpuresources_device_held{device="0"')
                    and line.endswith(" 1.0")
                    for line in text.splitlines()
                ):
                    break
                assert time.monotonic() < deadline, text[-2000:]
                time.sleep(0.2)
            assert "dask_gpuresources_worker_gpus{" in text
        finally:
            gr.shutdown()
