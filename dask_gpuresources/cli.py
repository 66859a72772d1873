"""``dask gpuresources ...`` / ``dask-gpuresources ...``: Ray's ``ray start`` on Dask.

Thin ``click`` commands; the work is plain ``dask scheduler`` / ``dask worker`` processes with
the package's preload, started in the background, and the library's own allocation table.

- ``start --head --num-gpus=4``: a scheduler and a worker on this machine (the scheduler
  listens on 127.0.0.1 unless ``--host`` says otherwise).
- ``start --address tcp://HOST:PORT [--num-gpus=N]``: a worker joining a cluster.
- ``stop``: stops what ``start`` started here (by the process ids it recorded, each checked
  to be the process it launched), and only that.
- ``status``: workers, devices and who holds them; ``--json`` for scripts.

What ``start`` launched is recorded in a private state directory (see
:mod:`dask_gpuresources._statedir`). Bad input is a one-line error and exit code 2, found
before anything is launched; a ``start`` that fails later stops what it launched.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from ._requests import whole_number
from ._statedir import (
    ProcessIdentityError,
    ProcessRecord,
    StateDir,
    StateDirError,
    is_running,
    signal_process,
)

__all__ = ["main"]

STARTUP_TIMEOUT = 60.0
#: how long ``stop`` waits for a process to exit after SIGTERM before SIGKILL
STOP_TIMEOUT = 15.0
#: log directories of clusters no longer running (failed starts) that are kept
KEEP_LOGS = 5
#: lines of a log shown when a process it belongs to fails during ``start``
LOG_TAIL = 12
SCHEDULER_FILE = "scheduler.json"
TLS_EXAMPLE = "--tls-ca-file ca.pem --tls-cert cert.pem --tls-key key.pem"


def _state() -> StateDir:
    try:
        return StateDir.open()
    except StateDirError as err:
        raise click.ClickException(str(err)) from None


@contextlib.contextmanager
def _locked(state: StateDir) -> Iterator[None]:
    try:
        with state.lock():
            yield
    except StateDirError as err:
        raise click.ClickException(str(err)) from None


def _records(state: StateDir) -> list[ProcessRecord]:
    try:
        return state.records()
    except StateDirError as err:
        raise click.ClickException(str(err)) from None


def _gpu_count(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = whole_number(float(value), whole_floats=True)
    except ValueError:  # not a number at all
        number = None
    if number is None:
        raise click.BadParameter(
            f"must be a whole number of GPUs >= 0, got {value!r}; use --num-gpus=4",
            param_hint="--num-gpus",
        )
    return number


# security ----------------------------------------------------------------------------------

_PEM = click.Path(exists=True, dir_okay=False, resolve_path=True)


def _tls_options(command: Any) -> Any:
    """``--tls-ca-file``, ``--tls-cert`` and ``--tls-key``, as ``dask scheduler`` has them."""
    for name, what in reversed(
        [
            ("--tls-ca-file", "CA certificate(s) file (PEM) for TLS."),
            ("--tls-cert", "Certificate file (PEM) for TLS; the key may be in it too."),
            ("--tls-key", "Private key file (PEM) for TLS, if not in --tls-cert."),
        ]
    ):
        command = click.option(name, type=_PEM, default=None, help=what)(command)
    return command


def _tls_files(ca: str | None, cert: str | None, key: str | None) -> dict[str, str]:
    """The TLS files given, checked to load; ``{}`` for none."""
    if not (ca or cert or key):
        return {}
    if not (ca and cert):
        raise click.UsageError(
            "TLS needs --tls-ca-file and --tls-cert (and --tls-key when the key is a separate "
            f"file), as dask scheduler/worker do; e.g. {TLS_EXAMPLE}"
        )
    files = {"ca": ca, "cert": cert, **({"key": key} if key else {})}
    try:
        _security(files).get_connection_args("client")  # loads them: bad files fail here
    except Exception as err:
        raise click.UsageError(
            f"cannot load the TLS files {sorted(files.values())}: {err}; give a CA file, a "
            f"certificate and its key in PEM format, e.g. {TLS_EXAMPLE}"
        ) from None
    return files


def _security(files: dict[str, str]) -> Any:
    from distributed.security import Security

    if not files:
        return Security()
    return Security(
        tls_ca_file=files["ca"],
        tls_client_cert=files["cert"],
        tls_client_key=files.get("key"),
        require_encryption=True,
    )


def _tls_args(files: dict[str, str]) -> list[str]:
    args = []
    for flag, name in (("--tls-ca-file", "ca"), ("--tls-cert", "cert"), ("--tls-key", "key")):
        if files.get(name):
            args += [flag, files[name]]
    return args


def _check_scheme(address: str, files: dict[str, str], flag: str) -> None:
    if files and not address.startswith("tls://"):
        raise click.BadParameter(
            f"{address!r} is not a tls:// address, but TLS files were given; use "
            f"{flag}=tls://HOST:PORT, or leave out the --tls-* options",
            param_hint=flag,
        )
    if address.startswith("tls://") and not files:
        raise click.UsageError(
            f"{address} is a TLS address: give the TLS files too, e.g. {flag} {address} "
            f"{TLS_EXAMPLE}"
        )


def _connect(address: str, files: dict[str, str] | None = None, timeout: float = 5) -> Any:
    from distributed import Client

    try:
        return Client(
            address, timeout=timeout, set_as_default=False, security=_security(files or {})
        )
    except OSError as err:
        raise click.UsageError(f"cannot reach a scheduler at {address}: {err}") from None


# checks made before anything is launched ---------------------------------------------------


def _split_gpus(gpus: int | None, nworkers: int) -> tuple[int | None, list[str]]:
    """GPUs per worker and the device tokens to split; refuses a count that does not split."""
    from ._devices import device_tokens, visible_devices
    from .exceptions import DeviceCountError

    if gpus and gpus % nworkers:
        raise click.BadParameter(
            f"--num-gpus={gpus} does not divide among --nworkers={nworkers} (each worker gets "
            f"its own devices); use --nworkers=1, or a --num-gpus that --nworkers divides",
            param_hint="--nworkers",
        )
    try:
        tokens = device_tokens(gpus, visible_devices()) if gpus else []
    except DeviceCountError as err:
        raise click.BadParameter(
            f"{err}; give at most as many as CUDA_VISIBLE_DEVICES lists", param_hint="--num-gpus"
        ) from None
    return (None if gpus is None else gpus // nworkers), tokens


def _check_listen(host: str, port: int) -> None:
    """Refuse a host that is not this machine's, or a scheduler port already in use."""
    if not host or "://" in host or any(c.isspace() for c in host):
        raise click.BadParameter(
            f"{host!r} is not a host name or address; use --host=127.0.0.1 (this machine "
            "only), --host=0.0.0.0 (all interfaces) or one of this machine's addresses",
            param_hint="--host",
        )
    if not 0 <= port <= 65535:
        raise click.BadParameter(
            f"{port} is not a port; use --port=8786, or --port=0 for any free port",
            param_hint="--port",
        )
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise click.BadParameter(
            f"cannot resolve {host!r} ({err.strerror}); use --host=127.0.0.1, --host=0.0.0.0 "
            "or one of this machine's addresses",
            param_hint="--host",
        ) from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the scheduler does
        try:
            sock.bind(sockaddr)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise click.BadParameter(_busy_port(host, port), param_hint="--port") from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise click.BadParameter(
                    f"{host!r} is not an address of this machine; use --host=127.0.0.1 (this "
                    "machine only), --host=0.0.0.0 (all interfaces) or one of its addresses",
                    param_hint="--host",
                ) from None
            raise click.BadParameter(
                f"cannot listen on {host}:{port} ({err.strerror})", param_hint="--port"
            ) from None


