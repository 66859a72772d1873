"""``dask gpuresources ...`` / ``dask-gpuresources ...``: Ray's ``ray start`` on Dask.

Thin ``click`` commands; the work is plain ``dask scheduler`` / ``dask worker`` processes with
the package's preload, started in the background, and the library's own allocation table.

- ``start --head --num-gpus=4``: a scheduler and a worker on this machine.
- ``start --address tcp://HOST:PORT [--num-gpus=N]``: a worker joining a cluster.
- ``stop``: stops what ``start`` started here (by the process ids it recorded), and only that.
- ``status``: workers, devices and who holds them; ``--json`` for scripts.

Bad input is a one-line error and exit code 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

__all__ = ["main"]

STARTUP_TIMEOUT = 60.0


def _state_dir() -> Path:
    # Per user, outside the home directory: what this machine's `start` launched.
    base = os.environ.get("DASK_GPURESOURCES_STATE_DIR") or os.path.join(
        tempfile.gettempdir(), f"dask-gpuresources-{os.getuid()}"
    )
    path = Path(base)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _records() -> list[dict]:
    path = _state_dir() / "processes.json"
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def _save(records: list[dict]) -> None:
    path = _state_dir() / "processes.json"
    if records:
        path.write_text(json.dumps(records, indent=2))
    elif path.exists():
        path.unlink()


def _alive(record: dict) -> bool:
    import psutil

    try:
        process = psutil.Process(record["pid"])
        # the same process, not a later one that reuses its pid
        return abs(process.create_time() - record["created"]) < 1.0 and (
            process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def _gpu_count(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is None or number < 0 or number != int(number):
        raise click.BadParameter(
            f"must be a whole number of GPUs >= 0, got {value!r}; use --num-gpus=4",
            param_hint="--num-gpus",
        )
    return int(number)


def _spawn(args: list[str], env: dict | None, log: Path, kind: str, address: str | None) -> dict:
    import psutil

    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl-C in this terminal later does not reach it
        )
    return {
        "pid": process.pid,
        "created": psutil.Process(process.pid).create_time(),
        "kind": kind,
        "address": address,
        "log": str(log),
    }


def _wait_for_file(path: Path, record: dict, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass  # being written
        if not _alive(record):
            raise click.ClickException(
                f"the scheduler exited during start; see its log: {record['log']}"
            )
        time.sleep(0.1)
    raise click.ClickException(f"the scheduler did not start in {timeout:.0f} s: {record['log']}")


def _connect(address: str, timeout: float = 5) -> Any:
    from distributed import Client

    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except OSError as err:
        raise click.UsageError(f"cannot reach a scheduler at {address}: {err}") from None


def _worker_processes(address: str, gpus: int | None, nworkers: int, log_dir: Path) -> list[dict]:
    from ._devices import device_tokens, visible_devices

    records = []
    if gpus is not None and gpus and gpus % nworkers:
        raise click.BadParameter(
            f"--num-gpus={gpus} does not divide among --nworkers={nworkers} (each worker gets "
            f"its own devices); use --nworkers=1",
            param_hint="--nworkers",
        )
    per = None if gpus is None else gpus // nworkers
    tokens = device_tokens(gpus, visible_devices()) if gpus else []
    for i in range(nworkers):
        args = ["worker", address, "--preload", "dask_gpuresources", "--nworkers", "1"]
        env = None
        if per is not None:
            args += ["--resources", f"GPU={per}", "--nthreads", str(max(per, os.cpu_count() or 1))]
            if nworkers > 1 and per:
                env = {"CUDA_VISIBLE_DEVICES": ",".join(tokens[i * per : (i + 1) * per])}
        log = log_dir / f"worker-{int(time.time())}-{i}.log"
        records.append(_spawn(args, env, log, "worker", address))
    return records


@click.group(name="gpuresources", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """GPU scheduling for Dask, the way `ray start` / `ray status` work."""


@main.command()
@click.option("--head", is_flag=True, help="Start a scheduler (and a worker) on this machine.")
@click.option("--address", help="Join the cluster of this scheduler with a worker.")
@click.option("--num-gpus", "num_gpus", help="GPUs this machine offers (default: detect, NVML).")
@click.option("--port", type=int, default=8786, show_default=True, help="Scheduler port.")
@click.option("--dashboard-address", default=":8787", show_default=True, help="Dashboard address.")
@click.option("--nworkers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--block", is_flag=True, help="Stay in the foreground until Ctrl-C.")
def start(
    head: bool,
    address: str | None,
    num_gpus: str | None,
    port: int,
    dashboard_address: str,
    nworkers: int,
    block: bool,
) -> None:
    """Start a scheduler and worker (--head), or a worker joining --address."""
    gpus = _gpu_count(num_gpus)
    if head == bool(address):
        raise click.UsageError(
            "give either --head (a new cluster) or --address tcp://HOST:PORT (join one); "
            "e.g. dask-gpuresources start --head --num-gpus=4"
        )
    log_dir = _state_dir()
    records = [r for r in _records() if _alive(r)]
    if head:
        running = [r for r in records if r["kind"] == "scheduler"]
        if running:
            raise click.UsageError(
                f"a head started here is already running at {running[0]['address']} "
                f"(pid {running[0]['pid']}); run dask-gpuresources stop first"
            )
        scheduler_file = log_dir / f"scheduler-{int(time.time() * 1000)}.json"
        record = _spawn(
            [
                "scheduler",
                "--port",
                str(port),
                "--dashboard-address",
                dashboard_address,
                "--preload",
                "dask_gpuresources",
                "--scheduler-file",
                str(scheduler_file),
            ],
            None,
            log_dir / f"scheduler-{int(time.time())}.log",
            "scheduler",
            None,
        )
        records.append(record)
        _save(records)
        info = _wait_for_file(scheduler_file, record, STARTUP_TIMEOUT)
        address = info["address"]
        record["address"] = address
        dashboard = info.get("services", {}).get("dashboard")
        existing = 0
    else:
        client = _connect(address)
        existing = len(client.scheduler_info(n_workers=-1)["workers"])
        client.close()
        dashboard = None
    new = _worker_processes(address, gpus, nworkers, log_dir)
    records += new
    _save(records)

    client = _connect(address)
    try:
        client.wait_for_workers(existing + nworkers, timeout=STARTUP_TIMEOUT)
        from . import install

        install(client)
        total = sum(
            w.get("resources", {}).get("GPU", 0)
            for w in client.scheduler_info(n_workers=-1)["workers"].values()
        )
    except TimeoutError:
        raise click.ClickException(
            f"the worker did not join {address} in {STARTUP_TIMEOUT:.0f} s; see {new[0]['log']}"
        ) from None
    finally:
        client.close()

    host = address.split("://")[-1].rsplit(":", 1)[0]
    click.echo(f"Scheduler: {address}")
    if dashboard:
        click.echo(f"Dashboard: http://{host}:{dashboard}/status")
    click.echo(f"Workers started: {nworkers}; GPUs in the cluster: {total:g}")
    click.echo("Connect with:")
    click.echo(f"    import dask_gpuresources as gr; gr.init(address={address!r})")
    click.echo("Stop with: dask-gpuresources stop")
    if block:
        click.echo("Running in the foreground; Ctrl-C stops them.")
        try:
            while any(_alive(r) for r in records):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        _stop(records)


def _stop(records: list[dict]) -> list[dict]:
    import psutil

    stopped = []
    for record in sorted(records, key=lambda r: r["kind"] == "scheduler"):  # workers first
        if not _alive(record):
            continue
        try:
            os.kill(record["pid"], signal.SIGTERM)
            stopped.append(record)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    for record in stopped:
        while _alive(record) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(record):
            try:
                for child in psutil.Process(record["pid"]).children(recursive=True):
                    child.kill()
                os.kill(record["pid"], signal.SIGKILL)
            except (ProcessLookupError, psutil.Error):
                pass
    _save([r for r in _records() if r not in records and _alive(r)])
    return stopped


@main.command()
def stop() -> None:
    """Stop what `start` started on this machine (and only that)."""
    records = _records()
    stopped = _stop(records)
    if not stopped:
        click.echo("Nothing to stop: no process started by dask-gpuresources start is running.")
    for record in stopped:
        where = f" ({record['address']})" if record.get("address") else ""
        click.echo(f"Stopped {record['kind']} pid {record['pid']}{where}")


def _default_address() -> str | None:
    for record in _records():
        if record["kind"] == "scheduler" and _alive(record):
            return record["address"]
    return None


@main.command()
@click.option("--address", help="Scheduler address (default: the head started here).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(address: str | None, as_json: bool) -> None:
    """Workers, devices, and who holds them."""
    address = address or _default_address()
    if address is None:
        raise click.UsageError(
            "no cluster started here; give --address tcp://HOST:PORT, or start one with "
            "dask-gpuresources start --head --num-gpus=4"
        )
    client = _connect(address)
    try:
        from .scheduler import HANDLER

        # Read-only: status never installs or re-registers anything on a running cluster.
        try:
            workers = client.sync(getattr(client.scheduler, f"{HANDLER}_table"), refresh=True)
        except Exception as err:
            if "unknown operation" not in str(err).lower():
                raise
            raise click.ClickException(
                f"the scheduler at {address} runs without dask_gpuresources; start it with "
                "`dask scheduler --preload dask_gpuresources`, or equip it from Python with "
                "dask_gpuresources.install(client)"
            ) from None
        nthreads = {
            a: w.get("nthreads", 0)
            for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
        }
    finally:
        client.close()
    for addr, worker in workers.items():
        worker["threads"] = nthreads.get(addr, 0)
    table = {"scheduler": address, "workers": dict(sorted(workers.items()))}
    total = sum(w["gpus"] for w in table["workers"].values())
    held = sum(
        h["amount"]
        for w in table["workers"].values()
        for d in w["devices"].values()
        for h in d["holders"]
    )
    table["totals"] = {"workers": len(table["workers"]), "gpus": total, "gpus_held": held}
    if as_json:
        click.echo(json.dumps(table, indent=2))
        return
    for line in _status_lines(table):
        click.echo(line)


def _status_lines(table: dict) -> list[str]:
    """The text of ``status`` for a table as ``status --json`` prints it."""
    totals = table["totals"]
    lines = [
        f"Scheduler {table['scheduler']}: {totals['workers']} worker(s), "
        f"{totals['gpus_held']:g}/{totals['gpus']:g} GPUs held"
    ]
    for addr, worker in table["workers"].items():
        lines.append(f"  {addr}  GPU={worker['gpus']:g}  threads={worker.get('threads', 0)}")
        if worker.get("overlap"):
            what = (
                "its GPUs are refused (gpuresources.scheduler.overlap: raise)"
                if worker.get("refused")
                else "tasks on both use one device at once"
            )
            lines.append(
                f"    WARNING: hands out the same physical GPUs as "
                f"{', '.join(worker['overlap'])}: {what}; give each worker its own devices "
                f"with CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES=0,1 dask worker ... "
                f"and CUDA_VISIBLE_DEVICES=2,3 dask worker ...)"
            )
        for device, info in worker["devices"].items():
            who = ", ".join(f"{h['key']} ({h['kind']}, {h['amount']:g})" for h in info["holders"])
            also = (
                f"  [also handed out by {', '.join(info['shared_with'])}]"
                if info.get("shared_with")
                else ""
            )
            lines.append(f"    device {device}: {who or 'free'}{also}")
    return lines
