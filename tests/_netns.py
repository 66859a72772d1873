"""A multi-host test bed on one machine: three network namespaces joined by a bridge.

Each namespace is a "host" with one address from 198.51.100.0/24 (TEST-NET-2, a range kept
for documentation that no real network uses): ``a`` = .1, ``b`` = .2, ``c`` = .3. The
namespaces reach each other through a bridge in the root namespace that has no address, and
have no route anywhere else (not even a default route): nothing started in them can leave the
bed. Loopback is up in each.

Every name carries the creating process id (``gpr<pid>-a``, ``gpr<pid>br``, ...), so parallel
runs never clash, and :func:`remove_stale` can tell leftovers of a killed run (whose pid is
gone) from a live bed. :meth:`MultiHostBed.close` removes everything that
:meth:`MultiHostBed.create` made, processes first, whatever state it is in, and may be called
twice.

A host's name resolves to its own address inside its namespace (``ip netns exec`` mounts
``/etc/netns/<ns>/hosts`` over ``/etc/hosts``), as on a real machine: Dask's address
detection (a UDP "connect" to 8.8.8.8, which fails without a default route) falls back to
the host name, so ``dask worker`` and ``dask scheduler`` started without ``--host`` advertise
the namespace's address.

Used by ``tests/test_multihost.py`` (pytest fixture) and ``scripts/multihost.py`` (for
people). Needs Linux, root and the ``ip`` command (iproute2); :func:`unavailable` says why not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HOSTS", "Host", "MultiHostBed", "remove_stale", "unavailable"]

REPO = Path(__file__).resolve().parent.parent
NETWORK = "198.51.100.0/24"
#: host name -> last byte of its address
HOSTS = {"a": 1, "b": 2, "c": 3}
PREFIX = "gpr"
_NAME = re.compile(rf"^{PREFIX}(\d+)(?:-[a-z]+|[a-z]p?|br)$")
_ETC_NETNS = Path("/etc/netns")


def _ip(*args: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and result.returncode:
        raise OSError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or ``None`` when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return f"creating network namespaces needs root (this runs as uid {os.geteuid()})"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`ip netns add` cannot run: {err}"
    if made.returncode:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(ns: str) -> list[int]:
    try:
        out = _ip("netns", "pids", ns, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_namespace_processes(ns: str, deadline: float) -> None:
    """SIGKILL every process in ``ns`` until none is left (or ``deadline``)."""
    while time.monotonic() < deadline:
        pids = [p for p in _netns_pids(ns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def remove_stale() -> list[str]:
    """Remove namespaces, links and hosts files of beds whose creating process is gone.

    Returns the names removed. A bed of a live process is left alone.
    """
    removed = []
    try:
        namespaces = _ip("netns", "list", check=False).stdout.split("\n")
        links = _ip("-o", "link", "show", check=False).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return removed
    for line in namespaces:
        name = line.split(" ")[0].strip()
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _kill_namespace_processes(name, time.monotonic() + 5)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for line in links:
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    if _ETC_NETNS.is_dir():
        for path in _ETC_NETNS.iterdir():
            match = _NAME.match(path.name)
            if match and not _pid_alive(int(match.group(1))):
                shutil.rmtree(path, ignore_errors=True)
    return removed


@dataclass
class Host:
    """One namespace: ``name`` (a, b, c), its namespace, address and the bridge-side link."""

    name: str
    ns: str
    ip: str
    port_link: str  # the veth end on the bridge, in the root namespace ("the switch port")

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


@dataclass
class MultiHostBed:
    """Three hosts on one bridge; processes started in them are tracked and ended on close.

    >>> bed = MultiHostBed(pid=4242)
    >>> bed.hosts["b"].ip, bed.hosts["b"].ns, bed.bridge
    ('198.51.100.2', 'gpr4242-b', 'gpr4242br')
    """

    pid: int = field(default_factory=os.getpid)
    log_dir: Path | None = None
    hosts: dict[str, Host] = field(init=False)
    bridge: str = field(init=False)
    processes: list[tuple[str, subprocess.Popen, Path | None]] = field(
        init=False, default_factory=list
    )
    _made: list[tuple[str, str]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        base = f"{PREFIX}{self.pid}"
        self.bridge = f"{base}br"
        self.hosts = {
            name: Host(name, f"{base}-{name}", f"198.51.100.{last}", f"{base}{name}p")
            for name, last in HOSTS.items()
        }

    # -- making and removing ----------------------------------------------------------------

    def create(self) -> MultiHostBed:
        """Make the bridge, the namespaces and their links; undone by :meth:`close`."""
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _ip("link", "set", self.bridge, "up")
            hostname = socket.gethostname()
            for host in self.hosts.values():
                _ip("netns", "add", host.ns)
                self._made.append(("netns", host.ns))
                inner = f"{PREFIX}{self.pid}{host.name}"
                _ip("link", "add", inner, "type", "veth", "peer", "name", host.port_link)
                self._made.append(("link", host.port_link))
                _ip("link", "set", host.port_link, "master", self.bridge)
                _ip("link", "set", host.port_link, "up")
                _ip("link", "set", inner, "netns", host.ns)
                _ip("-n", host.ns, "link", "set", inner, "name", "eth0")
                _ip("-n", host.ns, "link", "set", "lo", "up")
                _ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
                _ip("-n", host.ns, "link", "set", "eth0", "up")
                etc = _ETC_NETNS / host.ns
                etc.mkdir(parents=True, exist_ok=True)
                self._made.append(("etc", str(etc)))
                lines = ["127.0.0.1 localhost", f"{host.ip} {hostname} host-{host.name}"]
                lines += [f"{h.ip} host-{h.name}" for h in self.hosts.values() if h is not host]
                (etc / "hosts").write_text("\n".join(lines) + "\n")
        except BaseException:
            self.close()
            raise
        return self

    def close(self, timeout: float = 20) -> None:
        """End every process started in the bed, then remove what :meth:`create` made."""
        self.reset(timeout)
        for kind, name in reversed(self._made):
            if kind == "netns":
                _ip("netns", "del", name, check=False)
            elif kind == "link":
                _ip("link", "del", name, check=False)
            elif kind == "etc":
                shutil.rmtree(name, ignore_errors=True)
        self._made.clear()

    def reset(self, timeout: float = 20) -> None:
        """End every process in the bed (started here or not) and plug every cable back in."""
        deadline = time.monotonic() + timeout
        for _, process, _ in self.processes:
            if process.poll() is None:
                try:
                    process.terminate()
                except ProcessLookupError:
                    pass
        soft = time.monotonic() + min(5.0, timeout / 4)
        for _, process, _ in self.processes:
            try:
                process.wait(max(0.0, soft - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # whatever is left in a namespace (a nanny's worker, a CLI's background processes)
        for kind, name in self._made:
            if kind == "netns":
                _kill_namespace_processes(name, deadline)
        for _, process, _ in self.processes:
            if process.poll() is None:
                process.kill()
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()
        for kind, name in self._made:
            if kind == "link" and name != self.bridge:
                _ip("link", "set", name, "up", check=False)

    def leftovers(self) -> list[str]:
        """Names of this bed still present (``[]`` after :meth:`close`)."""
        names = {self.bridge, *(h.ns for h in self.hosts.values())}
        names |= {h.port_link for h in self.hosts.values()}
        out = _ip("netns", "list", check=False).stdout + _ip("-o", "link", check=False).stdout
        found = set(re.findall(rf"{PREFIX}{self.pid}[a-z0-9-]*", out))
        etc = [h.ns for h in self.hosts.values() if (_ETC_NETNS / h.ns).exists()]
        return sorted((found & names) | set(etc))

    def __enter__(self) -> MultiHostBed:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes ----------------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process in the bed: the repository importable, no GPUs chosen."""
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        env = {k: v for k, v in env.items() if not k.startswith(("DASK_", "PYTEST_"))}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def popen(
        self, host: str, argv: list[str], *, name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start ``argv`` in ``host``'s namespace in the background, output to a log file.

        The process is ended by :meth:`reset` and :meth:`close`.
        """
        log = None
        if self.log_dir is not None:
            log = Path(self.log_dir) / f"{host}-{name}.log"
            out = open(log, "ab")  # noqa: SIM115 (closed below: the child holds its own copy)
        else:
            out = subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                [*self.hosts[host].exec_prefix(), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(env),
                cwd=str(REPO),
            )
        finally:
            if log is not None:
                out.close()
        self.processes.append((f"{host}-{name}", process, log))
        return process

    def dask(
        self, host: str, args: list[str], *, name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """``python -m dask ARGS`` in ``host`` (``dask scheduler``, ``dask worker``, ...)."""
        return self.popen(host, [sys.executable, "-m", "dask", *args], name=name, env=env)

    def run(
        self,
        host: str,
        argv: list[str],
        *,
        timeout: float,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``host`` to its end (``timeout`` seconds at most)."""
        return subprocess.run(
            [*self.hosts[host].exec_prefix(), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(env),
            cwd=str(REPO),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    def python(
        self, host: str, code: str, *, timeout: float, env: dict[str, str] | None = None
    ) -> dict:
        """Run Python ``code`` in ``host``; it prints one JSON object as its last line.

        Raises ``AssertionError`` with the output when it exits non-zero or prints no JSON.
        """
        result = self.run(host, [sys.executable, "-c", code], timeout=timeout, env=env)
        lines = result.stdout.strip().splitlines()
        if result.returncode or not lines:
            raise AssertionError(
                f"driver on host {host} exited {result.returncode}\n--- stdout\n"
                f"{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
            )
        try:
            return json.loads(lines[-1])
        except ValueError:
            raise AssertionError(
                f"driver on host {host} printed no JSON last\n{result.stdout[-4000:]}"
            ) from None

    def log(self, name: str) -> str:
        """The output so far of the process started as ``name`` (``"a-scheduler"``)."""
        for full, _, path in self.processes:
            if full == name and path is not None and path.exists():
                return path.read_text(errors="replace")
        return ""

    def logs(self) -> str:
        """The tail of every process's log, for a failure message."""
        parts = []
        for full, process, path in self.processes:
            text = path.read_text(errors="replace")[-3000:] if path and path.exists() else ""
            parts.append(f"--- {full} (pid {process.pid}, exit {process.poll()})\n{text}")
        return "\n".join(parts)

    # -- faults -------------------------------------------------------------------------------

    def link(self, host: str, up: bool) -> None:
        """Plug ``host``'s cable into the bridge, or pull it (its port on the bridge)."""
        _ip("link", "set", self.hosts[host].port_link, "up" if up else "down")

    def kill_host(self, host: str, timeout: float = 10) -> list[int]:
        """SIGKILL every process in ``host``'s namespace (a machine that lost power)."""
        ns = self.hosts[host].ns
        pids = [p for p in _netns_pids(ns) if p != os.getpid()]
        _kill_namespace_processes(ns, time.monotonic() + timeout)
        for full, process, _ in self.processes:
            if full.startswith(f"{host}-"):
                if process.poll() is None:
                    process.kill()
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        return pids

    def pids(self, host: str) -> list[int]:
        """The processes now running in ``host``'s namespace."""
        return [p for p in _netns_pids(self.hosts[host].ns) if p != os.getpid()]


def wait_for(predicate, *, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Call ``predicate`` until it returns something true; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout:g} s")
        time.sleep(interval)
