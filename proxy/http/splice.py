"""Large response bodies moved from the upstream socket to the client socket inside the kernel.

Relaying a body through Python copies every byte twice between the kernel and
the process (``recv`` then ``send``) and wakes the event loop per chunk.
``splice(2)`` moves pages from one socket through a pipe into the other
without bringing them into the process: half the proxy's CPU per GiB.

It is used only where it cannot change a byte: a body of known length (the
upstream sent Content-Length, so no chunk framing to parse) on a plain-TCP
upstream connection (never TLS), when nothing of an earlier answer is still
waiting in the client connection's buffer. Both transports stop reading
while it runs and get their sockets back afterwards; uvloop refuses readers
on a socket a transport owns, so the pump watches duplicates of the two file
descriptors.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import time

SPLICE_FROM = 1 << 20  # bodies from this size (smaller ones are not worth the set-up)
PIPE_SIZE = 256 << 10  # measured: 64 KiB and 1-4 MiB pipes moved 1 GiB slower
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in Python 3.10+ but only on some builds
_MORE = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0) | getattr(os, "SPLICE_F_MORE", 0)
_LAST = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
AVAILABLE = hasattr(os, "splice")


class UpstreamClosed(ConnectionError):
    """The upstream closed its connection before the whole body had come."""


class ClientClosed(ConnectionError):
    """The client's connection broke while the body was being sent."""


def socket_fd(transport: asyncio.BaseTransport) -> int | None:
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else None


async def splice_body(
    upstream: asyncio.Transport, client: asyncio.Transport, prefix: bytes, length: int, idle_timeout: float | None
) -> bool:
    """Send ``prefix`` (head and body bytes already read), then ``length`` body bytes straight from ``upstream``.

    Returns whether the upstream connection is clean: nothing beyond the body
    is waiting in its socket (a byte more, or its end, and it must not be
    pooled). Raises ``UpstreamClosed``, ``ClientClosed`` or ``TimeoutError`` (no
    progress for ``idle_timeout`` seconds); the caller then aborts both connections.
    """
    upstream_fd, client_fd = socket_fd(upstream), socket_fd(client)
    if upstream_fd is None or client_fd is None:
        raise ClientClosed("a connection closed before the body could be sent")
    upstream.pause_reading()
    client.pause_reading()
    pump = _Pump(os.dup(upstream_fd), socket.socket(fileno=os.dup(client_fd)), prefix, length, idle_timeout)
    try:
        await pump.done
        clean = pump.upstream_clean()
    finally:
        pump.close()
    if not upstream.is_closing():
        upstream.resume_reading()
    if not client.is_closing():
        client.resume_reading()
    return clean


