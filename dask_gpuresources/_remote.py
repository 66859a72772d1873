"""Remote functions, actor classes and actor handles: what ``@remote`` makes.

A remote function's ``.remote()`` hands the call to the session's ordered sender (one
``client.map`` per run of calls with the same function and options); an actor class's
``.remote()`` submits a Dask actor hosting the user's instance
(:mod:`dask_gpuresources._actors`). Options are checked when they are given
(``@remote(...)``, ``.options(...)``), and a request no worker can ever hold raises at
``.remote()``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import math
import queue
import threading
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from distributed import Future
from distributed.worker import thread_state

from . import _config, _dask_internals, _runtime
from ._refs import (
    Failed,
    ObjectRef,
    dumps,
    has_refs,
    original_error,
    sender,
    unwrap,
    values_of,
    waits,
)
from ._requests import check_facade_options
from .exceptions import ActorDiedError, InfeasibleRequestError

__all__ = ["ActorClass", "ActorHandle", "RemoteFunction", "kill", "remote"]


def _request(opts: _Options) -> dict[str, float]:
    """What one call or actor needs of a single worker (GPUs rounded up to whole devices)."""
    need = {k: float(v) for k, v in opts.resources.items() if v}
    if opts.num_gpus:
        need["GPU"] = float(math.ceil(opts.num_gpus))
    if opts.num_cpus:
        need["CPU"] = float(opts.num_cpus)
    return need


def _check_feasible(key: str, opts: _Options) -> None:
    """Raise at ``.remote()`` for a request no worker can hold (unless clusters may grow).

    Every resource counts, not only GPUs: Dask would leave such a task waiting silently.
    """
    runtime = _runtime.current
    if runtime is None:
        return
    need = _request(opts)
    if not need:
        return
    shape = tuple(sorted(need.items()))
    if shape in runtime.feasible or _config.get("gpuresources.infeasible") == "wait":
        return
    # asked each time a new shape is seen: workers come and go
    workers = _runtime.capacities(runtime)
    if not workers:
        return  # no worker yet (a cluster scaling up): judged by the workers that join
    if any(all(caps.get(r, 0.0) >= a for r, a in need.items()) for _, caps in workers):
        runtime.feasible.add(shape)
        return
    # name the resource that the most capable worker for it still lacks
    for resource, amount in need.items():
        best, largest = None, 0.0
        for address, caps in workers:
            if caps.get(resource, 0.0) > largest:
                best, largest = address, caps[resource]
        if amount > largest or resource == list(need)[-1]:
            shown = _format(opts.num_gpus) if resource == "GPU" else _number(amount)
            raise InfeasibleRequestError(key, shown, _number(largest), best, resource=resource)


def _number(value: float) -> int | float:
    return int(value) if value == int(value) else value


def _format(amount: Any) -> str:
    from ._requests import format_amount

    return format_amount(amount)


def kill(actor: ActorHandle) -> None:
    """End ``actor`` now: its process ends, its GPUs go back, later calls raise."""
    if not isinstance(actor, ActorHandle):
        raise TypeError(
            f"kill() takes an actor handle, got {type(actor).__name__}; use kill(Counter.remote())"
        )
    _runtime.flush()
    actor._kill()


@dataclass(frozen=True)
class _Options:
    num_gpus: Any = 0
    num_cpus: Any = None
    resources: dict = field(default_factory=dict)
    max_calls: int | None = None
    isolation: str | None = None
    max_retries: int | None = None
    name: str | None = None

    def annotations(self) -> dict:
        isolation = self.isolation or ("process" if self.num_gpus else "thread")
        out: dict[str, Any] = {"isolation": isolation}
        if self.max_calls is not None:
            out["max_calls"] = self.max_calls
        return out

    def dask_resources(self) -> dict:
        out = dict(self.resources)
        if self.num_gpus:
            out["GPU"] = self.num_gpus
        runtime = _runtime.current
        # CPU slots are Dask's CPU resource where workers declare one (init's do); elsewhere
        # a call takes one of the worker's threads, as every Dask task does.
        if self.num_cpus and (runtime is None or runtime.cpu_declared):
            out["CPU"] = self.num_cpus
        return out


_OPTION_NAMES = {f for f in _Options.__dataclass_fields__}


def _options(base: _Options | None, kwargs: dict, example: str) -> _Options:
    unknown = set(kwargs) - _OPTION_NAMES
    if unknown:
        raise TypeError(
            f"unknown option(s) {sorted(unknown)}; the options are {sorted(_OPTION_NAMES)}, "
            f"e.g. {example}"
        )
    opts = replace(base or _Options(), **kwargs)
    if opts.num_gpus is None:
        opts = replace(opts, num_gpus=0)
    num = check_facade_options(
        opts.num_gpus,
        num_cpus=opts.num_cpus,
        resources=opts.resources,
        isolation=opts.isolation,
        max_calls=opts.max_calls,
        max_retries=opts.max_retries,
        example=example,
    )
    return replace(opts, num_gpus=num)


def _key(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex}"


class RemoteFunction:
    """A function decorated with :func:`remote`; call it with ``.remote(*args)``."""

    def __init__(self, function: Callable, options: _Options) -> None:
        self._function = function
        self._opts = options
        functools.update_wrapper(self, function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Remote functions cannot be called directly. Instead of running "
            f"'{self._function.__name__}()', try '{self._function.__name__}.remote()'."
        )

    def options(self, **options: Any) -> RemoteFunction:
        """A copy with some options changed for the calls made through it.

        Examples
        --------
        >>> f.options(num_gpus=2).remote()  # doctest: +SKIP
        """
        return RemoteFunction(
            self._function, _options(self._opts, options, "f.options(num_gpus=1)")
        )

    def remote(self, *args: Any, **kwargs: Any) -> ObjectRef:
        """Submit one call; returns its :class:`ObjectRef` at once."""
        _runtime.client(implicit=True)  # init()'s local cluster if none was started
        opts = self._opts
        key = _key(opts.name or self._function.__name__)
        _check_feasible(key, opts)
        ref = ObjectRef(Future(key, _runtime.current.client), key)
        batcher = sender(_runtime.current)
        if waits((args, kwargs)):  # an actor call's value: sent once it is known
            batcher.add_when_ready(self._function, args, kwargs, ref, opts)
        else:
            batcher.add(self._function, unwrap(args), unwrap(kwargs), ref, opts)
        return ref


# -- actors --------------------------------------------------------------------------------


class ActorClass:
    """A class decorated with :func:`remote`; create actors with ``.remote(*args)``."""

    def __init__(self, cls: type, options: _Options) -> None:
        self._cls = cls
        self._opts = options
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Actors cannot be instantiated directly. Instead of '{self._cls.__name__}()', use "
            f"'{self._cls.__name__}.remote()'."
        )

    def options(self, **options: Any) -> ActorClass:
        """A copy with some options changed for the actors created through it."""
        return ActorClass(self._cls, _options(self._opts, options, "A.options(num_gpus=1)"))

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        """Create an actor; it holds its GPUs from construction until it goes away."""
        from ._actors import ActorHost

        client = _runtime.client(implicit=True)
        opts = self._opts
        key = _key(opts.name or self._cls.__name__)
        _check_feasible(key, opts)
        isolation = opts.isolation or ("process" if opts.num_gpus else "thread")
        _runtime.flush()  # tasks whose refs the constructor takes go first
        future = client.submit(
            ActorHost,
            self._cls,
            unwrap(args),
            unwrap(kwargs),
            isolation,
            key=key,
            resources=opts.dask_resources() or None,
            actor=True,
            pure=False,
        )
        return ActorHandle(future, self._cls, key)


class ActorHandle:
    """A handle on a live actor: ``handle.method.remote(*args)`` returns an ObjectRef.

    Handles can be passed to tasks (thread isolation) and to other actors.
    """

    def __init__(self, future: Future, cls: type, key: str) -> None:
        self._future = future
        self._cls = cls
        self._key = key
        self._proxy: Any = None
        self._caller = uuid.uuid4().hex
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._deferred = 0  # calls waiting for the actor to be constructed
        self._dispatcher: ThreadPoolExecutor | None = None
        self._proxy_call: Any = None  # the proxy's ``call``, fetched once (see _send)
        self._killed = False  # kill() was called on this handle
        runtime = _runtime.current
        if runtime is not None:
            runtime.handles.add(self)

    def _stop(self) -> None:
        """At shutdown: calls not yet sent are dropped, the sending thread ends."""
        if self._dispatcher is not None:
            self._dispatcher.shutdown(wait=False, cancel_futures=True)

    def __reduce__(self):
        return _rebuild_handle, (self._future, self._cls, self._key, self._proxy)

    def __del__(self) -> None:
        # The last reference to this handle is gone: so is this process's claim on the
        # actor. Dask's proxy sits in a reference cycle after a method call, and its own
        # future would keep the actor (and its GPUs) wanted until a garbage collection.
        proxy = self.__dict__.get("_proxy")
        if proxy is not None:
            with contextlib.suppress(Exception):
                _dask_internals.release_actor_proxy(proxy)

    def __repr__(self) -> str:
        return f"Actor({self._cls.__name__}, {self._key})"

    def __getattr__(self, name: str) -> _ActorMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        if not callable(getattr(self._cls, name, None)):
            raise AttributeError(
                f"actor class {self._cls.__name__} has no method {name!r}; its methods are "
                f"{sorted(n for n in dir(self._cls) if not n.startswith('_'))}"
            )
        return _ActorMethod(self, name)

    def _status_error(self) -> ActorDiedError | None:
        """ActorDiedError when the actor's future says it is gone, else None."""
        status = self._future.status
        if status not in ("error", "cancelled", "lost"):
            return None
        return self._died(status)

    def _died(self, status: str, cause: BaseException | None = None) -> ActorDiedError:
        """The error for calls on this actor, gone with its future in ``status`` (Dask's
        future statuses, or ``"unreachable"``: its worker does not answer)."""
        proxy = self._proxy
        worker = _dask_internals.actor_address(proxy) if proxy is not None else None
        if status == "cancelled":
            reason = "it was killed" if self._killed else "it was cancelled"
            if proxy is None:
                reason += " before its constructor returned"
        elif proxy is not None or status in ("lost", "unreachable"):
            # a constructed actor's future errs only when Dask lost its worker
            reason = "its worker died"
        else:
            if cause is None:
                with contextlib.suppress(Exception):
                    cause = self._future.exception(timeout=5)
            if _dask_internals.actor_worker_lost(cause):
                reason = "its worker died while it was being constructed"
            else:
                reason = f"its constructor raised {type(cause).__name__}: {cause}"
        return ActorDiedError(self._key, worker, reason)

    def _call(self, method: str, args: tuple, kwargs: dict) -> ObjectRef:
        call_id = f"{self._key}.{method}"
        dead = self._status_error()
        if dead is not None:
            return ObjectRef(Failed(dead), call_id)
        payload = None
        if not has_refs((args, kwargs)):
            # Serialized before a sequence number is taken: a call that cannot be sent
            # fails alone, and the calls after it do not wait for it at the actor.
            try:
                payload = dumps((args, kwargs))
            except Exception as exc:
                return ObjectRef(Failed(original_error(exc)), call_id)
        with self._lock:
            seq = next(self._seq)
            ready = payload is not None and self._proxy is not None and self._deferred == 0
            if not ready:
                # Not constructed yet (it may be waiting for devices), or arguments still to
                # be computed: the call leaves from the handle's own thread once it can, so
                # that .remote() returns at once, as in Ray; calls keep their order.
                self._deferred += 1
        if ready:
            return ObjectRef(self._send(self._proxy, seq, method, payload), f"{call_id}#{seq}")
        if self._dispatcher is None:
            self._dispatcher = ThreadPoolExecutor(1, thread_name_prefix=f"send-{self._key}")
        return ObjectRef(
            self._dispatcher.submit(self._send_later, seq, method, args, kwargs, payload),
            f"{call_id}#{seq}",
        )

    def _send(self, proxy: Any, seq: int, method: str | None, payload: bytes) -> Any:
        try:
            call = self._proxy_call
            if call is None:
                if getattr(thread_state, "actor", False):
                    # inside an actor, where the proxy answers differently (a direct local
                    # call to an actor of the same worker): Dask's own call
                    return proxy.call((self._caller, seq, method, payload))
                # One caller for every call of this handle, answering through a plain
                # concurrent future (see _dask_internals.actor_caller).
                call = self._proxy_call = _dask_internals.actor_caller(
                    proxy, "call", _weak_died(self)
                )
            return call((self._caller, seq, method, payload))
        except RuntimeError as exc:  # "Worker holding Actor was lost"
            return Failed(
                self._died("lost" if _dask_internals.actor_worker_lost(exc) else "error", exc)
            )

    def _send_later(
        self, seq: int, method: str, args: tuple, kwargs: dict, payload: bytes | None
    ) -> Any:
        try:
            try:
                proxy = self._future.result()
            except BaseException as exc:
                # killed, or lost with its worker, or its constructor raised: as in Ray, a
                # call on it raises ActorDiedError (the constructor's error as its cause)
                status = self._future.status
                if status not in ("error", "cancelled", "lost"):
                    raise
                raise self._died(status, exc) from exc
            with self._lock:
                self._proxy = self._proxy or proxy
            if payload is None:
                try:
                    # the refs' values, computed elsewhere: waited for here, not in .remote()
                    payload = dumps(values_of((args, kwargs)))
                except BaseException as exc:
                    # the actor still expects this sequence number: let the next call go
                    self._send(proxy, seq, None, b"")
                    raise original_error(exc) from None
            sent = self._send(proxy, seq, method, payload)
            return self._wait(sent.result)
        finally:
            with self._lock:
                self._deferred -= 1

    def _wait(self, result: Any) -> Any:
        """``result()`` of a call sent to the actor, in slices: a kill of this handle
        meanwhile ends the wait with ActorDiedError (bound every wait). Only for the call: the
        same sliced wait on the actor's own Dask future left killed actors wanted by the
        scheduler in the soak (cause not found), so that one waits whole."""
        while True:
            try:
                return result(timeout=1.0)
            except (TimeoutError, concurrent.futures.TimeoutError, queue.Empty):
                dead = self._status_error()
                if dead is None and self._killed:
                    dead = self._died("cancelled")
                if dead is not None:
                    raise dead from None

    def _kill(self) -> None:
        self._killed = True
        self._future.cancel(force=True)


