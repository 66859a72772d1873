"""The isolated child's main loop: run what the worker sends, one message at a time.

``python -c "from dask_gpuresources._child import main; main()" FD PARENT_PID``, started by
:mod:`dask_gpuresources._isolation` with ``CUDA_VISIBLE_DEVICES`` set to its lease. It
imports neither ``distributed`` nor the worker modules: a child stays small, and
``import torch`` in a task sees only its devices.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ._wire import dumps, loads, pickled, recv, send

__all__ = ["main"]


def _watch_parent(parent: int) -> None:
    # A worker killed with SIGKILL cannot end its children; they notice instead.
    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class ChainedError(Exception):
    """Stands in for an exception in a ``__cause__``/``__context__`` chain that cannot be
    pickled: its type's name and its text, so the worker still gets the original error."""

    def __init__(self, type_name: str, text: str) -> None:
        self.type_name = type_name
        self.text = text
        super().__init__(f"{type_name}: {text}" if text else type_name)

    def __reduce__(self):
        return type(self), (self.type_name, self.text)


def _picklable(exc: BaseException) -> bool:
    try:
        pickled(exc)  # as the reply will be: the standard pickler, then cloudpickle
    except Exception:
        return False
    return True


def _replace_unpicklable_chain(exc: BaseException) -> None:
    """Replace each chained exception that cannot be pickled by a :class:`ChainedError`,
    so that the error itself comes back whole (its chain reads the same)."""
    replaced: dict[int, BaseException] = {id(exc): exc}  # each link once, and what it became
    todo = [exc]
    while todo:
        current = todo.pop()
        for attr in ("__cause__", "__context__"):
            chained = getattr(current, attr)
            if chained is None:
                continue
            if id(chained) in replaced:  # ``raise b from a`` in ``except a``: both links
                setattr(current, attr, replaced[id(chained)])
                continue
            # Tried without its own chain: a link further down is judged on its own.
            cause, context = chained.__cause__, chained.__context__
            chained.__cause__ = chained.__context__ = None
            ok = _picklable(chained)
            chained.__cause__, chained.__context__ = cause, context
            if not ok:
                stand_in = ChainedError(type(chained).__qualname__, str(chained))
                stand_in.__traceback__ = chained.__traceback__
                stand_in.__cause__, stand_in.__context__ = cause, context
                stand_in.__suppress_context__ = chained.__suppress_context__
                replaced[id(chained)] = stand_in
                setattr(current, attr, stand_in)
                chained = stand_in
            else:
                replaced[id(chained)] = chained
            todo.append(chained)


def _error_frames(exc: BaseException) -> list[Any]:
    from tblib import pickling_support

    pickling_support.install(exc)
    try:
        return dumps(("error", exc))
    except Exception:
        pass
    _replace_unpicklable_chain(exc)
    try:
        return dumps(("error", exc))
    except Exception:
        import traceback

        text = "".join(traceback.format_exception(exc))
        return dumps(("error", RuntimeError(f"unpicklable exception in the child:\n{text}")))


def main(argv: Sequence[str] | None = None) -> None:
    """Child process: run the tasks the worker sends until it closes the connection."""
    from . import _context

    # Ctrl-C in a terminal reaches the whole process group; the worker decides what ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    argv = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(argv[0]))
    # Not inherited by processes the user's code starts: a grandchild holding it would keep
    # the worker from seeing this child's end of the connection close.
    sock.set_inheritable(False)
    _watch_parent(int(argv[1]))
    try:
        op, init = loads(recv(sock))
    except (EOFError, OSError):  # the worker let go of this child before using it
        return
    sys.path[:] = init["sys_path"]
    _context.set_cluster(init.get("cluster"))
    for module in init["preload"]:
        try:
            __import__(module)
        except Exception as err:  # a preload is an optimisation, never a reason to fail
            print(f"dask_gpuresources child: could not preload {module}: {err}", file=sys.stderr)
    try:
        send(sock, dumps(("ready", os.getpid())))
    except OSError:  # the worker let go of this child (or died) while it started
        return

    instance: Any = None  # the actor this child hosts, if it hosts one
    home: Any = None  # that actor's context, current between its method calls
    while True:
        try:
            frames = recv(sock)
        except (EOFError, OSError):
            return
        try:
            message = loads(frames)
            op, context = message[0], message[1]
            _context.set_process_context(context)
            if op == "run":
                run_spec, data = message[2:]
                result = run_spec(data)
            elif op == "actor-init":
                cls, args, kwargs = message[2:]
                home = context
                instance = cls(*args, **kwargs)
                result = None
            elif op == "actor-call":
                name, payload = message[2:]
                args, kwargs = pickle.loads(payload)  # the caller's own pickle
                result = getattr(instance, name)(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = asyncio.run(_awaited(result))
            else:
                raise ValueError(f"unknown message {op!r}")
            reply = dumps(("ok", result))
        except SystemExit as exc:
            # sys.exit() in a task ends its process, as os._exit() would; the worker reports
            # the exit code. (Raised in the worker, it would take the worker down.)
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        except BaseException as exc:  # everything goes back to the worker, as in a thread
            reply = _error_frames(exc)
        finally:
            _context.set_process_context(home)
        try:
            send(sock, reply)
        except OSError:
            return


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


if __name__ == "__main__":
    main()
