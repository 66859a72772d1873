"""The local cluster :func:`dask_gpuresources.init` starts: a scheduler in this process and
worker processes holding this machine's devices.

Each local worker is a Dask ``Nanny`` in a process started with ``subprocess`` (not
``multiprocessing``, which would re-import the user's script) before the scheduler, so that
its imports overlap the scheduler's start. The Nanny starts the worker and starts it again
when it dies (a task calling ``os._exit``, the OOM killer) or when ``client.restart()`` asks,
so the cluster keeps its declared GPUs. :func:`wait_for_workers` watches the processes and
raises with a failed worker's last stderr lines.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
from distributed import Client, Scheduler, SpecCluster
from distributed.deploy.spec import ProcessInterface
from distributed.deploy.subprocess import SubprocessWorker

from ._requests import neighbours, whole_number

__all__ = ["START_TIMEOUT", "start", "wait_for_workers"]

#: Seconds init() waits for its local workers to connect before it gives up.
START_TIMEOUT = 60.0


def start(
    num_gpus: Any, num_cpus: Any, *, dashboard: bool, security: Any, options: dict
) -> SpecCluster:
    """The local cluster for ``init(num_gpus=..., num_cpus=...)`` (``None``: detect)."""
    gpus = _detected_gpus() if num_gpus is None else _check_count("num_gpus", num_gpus)
    cpus = os.cpu_count() or 1 if num_cpus is None else _check_count("num_cpus", num_cpus)
    return _local_cluster(gpus, max(cpus, gpus, 1), dashboard, security, dict(options))


def _check_count(name: str, value: Any) -> int:
    whole = whole_number(value, whole_floats=True)
    if whole is not None:
        return whole
    near = neighbours(value)
    if near is not None and near[0] >= 0:
        raise ValueError(
            f"{name} must be a whole number (a machine has whole devices), got {value!r}; "
            f"use {name}={near[0]} or {name}={near[1]}"
        )
    raise ValueError(f"{name} must be a whole number >= 0, got {value!r}; use {name}=4")


def _detected_gpus() -> int:
    from ._devices import visible_devices
    from ._nvml import default_backend, detect

    return detect(default_backend(), visible_devices()).count


def _worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    # The driver's import path, as multiprocessing would hand it on: modules next to the
    # user's script (or added to sys.path at run time) import on the worker too.
    paths = [p for p in sys.path if p] + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra or {})
    return env


def _spawn_worker_process(env: dict[str, str] | None = None) -> subprocess.Popen:
    """A worker process that imports Dask now and waits for its scheduler on stdin.

    Its stderr goes on to ours, line by line, and the last lines are kept on the process
    (``stderr_tail``) for the error :func:`init` raises when the worker fails to start.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "dask_gpuresources._local_worker"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_worker_env(env),
    )
    process.stderr_tail = collections.deque(maxlen=200)
    threading.Thread(
        target=_tee, args=(process,), name=f"worker-stderr-{process.pid}", daemon=True
    ).start()
    return process


def _tee(process: subprocess.Popen) -> None:
    for raw in iter(process.stderr.readline, b""):
        line = raw.decode(errors="replace")
        process.stderr_tail.append(line.rstrip("\n"))
        with contextlib.suppress(Exception):
            sys.stderr.write(line)
            sys.stderr.flush()
    with contextlib.suppress(OSError):
        process.stderr.close()


def wait_for_workers(client: Client, cluster: SpecCluster, timeout: float) -> None:
    """Wait until every local worker connected; raise if one ended or time ran out."""
    expected = len(cluster.worker_spec)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.wait_for_workers(expected, timeout=0.25)
            return
        except TimeoutError:
            pass
        for name, worker in cluster.workers.items():
            process = getattr(worker, "process", None)
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"the local worker {name} (pid {process.pid}) ended with exit code "
                    f"{process.returncode} before it connected to the scheduler; its last "
                    f"lines of stderr:\n{_tail(process)}"
                )
        if time.monotonic() > deadline:
            tails = "\n".join(
                _tail(w.process) for w in cluster.workers.values() if getattr(w, "process", None)
            )
            raise RuntimeError(
                f"the local workers did not connect to the scheduler within {timeout:g} s; "
                f"their last lines of stderr:\n{tails}"
            )


def _tail(process: subprocess.Popen) -> str:
    # the reader thread may still be taking the last lines out of the pipe
    deadline = time.monotonic() + 2
    while process.stderr is not None and not process.stderr.closed:
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    lines = list(getattr(process, "stderr_tail", ()))
    # A Nanny's failure to start its worker ends in a long chained traceback: the error that
    # caused it sits far above the last lines, so name every error line first.
    errors = list(dict.fromkeys(line.strip() for line in lines if _ERROR_LINE.match(line)))
    shown = [f"    {line}" for line in errors[:5]]
    if shown:
        shown.append("    ...")
    shown.extend(f"    {line}" for line in lines[-20:])
    return "\n".join(shown) if lines else "    (nothing)"


_ERROR_LINE = re.compile(r"\s*[\w.]*(Error|Exception|Interrupt)\b[^ ]*: ")


def _abandon(process: subprocess.Popen) -> None:
    """End a prestarted worker process that never got its scheduler."""
    with contextlib.suppress(OSError):
        process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


