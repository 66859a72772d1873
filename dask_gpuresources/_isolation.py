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
- An isolated actor has a child of its own for its whole life, driven by the worker's event
  loop (:class:`IsolatedActor`): its construction, its calls, its kill (SIGTERM, then SIGKILL
  after ``kill-grace-period``) and the watch on its process, whose exit in any state fails
  the actor's calls and tells the worker to end its hold.

The wire format is :mod:`dask_gpuresources._wire` (pure framing and pickling), the child's
main loop :mod:`dask_gpuresources._child` (it imports neither ``distributed`` nor the worker
modules); this module is the worker's side: the pool of warm children bound to leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
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
from .exceptions import ActorDiedError, IsolatedTaskError, _describe_exit

__all__ = ["EXECUTOR_NAME", "IsolatedActor", "IsolatedExecutor", "IsolatedRun"]

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
    kill_grace
        Seconds a killed isolated actor's child has between SIGTERM and SIGKILL.
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
        kill_grace: float = 3.0,
    ) -> None:
        self._resolve = resolve
        self.kill_grace = kill_grace
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
        self._actors: dict[Hashable, IsolatedActor] = {}
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
            children += list(self._running.values())
            actors = list(self._actors.values())
            self._idle.clear()
            self._actors.clear()
        self._reaper_wake.set()
        for actor in actors:
            actor.kill("its worker closed", grace=0.0)
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
        actor = self._actors.get(key)
        if actor is not None:  # an isolated actor cancelled while it is constructed
            actor.kill("it was killed while its constructor ran")
            return True
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
                *(("actor", a.child) for a in self._actors.values() if a.child is not None),
            ]
        rows = [
            {"pid": c.pid, "devices": list(c.tokens), "state": state, "calls": c.calls}
            for state, c in groups
        ]
        return rows

    # -- actors: one dedicated child each, for the actor's whole life ---------------------

    def start_actor(
        self,
        context: TaskContext,
        cls: type,
        args: tuple,
        kwargs: dict,
        *,
        loop: asyncio.AbstractEventLoop,
        on_death: Callable[[str], None],
    ) -> IsolatedActor:
        """Start a child bound to the actor's devices and construct the actor in it.

        Called from the actor's creation task (a worker thread): the construction runs on
        ``loop`` (the worker's event loop, which owns the actor from now on) and this thread
        waits for it; the constructor's exception is raised here. ``on_death(cause)`` is
        called on the loop if the child dies after its construction, by a kill or not.
        """
        if self._closed:
            raise RuntimeError("the isolated executor has been shut down")
        actor = IsolatedActor(self, context, loop=loop, on_death=on_death)
        with self._lock:
            self._actors[actor.key] = actor
        future = asyncio.run_coroutine_threadsafe(actor.construct(cls, args, kwargs), loop)
        while True:
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                if loop.is_closed():  # the worker went without finishing it
                    actor.kill("its worker closed", grace=0.0)
                    raise RuntimeError("the isolated executor has been shut down") from None

    def _actor_gone(self, actor: IsolatedActor) -> None:
        with self._lock:
            if self._actors.get(actor.key) is actor:
                del self._actors[actor.key]

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


# -- isolated actors --------------------------------------------------------------------------

CONSTRUCTING = "constructing"
READY = "ready"
CALLING = "calling"
DYING = "dying"
DEAD = "dead"


