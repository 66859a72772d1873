"""Isolated GPU tasks: warm child processes whose ``CUDA_VISIBLE_DEVICES`` is the lease.

A Dask worker runs tasks as threads of one process, and ``CUDA_VISIBLE_DEVICES`` is per
process, so a task that must *see* only its devices (TensorFlow, PyTorch, CuPy all read the
variable once, when they load) has to run in a process of its own. This module provides one:

- :class:`IsolatedExecutor` is a ``concurrent.futures.Executor`` the worker plugin registers
  as ``worker.executors["gpuresources"]``. Dask hands it Dask's own ``_run_task_simple``
  with the task; the executor runs that function on one of its threads with a stand-in for
  the task whose call ships the task and its inputs to a child process and returns what the
  child returns. Dask's own code still builds the result or error message.
- Children are started with ``subprocess`` (so a daemonic Nanny-managed worker may start
  them), with ``CUDA_VISIBLE_DEVICES`` set in their environment before Python starts, and are
  kept warm per device set: a child started for devices ``("1",)`` only ever runs tasks
  leased device 1.
- A child is recycled after ``max_calls`` tasks, or when NVML says it still holds more GPU
  memory than ``recycle-gpu-memory`` after its task; its replacement starts at once. A child
  that dies fails only its task (:class:`~dask_gpuresources.IsolatedTaskError`); one that
  dies while idle fails nothing (the next task gets a fresh one); a cancelled task's child is
  ended and never reused; idle children are reaped; ``shutdown`` ends them all. A child also
  ends itself if the worker process disappears.

The wire format is :mod:`dask_gpuresources._wire` (pure framing and pickling), the child's
main loop :mod:`dask_gpuresources._child` (it imports neither ``distributed`` nor the worker
modules); this module is the worker's side: the pool of warm children bound to leases.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import _wire
from ._context import TaskContext
from .exceptions import IsolatedTaskError

__all__ = ["EXECUTOR_NAME", "IsolatedExecutor", "IsolatedRun"]

logger = logging.getLogger("distributed.gpuresources")

#: Name under which the worker plugin registers the executor (``worker.executors[...]``).
EXECUTOR_NAME = "gpuresources"
#: an isolated actor's reply larger than this is unpickled on a thread, off the event loop
OFF_LOOP_BYTES = 1 << 20

# -- the worker side ------------------------------------------------------------------------


@dataclass(frozen=True)
class IsolatedRun:
    """How to run one task in isolation, decided on the worker's event loop at submit time."""

    key: Hashable
    gpu_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    max_calls: int


class _Child:
    """One child process bound to a device set (``tokens``)."""

    def __init__(
        self,
        tokens: tuple[str, ...],
        *,
        preload: Sequence[str],
        cluster: dict[str, Any] | None = None,
    ) -> None:
        self.tokens = tokens
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(tokens)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (
            f"import sys; sys.path.insert(0, {package_root!r}); "
            "from dask_gpuresources._child import main; main()"
        )
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.sock = ours
        self.pid = self.proc.pid
        self.calls = 0
        self.idle_since = time.monotonic()
        self.ready = False
        self.abort_reason: str | None = None
        init = {"sys_path": list(sys.path), "preload": list(preload), "cluster": cluster}
        _wire.send(ours, _wire.dumps(("init", init)))

    def wait_ready(self) -> None:
        if self.ready:
            return
        op, pid = _wire.loads(_wire.recv(self.sock))
        if op != "ready":
            raise EOFError(f"unexpected first message {op!r}")
        self.ready = True

    def call(self, frames: list[Any]) -> Any:
        _wire.send(self.sock, frames)
        op, value = _wire.loads(_wire.recv(self.sock))
        if op == "error":
            raise value
        return value

    def exitcode(self, wait: float = 2.0) -> int | None:
        try:
            return self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def close(self, timeout: float = 2.0) -> None:
        """Ask the child to leave (EOF), then make sure it did."""
        try:
            self.sock.close()
        except OSError:
            pass
        if self.exitcode(timeout) is None:
            self.kill()
            self.exitcode(timeout)