def _check_protocol(protocol: str | None, files: dict[str, str]) -> None:
    if protocol == "tls" and not files:
        raise click.BadParameter(
            "tls needs certificates: add --tls-ca-file, --tls-cert and --tls-key",
            param_hint="--protocol",
        )
    if protocol == "tcp" and files:
        raise click.BadParameter(
            "the --tls-* files make the cluster speak TLS; drop --protocol=tcp (or the files)",
            param_hint="--protocol",
        )


def _interface_address(interface: str) -> str:
    """The IPv4 address (else IPv6) of network interface ``interface``, as Dask's
    ``--interface`` chooses it."""
    import psutil

    addresses = psutil.net_if_addrs()
    if interface not in addresses:
        raise click.BadParameter(
            f"no network interface {interface!r} here; this machine has "
            f"{', '.join(sorted(addresses))}",
            param_hint="--interface",
        )
    for family in (socket.AF_INET, socket.AF_INET6):
        for snic in addresses[interface]:
            if snic.family == family:
                return snic.address.split("%")[0]
    raise click.BadParameter(
        f"network interface {interface!r} has no IP address", param_hint="--interface"
    )


def _echo_reach(host: str, address: str, files: dict[str, str]) -> None:
    """One line when the scheduler can be reached from other hosts."""
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        loopback = False
    if loopback:
        return
    if files:
        click.echo(
            f"Reachable from other hosts at {address}: only clients and workers with "
            "certificates from your CA get in (TLS)."
        )
    else:
        click.echo(
            f"Reachable from other hosts at {address}, without TLS: anyone who can reach it "
            "can run code as you; use --tls-ca-file/--tls-cert/--tls-key, or --host=127.0.0.1."
        )