class IsolatedActor:
    """An isolated actor's child process: one state machine, owned by the worker's event loop.

    ``constructing`` -> ``ready`` <-> ``calling``; from any of these, ``kill()`` leads to
    ``dying`` (SIGTERM, then SIGKILL after ``gpuresources.isolation.kill-grace-period``) and
    the child's exit, whatever its cause, to ``dead``. Everything here runs on the loop
    except :meth:`kill` from another thread (it hands off to the loop). The loop watches the
    process itself (a pidfd, or a thread waiting on it where there is none), so a death in any
    state is seen at once, and a call in flight never waits on a socket nobody writes to.

    The socket is closed only on the loop and only when no read or write of it is pending
    (after asyncio has removed its reader): closed from another thread, the loop would keep
    polling a file descriptor that the next socket opened may reuse, and that socket would
    never be read.
    """

    def __init__(
        self,
        executor: IsolatedExecutor,
        context: TaskContext,
        *,
        loop: asyncio.AbstractEventLoop,
        on_death: Callable[[str], None],
    ) -> None:
        self.key: Hashable = context.actor if context.actor is not None else context.key
        self.context = context
        self.state = CONSTRUCTING
        self.child: _Child | None = None
        #: why it is dying or dead, for ActorDiedError
        self.cause: str | None = None
        self.exitcode: int | None = None
        self._executor = executor
        self._loop = loop
        self._on_death = on_death
        self._kill_reason: str | None = None
        self._grace = executor.kill_grace
        self._in_flight = False  # a call (or the construction) is reading or writing the socket
        self._pidfd: int | None = None
        self._sigkill: asyncio.TimerHandle | None = None
        self._gone: asyncio.Future | None = None  # created on the loop
        self._constructed = False

    # -- the states ------------------------------------------------------------------------

    async def construct(self, cls: type, args: tuple, kwargs: dict) -> IsolatedActor:
        """Start the child and run the constructor in it; on the loop."""
        loop = self._loop
        self._gone = loop.create_future()
        try:
            # A process start blocks for milliseconds: off the loop.
            child = await loop.run_in_executor(None, self._executor._start, self.context.tokens)
        except BaseException as err:
            self._ended(None, f"its isolated child process could not start: {err}")
            raise
        self.child = child
        self._watch()
        if self.state is DYING:  # killed while its process was starting
            self._signal(signal.SIGKILL if self._grace <= 0 else signal.SIGTERM)
            self._arm_sigkill()
        if self.state is not CONSTRUCTING:
            raise await self._error_when_gone()
        child.sock.setblocking(False)
        self._in_flight = True
        try:
            op, pid = _wire.loads(await _wire.arecv(child.sock))
            await _wire.asend(
                child.sock, _wire.dumps(("actor-init", self.context, cls, args, kwargs))
            )
            op, value = _wire.loads(await _wire.arecv(child.sock))
        except (EOFError, OSError) as err:
            self._socket_done()
            raise await self._error_when_gone() from err
        except BaseException:
            self._socket_done()
            self.kill("its construction was interrupted")
            raise
        self._socket_done()
        if op == "error":
            self.kill("its constructor raised")
            await asyncio.shield(self._gone)  # its devices are free when the process is gone
            raise value
        if self.state is not CONSTRUCTING:  # killed just as the constructor returned
            raise await self._error_when_gone()
        self.state = READY
        self._constructed = True
        return self

    async def call(self, context: TaskContext, name: str, payload: bytes) -> Any:
        """Run method ``name`` in the child; the caller runs one call at a time.

        ``payload`` is the caller's pickle of ``(args, kwargs)``: it goes to the child as an
        out-of-band buffer (no copy, no unpickling here), and a large reply is unpickled on
        a thread, so that the event loop never spends more than a few microseconds per call
        whatever the call carries.
        """
        if self.state is not READY:
            raise self._error()
        sock = self.child.sock  # type: ignore[union-attr]
        frames = _wire.dumps(("actor-call", context, name, pickle.PickleBuffer(payload)))
        self.state = CALLING
        self._in_flight = True
        try:
            await _wire.asend(sock, frames)
            reply = await _wire.arecv(sock)
        except (EOFError, OSError) as err:
            self._socket_done()
            raise await self._error_when_gone() from err
        except BaseException:
            # Cancelled mid-call: the child's reply would be read by the next call.
            self._socket_done()
            self.kill("a call to it was cancelled while it ran")
            raise
        self._socket_done()
        if sum(f.nbytes for f in reply) > OFF_LOOP_BYTES:
            op, value = await self._loop.run_in_executor(None, _wire.loads, reply)
        else:
            op, value = _wire.loads(reply)
        if op == "error":
            raise value
        return value

    def kill(self, reason: str, *, grace: float | None = None) -> asyncio.Future | None:
        """End the child: SIGTERM now, SIGKILL once ``grace`` seconds have passed.

        Returns a future (of the loop) that is done once the process is gone, or None when
        called off the loop (the kill is handed to the loop).
        """
        if not self._on_loop():
            if self.child is not None and grace == 0:
                self.child.kill()  # a signal may come from any thread
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(lambda: self.kill(reason, grace=grace))
            return None
        if grace is not None:
            self._grace = grace
        if self.state is DEAD or self.state is DYING:
            if grace == 0:
                self._signal(signal.SIGKILL)
            return self._gone
        self.state = DYING
        self._kill_reason = reason
        if self.child is not None:  # else construct() signals it once it has started
            self._signal(signal.SIGKILL if self._grace <= 0 else signal.SIGTERM)
            self._arm_sigkill()
        return self._gone

    # -- the process -----------------------------------------------------------------------

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _signal(self, signum: int) -> None:
        proc = self.child.proc  # type: ignore[union-attr]
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    def _arm_sigkill(self) -> None:
        if self._sigkill is None and self._grace > 0:
            self._sigkill = self._loop.call_later(self._grace, self._signal, signal.SIGKILL)

    def _watch(self) -> None:
        """Have the loop learn of the child's exit at once, in any state."""
        proc = self.child.proc  # type: ignore[union-attr]
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: a thread waits for it
            loop = self._loop

            def wait() -> None:
                proc.wait()
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._exited)

            threading.Thread(target=wait, name=f"watch-{proc.pid}", daemon=True).start()
        else:
            self._loop.add_reader(self._pidfd, self._exited)

    def _exited(self) -> None:
        """The child's process has ended (on the loop)."""
        if self.state is DEAD:
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        child = self.child
        code = child.proc.wait()  # type: ignore[union-attr]
        if self._kill_reason is not None:
            cause = self._kill_reason
        else:
            cause = (
                f"its isolated child process (pid {child.pid}, CUDA_VISIBLE_DEVICES="  # type: ignore[union-attr]
                f"{','.join(self.context.tokens)!r}) died, {_describe_exit(code)}"
            )
            logger.warning("Isolated actor %r: %s", self.key, cause)
        self._ended(code, cause)
        if self._constructed:  # a construction's failure is its creation task's to report
            self._on_death(cause)

    def _ended(self, code: int | None, cause: str) -> None:
        self.exitcode = code
        self.cause = cause
        self.state = DEAD
        if self._sigkill is not None:
            self._sigkill.cancel()
            self._sigkill = None
        child = self.child
        if child is not None:
            if self._in_flight:
                # Wake the pending read (EOF) without freeing the descriptor: the call that
                # holds it closes it once asyncio has let go of it.
                with contextlib.suppress(OSError):
                    child.sock.shutdown(socket.SHUT_RDWR)
            else:
                child.sock.close()
        self._executor._actor_gone(self)
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(code)

    def _socket_done(self) -> None:
        self._in_flight = False
        if self.state is CALLING:
            self.state = READY
        elif self.state is DEAD:
            self.child.sock.close()  # type: ignore[union-attr]

    async def _error_when_gone(self) -> ActorDiedError:
        """The error for a call or construction that lost its child, once the process is
        gone. Its end of the socket closes as it exits, often a moment before the loop sees
        the exit; a child that closed it and lives on is broken: it is ended."""
        gone = self._gone
        if self.state is not DEAD:
            try:
                await asyncio.wait_for(asyncio.shield(gone), max(self._grace, 1.0))
            except asyncio.TimeoutError:
                self.kill("its isolated child process closed its connection", grace=0.0)
                await asyncio.shield(gone)  # type: ignore[arg-type]
        return self._error()

    def _error(self) -> ActorDiedError:
        cause = self.cause or self._kill_reason or f"it is {self.state}"
        return ActorDiedError(self.key, self._executor._worker_address(), cause)
