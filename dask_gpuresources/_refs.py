"""Object refs and the one ordered sender: ``get``, ``wait``, ``put``, ``cancel``.

An :class:`ObjectRef` wraps a Dask future (a task's, or ``put``'s scattered value) or an
actor call's future. ``.remote()`` calls leave through the session's :class:`Batcher`, the
one ordered sender: a call never reaches the scheduler before the calls it depends on, and
a call that cannot be sent fails only its own ref.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import dask
import distributed
from distributed import Client, Future

from . import _context, _runtime
from ._wire import pickled
from .exceptions import ActorDiedError, GetTimeoutError, TaskCancelledError

logger = logging.getLogger("dask_gpuresources.api")

__all__ = ["Batcher", "Failed", "ObjectRef", "cancel", "get", "put", "sender", "wait"]


class Failed:
    """A future that already failed (an actor call that could not be sent)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def done(self) -> bool:
        return True

    def result(self, timeout: Any = None) -> Any:
        raise self.exc


class ObjectRef:
    """A reference to a remote value: what ``f.remote()`` and ``put`` return.

    Pass it to :func:`get`, :func:`wait`, or as an argument to other remote calls (it is
    resolved before the call runs, also inside lists and dicts).
    """

    __slots__ = ("_future", "_id", "_sent")

    def __init__(self, future: Any, id: str) -> None:
        self._future = future
        self._id = id
        # For a call that waits for actor calls' values before it is sent: set once it was
        # handed to the sender (or failed); None for every other ref.
        self._sent: threading.Event | None = None

    @property
    def future(self) -> Any:
        """The Dask future underneath (a ``distributed.Future`` for tasks and ``put``)."""
        return self._future

    def task_id(self) -> str:
        """The Dask key of the task that produces the value (or of the actor call)."""
        return self._id

    hex = task_id

    def done(self) -> bool:
        return self._future.done()

    def __await__(self):
        """``await ref`` in an async driver: the value, without blocking the event loop."""
        return asyncio.get_running_loop().run_in_executor(None, get, self).__await__()

    def __repr__(self) -> str:
        return f"ObjectRef({self._id})"

    def __reduce__(self):
        if isinstance(self._future, Future):
            return ObjectRef, (self._future, self._id)
        raise TypeError(
            "an actor call's ObjectRef cannot be sent to another task; pass its value "
            "(get(ref)) instead"
        )


def unwrap(value: Any) -> Any:
    """Object refs to what Dask resolves before a task runs (futures), in any nesting."""
    if isinstance(value, ObjectRef):
        if isinstance(value._future, Future):
            return value._future
        return value._future.result()  # an actor call's value
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(unwrap(v) for v in value)
    if type(value) is dict:
        return {k: unwrap(v) for k, v in value.items()}
    return value


def waits(value: Any) -> bool:
    """Whether ``value`` holds a ref that a task cannot depend on yet: an actor call not yet
    answered, or a call still waiting to be sent (see :meth:`Batcher.add_when_ready`)."""
    return _any_ref(value, _unsent)


def _unsent(ref: ObjectRef) -> bool:
    if ref._sent is not None:
        return not ref._sent.is_set()
    return not isinstance(ref._future, Future) and not ref._future.done()


def _any_ref(value: Any, test: Callable[[ObjectRef], bool]) -> bool:
    """Whether ``test`` holds for a ref in ``value``, in the nestings :func:`unwrap` follows."""
    if isinstance(value, ObjectRef):
        return test(value)
    if type(value) in (list, tuple, set, frozenset):
        return any(_any_ref(v, test) for v in value)
    if type(value) is dict:
        return any(_any_ref(v, test) for v in value.values())
    return False