def _busy_port(host: str, port: int | str) -> str:
    return (
        f"port {port} on {host} is already in use (another scheduler?); choose another with "
        f"--port, e.g. --port=0 for any free port"
    )


def _dashboard_address(host: str, dashboard_address: str) -> str:
    if dashboard_address.startswith(":"):  # a port only: the scheduler's interface
        return (f"[{host}]" if ":" in host else host) + dashboard_address
    return dashboard_address


# processes ---------------------------------------------------------------------------------


def _spawn(
    state: StateDir,
    cluster: str,
    log: str,
    args: list[str],
    env: dict | None,
    kind: str,
    address: str | None,
    files: dict[str, str],
) -> ProcessRecord:
    import psutil

    fd = state.open_log(cluster, log)  # new, private, never through a symlink
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=fd,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl-C in this terminal later does not reach it
        )
    finally:
        os.close(fd)
    try:
        created = psutil.Process(process.pid).create_time()
    except psutil.Error:  # exited at once; the record is never signalled
        created = time.time()
    return ProcessRecord(
        pid=process.pid,
        created=created,
        kind=kind,
        cluster=cluster,
        address=address,
        log=str(state.path / cluster / log),
        security=dict(files),
    )


def _log_tail(state: StateDir, record: ProcessRecord, lines: int = LOG_TAIL) -> str:
    """The last `lines` of a process's log, indented (all of it for ``lines=0``)."""
    try:
        dfd = os.open(record.cluster, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=state.fd)
        try:
            text = state.read_text(os.path.basename(record.log or ""), dir_fd=dfd) or ""
        finally:
            os.close(dfd)
    except (OSError, StateDirError):
        return ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _wait_for_scheduler(
    state: StateDir, record: ProcessRecord, host: str, port: int, timeout: float
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dfd = os.open(record.cluster, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=state.fd)
        try:
            text = state.read_text(SCHEDULER_FILE, dir_fd=dfd)
        finally:
            os.close(dfd)
        if text:
            try:
                return json.loads(text)
            except ValueError:
                pass  # being written
        if not is_running(record):
            tail = _log_tail(state, record)
            if "address already in use" in _log_tail(state, record, 0).lower():
                what = _busy_port(host, port)
            else:
                what = "the scheduler exited during start"
            raise click.ClickException(f"{what}; the end of its log ({record.log}):\n{tail}")
        time.sleep(0.1)
    raise click.ClickException(f"the scheduler did not start in {timeout:.0f} s: {record.log}")


def _stop_processes(
    records: list[ProcessRecord],
) -> tuple[list[ProcessRecord], list[tuple[ProcessRecord, ProcessIdentityError]]]:
    """SIGTERM each recorded process (workers first), SIGKILL what outlives STOP_TIMEOUT.

    Returns the processes stopped and the records refused: their pid now belongs to another
    process than the one recorded, which is never signalled.
    """
    stopped, refused = [], []
    for record in sorted(records, key=lambda r: r.kind == "scheduler"):  # workers first
        try:
            if signal_process(record, signal.SIGTERM):
                stopped.append(record)
        except ProcessIdentityError as err:
            refused.append((record, err))
    deadline = time.monotonic() + STOP_TIMEOUT
    for record in stopped:
        while is_running(record) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessIdentityError):
            signal_process(record, signal.SIGKILL, children=True)
    return stopped, refused


