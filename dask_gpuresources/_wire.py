"""The messages between a worker and its isolated children: framing and pickling.

Pure: sockets in, frames out; no Dask. A message is a pickle (protocol 5) and its
out-of-band buffers (NumPy arrays and the like), so that each large buffer is copied once,
by the kernel. The standard pickler goes first, cloudpickle takes over for what only it can
pickle.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from collections.abc import Sequence
from typing import Any

import cloudpickle

__all__ = ["arecv", "asend", "dumps", "loads", "pickled", "recv", "send"]

#
# A message is a list of frames (a pickle and its out-of-band buffers), sent as
#   prefix: frame count (I) and total frame bytes (Q)
#   table:  each frame's length (Q)
#   frames
# so that a reader needs two reads (prefix, then the rest) whatever the number of frames,
# and a small message goes out in one write: every isolated call crosses this twice.

_PREFIX = struct.Struct("!IQ")
_LENGTH = struct.Struct("!Q")
_ONE_WRITE = 1 << 16  # messages up to this size are joined into a single write


def pickled(obj: Any, buffers: list[pickle.PickleBuffer] | None = None) -> bytes:
    """``obj`` pickled (protocol 5), its large buffers out of band into ``buffers`` if given.

    The standard pickler first, as Dask's own protocol does: it is several times faster than
    cloudpickle on the small messages of every call. cloudpickle takes over for what only it
    can pickle, and for anything of __main__, which the other side cannot import.
    """
    callback = None if buffers is None else buffers.append
    try:
        head = pickle.dumps(obj, protocol=5, buffer_callback=callback)
    except Exception:
        head = None
    if head is None or b"__main__" in head:
        if buffers is not None:
            buffers.clear()
        head = cloudpickle.dumps(obj, protocol=5, buffer_callback=callback)
    return head


def dumps(obj: Any) -> list[Any]:
    buffers: list[pickle.PickleBuffer] = []
    head = pickled(obj, buffers)
    return [head, *(b.raw() for b in buffers)]


def loads(frames: list[Any]) -> Any:
    return pickle.loads(frames[0], buffers=frames[1:])


def _chunks(frames: Sequence[Any]) -> list[Any]:
    """What to write for ``frames``: one chunk for a small message, else header + frames."""
    sizes = [memoryview(f).nbytes for f in frames]
    total = sum(sizes)
    header = _PREFIX.pack(len(frames), total) + b"".join(_LENGTH.pack(n) for n in sizes)
    if total <= _ONE_WRITE:
        return [header + b"".join(frames)]
    return [header, *frames]


def _split(count: int, body: bytearray) -> list[memoryview]:
    """The frames of a message from its table and frames (views, no copies)."""
    view = memoryview(body)
    offset = _LENGTH.size * count
    frames = []
    for i in range(count):
        (n,) = _LENGTH.unpack_from(body, i * _LENGTH.size)
        frames.append(view[offset : offset + n])
        offset += n
    return frames


def send(sock: socket.socket, frames: Sequence[Any]) -> None:
    for chunk in _chunks(frames):
        sock.sendall(chunk)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError("the other end closed the connection")
        got += k
    return buf


def recv(sock: socket.socket) -> list[memoryview]:
    count, total = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    return _split(count, _recv_exact(sock, _LENGTH.size * count + total))


async def asend(sock: socket.socket, frames: Sequence[Any]) -> None:
    loop = asyncio.get_running_loop()
    for chunk in _chunks(frames):
        await loop.sock_sendall(sock, chunk)


async def _arecv_exact(sock: socket.socket, n: int) -> bytearray:
    loop = asyncio.get_running_loop()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if not k:
            raise EOFError("the other end closed the connection")
        got += k
    return buf


async def arecv(sock: socket.socket) -> list[memoryview]:
    count, total = _PREFIX.unpack(await _arecv_exact(sock, _PREFIX.size))
    return _split(count, await _arecv_exact(sock, _LENGTH.size * count + total))