def _wait_for(value: Any) -> None:
    """Block until :func:`waits` is false for ``value`` (actor calls' errors propagate)."""
    if isinstance(value, ObjectRef):
        if value._sent is not None:
            value._sent.wait()
        elif not isinstance(value._future, Future):
            value._future.result()
    elif type(value) in (list, tuple, set, frozenset):
        for v in value:
            _wait_for(v)
    elif type(value) is dict:
        for v in value.values():
            _wait_for(v)


def has_refs(value: Any) -> bool:
    """Whether ``value`` holds an ObjectRef, in the nestings :func:`unwrap` follows."""
    return _any_ref(value, _always)


def _always(ref: ObjectRef) -> bool:
    return True


def dumps(value: Any) -> bytes:
    """An actor call's ``(args, kwargs)`` as one pickle (unpickled where the method runs)."""
    return pickled(value)


def values_of(value: Any) -> Any:
    """Object refs replaced by their values, in any nesting (for actor calls)."""
    if isinstance(value, ObjectRef):
        return get(value)
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(values_of(v) for v in value)
    if type(value) is dict:
        return {k: values_of(v) for k, v in value.items()}
    return value


def _as_refs(refs: Any, what: str) -> tuple[list[ObjectRef], bool]:
    if isinstance(refs, ObjectRef):
        return [refs], True
    if isinstance(refs, Iterable) and not isinstance(refs, (str, bytes, dict)):
        refs = list(refs)
        bad = [r for r in refs if not isinstance(r, ObjectRef)]
        if not bad:
            return refs, False
        raise TypeError(
            f"{what}() takes ObjectRefs, got {type(bad[0]).__name__}: {bad[0]!r}; pass what "
            f"f.remote() returned, e.g. {what}([f.remote(1), f.remote(2)])"
        )
    raise TypeError(
        f"{what}() takes an ObjectRef or a list of them, got {type(refs).__name__}: {refs!r}; "
        f"use {what}(f.remote())"
    )


def get(refs: ObjectRef | list[ObjectRef], *, timeout: float | None = None) -> Any:
    """The value(s) of object refs, waiting for them.

    Parameters
    ----------
    refs
        One ``ObjectRef`` (returns its value) or a list (returns a list of values).
    timeout
        Seconds to wait at most; then :class:`GetTimeoutError` (a ``TimeoutError``).

    Raises
    ------
    Exception
        The task's own exception, with its type and remote traceback.

    Examples
    --------
    >>> get(f.remote(1))  # doctest: +SKIP
    2
    """
    items, single = _as_refs(refs, "get")
    if _in_event_loop():
        raise RuntimeError(
            "get() blocks, and it was called inside a running event loop (an async "
            "function); use 'await ref' (or 'await asyncio.gather(*refs)') there instead"
        )
    _runtime.flush()
    deadline = None if timeout is None else time.monotonic() + timeout
    futures = [r._future for r in items if isinstance(r._future, Future)]
    gathered: dict[str, Any] = {}
    if futures:
        # one wait and one gather for all task results, not a round trip per ref
        try:
            distributed.wait(futures, timeout=timeout)
        except concurrent.futures.CancelledError:
            pass  # named below, with the key
        except TimeoutError:
            pending = [f.key for f in futures if not f.done()]
            raise GetTimeoutError(
                f"get() timed out after {timeout} s: {len(pending)} of {len(items)} "
                f"object(s) not ready, e.g. {pending[0]!r}"
            ) from None
        for f in futures:
            if f.status == "cancelled":
                raise TaskCancelledError(f.key, cancel_reason(f))
        try:
            values = futures[0].client.gather(futures)
        except concurrent.futures.CancelledError:
            cancelled = [f for f in futures if f.status == "cancelled"] or futures[:1]
            raise TaskCancelledError(cancelled[0].key, cancel_reason(cancelled[0])) from None
        gathered = {f.key: v for f, v in zip(futures, values, strict=True)}
    values = []
    for ref in items:
        if isinstance(ref._future, Future):
            values.append(gathered[ref._future.key])
            continue
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
        try:
            values.append(ref._future.result(timeout=remaining))
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise GetTimeoutError(
                f"get() timed out after {timeout} s waiting for {ref._id!r}"
            ) from None
        except OSError as err:  # an actor call whose worker is gone
            actor = ref._id.split(".")[0]
            raise ActorDiedError(actor, None, f"its worker is gone: {err}") from None
    return values[0] if single else values