#: Security's fields -> the Dask config keys a worker process builds its Security from
_TLS_CONFIG = {
    "require_encryption": "distributed.comm.require-encryption",
    "tls_ca_file": "distributed.comm.tls.ca-file",
    "tls_ciphers": "distributed.comm.tls.ciphers",
    "tls_client_cert": "distributed.comm.tls.client.cert",
    "tls_client_key": "distributed.comm.tls.client.key",
    "tls_worker_cert": "distributed.comm.tls.worker.cert",
    "tls_worker_key": "distributed.comm.tls.worker.key",
}


def tls_config(security: Any) -> dict[str, Any]:
    """The Dask config that makes a worker process's ``Security()`` equal ``security``.

    Certificates and keys go as they are: file paths, or the PEM text itself for
    ``Security.temporary()`` (Dask's ``Security`` takes either).
    """
    out = {}
    for field, key in _TLS_CONFIG.items():
        value = getattr(security, field, None)
        if value is not None:
            out[key] = value
    return out


class _WorkerProcess(SubprocessWorker):
    """A local worker's Nanny in a process of its own (``dask spec``, run by ``_local_worker``).

    Not ``multiprocessing``: a spawned worker would re-import the user's script (Ray's
    page runs ``init()`` at module level, with no ``if __name__ == "__main__"`` guard).
    :func:`init` starts the process before the scheduler (``prestarted``), so that its
    imports overlap the scheduler's start; a worker the cluster adds later starts its own.
    """

    def __init__(
        self,
        *args: Any,
        env: dict[str, str] | None = None,
        prestarted: list | None = None,
        security: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._env = env  # e.g. this worker's CUDA_VISIBLE_DEVICES
        self._prestarted = prestarted  # a one-element list, emptied when taken
        self._security = security  # the cluster's TLS, handed to the process on stdin

    async def _start(self) -> None:
        if self._prestarted:
            process = self._prestarted.pop()
        else:
            process = _spawn_worker_process(self._env)
        self.process = process
        spec = {"cls": self.worker_class, "opts": self.worker_kwargs}
        message = {"address": self.scheduler, "spec": spec}
        if self._security is not None:
            # On stdin, not in the environment or argv: other users cannot read a pipe.
            message["tls"] = tls_config(self._security)
        line = json.dumps(message) + "\n"
        try:
            process.stdin.write(line.encode())
            process.stdin.close()
        except BrokenPipeError:
            raise RuntimeError(
                f"the local worker process (pid {process.pid}) ended before it started, "
                f"with exit code {process.poll()}"
            ) from None

    async def close(self) -> None:
        if self._prestarted:  # closed before it started: end its prestarted process
            self.process = self._prestarted.pop()
        # SIGTERM first: the worker closes cleanly, ending its isolated children itself.
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            deadline = time.monotonic() + 10  # the Nanny ends its worker, then itself
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if process.poll() is None:
                for child in psutil.Process(process.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                process.kill()
                process.wait()
        self.process = None
        await ProcessInterface.close(self)


def _local_cluster(
    gpus: int, threads: int, dashboard: bool, security: Any, options: dict
) -> SpecCluster:
    """One scheduler in this process and one worker process holding ``gpus`` devices."""
    n_workers = options.pop("n_workers", 1)
    if not isinstance(n_workers, int) or n_workers < 1 or (gpus and gpus % n_workers):
        raise ValueError(
            f"n_workers must be a whole number >= 1 that divides num_gpus={gpus} (each local "
            f"worker gets its own devices), got {n_workers!r}; use n_workers=1"
        )
    scheduler_options = {
        "port": 0,
        "dashboard_address": ":0" if dashboard else None,
        "dashboard": dashboard,
        **({"security": security} if security is not None else {}),
        **options.pop("scheduler_options", {}),
    }
    per = gpus // n_workers
    from ._devices import device_tokens, visible_devices

    # Checked here, before any process starts: a worker declaring more devices than its
    # CUDA_VISIBLE_DEVICES lists would come up without device state.
    machine = device_tokens(gpus, visible_devices())
    workers = {}
    for i in range(n_workers):
        nthreads = max(threads // n_workers, per, 1)
        kwargs: dict[str, Any] = {
            "nthreads": nthreads,
            # CPU slots are the worker's threads, declared so that num_cpus=n holds n of them
            "resources": {"GPU": per, "CPU": nthreads},
            **options.get("worker_options", {}),
        }
        env = None
        if n_workers > 1 and per:
            # distinct devices per worker: slots i*per .. (i+1)*per - 1 of this machine
            tokens = machine[i * per : (i + 1) * per]
            env = {"CUDA_VISIBLE_DEVICES": ",".join(tokens)}
        workers[f"gpu-worker-{i}"] = {
            "cls": _WorkerProcess,
            "options": {
                "worker_class": "distributed.Nanny",
                "worker_kwargs": kwargs,
                "env": env,
                "security": security,
                "prestarted": [_spawn_worker_process(env)],
            },
        }
    try:
        return SpecCluster(
            workers=workers,
            scheduler={"cls": Scheduler, "options": scheduler_options},
            security=security,
            silence_logs=logging.WARNING,
            name="dask_gpuresources",
        )
    except BaseException:
        for spec in workers.values():
            for process in spec["options"]["prestarted"]:
                _abandon(process)
        raise
