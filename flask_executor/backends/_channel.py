"""The web process's end of a worker's pipe: framed messages that never block.

A worker uses a plain :class:`multiprocessing.connection.Connection`
(``send_bytes`` / ``recv_bytes``); the web process talks to it through a
:class:`Channel` over the other end of the same socket pair, with the same
framing (a 4-byte big-endian length, or ``-1`` and an 8-byte length for
messages over 2 GiB). The socket is non-blocking: :meth:`Channel.send` queues
what the socket cannot take now, and :meth:`Channel.receive` keeps a partial
message until the rest arrives. A worker that is frozen (SIGSTOP, a debugger)
therefore never blocks the thread that submits to it or the dispatcher that
reads from it: its bytes simply wait.

A message is a pickled tuple; a task's payload and its result travel as a
*split* message instead (:func:`split_parts` / :meth:`Channel.send` with a
``body``, read back by :func:`decode`): a zero byte, the length of a pickled
header tuple, the header, then the body's bytes as they are. A pickle never
starts with a zero byte, so both kinds share the framing, and the bytes that
are already a pickle (the call, the result) are not pickled a second time.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

__all__ = [
    "CONTROL_ID", "Channel", "channel_pair", "control_pair", "decode", "framed", "split_header",
    "split_parts", "write_parts",
]  # fmt: skip

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
#: Below this, header and message go out in one ``send`` (as Connection does).
_SMALL = 16384
_READ = 1 << 16
#: Incomplete messages at least this large are read into a buffer of their own.
_LARGE = 1 << 20
_SPLIT = struct.Struct("!BI")  # 0, then the header's length
#: One give-back request on a worker's control socket (see :func:`control_pair`):
#: the id of the task sent ahead that the web process wants back.
CONTROL_ID = struct.Struct("!q")
#: What the web process's end of a worker socket asks to buffer (the kernel
#: caps it at ``net.core.wmem_max``; Linux's default buffer is 208 KiB).
_SEND_BUFFER = 1 << 20


def _frame(size: int) -> bytes:
    if size > 0x7FFFFFFF:
        return _SHORT.pack(-1) + _LONG.pack(size)
    return _SHORT.pack(size)


def split_header(header: tuple[Any, ...]) -> bytes:
    """The start of a split message whose body follows: see the module's
    docstring."""
    data = pickle.dumps(header, pickle.HIGHEST_PROTOCOL)
    return _SPLIT.pack(0, len(data)) + data


def decode(data: bytes | bytearray) -> tuple[Any, ...]:
    """A message as a tuple; a split message's body is appended to its
    header, as a :class:`memoryview` of ``data`` (no copy)."""
    if not data or data[0] != 0:
        return pickle.loads(data)  # type: ignore[no-any-return]
    _, size = _SPLIT.unpack_from(data)
    view = memoryview(data)
    start = _SPLIT.size
    header: tuple[Any, ...] = pickle.loads(view[start : start + size])
    return (*header, view[start + size :])


def split_parts(header: tuple[Any, ...], body: bytes | memoryview) -> list[memoryview]:
    """A split message, framed, as the pieces to write (``body`` not copied)."""
    head = split_header(header)
    view = memoryview(body).cast("B")
    return [memoryview(_frame(len(head) + view.nbytes) + head), view]


def framed(data: bytes) -> memoryview:
    """One plain message, framed, to write with :func:`write_parts`."""
    return memoryview(_frame(len(data)) + data)


def write_parts(conn: Connection, parts: list[memoryview]) -> None:
    """Write ``parts`` over a worker's blocking connection, in one system call
    where the socket takes them all."""
    fd = conn.fileno()
    while parts:
        sent = os.writev(fd, parts)
        while parts and sent >= parts[0].nbytes:
            sent -= parts[0].nbytes
            parts.pop(0)
        if sent:
            parts[0] = parts[0][sent:]


def channel_pair() -> tuple[Channel, Connection]:
    """A channel for the web process and the connection for its worker."""
    ours, theirs = socket.socketpair()
    try:  # a call of up to this size goes out at once, not in rounds of the dispatcher
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
    except OSError:
        pass  # the system's limit (net.core.wmem_max) applies, as it does anyway
    fd = theirs.detach()
    # The worker reads and writes its end with blocking calls; under gevent the
    # socket pair comes non-blocking at the OS level (a large result then failed
    # with BlockingIOError), so say so explicitly.
    os.set_blocking(fd, True)
    return Channel(ours), Connection(fd)


def control_pair() -> tuple[socket.socket, Connection]:
    """The web process's end of a worker's control socket (non-blocking: a
    worker that does not read it never blocks the dispatcher) and the
    worker's end, read by its watcher thread."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    fd = theirs.detach()
    os.set_blocking(fd, True)
    return ours, Connection(fd)


