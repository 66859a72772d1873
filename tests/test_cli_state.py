"""The CLI's state directory and ``start``'s hardening, with real ``dask scheduler`` /
``dask worker`` processes: refusals of an unsafe state directory, no symlink followed, records
read and written under a lock, pids signalled only when they are the process recorded, a
failed or terminated ``start`` leaving nothing behind, ``--host`` and TLS."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from _certs import certificates
from _cli import ENV, cli
from click.testing import CliRunner

from dask_gpuresources._statedir import ProcessRecord, StateDir
from dask_gpuresources.cli import main

pytestmark = pytest.mark.slow
NOBODY = 65534
FAST = ["--port=0", "--dashboard-address=:0"]


def popen_cli(*args, state_dir):
    return subprocess.Popen(
        [sys.executable, "-m", "dask", "gpuresources", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, ENV: str(state_dir)},
    )


def leftovers(state_dir, exclude=()):
    """Processes started with this state directory in their environment (what a start
    launched: schedulers, workers, nannies' children), other than `exclude`."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid() or process.pid in exclude:
            continue
        try:
            if process.environ().get(ENV) == str(state_dir):
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
        except psutil.Error:
            pass
    return found


def wait_gone(processes, timeout=30):
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    monkeypatch.setenv(ENV, str(path))
    yield path
    # whatever a test (or the code before these fixes) left running
    cli("stop", state_dir=path)
    for process in leftovers(path):
        try:
            process.kill()
        except psutil.Error:
            pass


def records(state_dir):
    path = state_dir / "processes.json"
    return json.loads(path.read_text()) if path.exists() else []


# the state directory is refused unless private --------------------------------------------


def refused(path, monkeypatch):
    monkeypatch.setenv(ENV, str(path))
    result = CliRunner().invoke(main, ["stop"])
    assert result.exit_code == 1, result.output
    assert f"refusing the state directory {path}: " in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    return result.output


def test_symlinked_state_dir_is_refused(tmp_path, monkeypatch):
    target = tmp_path / "someone-elses"
    target.mkdir()
    os.chmod(target, 0o777)
    os.chown(target, NOBODY, NOBODY)
    link = tmp_path / "state"
    link.symlink_to(target)
    out = refused(link, monkeypatch)
    assert "it is a symlink; remove it (rm " in out
    assert os.listdir(target) == []


def test_state_dir_of_another_user_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)
    out = refused(path, monkeypatch)
    assert f"owned by uid {NOBODY}, not by you (uid {os.getuid()})" in out
    assert os.listdir(path) == []


@pytest.mark.parametrize("mode", [0o755, 0o777])
def test_state_dir_with_open_mode_is_refused(tmp_path, monkeypatch, mode):
    path = tmp_path / "state"
    path.mkdir()
    os.chmod(path, mode)
    out = refused(path, monkeypatch)
    assert f"it has mode {mode:04o}, not 0700; run chmod 700 {path}" in out
    assert os.listdir(path) == []