class _Pump:
    """Moves bytes whenever the upstream socket is readable and the client socket writable."""

    def __init__(
        self, upstream: int, client: socket.socket, prefix: bytes, length: int, idle_timeout: float | None
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.upstream, self.client_socket, self.client = upstream, client, client.fileno()
        self.pipe_out, self.pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.capacity = fcntl.fcntl(self.pipe_in, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # above /proc/sys/fs/pipe-max-size: keep the default
            self.capacity = 65536
        self.prefix = memoryview(prefix)
        self.left = length  # still in the upstream socket
        self.in_pipe = 0
        self.reading = self.writing = False
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.idle_timeout = idle_timeout
        self.progress = time.monotonic()
        self.timer = self.loop.call_later(idle_timeout, self._check_idle) if idle_timeout else None
        # A client that leaves while the upstream is quiet is seen by reading (its transport is paused).
        self.loop.add_reader(self.client, self._client_readable)
        self.watching_client = True
        self._pump()

    def _pump(self) -> None:
        try:
            while self._step():
                pass
        except ConnectionError as error:
            self._finish(error)
            return
        if not (self.prefix or self.left or self.in_pipe):
            self._finish(None)
            return
        self._watch(want_read=bool(self.left) and self.in_pipe < self.capacity and not self.prefix,
                    want_write=bool(self.prefix or self.in_pipe))  # fmt: skip

    def _step(self) -> bool:
        """One round of moves; True when something moved (so another round may move more)."""
        moved = False
        if self.prefix:
            sent = _to_client(os.write, self.client, self.prefix)
            if sent > 0:
                self.prefix, moved = self.prefix[sent:], True
            if self.prefix:
                return moved
        if self.left and self.in_pipe < self.capacity:
            try:
                room = min(self.left, self.capacity - self.in_pipe)
                taken = os.splice(self.upstream, self.pipe_in, room, flags=_MORE)
            except BlockingIOError:
                taken = -1
            except OSError as error:
                raise UpstreamClosed(f"reading the body from the upstream failed: {error.strerror}") from None
            if taken == 0:
                raise UpstreamClosed(f"the upstream closed the connection {self.left} bytes before the end of the body")
            if taken > 0:
                self.left -= taken
                self.in_pipe += taken
                moved = True
        if self.in_pipe:
            given = _to_client(os.splice, self.pipe_out, self.client, self.in_pipe, flags=_MORE if self.left else _LAST)
            if given > 0:
                self.in_pipe -= given
                moved = True
        if moved:
            self.progress = time.monotonic()
        return moved

    def upstream_clean(self) -> bool:
        """Nothing (no byte, no end of file) waits in the upstream socket after the body."""
        with socket.socket(fileno=os.dup(self.upstream)) as peek:
            try:
                peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # a byte, or b"" at the end of file
            except BlockingIOError:
                return True
            except OSError:
                pass
        return False

    def _watch(self, *, want_read: bool, want_write: bool) -> None:
        if want_read != self.reading:
            if want_read:
                self.loop.add_reader(self.upstream, self._pump)
            else:
                self.loop.remove_reader(self.upstream)
            self.reading = want_read
        if want_write != self.writing:
            if want_write:
                self.loop.add_writer(self.client, self._pump)
            else:
                self.loop.remove_writer(self.client)
            self.writing = want_write

    def _client_readable(self) -> None:
        """The client closed (end of file, reset), or sent its next request early (left for the front)."""
        try:
            peeked = self.client_socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as error:
            self._finish(ClientClosed(f"the client connection broke: {error.strerror}"))
            return
        if not peeked:
            self._finish(ClientClosed("the client closed its connection"))
        else:
            self._stop_watching_client()

    def _stop_watching_client(self) -> None:
        if self.watching_client:
            self.loop.remove_reader(self.client)
            self.watching_client = False

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        quiet = time.monotonic() - self.progress
        if quiet >= self.idle_timeout:
            self._finish(TimeoutError(f"no body bytes moved for {self.idle_timeout:g}s"))
        else:
            self.timer = self.loop.call_later(self.idle_timeout - quiet, self._check_idle)

    def _finish(self, error: BaseException | None) -> None:
        if self.done.done():
            return
        self._watch(want_read=False, want_write=False)
        self._stop_watching_client()
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)

    def close(self) -> None:
        """Stop watching and close the duplicates and the pipe (the transports keep their own descriptors)."""
        self._watch(want_read=False, want_write=False)
        self._stop_watching_client()
        if self.timer is not None:
            self.timer.cancel()
        for fd in (self.upstream, self.pipe_out, self.pipe_in):
            os.close(fd)
        self.client_socket.close()
        if not self.done.done():
            self.done.cancel()


def _to_client(call: object, *args: object, **kwargs: object) -> int:
    """A write towards the client: bytes written, -1 when it would block; ``ClientClosed`` when it broke."""
    try:
        return call(*args, **kwargs)  # type: ignore[operator,no-any-return]
    except BlockingIOError:
        return -1
    except OSError as error:
        raise ClientClosed(f"the client connection broke: {error.strerror}") from None