class _ChildCall:
    """Stands in for a task in Dask's ``_run_task_simple``: calling it runs the task in a child."""

    def __init__(self, executor: IsolatedExecutor, run: IsolatedRun, run_spec: Any) -> None:
        self.executor = executor
        self.run = run
        self.run_spec = run_spec

    def __call__(self, data: dict) -> Any:
        return self.executor._call(self.run, self.run_spec, data)


class IsolatedExecutor(Executor):
    """Runs each task in a warm child process bound to the task's devices.

    Parameters
    ----------
    resolve
        Called on the worker's event loop with a task key; returns its :class:`IsolatedRun`.
    worker_address
        Returns the worker's address, for error messages.
    max_workers
        Threads that wait on children (one per running isolated task).
    idle_timeout
        Seconds an idle child lives before it is ended.
    spare
        Start a replacement as soon as a child is recycled.
    preload
        Modules a fresh child imports before its first task.
    nvml, recycle_gpu_memory
        With both: recycle a child holding more than ``recycle_gpu_memory`` bytes of GPU
        memory after its task.
    cluster
        Returns ``{"scheduler": address, "security": {field: value}}`` for a new child, so
        that ``.remote()`` inside an isolated task can reach the cluster; None: it cannot.
    """

    def __init__(
        self,
        *,
        resolve: Callable[[Hashable], IsolatedRun],
        worker_address: Callable[[], str | None],
        max_workers: int,
        idle_timeout: float,
        spare: bool = True,
        preload: Sequence[str] = (),
        nvml: Any = None,
        recycle_gpu_memory: int | None = None,
        cluster: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self._resolve = resolve
        self._cluster = cluster
        self._worker_address = worker_address
        self._threads = ThreadPoolExecutor(max_workers, thread_name_prefix="gpuresources-isolated")
        self.idle_timeout = idle_timeout
        self.spare = spare
        self.preload = tuple(preload)
        self._nvml = nvml
        self.recycle_gpu_memory = recycle_gpu_memory
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, ...], list[_Child]] = {}
        self._running: dict[Hashable, _Child] = {}
        #: Keys submitted here whose thread has not ended (a count per key): the only keys
        #: a cancel can concern. The worker reports every cancelled task, thread tasks too.
        self._inflight: dict[Hashable, int] = {}
        #: Cancels of in-flight keys that have no child yet; dropped when their task ends.
        self._aborted: dict[Hashable, str] = {}
        self._actors: dict[Hashable, _Child] = {}
        self._closed = False
        self._reaper_wake = threading.Event()
        self._reaper: threading.Thread | None = None
        #: Counters for the benchmark and the logs.
        self.started = 0
        self.recycled = 0
        self.crashed = 0
        self.reaped = 0
        self.died_idle = 0

    # -- Executor ---------------------------------------------------------------------------

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        """Dask calls ``submit(_run_task_simple, run_spec, data, delay)`` on its event loop."""
        if self._closed:
            raise RuntimeError("the isolated executor has been shut down")
        run_spec, *rest = args
        run = self._resolve(run_spec.key)
        with self._lock:
            self._inflight[run.key] = self._inflight.get(run.key, 0) + 1
        try:
            return self._threads.submit(
                self._run_task, run.key, fn, _ChildCall(self, run, run_spec), *rest, **kwargs
            )
        except BaseException:
            self._task_ended(run.key)
            raise

    def _run_task(self, key: Hashable, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        # Whatever ``fn`` does (it may never call for a child), the task's end is recorded.
        try:
            return fn(*args, **kwargs)
        finally:
            self._task_ended(key)

    def _task_ended(self, key: Hashable) -> None:
        with self._lock:
            left = self._inflight.pop(key, 1) - 1
            if left:
                self._inflight[key] = left
            else:
                # A cancel that found no child to end concerned this run only: a later task
                # that reuses the key must not inherit it.
                self._aborted.pop(key, None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """End every child, idle or running, and the threads that wait on them."""
        with self._lock:
            self._closed = True
            children = [c for cs in self._idle.values() for c in cs]
            children += list(self._running.values()) + list(self._actors.values())
            self._idle.clear()
            self._actors.clear()
        self._reaper_wake.set()
        for child in children:
            child.abort_reason = child.abort_reason or "was stopped because its worker closed"
            child.kill()
        for child in children:
            child.close(timeout=5)
        self._threads.shutdown(wait=wait, cancel_futures=cancel_futures)
        if self._reaper is not None and wait:
            self._reaper.join(timeout=5)

    # -- what the worker plugin calls -------------------------------------------------------

    def abort(self, key: Hashable, reason: str) -> bool:
        """End the child running ``key`` (the task was cancelled); True if there was one.

        Only keys submitted here and not yet ended count: the worker reports every
        cancelled task, and a record for a thread task would fail a later isolated task that
        reuses its key. A cancel that comes before Dask submits the task is not recorded;
        that task runs to its end, and Dask discards its result.
        """
        with self._lock:
            if key not in self._inflight:
                return False
            child = self._running.get(key)
            if child is None:
                # Queued, or its child is starting: it fails when it asks for its child.
                self._aborted[key] = reason
                return False
            # Marked under the lock that _checkin takes: a child that abort() has chosen to
            # kill is never put back in the pool, whenever the kill itself lands.
            child.abort_reason = reason
        child.kill()
        return True

    def children(self) -> list[dict]:
        """One row per live child: pid, devices, state, tasks run."""
        with self._lock:
            groups = [
                *(("idle", c) for cs in self._idle.values() for c in cs),
                *(("running", c) for c in self._running.values()),
                *(("actor", c) for c in self._actors.values()),
            ]
        rows = [
            {"pid": c.pid, "devices": list(c.tokens), "state": state, "calls": c.calls}
            for state, c in groups
        ]
        return rows

    # -- actors: one dedicated child each, for the actor's whole life ---------------------

    def start_actor(self, context: TaskContext, cls: type, args: tuple, kwargs: dict) -> _Child:
        """Start a child bound to the actor's devices and construct the actor in it.

        Blocks until the constructor returns (call it from the actor's creation task); the
        constructor's exception is raised here.
        """
        if self._closed:
            raise RuntimeError("the isolated executor has been shut down")
        child = self._start(context.tokens)
        with self._lock:
            self._actors[context.key] = child
        try:
            child.wait_ready()
            child.call(_wire.dumps(("actor-init", context, cls, args, kwargs)))
        except (EOFError, OSError) as err:
            self.end_actor(context.key)
            raise self._died(child, IsolatedRun(context.key, (), context.tokens, 0)) from err
        except BaseException:
            self.end_actor(context.key)
            raise
        return child

    async def acall_actor(
        self, child: _Child, context: TaskContext, name: str, payload: bytes
    ) -> Any:
        """Run method ``name`` of the actor hosted by ``child``, from the worker's event loop.

        ``payload`` is the caller's pickle of ``(args, kwargs)``: it goes to the child as an
        out-of-band buffer (no copy, no unpickling here), and a large reply is unpickled on
        a thread, so that the event loop never spends more than a few microseconds per call
        whatever the call carries. The child's socket is non-blocking; the caller runs one
        call at a time per actor.
        """
        frames = _wire.dumps(("actor-call", context, name, pickle.PickleBuffer(payload)))
        try:
            await _wire.asend(child.sock, frames)
            reply = await _wire.arecv(child.sock)
            if sum(f.nbytes for f in reply) > OFF_LOOP_BYTES:
                op, value = await asyncio.get_running_loop().run_in_executor(
                    None, _wire.loads, reply
                )
            else:
                op, value = _wire.loads(reply)
        except (EOFError, OSError) as err:
            child.kill()
            from .exceptions import ActorDiedError

            reason = child.abort_reason or (
                f"its isolated child process (pid {child.pid}, CUDA_VISIBLE_DEVICES="
                f"{','.join(child.tokens)!r}) ended with exit code {child.proc.poll()}"
            )
            raise ActorDiedError(context.actor, self._worker_address(), reason) from err
        if op == "error":
            raise value
        return value

    def end_actor(self, key: Hashable, reason: str = "it was killed") -> None:
        """End the child of actor ``key`` (killed, released, or its worker closing)."""
        with self._lock:
            child = self._actors.pop(key, None)
        if child is not None:
            child.abort_reason = child.abort_reason or reason
            child.kill()
            threading.Thread(target=child.close, daemon=True).start()  # reap it

    # -- running a task (on one of the executor's threads) ----------------------------------

    def _call(self, run: IsolatedRun, run_spec: Any, data: dict) -> Any:
        context = TaskContext(run.key, run.gpu_ids, run.tokens, self._worker_address())
        frames = _wire.dumps(("run", context, run_spec, data))
        child = self._checkout(run)
        try:
            result = child.call(frames)
        except (EOFError, OSError) as err:
            self._lost(child, run)
            raise self._died(child, run) from err
        except BaseException:
            self._checkin(child, run)
            raise
        self._checkin(child, run)
        return result

    def _checkout(self, run: IsolatedRun) -> _Child:
        for attempt in (1, 2):
            with self._lock:
                refused = self._refusal(run)
                child, dead = (None, []) if refused else self._take_idle(run.tokens)
                if child is not None:
                    self._running[run.key] = child
            self._discard_dead(dead)
            if refused is not None:
                raise refused
            if child is None:
                fresh = self._start(run.tokens)
                # Checked again with the claim, in one hold of the lock: a cancel while the
                # child was starting is either recorded (seen here) or finds it running.
                with self._lock:
                    refused = self._refusal(run)
                    if refused is None:
                        self._running[run.key] = fresh
                    elif not self._closed:  # still warm for the next task on these devices
                        fresh.idle_since = time.monotonic()
                        self._idle.setdefault(fresh.tokens, []).append(fresh)
                        self._ensure_reaper()
                if refused is not None:
                    if self._closed:
                        fresh.close()
                    raise refused
                child = fresh
            try:
                child.wait_ready()
                return child
            except (EOFError, OSError) as err:
                # A spare that died while waiting (or a child that could not start): one
                # more try with a fresh process, then the task fails with the reason.
                self._lost(child, run)
                if child.abort_reason is not None:
                    raise self._died(child, run) from err
                if attempt == 2:
                    raise self._died(child, run, "could not start") from err
        raise AssertionError("unreachable")

    def _refusal(self, run: IsolatedRun) -> Exception | None:
        """Why ``run`` may not have a child (closed, or cancelled while queued); lock held."""
        if self._closed:
            return RuntimeError("the isolated executor has been shut down")
        aborted = self._aborted.pop(run.key, None)
        if aborted is not None:
            return IsolatedTaskError(
                run.key, self._worker_address(), run.tokens, None, None, aborted
            )
        return None

    def _take_idle(self, tokens: tuple[str, ...]) -> tuple[_Child | None, list[_Child]]:
        """A live idle child for ``tokens``, and the dead ones met on the way; lock held.

        An idle child can die (the OOM killer, an operator's ``kill``); handed to a task, its
        death would be blamed on that task.
        """
        pool = self._idle.get(tokens)
        dead = []
        while pool:
            child = pool.pop()
            if child.proc.poll() is None:
                return child, dead
            dead.append(child)
        self._idle.pop(tokens, None)
        return None, dead

    def _discard_dead(self, dead: Sequence[_Child]) -> None:
        """Let go of idle children that died: log it, and reap their processes."""
        for child in dead:
            self.died_idle += 1
            logger.warning(
                "Isolated child pid %d (CUDA_VISIBLE_DEVICES=%s) died while idle, exit code "
                "%s; the next task on these devices gets a fresh one",
                child.pid,
                ",".join(child.tokens),
                child.proc.returncode,
            )
            child.close()

    def _checkin(self, child: _Child, run: IsolatedRun) -> None:
        child.calls += 1
        reason = None
        if run.max_calls and child.calls >= run.max_calls:
            reason = f"after {child.calls} task(s) (max_calls={run.max_calls})"
        elif self._nvml is not None and self.recycle_gpu_memory is not None:
            held = self._gpu_memory(child)
            if held is not None and held > self.recycle_gpu_memory:
                reason = (
                    f"because it still holds {held / 2**20:.0f} MiB of GPU memory after task "
                    f"{run.key!r} (recycle-gpu-memory: {self.recycle_gpu_memory / 2**20:.0f} MiB)"
                )
                logger.info("Recycling isolated child pid %d %s", child.pid, reason)
        with self._lock:
            self._running.pop(run.key, None)
            closed = self._closed
            # abort() marks a child under this lock before it kills it, so a marked child is
            # dead or about to be; one that ended after answering is no use either.
            lost = child.abort_reason is not None or child.proc.poll() is not None
            if reason is None and not closed and not lost:
                child.idle_since = time.monotonic()
                self._idle.setdefault(child.tokens, []).append(child)
                self._ensure_reaper()
                return
        child.close()
        if lost:  # as for a child lost mid-task: the next task starts one when it needs it
            return
        self.recycled += reason is not None
        if self.spare and not closed:
            spare = self._start(child.tokens)
            with self._lock:
                if self._closed:
                    spare.kill()
                else:
                    self._idle.setdefault(spare.tokens, []).append(spare)

    def _gpu_memory(self, child: _Child) -> int | None:
        try:
            return self._nvml.process_memory(child.pid)
        except Exception as err:  # NVML gone: stop asking
            logger.info("Not checking isolated children's GPU memory any more: %s", err)
            self._nvml = None
            return None

    def _lost(self, child: _Child, run: IsolatedRun) -> None:
        with self._lock:
            if self._running.get(run.key) is child:
                del self._running[run.key]
        child.kill()

    def _died(self, child: _Child, run: IsolatedRun, reason: str | None = None) -> Exception:
        code = child.exitcode()
        if reason is None:
            reason = child.abort_reason
        if reason is None:
            self.crashed += 1
            reason = "crashed"
            logger.warning(
                "Isolated child pid %d (CUDA_VISIBLE_DEVICES=%s) died running task %r, "
                "exit code %s",
                child.pid,
                ",".join(child.tokens),
                run.key,
                code,
            )
        return IsolatedTaskError(
            run.key, self._worker_address(), child.tokens, child.pid, code, reason
        )

    def _start(self, tokens: tuple[str, ...]) -> _Child:
        child = _Child(
            tokens, preload=self.preload, cluster=None if self._cluster is None else self._cluster()
        )
        self.started += 1
        return child

    # -- reaping idle children --------------------------------------------------------------

    def _ensure_reaper(self) -> None:
        # Called with the lock held.
        if self._reaper is None and self.idle_timeout > 0:
            self._reaper = threading.Thread(
                target=self._reap_forever, name="gpuresources-reaper", daemon=True
            )
            self._reaper.start()

    def _reap_forever(self) -> None:
        interval = min(max(self.idle_timeout / 4, 0.05), 5.0)
        while not self._reaper_wake.wait(interval):
            self.reap()

    def reap(self) -> int:
        """End children idle longer than ``idle_timeout``, drop dead ones; returns how many."""
        deadline = time.monotonic() - self.idle_timeout
        stale: list[_Child] = []
        dead: list[_Child] = []
        with self._lock:
            for tokens, pool in list(self._idle.items()):
                keep = []
                for c in pool:
                    if c.proc.poll() is not None:
                        dead.append(c)
                    elif c.idle_since <= deadline:
                        stale.append(c)
                    else:
                        keep.append(c)
                if keep:
                    self._idle[tokens] = keep
                else:
                    del self._idle[tokens]
        self.reaped += len(stale) + len(dead)
        self._discard_dead(dead)
        for child in stale:
            child.close()
        return len(stale) + len(dead)
