"""The CLI's state directory: what ``start`` launched on this machine, and its logs.

Where: ``$DASK_GPURESOURCES_STATE_DIR`` when set, else ``$XDG_RUNTIME_DIR/dask-gpuresources``
when ``XDG_RUNTIME_DIR`` is set, else ``$TMPDIR/dask-gpuresources-<uid>``.

On a shared host anyone can create a path under ``/tmp`` first, so the directory is trusted
only as ssh and tmux trust theirs: it must be a real directory (not a symlink), owned by this
user, with mode 0700. Everything in it is then out of other users' reach; files are still
written atomically (a temporary file in the same directory, then ``os.replace``) and opened
without following symlinks, relative to a descriptor of the checked directory, so that a path
swapped after the check is never used.

Contents:

- ``processes.json``: one record per process ``start`` launched (pid, creation time, kind,
  address, cluster directory), read and rewritten under ``flock`` on ``lock``.
- one directory per cluster (``head-...`` or ``join-...``) holding its logs and scheduler file.

A process is signalled only through :func:`signal_process`, which refuses a pid whose
creation time differs from the recorded one (the pid was reused by another process).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ProcessIdentityError",
    "ProcessRecord",
    "StateDir",
    "StateDirError",
    "default_path",
    "is_running",
    "signal_process",
]

RECORDS = "processes.json"
LOCK = "lock"
ENV_VAR = "DASK_GPURESOURCES_STATE_DIR"
#: creation times of one process, read twice, differ by less than this (Linux derives them
#: from the boot time, which can move by a clock step); a reused pid differs by far more
CREATE_TIME_TOLERANCE = 1.0
_ELSEWHERE = f"set {ENV_VAR} to a directory of yours (it is created with mode 0700)"


class StateDirError(RuntimeError):
    """The state directory is unsafe or unusable; the message names the path and the fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"refusing the state directory {self.path}: {problem}; {fix}")


class ProcessIdentityError(RuntimeError):
    """A recorded pid now belongs to another process than the one ``start`` launched."""

    def __init__(self, pid: int, recorded: float, actual: float) -> None:
        self.pid = pid
        self.recorded = recorded
        self.actual = actual
        super().__init__(
            f"pid {pid} is not the process that was started (created at {actual:.2f}, "
            f"recorded {recorded:.2f}): its pid was reused; not signalling it"
        )