def wait(
    refs: list[ObjectRef],
    *,
    num_returns: int = 1,
    timeout: float | None = None,
    fetch_local: bool = True,
) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Wait until ``num_returns`` of ``refs`` are ready, or ``timeout`` seconds.

    Returns
    -------
    (ready, not_ready)
        Both in the order of ``refs``; ``ready`` has at most ``num_returns`` refs.
    """
    items, single = _as_refs(refs, "wait")
    _runtime.flush()
    if single:
        raise TypeError("wait() takes a list of ObjectRefs; use wait([ref])")
    if not isinstance(num_returns, int) or not 0 <= num_returns <= len(items):
        raise ValueError(
            f"num_returns must be between 0 and the number of refs ({len(items)}), got "
            f"{num_returns!r}; use wait(refs, num_returns={max(min(len(items), 1), 0)})"
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.001
    while True:
        ready = [r for r in items if r._future.done()]
        remaining = None if deadline is None else deadline - time.monotonic()
        if len(ready) >= num_returns or (remaining is not None and remaining <= 0):
            break
        pending = [r._future for r in items if not r._future.done()]
        if all(isinstance(f, Future) for f in pending):
            # Dask wakes us when one completes: no polling
            with contextlib.suppress(TimeoutError, concurrent.futures.CancelledError):
                distributed.wait(pending, timeout=remaining, return_when="FIRST_COMPLETED")
        elif all(isinstance(f, concurrent.futures.Future) for f in pending):
            concurrent.futures.wait(
                pending, timeout=remaining, return_when=concurrent.futures.FIRST_COMPLETED
            )
        else:  # actor calls sent straight away answer through Dask's ActorFuture: poll those
            time.sleep(pause if remaining is None else min(pause, remaining))
            pause = min(pause * 2, 0.02)
    ready = ready[:num_returns]
    chosen = {id(r) for r in ready}
    return ready, [r for r in items if id(r) not in chosen]


def cancel(ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task behind ``ref``, as Ray's ``ray.cancel``.

    A queued task is dropped; a running isolated task's child process is ended and its
    devices go back; ``get(ref)`` then raises :class:`TaskCancelledError`, as do tasks that
    depend on it. A running thread task cannot be interrupted: its result is dropped.

    Parameters
    ----------
    force
        Accepted for Ray's signature; Dask's ``force=True`` also cancels a task other
        clients still want.
    recursive
        Ray cancels the tasks the cancelled one submitted; here those are cancelled when
        they depend on it (Dask cancels dependents), and not otherwise.

    Notes
    -----
    Cancelling an actor method call is not supported (Ray refuses ``force`` there too):
    kill the actor with :func:`kill`.

    Examples
    --------
    >>> ref = slow.remote()  # doctest: +SKIP
    >>> cancel(ref)  # doctest: +SKIP
    """
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"cancel() takes an ObjectRef, got {type(ref).__name__}: {ref!r}")
    if not isinstance(ref._future, Future):
        raise TypeError(
            f"{ref!r} is an actor method call; actor calls cannot be cancelled, kill the "
            "actor instead: kill(actor)"
        )
    _runtime.flush()  # a call still in the sender's hands is sent first, then cancelled
    ref._future.client.cancel([ref._future], force=force)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def put(value: Any) -> ObjectRef:
    """Store ``value`` in the cluster's memory; returns a ref to pass to remote calls."""
    _runtime.flush()
    (future,) = _runtime.client(implicit=True).scatter([value], hash=False)
    return ObjectRef(future, future.key)