def _weak_died(handle: ActorHandle) -> Callable[[str], ActorDiedError]:
    """``handle._died`` without a reference to the handle: the caller it is given to lives
    on the handle, and a cycle through it would keep a dropped handle (and so its actor and
    devices) alive until a garbage collection."""
    died = weakref.WeakMethod(handle._died)
    key = handle._key

    def gone(reason: str) -> ActorDiedError:
        method = died()
        if method is None:  # every handle dropped: the actor was released
            return ActorDiedError(key, None, f"it was released ({reason})")
        return method(reason)

    return gone


def _rebuild_handle(future: Future, cls: type, key: str, proxy: Any) -> ActorHandle:
    handle = ActorHandle(future, cls, key)
    handle._proxy = proxy
    return handle


class _ActorMethod:
    def __init__(self, handle: ActorHandle, name: str) -> None:
        self._handle = handle
        self._name = name

    def remote(self, *args: Any, **kwargs: Any) -> ObjectRef:
        return self._handle._call(self._name, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Actor methods cannot be called directly. Instead of running "
            f"'actor.{self._name}()', try 'actor.{self._name}.remote()'."
        )


# -- the decorator -------------------------------------------------------------------------


def remote(*args: Any, **options: Any) -> Any:
    """Make a function a remote function, or a class an actor class.

    Bare (``@remote``) or with options (``@remote(num_gpus=1)``).

    Parameters
    ----------
    num_gpus
        GPUs each call or actor holds: a fraction below 1 or a whole number (default 0).
    num_cpus
        Dask ``CPU`` resource to hold (only where workers declare one).
    resources
        Other Dask resources, e.g. ``{"special_hardware": 1}``.
    max_calls
        Recycle an isolated child after this many calls (0: never; 1: a fresh process per
        call, Ray's default for GPU functions).
    isolation
        ``"process"`` (default when ``num_gpus > 0``) or ``"thread"``.
    max_retries
        Retries of a failed call (Dask ``retries``).

    Examples
    --------
    >>> @remote(num_gpus=1)
    ... def use_gpu():
    ...     return get_gpu_ids()
    >>> get(use_gpu.remote())  # doctest: +SKIP
    [0]
    """
    if len(args) == 1 and not options and (callable(args[0]) or isinstance(args[0], type)):
        return _make(args[0], _Options())
    if args:
        raise TypeError(
            "remote() takes a function or class, or only keyword options; use @remote or "
            "@remote(num_gpus=1)"
        )
    opts = _options(None, options, "@remote(num_gpus=1)")
    return lambda target: _make(target, opts)


def _make(target: Any, opts: _Options) -> Any:
    if isinstance(target, type):
        return ActorClass(target, opts)
    if callable(target):
        return RemoteFunction(target, opts)
    raise TypeError(f"@remote applies to functions and classes, got {target!r}")