def default_path(environ: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """The state directory's path (not created, not checked).

    Examples
    --------
    >>> str(default_path({"XDG_RUNTIME_DIR": "/run/user/1000"}))
    '/run/user/1000/dask-gpuresources'
    >>> str(default_path({"DASK_GPURESOURCES_STATE_DIR": "/x", "XDG_RUNTIME_DIR": "/run"}))
    '/x'
    >>> default_path({}, uid=7).name
    'dask-gpuresources-7'
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "dask-gpuresources"
    uid = os.getuid() if uid is None else uid
    return Path(tempfile.gettempdir()) / f"dask-gpuresources-{uid}"


def check_dir_stat(path: str | os.PathLike, st: os.stat_result, uid: int) -> None:
    """Raise :class:`StateDirError` unless `st` (from ``lstat``) is a private directory.

    Examples
    --------
    >>> st = os.stat_result((stat.S_IFDIR | 0o755, 0, 0, 0, 1000, 0, 0, 0, 0, 0))
    >>> check_dir_stat("/tmp/d", st, 1000)
    Traceback (most recent call last):
    ...
    dask_gpuresources._statedir.StateDirError: refusing the state directory /tmp/d: it has \
mode 0755, not 0700; run chmod 700 /tmp/d
    """
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(path, "it is a symlink", f"remove it (rm {path}) and run again")
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(path, "it is not a directory", f"remove it (rm {path}) and run again")
    if st.st_uid != uid:
        raise StateDirError(
            path,
            f"it is owned by uid {st.st_uid}, not by you (uid {uid})",
            f"remove it as its owner, or set {ENV_VAR} or XDG_RUNTIME_DIR to a directory of yours",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        raise StateDirError(path, f"it has mode {mode:04o}, not 0700", f"run chmod 700 {path}")


@dataclass
class ProcessRecord:
    """One process launched by ``start``."""

    pid: int
    created: float
    kind: str  # "scheduler" or "worker"
    cluster: str  # the cluster directory's name in the state directory ("": none)
    address: str | None = None  # the scheduler's address (the one it joined, for a worker)
    log: str | None = None
    security: dict[str, str] = field(default_factory=dict)  # TLS file paths, for status

    @classmethod
    def from_json(cls, data: Any) -> ProcessRecord | None:
        """A record from its JSON form; ``None`` for anything malformed."""
        try:
            record = cls(
                pid=int(data["pid"]),
                created=float(data["created"]),
                kind=str(data["kind"]),
                cluster=str(data.get("cluster") or ""),  # "": none (records of 0.1.0)
                address=data.get("address"),
                log=data.get("log"),
                security=dict(data.get("security") or {}),
            )
        except (KeyError, TypeError, ValueError):
            return None
        if record.pid <= 1 or record.kind not in ("scheduler", "worker"):
            return None
        if record.cluster and not _plain_name(record.cluster):
            return None
        return record

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _process(record: ProcessRecord) -> Any:
    """The running process `record` names; ``None`` if it is gone or is another process."""
    import psutil

    try:
        process = psutil.Process(record.pid)
        created = process.create_time()
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    if abs(created - record.created) >= CREATE_TIME_TOLERANCE:
        raise ProcessIdentityError(record.pid, record.created, created)
    return process


def is_running(record: ProcessRecord) -> bool:
    """Whether the very process `record` names still runs (not a later one with its pid)."""
    try:
        return _process(record) is not None
    except ProcessIdentityError:
        return False


def signal_process(record: ProcessRecord, signum: int, *, children: bool = False) -> bool:
    """Send `signum` to the process `record` names, after checking it is that process.

    Returns ``False`` when it is no longer running. Raises :class:`ProcessIdentityError`, and
    signals nothing, when the pid now belongs to a process created at another time.
    With `children`, its descendants get `signum` too (found before the parent is signalled).
    """
    import psutil

    process = _process(record)
    if process is None:
        return False
    targets = [process]
    if children:
        try:
            targets += process.children(recursive=True)
        except psutil.Error:
            pass
    sent = False
    for target in targets:
        try:
            # psutil refuses to signal a Process whose pid was reused since it was created
            target.send_signal(signum)
            sent = True
        except psutil.Error:
            pass
    return sent


def open_nofollow(
    path: str | os.PathLike, flags: int, mode: int = 0o600, dir_fd: int | None = None
) -> int:
    """``os.open`` that refuses a symlink at the last component (ELOOP)."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)


class StateDir:
    """The checked state directory, held by a descriptor; create with :meth:`open`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> StateDir:
        """Create (mode 0700) or check the state directory; :class:`StateDirError` if unsafe."""
        path = Path(default_path() if path is None else path)
        uid = os.getuid()
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            created = False
        except FileNotFoundError:
            raise StateDirError(
                path, "its parent directory does not exist", f"create {path.parent} first"
            ) from None
        except OSError as err:
            raise StateDirError(
                path, f"it cannot be created ({err.strerror})", _ELSEWHERE
            ) from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            # ELOOP: a symlink; ENOTDIR: a file; EACCES: someone else's private directory
            check_dir_stat(path, os.lstat(path), uid)
            raise StateDirError(path, f"it cannot be opened ({err.strerror})", _ELSEWHERE) from None
        try:
            if created:
                os.fchmod(fd, 0o700)  # whatever the umask took away
            check_dir_stat(path, os.fstat(fd), uid)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> StateDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive ``flock`` on the directory's lock file, for a read-modify-write."""
        try:
            fd = open_nofollow(LOCK, os.O_RDWR | os.O_CREAT, dir_fd=self.fd)
        except OSError as err:
            raise self._bad_file(LOCK, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read_text(self, name: str, *, dir_fd: int | None = None) -> str | None:
        """A regular file's text, ``None`` if absent; never follows a symlink.

        A symlink or anything else than a regular file at `name` is refused
        (:class:`StateDirError`): nothing but this module writes there.
        """
        try:
            fd = open_nofollow(
                name,
                os.O_RDONLY | os.O_NONBLOCK,  # a planted FIFO must not block the read
                dir_fd=self.fd if dir_fd is None else dir_fd,
            )
        except FileNotFoundError:
            return None
        except OSError as err:
            raise self._bad_file(name, err) from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise StateDirError(
                    self.path / name,
                    "it is not a regular file",
                    f"remove it (rm {self.path / name})",
                )
            return f.read().decode()

    def _bad_file(self, name: str, err: OSError) -> StateDirError:
        path = self.path / name
        if err.errno == errno.ELOOP:
            return StateDirError(path, "it is a symlink", f"remove it (rm {path}) and run again")
        return StateDirError(
            path, f"it cannot be opened ({err.strerror})", f"remove it (rm {path})"
        )

    def write_atomic(self, name: str, text: str) -> None:
        """Replace `name` with `text` at once: readers see the old or the new file, whole."""
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd=self.fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    # records -----------------------------------------------------------------------------

    def records(self) -> list[ProcessRecord]:
        """The process records; malformed entries are dropped. Read under :meth:`lock`."""
        text = self.read_text(RECORDS)
        if not text:
            return []
        try:
            data = json.loads(text)
        except ValueError:
            return []
        if not isinstance(data, list):
            return []
        return [r for r in map(ProcessRecord.from_json, data) if r is not None]

    def save(self, records: list[ProcessRecord]) -> None:
        """Write the process records (remove the file when none); call under :meth:`lock`."""
        if records:
            self.write_atomic(RECORDS, json.dumps([r.to_json() for r in records], indent=2))
        else:
            self.unlink(RECORDS)

    # cluster directories -----------------------------------------------------------------

    def make_cluster_dir(self, name: str) -> Path:
        """A new, private directory for one cluster's logs and scheduler file."""
        if not _plain_name(name):
            raise ValueError(f"not a plain directory name: {name!r}")
        os.mkdir(name, 0o700, dir_fd=self.fd)
        return self.path / name

    def open_log(self, cluster: str, name: str) -> int:
        """A new log file in a cluster directory, opened for appending without following
        symlinks; the caller closes the returned descriptor."""
        dfd = open_nofollow(cluster, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        try:
            return open_nofollow(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, dir_fd=dfd
            )
        finally:
            os.close(dfd)

    def cluster_dirs(self) -> list[str]:
        """Names of the cluster directories, oldest first."""
        names = []
        for entry in os.scandir(self.fd):
            if entry.name.startswith(("head-", "join-")) and entry.is_dir(follow_symlinks=False):
                names.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
        return [name for _, name in sorted(names)]

    def remove_cluster_dir(self, name: str) -> bool:
        """Remove a cluster directory and its logs (never following a symlink out of it)."""
        if not _plain_name(name):
            return False
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False
        try:
            shutil.rmtree(name, dir_fd=self.fd)
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise
        return True

    def prune(self, keep: int, in_use: set[str]) -> list[str]:
        """Remove all but the newest `keep` cluster directories no record refers to."""
        unused = [n for n in self.cluster_dirs() if n not in in_use]
        doomed = unused[: max(0, len(unused) - keep)]
        for name in doomed:
            self.remove_cluster_dir(name)
        return doomed