def test_state_dir_is_made_private_under_xdg_runtime_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(main, ["stop"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    st = os.lstat(runtime / "dask-gpuresources")
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.getuid()


def test_symlinked_records_are_refused_not_followed(state_dir, tmp_path):
    """A records file that is a symlink (say to records forged elsewhere) is neither read
    (``stop`` would signal the forged pids) nor written through."""
    victim = subprocess.Popen(["sleep", "120"])
    try:
        forged = tmp_path / "forged.json"
        record = ProcessRecord(
            pid=victim.pid,
            created=psutil.Process(victim.pid).create_time(),
            kind="worker",
            cluster="head-forged",
            log=str(tmp_path / "x.log"),
        )
        text = json.dumps([record.to_json()])
        forged.write_text(text)
        (state_dir / "processes.json").symlink_to(forged)

        stopped = cli("stop", state_dir=state_dir)
        assert stopped.returncode == 1, stopped.stdout
        assert f"{state_dir / 'processes.json'}: it is a symlink" in stopped.stderr
        assert victim.poll() is None, "stop signalled a pid read through a symlink"

        started = cli("start", "--head", "--num-gpus=1", *FAST, state_dir=state_dir)
        assert started.returncode == 1 and "it is a symlink" in started.stderr
        assert forged.read_text() == text
        assert leftovers(state_dir, exclude={victim.pid}) == []
    finally:
        victim.kill()
        victim.wait()


def test_records_are_written_atomically_and_never_through_a_symlink(tmp_path):
    path = tmp_path / "state"
    with StateDir.open(path) as state:
        assert os.stat(path).st_mode & 0o777 == 0o700
        target = tmp_path / "target"
        target.write_text("untouched")
        (path / "processes.json").symlink_to(target)
        record = ProcessRecord(pid=12345, created=1.0, kind="scheduler", cluster="head-a")
        with state.lock():
            state.save([record])  # replaces the link itself
        assert target.read_text() == "untouched"
        assert not os.path.islink(path / "processes.json")
        assert state.records() == [record]
        assert sorted(os.listdir(path)) == ["lock", "processes.json"]  # no temporary left
        assert os.stat(path / "processes.json").st_mode & 0o777 == 0o600

        state.make_cluster_dir("head-a")
        (path / "head-a" / "scheduler.log").symlink_to(target)
        with pytest.raises(FileExistsError):
            state.open_log("head-a", "scheduler.log")
        assert target.read_text() == "untouched"


def test_records_are_read_and_written_under_a_lock(state_dir):
    """``stop`` waits for the lock that guards the records' read-modify-write."""
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        stop = popen_cli("stop", state_dir=state_dir)
        with pytest.raises(subprocess.TimeoutExpired):
            stop.wait(timeout=3)  # blocked on the lock (it ends in ~1 s when not)
    finally:
        os.close(fd)
    out, err = stop.communicate(timeout=60)
    assert stop.returncode == 0, err
    assert "Nothing to stop" in out


def test_stop_does_not_signal_a_reused_pid(state_dir):
    """A recorded pid whose process was created at another time than recorded is another
    process (the pid was reused): ``stop`` leaves it alone and drops the record."""
    victim = subprocess.Popen(["sleep", "120"])
    try:
        created = psutil.Process(victim.pid).create_time()
        record = ProcessRecord(
            pid=victim.pid, created=created - 1000, kind="worker", cluster="head-old"
        )
        with StateDir.open(state_dir) as state, state.lock():
            state.save([record])
        stopped = cli("stop", state_dir=state_dir)
        assert stopped.returncode == 0, stopped.stderr
        assert f"pid {victim.pid} is not the process that was started" in stopped.stderr
        assert "Nothing to stop" in stopped.stdout
        assert victim.poll() is None and psutil.Process(victim.pid).status() != "zombie"
        assert records(state_dir) == []
    finally:
        victim.kill()
        victim.wait()


# start --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-gpus=3", "--nworkers=2"], "--num-gpus=3 does not divide among --nworkers=2"),
        (["--host=tcp://127.0.0.1"], "is not a host name or address; use --host=127.0.0.1"),
        (["--host=203.0.113.9"], "'203.0.113.9' is not an address of this machine"),
        (["--port=70000"], "70000 is not a port; use --port=8786"),
        (["--protocol=tls"], "tls needs certificates: add --tls-ca-file"),
        (["--interface=no-such-nic0"], "no network interface 'no-such-nic0' here"),
        (["--interface=lo", "--host=127.0.0.1"], "give --host or --interface, not both"),
        (["--tls-cert=/etc/hostname"], "TLS needs --tls-ca-file and --tls-cert"),
        (
            ["--tls-ca-file=/etc/hostname", "--tls-cert=/etc/hostname"],
            "cannot load the TLS files",
        ),
    ],
)
def test_bad_start_launches_nothing(state_dir, args, message):
    result = cli("start", "--head", *FAST, *args, state_dir=state_dir)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(state_dir) == []
    assert os.listdir(state_dir) == []  # no record, no log directory


def test_join_with_tls_files_needs_a_tls_address(state_dir, tls_files):
    result = cli("start", "--address=tcp://127.0.0.1:1", *tls_files["args"], state_dir=state_dir)
    assert result.returncode == 2
    assert "'tcp://127.0.0.1:1' is not a tls:// address" in result.stderr
    assert os.listdir(state_dir) == []