_sender_lock = threading.Lock()


def sender(runtime: _runtime.Runtime) -> Batcher:
    """The session's one ordered sender of ``.remote()`` calls, made on its first call."""
    batcher = runtime.batcher
    if batcher is None:
        with _sender_lock:
            if runtime.batcher is None:
                runtime.batcher = Batcher(runtime.client)
            batcher = runtime.batcher
    return batcher


class Batcher:
    """The one ordered sender of ``.remote()`` calls.

    One ``client.submit`` per call costs the scheduler a graph update each (about 2 ms on a
    small machine); consecutive calls with the same function and options go as one
    ``client.map`` instead. A batch leaves when it reaches ``LIMIT`` calls, when anything
    waits on a result (``get``, ``wait``, an actor call, ...), or 1 ms after its first call,
    so nothing is held back.

    Order: whoever sends (the background thread or a caller's :meth:`flush`) holds
    ``sending`` from taking the pending calls to having sent them, so a batch never overtakes
    an earlier one (a task never reaches the scheduler before the tasks it depends on), and
    :meth:`flush` returns only once everything added before it was sent.

    Errors: a call that cannot be sent (an argument or function that does not pickle) fails
    only its own ref, with the original exception, through a task under its key that raises
    it, so tasks that depend on it fail with it too. The sender never dies.
    """

    LIMIT = 512
    DELAY = 0.001

    def __init__(self, client: Client) -> None:
        self.client = client
        self.pending: list[tuple] = []
        self.functions: dict[Callable, Future] = {}
        self.lock = threading.Lock()
        self.sending = threading.Lock()  # held from swap to sent
        self.wake = threading.Condition(self.lock)
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="remote-batcher", daemon=True)
        self.thread.start()
        self.waiting: concurrent.futures.ThreadPoolExecutor | None = None  # add_when_ready

    def add_when_ready(
        self, function: Callable, args: tuple, kwargs: dict, ref: ObjectRef, opts: Any
    ) -> None:
        """:meth:`add` the call once the actor calls among its arguments have answered, from
        a thread of the sender's (``.remote()`` returns at once, as in Ray). An actor call
        that failed fails ``ref`` with its error, and the tasks that depend on ``ref`` too.

        Order: a call waits here for the calls it depends on to be handed to the sender
        (their ``_sent``); calls start waiting in the order they were made, so a pool of
        threads never waits on a call that has no thread.
        """
        ref._sent = threading.Event()
        with self.lock:
            if self.closed:
                raise RuntimeError(
                    "dask_gpuresources was shut down; call init() again before .remote()"
                )
            if self.waiting is None:
                self.waiting = concurrent.futures.ThreadPoolExecutor(
                    self.WAITING_THREADS, thread_name_prefix="remote-waiting"
                )
            self.waiting.submit(self._add_when_ready, function, args, kwargs, ref, opts)

    WAITING_THREADS = 32

    def _add_when_ready(
        self, function: Callable, args: tuple, kwargs: dict, ref: ObjectRef, opts: Any
    ) -> None:
        try:
            try:
                _wait_for((args, kwargs))
                args, kwargs = unwrap(args), unwrap(kwargs)
            except BaseException as exc:
                self._fail(ref, exc)
                return
            with contextlib.suppress(RuntimeError):  # shut down meanwhile: nothing to send
                self.add(function, args, kwargs, ref, opts)
        finally:
            ref._sent.set()

    def add(self, function: Callable, args: tuple, kwargs: dict, ref: ObjectRef, opts: Any):
        with self.lock:
            if self.closed:
                raise RuntimeError(
                    "dask_gpuresources was shut down; call init() again before .remote()"
                )
            self.pending.append((function, args, kwargs, ref, opts))
            full = len(self.pending) >= self.LIMIT
            if len(self.pending) == 1:
                self.wake.notify()
        if full:
            self.flush()

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.pending and not self.closed:
                    self.wake.wait()
                if self.closed:
                    return
            time.sleep(self.DELAY)
            try:
                self.flush()
            except BaseException:  # flush fails refs, not itself; if it ever did, live on
                logger.exception("dask_gpuresources: sending remote calls failed")

    def flush(self) -> None:
        with self.sending:
            with self.lock:
                batch, self.pending = self.pending, []
            start = 0
            for i in range(1, len(batch) + 1):
                if (
                    i == len(batch)
                    or batch[i][0] is not batch[start][0]
                    or batch[i][4] != batch[start][4]
                ):
                    self._send_or_fail(batch[start:i])
                    start = i

    def _shipped(self, function: Callable) -> Any:
        """The function as data in the cluster: shipped once, not pickled into every task.

        A function defined in a script is pickled by value; inside each task that would be
        paid for every call, by the scheduler and by the worker. As the result of one small
        task, each worker receives it once and keeps it in memory.

        A task, not scattered data: Dask keeps one replica of a value no task is waiting
        for (its memory manager undoes a broadcast), and scattered data that is lost with
        its worker cannot be made again, so every call of the function would fail with the
        host that held it. A task's result is computed again elsewhere.
        """
        future = self.functions.get(function)
        if future is None or future.status in ("lost", "error", "cancelled"):
            name = getattr(function, "__name__", "function")
            (future,) = self.client.map(
                _the_function, [function], key=[f"function-{name}-{uuid.uuid4().hex}"], pure=False
            )
            self.functions[function] = future
        return future

    def _send_or_fail(self, run: list[tuple]) -> None:
        try:
            self._send(run)
        except Exception as exc:
            if len(run) > 1:  # find the calls that cannot be sent; send the others
                for call in run:
                    self._send_or_fail([call])
                return
            self._fail(run[0][3], original_error(exc))

    def _send(self, run: list[tuple]) -> None:
        function, opts = run[0][0], run[0][4]
        shipped = self._shipped(function)
        with dask.annotate(**opts.annotations()):
            self.client.map(
                _context.invoke,
                [shipped] * len(run),
                [c[1] for c in run],
                [c[2] for c in run],
                key=[c[3]._id for c in run],
                resources=opts.dask_resources() or None,
                retries=opts.max_retries,
                pure=False,
            )

    def _fail(self, ref: ObjectRef, exc: BaseException) -> None:
        """Fail ``ref`` with ``exc``: a task under its key raises it (dependents fail too)."""
        try:
            try:
                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            # map, not submit: submit sends nothing for a key this client already knows
            self.client.map(_reraise, [exc], key=[ref._id], pure=False)
        except Exception:  # the client itself is gone: fail the ref where it is
            ref._future = Failed(exc)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush()
        with self.lock:
            self.closed = True
            self.wake.notify()
            waiting = self.waiting
        if waiting is not None:  # calls still waiting for actor calls are dropped
            waiting.shutdown(wait=False, cancel_futures=True)
        self.thread.join(timeout=10)


def cancel_reason(future: Future) -> str | None:
    """Why Dask cancelled ``future`` (``"lost dependencies"`` and the like), from the
    ``FutureCancelledError`` its ``result()`` raises; None when it does not say."""
    try:
        future.result(timeout=5)
    except concurrent.futures.CancelledError as exc:
        return getattr(exc, "msg", None) or None
    except Exception:
        return None
    return None


def _the_function(function: Callable) -> Callable:
    return function


def _reraise(exc: BaseException) -> Any:
    raise exc


def original_error(exc: BaseException) -> BaseException:
    """The error under Dask's "Could not serialize object of type ..." wrapper."""
    while isinstance(exc, TypeError) and exc.__cause__ is not None:
        text = str(exc.args[0]) if exc.args else ""
        if not text.startswith("Could not serialize"):
            break
        exc = exc.__cause__
    return exc
