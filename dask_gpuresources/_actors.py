"""The worker side of facade actors: the Dask actor that hosts the user's instance.

Every ``@remote`` class becomes a Dask actor of class :class:`ActorHost`. Its constructor runs
in the actor's creation task (the moment the worker leased its devices); from then on:

- the devices stay leased until the actor goes away (the worker plugin holds them, see
  ``GPUAdmission._release_resources``), and the host's finalizer ends its child process then;
- methods run one at a time, in the order each caller issued them, on a thread of the
  actor's own (so different actors on one worker run concurrently, and the worker's event
  loop never waits on user code);
- with ``isolation="process"`` the instance lives in a dedicated child process bound to the
  actor's devices (:class:`~dask_gpuresources._isolation.IsolatedActor`, driven by the
  worker's event loop), and each method call is forwarded there; a kill ends that process
  in any state, and its death in any state fails the calls and ends the hold.

Inside the constructor and every method, ``get_gpu_ids()`` and ``get_runtime_context()``
answer for the actor.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import pickle
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from distributed.worker import get_worker, thread_state

from . import _context
from ._context import TaskContext
from .exceptions import ActorDiedError
from .worker import devices_of

__all__ = ["ActorHost"]


class ActorHost:
    """Hosts one facade actor on a worker (created by Dask as an ``actor=True`` task)."""

    def __init__(self, cls: type, args: tuple, kwargs: dict, isolation: str) -> None:
        worker = get_worker()
        key = thread_state.key
        devices = devices_of(worker)
        ids = tuple(devices.ids_for(key)) if devices is not None else ()
        tokens = tuple(devices.tokens_for(key)) if devices is not None else ()
        self.key: Hashable = key
        self.worker = worker.address
        self.context = TaskContext(key, ids, tokens, worker.address, actor=key)
        self._next: dict[str, int] = collections.defaultdict(int)
        self._turn = asyncio.Condition()
        self._io = asyncio.Lock()  # one call at a time in an isolated actor's child
        self._early = 0  # calls waiting for an earlier one from the same caller
        self._starting = 0  # calls whose task has not yet asked for the child's lock
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"actor-{key}")
        self._instance: Any = None
        self._child: Any = None
        self._dead: str | None = None
        self._devices = devices
        self._closed = False
        executor = devices.executor if devices is not None else None
        if isolation == "process" and executor is not None:
            # Constructed on the worker's event loop, which owns the child from now on (its
            # calls, its kill, the watch on its process); this thread waits for it.
            self._child = executor.start_actor(
                self.context,
                cls,
                args,
                kwargs,
                loop=worker.loop.asyncio_loop,
                on_death=self._child_died,
            )
        else:
            with _context.use(self.context):
                self._instance = cls(*args, **kwargs)
        if devices is not None:
            devices.on_actor_release(key, self.close)

    async def call(self, message: tuple) -> Any:
        """Run ``(caller, seq, method, payload)``: a caller's calls run in ``seq`` order.

        One argument, so that Dask serializes one object per call. ``payload`` is
        ``(args, kwargs)`` pickled by the caller before it took ``seq`` (a call that cannot be
        pickled never takes one); ``method`` None only lets ``seq`` pass (a call whose
        arguments failed after it took its number).
        """
        caller, seq, method, payload = message
        direct = None
        if self._next[caller] < seq:  # arrived before an earlier call: wait for its turn
            self._early += 1
            try:
                async with self._turn:
                    # An actor killed meanwhile wakes its waiters (close()): they fail below.
                    await self._turn.wait_for(
                        lambda: self._next[caller] >= seq or self._dead is not None
                    )
            finally:
                self._early -= 1
        try:
            if method is None:
                return None
            if self._dead is not None:
                raise ActorDiedError(self.key, self.worker, self._dead)
            # The payload is unpickled where the method runs (the actor's thread, or its
            # child), never on the event loop: a call carrying model weights (hundreds of MB)
            # must not stall the worker's heartbeats and every other task's traffic.
            context = TaskContext(
                f"{self.key}.{method}#{seq}",
                self.context.gpu_ids,
                self.context.tokens,
                self.worker,
                actor=self.key,
            )
            if self._child is not None:
                # The child's lock must be asked for in turn order. Awaited right here (no
                # task to create and schedule: a loop iteration off every call) only when
                # nothing can suspend before it (no call waits for its turn) and no earlier
                # call's task has yet to ask; else a task now (tasks start in creation
                # order, and a call asking in place would overtake one not yet started).
                if self._early or self._starting:
                    self._starting += 1
                    future = asyncio.ensure_future(self._call_child(context, method, payload, 1))
                else:
                    direct = self._call_child(context, method, payload)
            else:
                # Submitted before anything else can interleave: calls run in turn order. The
                # copied context carries the worker, so get_worker() works in the method.
                future = asyncio.get_running_loop().run_in_executor(
                    self._thread,
                    contextvars.copy_context().run,
                    self._run,
                    context,
                    method,
                    payload,
                )
        finally:
            self._next[caller] = max(self._next[caller], seq + 1)
            if self._early:
                async with self._turn:
                    self._turn.notify_all()
        if direct is not None:
            return await direct
        return await future

    async def _call_child(
        self, context: TaskContext, method: str, payload: bytes, started: int = 0
    ) -> Any:
        # A task's first step: it asks for the lock now. (A task cancelled before this step
        # leaves the count above zero: later calls then take the task path, in order.)
        self._starting -= started
        async with self._io:
            return await self._child.call(context, method, payload)

    def _run(self, context: TaskContext, method: str, payload: bytes) -> Any:
        if self._dead is not None:  # queued behind a method that was running at kill()
            raise ActorDiedError(self.key, self.worker, self._dead)
        args, kwargs = pickle.loads(payload)
        with _context.use(context):
            result = getattr(self._instance, method)(*args, **kwargs)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return result

    async def _wake(self) -> None:
        async with self._turn:
            self._turn.notify_all()

    def _child_died(self, cause: str) -> None:
        """The isolated child is gone (on the loop): calls fail, and unless the actor was
        closed (its hold then ends with the close), its hold ends now."""
        if self._dead is None:
            self._dead = cause
        if self._early:
            asyncio.ensure_future(self._wake())
        if not self._closed and self._devices is not None:
            self._devices.actor_died(self.key)

    def close(self) -> Any:
        """End the actor: its child process, its thread. Called when Dask releases it.

        Returns a future that is done once a method running on the actor's thread returns,
        or once the isolated child's process is gone (its devices stay leased until then),
        or None when nothing runs on its devices.
        """
        self._closed = True
        self._dead = self._dead or "it was killed or released"
        self._instance = None
        if self._early:
            # Calls waiting for an earlier one that will never come: fail them now.
            asyncio.ensure_future(self._wake())
        if self._child is not None:
            self._thread.shutdown(wait=False)
            return self._child.kill("it was killed or released")
        # Calls queued behind the running one fail at once (see _run); the marker is done
        # when the running one returns.
        drained = self._thread.submit(_nothing)
        self._thread.shutdown(wait=False)
        return drained


def _nothing() -> None:
    return None
