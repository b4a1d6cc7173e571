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
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from multiprocessing.connection import Connection

__all__ = ["Channel", "channel_pair"]

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
#: Below this, header and message go out in one ``send`` (as Connection does).
_SMALL = 16384
_READ = 1 << 16


def channel_pair() -> tuple[Channel, Connection]:
    """A channel for the web process and the connection for its worker."""
    ours, theirs = socket.socketpair()
    fd = theirs.detach()
    # The worker reads and writes its end with blocking calls; under gevent the
    # socket pair comes non-blocking at the OS level (a large result then failed
    # with BlockingIOError), so say so explicitly.
    os.set_blocking(fd, True)
    return Channel(ours), Connection(fd)


class Channel:
    """Non-blocking, framed messages over ``sock``.

    Not thread-safe: the process pool calls it with its lock held.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._out: deque[memoryview] = deque()
        self._in = bytearray()
        self.closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def sending(self) -> bool:
        """Bytes are waiting for the socket to take them."""
        return bool(self._out)

    def send(self, data: bytes) -> None:
        """Queue one message and send what the socket takes now.

        :raises OSError: the worker's end is closed.
        """
        size = len(data)
        if size > 0x7FFFFFFF:
            header = _SHORT.pack(-1) + _LONG.pack(size)
        else:
            header = _SHORT.pack(size)
        if size < _SMALL:
            self._out.append(memoryview(header + data))
        else:
            self._out.append(memoryview(header))
            self._out.append(memoryview(data))
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

    def receive(self) -> list[bytes]:
        """The complete messages that arrived; sets :attr:`closed` at EOF."""
        while True:
            try:
                data = self._sock.recv(_READ)
            except BlockingIOError:
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            self._in += data
        return self._messages()

    def _messages(self) -> list[bytes]:
        messages = []
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
            if len(buffer) - start - head < size:
                break
            with memoryview(buffer) as view:  # one copy, not two
                messages.append(bytes(view[start + head : start + head + size]))
            start += head + size
        if start:
            del buffer[:start]
        return messages

    def close(self) -> None:
        self._out.clear()
        self._sock.close()