class Channel:
    """Non-blocking, framed messages over ``sock``.

    Not thread-safe: the process pool calls it with its lock held.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._out: deque[memoryview] = deque()
        self._in = bytearray()
        #: The buffer a large incoming message is read into, and how full it is.
        self._body: bytearray | None = None
        self._filled = 0
        self.closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def sending(self) -> bool:
        """Bytes are waiting for the socket to take them."""
        return bool(self._out)

    def send(self, data: bytes, body: bytes | None = None) -> None:
        """Queue one message and send what the socket takes now. With
        ``body``, ``data`` is a :func:`split_header` and ``body`` is sent
        after it as it is.

        :raises OSError: the worker's end is closed.
        """
        size = len(data) + (0 if body is None else len(body))
        header = _frame(size)
        if size < _SMALL:
            self._out.append(memoryview(header + data + (body or b"")))
        elif body is None:
            self._out.append(memoryview(header))
            self._out.append(memoryview(data))
        else:
            self._out.append(memoryview(header + data))  # a split header: small
            self._out.append(memoryview(body))
        self.flush()

    def flush(self) -> None:
        """Send queued bytes until the socket would block.

        :raises OSError: the worker's end is closed.
        """
        out = self._out
        while out:
            try:
                sent = self._sock.send(out[0])
            except BlockingIOError:
                return
            if sent < len(out[0]):
                out[0] = out[0][sent:]
            else:
                out.popleft()

    def receive(self) -> list[bytes | bytearray]:
        """The complete messages that arrived; sets :attr:`closed` at EOF.

        A large message is read straight into a buffer of its size (no
        growing buffer, no extra copy), which is returned as it is.
        """
        messages: list[bytes | bytearray] = []
        while not self.closed:
            try:
                if self._body is not None:
                    wanted = len(self._body) - self._filled
                    count = self._sock.recv_into(memoryview(self._body)[self._filled :])
                    self._filled += count
                    if self._filled == len(self._body):
                        messages.append(self._body)
                        self._body = None
                else:
                    wanted = _READ
                    data = self._sock.recv(_READ)
                    count = len(data)
                    self._in += data
                    messages += self._messages()
            except BlockingIOError:
                break
            except OSError:
                count = 0
            if not count:
                self.closed = True
            elif count < wanted:
                break  # the socket had no more: no second call only to hear so
        return messages

    def _messages(self) -> list[bytes | bytearray]:
        """Cut the complete messages out of the input buffer; start the body
        buffer of a large one that is still incomplete."""
        messages: list[bytes | bytearray] = []
        buffer = self._in
        start = 0
        while len(buffer) - start >= 4:
            (size,) = _SHORT.unpack_from(buffer, start)
            head = 4
            if size == -1:
                if len(buffer) - start < 12:
                    break
                (size,) = _LONG.unpack_from(buffer, start + 4)
                head = 12
            available = len(buffer) - start - head
            with memoryview(buffer) as view:
                body = view[start + head : start + head + size]
                if available >= size:
                    messages.append(bytes(body))
                    body.release()
                    start += head + size
                    continue
                if size >= _LARGE:
                    self._body = bytearray(size)
                    self._body[:available] = body
                    self._filled = available
                    start = len(buffer)
                body.release()
            break
        if start:
            del buffer[:start]
        return messages

    def close(self) -> None:
        self._out.clear()
        self._sock.close()
