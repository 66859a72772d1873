"""Exceptions raised by dask_gpuresources.

- :class:`InvalidRequestError` (a ``ValueError``): a GPU request that is not a valid amount
  (negative, not a number, or above 1 and not whole).
- :class:`InfeasibleRequestError`: a request (GPUs, CPUs, a custom resource) that no worker
  of the cluster can ever hold.
- :class:`NoLeaseError` (a ``RuntimeError``): ``get_gpu_ids()`` called outside a Dask task.
- :class:`DeviceCountError` (a ``ValueError``): a worker declared more GPUs than its
  ``CUDA_VISIBLE_DEVICES`` lists, or a count that is not a whole number.
- :class:`GetTimeoutError` (a ``TimeoutError``): ``get()`` ran out of time before every
  object was ready.
- :class:`TaskCancelledError` (a ``RuntimeError``): ``get()`` of a task that was cancelled
  (``cancel(ref)``), or that depends on one.
- :class:`ActorDiedError` (a ``RuntimeError``): a call on an actor that was killed, or whose
  worker or process died.
- :class:`IsolatedTaskError` (a ``RuntimeError``): the child process running an isolated task
  died (crash, ``os._exit``, out of memory), was ended because the task was cancelled, or
  outlived the task's ``timeout``.
"""

from __future__ import annotations

import signal

__all__ = [
    "ActorDiedError",
    "DeviceCountError",
    "GetTimeoutError",
    "InfeasibleRequestError",
    "InvalidRequestError",
    "IsolatedTaskError",
    "NoLeaseError",
    "TaskCancelledError",
]


class InvalidRequestError(ValueError):
    """A GPU request that can never be a valid amount."""

    def __init__(self, value: object, reason: str, example: str) -> None:
        self.value = value
        self.reason = reason
        self.example = example
        super().__init__(f"{reason}, got {value!r}; use {example}")

    def __reduce__(self):
        return type(self), (self.value, self.reason, self.example)


class InfeasibleRequestError(Exception):
    """No worker of the cluster can ever satisfy a request (GPUs, CPUs or a custom resource)."""

    def __init__(
        self,
        key: object,
        requested: object,
        largest: object,
        worker: str | None,
        resource: str = "GPU",
    ) -> None:
        self.key = key
        self.requested = requested
        self.largest = largest
        self.worker = worker
        self.resource = resource
        if worker is None:
            what = "any GPU" if resource == "GPU" else f"the resource {resource!r}"
            offer = f"no worker in the cluster declares {what}"
        else:
            offer = f"the largest worker, {worker}, has {resource}={largest}"
        if resource == "GPU":
            add = "add a worker with enough GPUs (dask worker ... --resources GPU=N)"
        elif resource == "CPU":
            add = "add a worker with enough threads (dask worker ... --nthreads N)"
        else:
            add = f"add a worker that declares it (dask worker ... --resources {resource}=N)"
        super().__init__(
            f"task {key!r} requests {resource}={requested}, but {offer}; ask for at most the "
            f"largest worker's amount, {add}, or set the dask config "
            "gpuresources.infeasible: wait for clusters that scale up"
        )

    def __reduce__(self):
        return type(self), (self.key, self.requested, self.largest, self.worker, self.resource)


class NoLeaseError(RuntimeError):
    """``get_gpu_ids()`` was called where no Dask task is running."""


class DeviceCountError(ValueError):
    """A worker's GPU declaration does not fit what it may use."""


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"exit code {exitcode} = {name}{hint}"
    return f"exit code {exitcode}"


class IsolatedTaskError(RuntimeError):
    """The child process of an isolated task ended before the task returned."""

    def __init__(
        self,
        key: object,
        worker: str | None,
        devices: tuple[str, ...] | list[str],
        pid: int | None,
        exitcode: int | None,
        reason: str,
    ) -> None:
        self.key = key
        self.worker = worker
        self.devices = tuple(devices)
        self.pid = pid
        self.exitcode = exitcode
        self.reason = reason
        visible = ",".join(self.devices)
        if pid is None:
            what = f"before its isolated child process (CUDA_VISIBLE_DEVICES={visible!r}) started"
        else:
            what = (
                f": its isolated child process (pid {pid}, CUDA_VISIBLE_DEVICES={visible!r}) "
                f"ended with {_describe_exit(exitcode)}"
            )
        super().__init__(
            f"task {key!r} {reason}{'' if pid is not None else ' '}{what}, on worker "
            f"{worker}; the worker carries on, the device lease is released, and the next "
            "task gets a fresh child"
        )

    def __reduce__(self):
        return type(self), (
            self.key,
            self.worker,
            self.devices,
            self.pid,
            self.exitcode,
            self.reason,
        )


class GetTimeoutError(TimeoutError):
    """``get()`` ran out of time before every requested object was ready."""


class ActorDiedError(RuntimeError):
    """The actor is gone: killed, or its worker or process died."""

    def __init__(self, actor: object, worker: str | None, reason: str) -> None:
        self.actor = actor
        self.worker = worker
        self.reason = reason
        where = "" if worker is None else f" on worker {worker}"
        super().__init__(
            f"actor {actor!r}{where} is dead ({reason}); create a new one with "
            "YourActor.remote(...)"
        )

    def __reduce__(self):
        return type(self), (self.actor, self.worker, self.reason)


class TaskCancelledError(RuntimeError):
    """``get()`` of a task that was cancelled (``cancel(ref)``), or that depends on one, or
    whose input was lost with its worker (an object from ``put()`` lives on one worker);
    ``reason`` says why when Dask gave one."""

    def __init__(self, key: object, reason: str | None = None) -> None:
        self.key = key
        self.reason = reason
        text = f"task {key!r} was cancelled before it returned a value"
        super().__init__(f"{text}: {reason}" if reason else text)

    def __reduce__(self):
        return type(self), (self.key, self.reason)