def _forget(state: StateDir, records: list[ProcessRecord]) -> None:
    """Drop `records` (and the dead) from the state directory; call under its lock."""
    gone = {(r.pid, r.created) for r in records}
    state.save([r for r in _records(state) if (r.pid, r.created) not in gone and is_running(r)])


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt here, so it stops what ``start`` started as Ctrl-C
    does."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_args(
    address: str, per: int | None, host: str | None, files: dict[str, str]
) -> list[str]:
    args = ["worker", address, "--preload", "dask_gpuresources", "--nworkers", "1"]
    if host:
        args += ["--host", host]
    if per is not None:
        args += ["--resources", f"GPU={per}", "--nthreads", str(max(per, os.cpu_count() or 1))]
    return args + _tls_args(files)


@click.group(name="gpuresources", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """GPU scheduling for Dask, the way `ray start` / `ray status` work."""


@main.command()
@click.option("--head", is_flag=True, help="Start a scheduler (and a worker) on this machine.")
@click.option("--address", help="Join the cluster of this scheduler with a worker.")
@click.option("--num-gpus", "num_gpus", help="GPUs this machine offers (default: detect, NVML).")
@click.option(
    "--host",
    default=None,
    help="With --head: the interface the scheduler (and its dashboard) listens on; default "
    "127.0.0.1, this machine only; 0.0.0.0 (all interfaces) or one of this machine's "
    "addresses lets workers on other hosts join. With --address: the worker's interface.",
)
@click.option(
    "--interface",
    default=None,
    help="Listen on this network interface's address (e.g. eth0, ib0) instead of --host.",
)
@click.option(
    "--protocol",
    type=click.Choice(["tcp", "tls"]),
    default=None,
    help="Scheduler protocol; default tls with the --tls-* files, else tcp.",
)
@click.option(
    "--port", type=int, default=8786, show_default=True, help="Scheduler port; 0: any free one."
)
@click.option(
    "--dashboard-address",
    default=":8787",
    show_default=True,
    help="Dashboard address; a bare :PORT is on the --host interface; :0: any free port.",
)
@click.option(
    "--nworkers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes to start; the GPUs are split evenly among them, each with its own "
    "CUDA_VISIBLE_DEVICES, so --num-gpus must be a multiple of it.",
)
@_tls_options
@click.option("--block", is_flag=True, help="Stay in the foreground until Ctrl-C or SIGTERM.")
def start(
    head: bool,
    address: str | None,
    num_gpus: str | None,
    host: str | None,
    interface: str | None,
    protocol: str | None,
    port: int,
    dashboard_address: str,
    nworkers: int,
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    block: bool,
) -> None:
    """Start a scheduler and worker (--head), or a worker joining --address.

    With --tls-ca-file/--tls-cert/--tls-key the scheduler and workers speak TLS (tls://
    addresses) with these files, as dask scheduler/worker do with the same options.
    """
    # Every check first: nothing is launched for a call that cannot succeed.
    gpus = _gpu_count(num_gpus)
    if head == bool(address):
        raise click.UsageError(
            "give either --head (a new cluster) or --address tcp://HOST:PORT (join one); "
            "e.g. dask-gpuresources start --head --num-gpus=4"
        )
    per, tokens = _split_gpus(gpus, nworkers)
    files = _tls_files(tls_ca_file, tls_cert, tls_key)
    _check_protocol(protocol, files)
    if interface is not None:
        if host is not None:
            raise click.UsageError(
                "give --host or --interface, not both; e.g. --interface=eth0 or --host=10.0.0.5"
            )
        host = _interface_address(interface)
    if head:
        host = host or "127.0.0.1"
        _check_listen(host, port)
        dashboard_address = _dashboard_address(host, dashboard_address)
    else:
        _check_scheme(address, files, "--address")
    state = _state()
    launched: list[ProcessRecord] = []
    with state, _sigterm_interrupts():
        with _locked(state):
            live = [r for r in _records(state) if is_running(r)]
            running = [r for r in live if r.kind == "scheduler"]
            if head and running:
                raise click.UsageError(
                    f"a head started here is already running at {running[0].address} "
                    f"(pid {running[0].pid}); run dask-gpuresources stop first"
                )
            try:
                address, dashboard, total = _launch(
                    state, live, launched, head, address, host, port, dashboard_address,
                    nworkers, per, tokens, files,
                )  # fmt: skip
            except BaseException:
                # Ctrl-C, SIGTERM or a failure: stop what this start launched; no record
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one: finish this
                _stop_processes(launched)
                _forget(state, launched)
                raise
        interrupted = False
        try:  # with --block, a Ctrl-C or SIGTERM from here on stops what was started
            _echo_started(address, dashboard, nworkers, total, files)
            if head:
                _echo_reach(host, address, files)
            if not block:
                return
            click.echo("Running in the foreground; Ctrl-C or SIGTERM stops them.")
            while any(is_running(r) for r in launched):
                time.sleep(0.5)
        except KeyboardInterrupt:
            if not block:
                raise
            interrupted = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one: finish stopping
        with _locked(state):
            recorded = {(r.pid, r.created) for r in _records(state)}
            if not any((r.pid, r.created) in recorded for r in launched):
                click.echo("Stopped (by dask-gpuresources stop).")
                return
            _stop_processes(launched)
            _forget(state, launched)
            clusters = {r.cluster for r in launched}
            if interrupted:
                for cluster in clusters:
                    state.remove_cluster_dir(cluster)
        if not interrupted:  # they exited by themselves: keep their logs
            logs = ", ".join(str(state.path / c) for c in sorted(clusters))
            raise click.ClickException(f"the cluster's processes exited; their logs: {logs}")


def _echo_started(
    address: str, dashboard: Any, nworkers: int, total: float, files: dict[str, str]
) -> None:
    where = address.split("://")[-1].rsplit(":", 1)[0]
    click.echo(f"Scheduler: {address}")
    if dashboard:
        click.echo(f"Dashboard: http://{where}:{dashboard}/status")
    click.echo(f"Workers started: {nworkers}; GPUs in the cluster: {total:g}")
    click.echo("Connect with:")
    if files:
        click.echo(
            "    from distributed.security import Security; security = Security("
            f"tls_ca_file={files['ca']!r}, tls_client_cert={files['cert']!r}, "
            f"tls_client_key={files.get('key')!r}, require_encryption=True)"
        )
        click.echo(
            f"    import dask_gpuresources as gr; gr.init(address={address!r}, security=security)"
        )
    else:
        click.echo(f"    import dask_gpuresources as gr; gr.init(address={address!r})")
    click.echo("Stop with: dask-gpuresources stop")


def _launch(
    state: StateDir,
    live: list[ProcessRecord],
    launched: list[ProcessRecord],
    head: bool,
    address: str | None,
    host: str | None,
    port: int,
    dashboard_address: str,
    nworkers: int,
    per: int | None,
    tokens: list[str],
    files: dict[str, str],
) -> tuple[str, Any, float]:
    """Launch the processes of ``start``, appending each to `launched` (and recording it) as
    soon as it runs; the scheduler's address, its dashboard port and the cluster's GPUs."""
    if not head:  # reachable, before anything is made
        client = _connect(address, files)
        try:
            existing = len(client.scheduler_info(n_workers=-1)["workers"])
        finally:
            client.close()
    state.prune(KEEP_LOGS, in_use={r.cluster for r in live})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cluster = f"{'head' if head else 'join'}-{stamp}-{secrets.token_hex(3)}"
    state.make_cluster_dir(cluster)
    dashboard = None
    if head:
        record = _spawn(
            state,
            cluster,
            "scheduler.log",
            [
                "scheduler",
                "--host",
                host,
                "--port",
                str(port),
                "--protocol",
                "tls" if files else "tcp",
                "--dashboard-address",
                dashboard_address,
                "--preload",
                "dask_gpuresources",
                "--scheduler-file",
                str(state.path / cluster / SCHEDULER_FILE),
                *_tls_args(files),
            ],
            None,
            "scheduler",
            None,
            files,
        )
        launched.append(record)
        state.save(live + launched)
        info = _wait_for_scheduler(state, record, host, port, STARTUP_TIMEOUT)
        address = info["address"]
        record.address = address
        dashboard = info.get("services", {}).get("dashboard")
        existing = 0
        worker_host = None  # each worker picks the interface that reaches the scheduler
    else:
        worker_host = host
    new = []
    for i in range(nworkers):
        env = None
        if per and nworkers > 1:
            env = {"CUDA_VISIBLE_DEVICES": ",".join(tokens[i * per : (i + 1) * per])}
        record = _spawn(
            state,
            cluster,
            f"worker-{i}.log",
            _worker_args(address, per, worker_host, files),
            env,
            "worker",
            address,
            files,
        )
        launched.append(record)
        new.append(record)
        state.save(live + launched)

    client = _connect(address, files)
    try:
        client.wait_for_workers(existing + nworkers, timeout=STARTUP_TIMEOUT)
        from . import install

        install(client)
        total = sum(
            w.get("resources", {}).get("GPU", 0)
            for w in client.scheduler_info(n_workers=-1)["workers"].values()
        )
    except TimeoutError:
        tail = _log_tail(state, new[0])
        raise click.ClickException(
            f"the worker did not join {address} in {STARTUP_TIMEOUT:.0f} s; the end of its "
            f"log ({new[0].log}):\n{tail}"
        ) from None
    finally:
        client.close()
    return address, dashboard, total


@main.command()
def stop() -> None:
    """Stop what `start` started on this machine (and only that), and remove its logs."""
    with _state() as state, _locked(state):
        records = _records(state)
        stopped, refused = _stop_processes(records)
        _forget(state, records)
        for cluster in {r.cluster for r in records}:
            state.remove_cluster_dir(cluster)
    for record, err in refused:
        click.echo(f"Not stopped: {record.kind} {err}; its record is dropped", err=True)
    if not stopped:
        click.echo("Nothing to stop: no process started by dask-gpuresources start is running.")
    for record in stopped:
        where = f" ({record.address})" if record.address else ""
        click.echo(f"Stopped {record.kind} pid {record.pid}{where}")


def _default_head() -> ProcessRecord | None:
    with _state() as state:
        for record in _records(state):
            if record.kind == "scheduler" and record.address and is_running(record):
                return record
    return None


def _no_cluster(as_json: bool, address: str | None, message: str) -> None:
    """No cluster to show: a usage error, or with --json the same as JSON; exit code 2."""
    if not as_json:
        raise click.UsageError(message)
    doc = {
        "running": False,
        "scheduler": address,
        "workers": {},
        "totals": {"workers": 0, "gpus": 0, "gpus_held": 0},
        "error": message,
    }
    click.echo(json.dumps(doc, indent=2))
    sys.exit(2)


@main.command()
@click.option("--address", help="Scheduler address (default: the head started here).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_tls_options
def status(
    address: str | None,
    as_json: bool,
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Workers, devices, and who holds them.

    Exit code 0 with a cluster; 2 without one (no head started here and no --address, or an
    unreachable scheduler), in which case --json prints {"running": false, ...}. The TLS
    options default to those the head started here was given.
    """
    files = _tls_files(tls_ca_file, tls_cert, tls_key)
    if address is None:
        head = _default_head()
        if head is None:
            return _no_cluster(
                as_json,
                None,
                "no cluster started here; give --address tcp://HOST:PORT, or start one with "
                "dask-gpuresources start --head --num-gpus=4",
            )
        address = head.address
        files = files or head.security
    _check_scheme(address, files, "--address")
    try:
        client = _connect(address, files)
    except click.UsageError as err:
        return _no_cluster(as_json, address, err.message)
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
    table = {"running": True, "scheduler": address, "workers": dict(sorted(workers.items()))}
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