def test_busy_port_is_named_with_the_flag(state_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli(
            "start", "--head", f"--port={port}", "--dashboard-address=:0", state_dir=state_dir
        )
    assert result.returncode == 2, result.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "choose another with --port, e.g. --port=0" in result.stderr
    assert leftovers(state_dir) == [] and records(state_dir) == []


def test_sigterm_during_start_stops_what_it_launched(state_dir):
    """A start ended while its workers are still joining stops the scheduler it launched
    and leaves no record."""
    start = popen_cli("start", "--head", "--num-gpus=1", *FAST, state_dir=state_dir)
    deadline = time.monotonic() + 60
    while not any(r["kind"] == "scheduler" for r in records(state_dir)):
        assert start.poll() is None, start.communicate()
        assert time.monotonic() < deadline, "no scheduler recorded"
        time.sleep(0.05)
    launched = leftovers(state_dir, exclude={start.pid})
    assert launched
    start.send_signal(signal.SIGTERM)
    start.communicate(timeout=60)
    assert start.returncode != 0
    assert wait_gone(launched) == [], "start left a process it launched running"
    assert leftovers(state_dir) == [] and records(state_dir) == []


def test_sigterm_stops_start_block(state_dir):
    start = popen_cli("start", "--head", "--num-gpus=1", "--block", *FAST, state_dir=state_dir)
    try:
        for line in start.stdout:  # bounded by the pytest timeout; start's own is 60 s
            if line.startswith("Running in the foreground"):
                break
        else:
            pytest.fail(start.communicate(timeout=10))
        launched = leftovers(state_dir, exclude={start.pid})
        assert {r["kind"] for r in records(state_dir)} == {"scheduler", "worker"}
        start.send_signal(signal.SIGTERM)
        start.wait(timeout=60)
    finally:
        if start.poll() is None:
            start.kill()
        start.communicate()
    assert wait_gone(launched) == [], "SIGTERM of start --block left its processes running"
    assert records(state_dir) == []
    assert not [n for n in os.listdir(state_dir) if n.startswith("head-")]  # logs removed


def test_status_json_without_a_cluster_is_json(state_dir):
    result = CliRunner().invoke(main, ["status", "--json"])
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["running"] is False and doc["workers"] == {} and doc["scheduler"] is None
    assert "no cluster started here" in doc["error"]

    result = CliRunner().invoke(main, ["status", "--json", "--address", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["running"] is False and doc["scheduler"] == "tcp://127.0.0.1:1"


def listening(pid):
    """The addresses a process and its children listen on."""
    process = psutil.Process(pid)
    return {
        c.laddr.ip
        for p in [process, *process.children(recursive=True)]
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


@pytest.mark.parametrize("host", [None, "127.0.0.1", "0.0.0.0", "interface lo"])
def test_host_sets_where_the_scheduler_listens(state_dir, tmp_path, host):
    planted = tmp_path / "planted"
    planted.write_text("")
    now = int(time.time())
    for t in range(now - 2, now + 60):  # where logs used to go, by name
        (state_dir / f"scheduler-{t}.log").symlink_to(planted)
        (state_dir / f"worker-{t}-0.log").symlink_to(planted)

    flags = [] if host is None else [f"--host={host}"]
    if host == "interface lo":
        flags = ["--interface=lo"]  # the loopback interface's address, 127.0.0.1
    started = cli("start", "--head", "--num-gpus=1", *FAST, *flags, state_dir=state_dir)
    assert started.returncode == 0, started.stderr
    # one line says when other hosts can reach the scheduler, and what that means
    reach = [line for line in started.stdout.splitlines() if "other hosts" in line]
    if host == "0.0.0.0":
        assert len(reach) == 1 and "without TLS: anyone who can reach it" in reach[0]
    else:
        assert reach == []
    assert planted.read_text() == "", "a log was written through a planted symlink"
    (scheduler,) = [r for r in records(state_dir) if r["kind"] == "scheduler"]
    where = listening(scheduler["pid"])
    status = json.loads(cli("status", "--json", state_dir=state_dir).stdout)
    assert status["running"] is True and status["totals"]["workers"] == 1
    if host == "0.0.0.0":
        assert where == {"0.0.0.0"}  # every interface: workers on other hosts can join
        assert not ipaddress.ip_address(status["scheduler"][6:].rsplit(":", 1)[0]).is_unspecified
    else:
        assert where == {"127.0.0.1"}  # the scheduler and its dashboard, this machine only
        assert status["scheduler"].startswith("tcp://127.0.0.1:")

    (cluster,) = {r["cluster"] for r in records(state_dir)}
    logs = sorted(os.listdir(state_dir / cluster))
    assert "scheduler.log" in logs and "worker-0.log" in logs
    assert all(not os.path.islink(state_dir / cluster / name) for name in logs)
    stopped = cli("stop", state_dir=state_dir)
    assert stopped.returncode == 0 and stopped.stdout.count("Stopped") == 2
    assert not (state_dir / cluster).exists()  # stop removes the cluster's logs


# TLS ------------------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path):
    """A CA, and a certificate for 127.0.0.1 signed by it, as PEM files."""
    made = certificates(tmp_path, {"local": "127.0.0.1"})
    paths = {"ca": made["ca"], "cert": made["local"][0], "key": made["local"][1]}
    args = [
        f"--tls-ca-file={paths['ca']}",
        f"--tls-cert={paths['cert']}",
        f"--tls-key={paths['key']}",
    ]
    return {**paths, "args": args}


def test_tls_start_and_status(state_dir, tls_files):
    started = cli("start", "--head", "--num-gpus=2", *FAST, *tls_files["args"], state_dir=state_dir)
    assert started.returncode == 0, started.stderr
    address = started.stdout.splitlines()[0].split("Scheduler: ")[1]
    assert address.startswith("tls://127.0.0.1:")
    assert "security=security" in started.stdout

    # the same options, given or (for the head started here) remembered
    for args in (tls_files["args"], []):
        status = cli("status", "--json", f"--address={address}", *args, state_dir=state_dir)
        if not args:  # an explicit TLS address without the files: told what to give
            assert status.returncode == 2
            assert "is a TLS address: give the TLS files too" in status.stderr
            status = cli("status", "--json", state_dir=state_dir)
        assert status.returncode == 0, status.stderr
        table = json.loads(status.stdout)
        assert table["scheduler"] == address
        (worker,) = table["workers"]
        assert worker.startswith("tls://") and table["totals"]["gpus"] == 2

    joined = cli(
        "start", f"--address={address}", "--num-gpus=1", *tls_files["args"], state_dir=state_dir
    )
    assert joined.returncode == 0, joined.stderr
    assert "GPUs in the cluster: 3" in joined.stdout
    assert cli("stop", state_dir=state_dir).stdout.count("Stopped") == 3


def test_scheduler_failing_on_a_busy_port_is_explained(tmp_path):
    """A port taken between ``start``'s check and the scheduler's bind: the scheduler exits,
    and the error names the port, the flag, and shows the end of the scheduler's log."""
    from click import ClickException

    from dask_gpuresources.cli import _spawn, _wait_for_scheduler

    with StateDir.open(tmp_path / "state") as state, socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        state.make_cluster_dir("head-busy")
        record = _spawn(
            state,
            "head-busy",
            "scheduler.log",
            ["scheduler", "--host=127.0.0.1", f"--port={port}", "--dashboard-address=:0"],
            None,
            "scheduler",
            None,
            {},
        )
        with pytest.raises(ClickException) as info:
            _wait_for_scheduler(state, record, "127.0.0.1", port, timeout=60)
    message = info.value.message
    assert f"port {port} on 127.0.0.1 is already in use" in message
    assert "choose another with --port" in message
    assert f"the end of its log ({tmp_path / 'state' / 'head-busy' / 'scheduler.log'}):" in message
    assert "Scheduler failed to start" in message


def test_stop_ends_start_block(state_dir):
    start = popen_cli("start", "--head", "--num-gpus=1", "--block", *FAST, state_dir=state_dir)
    try:
        for line in start.stdout:
            if line.startswith("Running in the foreground"):
                break
        else:
            pytest.fail(start.communicate(timeout=10))
        stopped = cli("stop", state_dir=state_dir)
        assert stopped.returncode == 0 and stopped.stdout.count("Stopped") == 2
        out, err = start.communicate(timeout=60)
    finally:
        if start.poll() is None:
            start.kill()
            start.communicate()
    assert start.returncode == 0, err
    assert "Stopped (by dask-gpuresources stop)." in out
    assert records(state_dir) == [] and leftovers(state_dir) == []
