"""The HTTP front: client connections, parsed and answered by the proxy itself.

A framework server (aiohttp's) spent about a third of a small proxied
request's CPU time on things a relay does not use: request objects with
lazily parsed URLs, routers, middlewares, response objects that re-serialise
headers. Here a connection is one ``asyncio.Protocol``:

* the head is parsed in one pass, by patterns that cannot backtrack (time
  linear in its size), and kept as the client sent it: raw UTF-8 in the
  target (curl sends ``?q=café``) and Latin-1 bytes in header values go on
  unchanged; which target forms are served is one decision
  (``admit_target``, or what ``Front(admit=...)`` is given);
* the body's framing is decided once (``http1.request_framing``), strictly:
  whatever a peer might read differently is refused and the connection closed;
* a body is hashed and collected as it arrives, in the protocol's callback,
  so the handler waits once for all of it (``read_body``), or handed on piece
  by piece with the client read no faster than the handler sends it on
  (``stream_body``); ``Expect: 100-continue`` is answered when the handler
  asks for the body, after its size was checked;
* an answer is always framed by the proxy itself (``Response``), and goes
  out with as few writes as possible: head and a complete
  body in one, a streamed body chunk by chunk (chunked to HTTP/1.1 clients
  when the upstream gave no length), pausing while the client is slow; a
  client that stops reading its answers is not read from either, so
  pipelined requests cannot pile answers up here;
* ``header_timeout`` bounds the wait for a head and any pause inside a body;
* limits get the statuses that tell a client what to fix (414 for the
  request line, 431 for headers, 505 for the version), in JSON like every
  answer of the proxy's own, and never a traceback.

A WebSocket upgrade, once parsed and judged here, is handed with the bytes
already read to aiohttp's server, which does the WebSocket framing (see
``websocket``).

``CONNECT`` goes to the ``connect`` hook when the front has one (see
``tunnel``): refused, a blind tunnel, or TLS terminated here with
``start_tls``, after which the connection's requests are read as before and
carry the tunnel's authority (``Connection.tunnel``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from multidict import CIMultiDict

from .http1 import (
    EMPTY_SHA256,
    TOKEN,
    ChunkDecoder,
    FramingError,
    connection_tokens,
    has_body,
    http_date,
    malformed_line,
    parse_fields,
    request_framing,
)
from .linger import LingeringClose
from .target import ABSOLUTE, AUTHORITY, ORIGIN, split_absolute, target_form
from .tunnel import Terminate, Tunnel, open_blind

log = logging.getLogger("signing_proxy.front")

MAX_LINE = 8190  # bytes in the request line, and in each header line
MAX_HEADERS = 128
MAX_HEAD = 64 * 1024  # the whole head; also the most bytes buffered ahead of a pipelined request
URI_TOO_LONG, HEADERS_TOO_LARGE = 414, 431
STREAM_HIGH_WATER = 1 << 20  # body bytes a streamed (or not yet claimed) body may hold before reading pauses

_REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([\x21-\x7e\x80-\xff]+) HTTP/([0-9])\.([0-9])")
FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding"})  # written by Response itself, never relayed
# The same for a HEAD or 304 answer: its Content-Length describes the body it would have had, and is relayed.
TRANSFER_FIELDS = frozenset({"transfer-encoding"})
# Bytes of chunk framing (size lines, extensions, CRLFs, trailers) a request body may have beyond a quarter
# of its data: chunks of a few bytes would otherwise cost far more CPU and memory than their data.
MAX_CHUNK_FRAMING = 64 * 1024
SMALL_PIECE = 16 * 1024  # body pieces below this are coalesced into one buffer


def error_body(message: str, reason: str) -> bytes:
    """The JSON body of every answer the proxy makes itself: what happened and what to do."""
    return json.dumps({"message": message, "reason": reason}).encode()


class Refusal(Exception):
    """A request the proxy answers itself, with ``status`` and a JSON body saying why and what to do."""

    def __init__(
        self, message: str, status: int = 400, reason: str = "bad_request", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.reason, self.headers = message, status, reason, headers


class BodyTooLarge(Exception):
    pass


Handler = Callable[["Request"], Awaitable[None]]
# Decides a CONNECT request: what to do, or raise Refusal.
ConnectHook = Callable[["Request"], "Terminate | Tunnel"]


class Front:
    """The protocol factory for client connections, and what they share: handler, limits, timers."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body: int,
        header_timeout: float,
        upgrade: Callable[[str | None], Any],
        connect: ConnectHook | None = None,
        admit: Callable[[Request], None] | None = None,
    ) -> None:
        self.handler = handler
        self.admit = admit or admit_target  # which request-target forms go on (the one decision)
        self.max_body = max_body
        self.header_timeout = header_timeout
        self.upgrade = upgrade  # makes the aiohttp protocol a WebSocket upgrade (and its tunnel) is handed to
        self.connect = connect  # decides CONNECT requests; None: they go to the handler like any other
        self.tunnels: set[Any] = set()  # both sides of every blind tunnel, closed when the front stops
        self.connections: set[Connection] = set()
        self.lingering: set[LingeringClose] = set()  # connections closing after an early answer
        self.stopping = False
        self._sweeper: asyncio.Task[None] | None = None
        # Set by the first connection: on Python 3.11 each get_running_loop() is a getpid() system call.
        self.loop: asyncio.AbstractEventLoop | None = None

    def __call__(self) -> Connection:
        if self._sweeper is None:
            self.loop = asyncio.get_running_loop()
            self._sweeper = self.loop.create_task(self._sweep())
        return Connection(self)

    async def _sweep(self) -> None:
        """Act on connections whose request head or body is overdue: one timer for all, not one per request."""
        loop = asyncio.get_running_loop()
        tick = min(1.0, self.header_timeout / 4)
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for connection in [c for c in self.connections if c.deadline is not None and c.deadline <= now]:
                connection.overdue()

    async def stop(self, grace: float) -> None:
        """Close idle connections; give requests being served ``grace`` seconds, then cut them."""
        self.stopping = True
        for connection in list(self.connections):
            if connection.request is None:
                connection.close()
        busy = [c.task for c in self.connections if c.task is not None and not c.task.done()]
        if busy:
            _, late = await asyncio.wait(busy, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        for connection in [*self.connections, *self.lingering, *self.tunnels]:
            connection.close()
        if self._sweeper is not None:
            self._sweeper.cancel()


class Request:
    """One request: its head as sent, its body (read on demand) and its answer."""

    __slots__ = (
        "_backlog",
        "_body_error",
        "_body_parts",
        "_body_size",
        "_body_waiter",
        "_chunks",
        "_digest",
        "_limit",
        "_remaining",
        "_streaming",
        "connection",
        "expect_continue",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "status",
        "target",
        "target_form",
    )

    def __init__(
        self, connection: Connection, method: str, target: str, http11: bool, headers: CIMultiDict[str]
    ) -> None:
        self.connection = connection
        self.method = method
        self.target = target  # the request target as sent (decoded as UTF-8)
        self.target_form = target_form(method, target)  # origin, absolute, authority or asterisk
        self.http11 = http11
        self.headers = headers
        self.status = 0  # of the answer, once its head is sent
        tokens = connection_tokens(headers.getall("Connection")) if "Connection" in headers else frozenset()
        self.keep_alive = "close" not in tokens if http11 else "keep-alive" in tokens
        self.expect_continue = False
        self._remaining: int | None = None  # Content-Length bytes still to come
        self._chunks: ChunkDecoder | None = None
        # Large reads as they came, small ones coalesced: a body costs about its size however it is cut.
        self._body_parts: list[bytes | bytearray] = []
        self._body_size = 0
        self._digest: Any = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._body_error: Exception | None = None
        self._limit: float = float("inf")  # max_body once the handler chose read_body; stream_body's limit
        self._streaming = False
        self._backlog = 0  # bytes held for a handler that has not asked yet, or streams

    # ------------------------------------------------------------ the body

    @property
    def body_exists(self) -> bool:
        return self._chunks is not None or self._remaining is not None

    def _frame_body(self) -> None:
        """Find the body's framing in the headers (RFC 9112 6, see ``request_framing``); raises Refusal."""
        headers = self.headers
        try:
            framing = request_framing(headers, self.http11)
        except FramingError as error:
            raise Refusal(str(error)) from None
        if framing.kind == "chunked":
            self._chunks = ChunkDecoder()
        elif framing.kind == "length":
            self._remaining = framing.length
        if self.body_exists:
            self._digest = hashlib.sha256()
        expect = headers.get("Expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise Refusal(f"unsupported Expect value {expect[:40]!r}", 417, "expectation_failed")
            self.expect_continue = self.http11 and self.body_exists

    @property
    def body_pending(self) -> bool:
        """The body was not read to its end (what the client sends next is still body, or unknown)."""
        return self._digest is not None and self._body_error is not _BODY_READ

    def feed(self, data: bytes) -> bytes:
        """Take body bytes; returns what follows the body (a pipelined request)."""
        rest = b""
        if self._body_error is not None:
            return rest  # refused (too large, malformed): the connection closes after the answer
        decoder = self._chunks
        if decoder is not None:
            try:
                piece, done = decoder.feed(data)
                if decoder.framing > MAX_CHUNK_FRAMING + (self._body_size + len(piece)) // 4:
                    raise FramingError("its chunks are too small (chunk framing outweighs the data)")
            except FramingError as error:
                self._end_body(Refusal(f"malformed chunked body: {error}"))
                return b""
            if done:
                rest = decoder.rest
        else:
            assert self._remaining is not None
            piece = data[: self._remaining] if len(data) > self._remaining else data
            self._remaining -= len(piece)
            rest = data[len(piece) :]
            done = self._remaining == 0
        if piece:
            self._body_size += len(piece)
            if self._body_size > self._limit:
                self._end_body(BodyTooLarge())
                return b""
            if not self._streaming:
                self._digest.update(piece)
            parts = self._body_parts
            if len(piece) >= SMALL_PIECE:
                parts.append(piece)  # a large read is kept as it came, without a copy
            elif parts and type(parts[-1]) is bytearray:
                parts[-1] += piece  # small ones are coalesced: no object per tiny chunk
            else:
                parts.append(bytearray(piece))
            if self._limit == float("inf") or self._streaming:
                self._backlog += len(piece)
        if done:
            self._end_body(None)
        elif self._streaming and piece:
            self._end_body(_BODY_MORE)
        if self._backlog > STREAM_HIGH_WATER:
            self.connection._update_reading()  # the handler has not caught up: stop reading the client
        return rest

    def _end_body(self, error: Exception | None) -> None:
        if error is not _BODY_MORE:
            self._body_error = _BODY_READ if error is None else error
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_body(self, limit: int | None = None) -> tuple[list[bytes], int, str]:
        """The whole body (as the pieces that arrived), its length and SHA-256.

        Raises ``BodyTooLarge`` above ``limit`` (default: the front's
        ``max_body``, which bounds every body; at once when Content-Length says
        so, before ``100 Continue`` invites the body) and ``Refusal``.
        """
        if self._digest is None:
            return [], 0, EMPTY_SHA256
        limit = self.connection.front.max_body if limit is None else limit
        self._limit = limit
        if self._backlog:
            self._backlog = 0
            self.connection._update_reading()
        self._refuse_over(limit)
        if self._body_error is None:
            self._invite_body()
            await self._more_body()
        if self._body_error is not _BODY_READ:
            raise self._body_error  # type: ignore[misc]
        if self._body_size > limit:  # a chunked body under the front's bound, over this request's
            raise BodyTooLarge
        return self._body_parts, self._body_size, self._digest.hexdigest()  # type: ignore[return-value]

    async def stream_body(self, limit: int | None = None) -> AsyncIterator[bytes]:
        """The body piece by piece as it arrives, neither hashed nor kept (for bodies of any size).

        At most about ``STREAM_HIGH_WATER`` bytes wait here: above that the
        client is not read from until the handler takes them, so memory stays
        flat however fast the client sends. ``limit`` (bytes, None for none)
        raises ``BodyTooLarge``, at once when Content-Length is over it. A
        pause longer than ``header_timeout`` raises a 408 ``Refusal``.
        """
        if self._digest is None:
            return
        self._streaming = True
        self._limit = float("inf") if limit is None else limit
        self._refuse_over(self._limit)
        self._invite_body()
        while True:
            if self._body_parts:
                parts, self._body_parts, self._backlog = self._body_parts, [], 0
                self.connection._update_reading()
                for part in parts:
                    yield part
                continue
            if self._body_error is _BODY_READ:
                return
            if self._body_error is not None:
                raise self._body_error
            await self._more_body()

    def _refuse_over(self, limit: float) -> None:
        """``BodyTooLarge`` once what arrived, or what Content-Length announces, is over ``limit``."""
        if self._body_size > limit or (self._remaining is not None and self._body_size + self._remaining > limit):
            self._body_error = BodyTooLarge()  # the connection closes after the 413
            raise self._body_error

    def _invite_body(self) -> None:
        """``100 Continue``, once, for a client that waits for it before sending the body."""
        if self.expect_continue:
            self.expect_continue = False
            self.connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _more_body(self) -> None:
        """Wait for more of the body, its end or its failure; a pause over ``header_timeout`` is a 408."""
        loop = self.connection.loop
        self._body_waiter = loop.create_future()
        self.connection.deadline = loop.time() + self.connection.front.header_timeout
        try:
            await self._body_waiter
        finally:
            self._body_waiter = None
            self.connection.deadline = None

    # ------------------------------------------------------------ the answer

    def refuse(self, refusal: Refusal) -> None:
        """Answer with ``refusal``: a whole JSON answer of the proxy's own."""
        headers = [*refusal.headers, ("Content-Type", "application/json")]
        self.respond(refusal.status, REASONS.get(refusal.status, "Error"), headers).send(
            error_body(refusal.message, refusal.reason)
        )

    def respond(
        self, status: int, reason: str, headers: Iterable[tuple[str, str]], drop: frozenset[str] = frozenset()
    ) -> Response:
        """Start the answer; ``headers`` whose lower-cased name is in ``drop`` are left out (hop-by-hop ones)."""
        self.status = status
        return Response(self, status, reason, headers, drop)


class _BodyRead(Exception):
    """Marks a body read to its end (``Request._body_error`` is this when there was no error)."""


_BODY_READ = _BodyRead()
_BODY_MORE = _BodyRead()  # passed to _end_body to wake a streaming reader: more body arrived


class Response:
    """The answer to a request: sent whole (``send``) or streamed (``start``, ``write``, ``finish``).

    Its framing is always the proxy's own: a Content-Length or
    Transfer-Encoding among the headers given is dropped and the one that
    matches what is sent is written instead (a HEAD or 304 answer keeps the
    length it describes). Hop-by-hop rules, which may name either, apply to
    what is relayed, never to how the answer is delimited.
    """

    __slots__ = ("_chunked", "_head", "request")

    def __init__(
        self,
        request: Request,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]],
        drop: frozenset[str] = frozenset(),
    ) -> None:
        self.request = request
        self._chunked = False
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        framing = TRANSFER_FIELDS if request.method == "HEAD" or status == 304 else FRAMING_FIELDS
        dated = False
        for name, value in headers:
            lower = name.lower()
            if lower in framing or lower in drop:
                continue
            if lower == "date":
                dated = True
            lines.append(f"{name}: {value}\r\n")
        if not dated:
            lines.append(f"Date: {http_date()}\r\n")
        self._head = lines

    def _head_bytes(self, extra: str = "") -> bytes:
        request = self.request
        close = not request.keep_alive or request.body_pending or request.connection.front.stopping
        if close:
            request.keep_alive = False
            extra += "Connection: close\r\n"
        elif not request.http11:
            extra += "Connection: keep-alive\r\n"
        return "".join((*self._head, extra, "\r\n")).encode("utf-8", "surrogateescape")

    def send(self, body: bytes = b"") -> None:
        """The whole answer in one write, with its length; no body at all where none is allowed (HEAD, 204, 304)."""
        request = self.request
        if has_body(request.method, request.status):
            head = self._head_bytes(f"Content-Length: {len(body)}\r\n")
            request.connection.write(head + body if body else head)
        else:
            request.connection.write(self._head_bytes())
        request.connection.answered(request)

    def start(self, first: bytes, *, length: int | None, codings: tuple[str, ...] = ()) -> None:
        """Send the head and the first body bytes of a body of ``length`` bytes (None: unknown).

        Without a length the body is sent chunked to an HTTP/1.1 client (after
        ``codings``, transfer codings relayed as they came), and delimited by
        closing the connection to an HTTP/1.0 one.
        """
        head = self.head(length=length, codings=codings)
        if self._chunked and first:
            first = b"%x\r\n%b\r\n" % (len(first), first)
        self.request.connection.write(head + first if first else head)

    def head(self, *, length: int | None, codings: tuple[str, ...] = ()) -> bytes:
        """The head of a streamed answer (``start`` sends it; ``splice`` sends it itself)."""
        if length is not None and not codings:
            extra = f"Content-Length: {length}\r\n"
        elif self.request.http11:
            self._chunked = True
            extra = f"Transfer-Encoding: {', '.join((*codings, 'chunked'))}\r\n"
        else:
            self.request.keep_alive = False
            extra = ""
        return self._head_bytes(extra)

    def write(self, chunk: bytes) -> None:
        connection = self.request.connection
        if self._chunked:
            connection.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            connection.write(chunk)

    async def drain(self) -> None:
        """Wait while the client reads slower than the upstream sends."""
        waiter = self.request.connection.drain_waiter
        if waiter is not None:
            await waiter

    def finish(self) -> None:
        if self._chunked:
            self.request.connection.write(b"0\r\n\r\n")
        self.request.connection.answered(self.request)

    def abort(self) -> None:
        """Cut the connection: the body is incomplete and the client must not take it for whole."""
        self.request.connection.abort()


class Connection(asyncio.Protocol):
    """One client connection: requests in, one at a time (pipelined ones wait their turn)."""

    __slots__ = (
        "buffer", "deadline", "drain_waiter", "front", "loop", "request", "searched", "task", "transport", "tunnel"
    )  # fmt: skip

    def __init__(self, front: Front) -> None:
        self.front = front
        self.loop: asyncio.AbstractEventLoop = front.loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer: bytes | bytearray = b""  # bytes of the next request (its head, or more)
        self.searched = 0  # where in ``buffer`` the end of the head may start (searched up to there)
        self.request: Request | None = None  # the one being served
        self.task: asyncio.Task[None] | None = None
        self.deadline: float | None = None  # when the next head must have arrived
        self.drain_waiter: asyncio.Future[None] | None = None
        self.tunnel: str | None = None  # host:port of the CONNECT whose TLS this connection's requests came in

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.connections.add(self)
        self._wait_for_head()

    def data_received(self, data: bytes) -> None:
        request = self.request
        if request is not None:
            if request.body_pending:
                data = request.feed(data)
            if request._body_waiter is not None:
                self.deadline = self.loop.time() + self.front.header_timeout
            if data:
                self.buffer += data
                self._update_reading()  # a pipelined request waits its turn, in at most MAX_HEAD bytes
            return
        if not self.buffer:
            self.buffer = data  # most heads arrive in one read: kept without a copy
        elif type(self.buffer) is bytearray:
            self.buffer += data
        else:  # a head in pieces grows in place: time linear in its size however it is cut
            self.buffer = bytearray(self.buffer) + data
        self._next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.deadline = None
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client is gone: stop working for it (the upstream request too)
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        # Let go of what this connection held: the request and its task refer back to it, a
        # cycle that only the garbage collector (rarely run, see server.tune_gc) would free,
        # with a whole request body inside.
        self.transport, self.request, self.task, self.buffer = None, None, None, b""

    def pause_writing(self) -> None:
        """The client reads slower than we answer: stop reading its requests until it catches up."""
        if self.drain_waiter is None:
            self.drain_waiter = self.loop.create_future()
        self._update_reading()

    def resume_writing(self) -> None:
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._update_reading()
        if self.request is None and self.buffer and self.transport is not None:
            self._next_request()  # a pipelined request held back while the client was not reading

    def _update_reading(self) -> None:
        """Read from the client unless its answers pile up unread or a pipelined request is already waiting."""
        transport = self.transport
        if transport is None:
            return
        request = self.request
        hold = self.drain_waiter is not None or (
            request is not None and (len(self.buffer) > MAX_HEAD or request._backlog > STREAM_HIGH_WATER)
        )
        if hold and transport.is_reading():
            transport.pause_reading()
        elif not hold and not transport.is_reading():
            transport.resume_reading()

    # ------------------------------------------------------------ requests

    def _wait_for_head(self) -> None:
        self.deadline = self.loop.time() + self.front.header_timeout

    def _next_request(self) -> None:
        buffer = self.buffer
        if buffer[:1] in (b"\r", b"\n"):  # empty lines before a request line are ignored (RFC 9112 2.2)
            buffer = self.buffer = buffer.lstrip(b"\r\n")
            self.searched = 0
        end = buffer.find(b"\r\n\r\n", self.searched)  # from where the last search stopped: linear in all
        if end + 4 > MAX_HEAD:
            self._refuse(too_large(HEADERS_TOO_LARGE))
            return
        if end < 0:
            self.searched = max(len(buffer) - 3, 0)
            if len(buffer) > MAX_HEAD or (len(buffer) > MAX_LINE and buffer.find(b"\r\n", 0, MAX_LINE + 2) < 0):
                line_end = buffer.find(b"\r\n", 0, MAX_LINE + 2)
                self._refuse(too_large(URI_TOO_LONG if line_end < 0 else HEADERS_TOO_LARGE))
            return
        self.searched = 0
        self.buffer = buffer[end + 4 :]
        try:
            request = self._parse_head(buffer[: end + 2])  # the last header line with its CRLF
            self.front.admit(request)
            if request.method == "CONNECT" and self.front.connect is not None:
                self._connect(request)
                return
            request._frame_body()  # before a hand-over too: every refusal is ours, in JSON
            upgrade = request.headers.get("Upgrade")
            if upgrade is not None and upgrade.lower() == "websocket":
                self._hand_over(request, buffer)
                return
        except Refusal as error:
            log.debug("refused a malformed request: %s", error.message)
            self._refuse(error)
            return
        self.request = request
        self.deadline = None
        if request.body_pending and self.buffer:
            rest, self.buffer = self.buffer, b""
            self.buffer = request.feed(rest)
        self.task = self.loop.create_task(self.front.handler(request))

    def _parse_head(self, head: bytes) -> Request:
        request_line, _, block = head.partition(b"\r\n")  # each header line ends in CRLF, the last one too
        if len(request_line) > MAX_LINE:
            raise too_large(URI_TOO_LONG)
        line = _REQUEST_LINE.fullmatch(request_line)
        if line is None:
            # Only the method is echoed: the target may carry a presigned query's credentials.
            raise Refusal(f"malformed request line (starting {request_line.split(b' ', 1)[0][:20]!r})")
        method, raw_target, major, minor = line.groups()
        if major != b"1" or minor not in (b"0", b"1"):
            raise Refusal("signing-proxy speaks HTTP/1.1 (and 1.0)", 505, "http_version_not_supported")
        try:
            target = raw_target.decode("utf-8")
        except UnicodeDecodeError:
            raise Refusal(
                "the request target must be UTF-8 (percent-encode other bytes)", reason="bad_request_target"
            ) from None
        if block.count(b"\r\n") > MAX_HEADERS:
            raise too_large(HEADERS_TOO_LARGE)
        if len(block) > MAX_LINE and any(len(field) > MAX_LINE for field in block.split(b"\r\n")):
            raise too_large(HEADERS_TOO_LARGE)
        pairs = parse_fields(block, "surrogateescape")  # bytes that are not UTF-8 go upstream unchanged
        if pairs is None:
            raise Refusal(malformed_line(block))
        headers = CIMultiDict(pairs)
        if minor == b"1" and len(headers.getall("Host", ())) != 1:
            raise Refusal("an HTTP/1.1 request must carry exactly one Host header (RFC 9112 3.2)")
        # Upper-cased as aiohttp's parser did: upstreams behind aiohttp-style parsers see it so.
        return Request(self, method.decode("ascii").upper(), target, minor == b"1", headers)

    def addressed_to_me(self, authority: str) -> bool:
        """Whether ``authority`` (host[:port] of an absolute-form target) names this proxy's own socket."""
        sockname = self.transport.get_extra_info("sockname") if self.transport is not None else None
        if not sockname:
            return False
        host, _, port = authority.rpartition(":") if not authority.endswith("]") else (authority, "", "")
        if not port.isdigit():
            host, port = authority, "80"
        return int(port) == sockname[1] and host.lower().strip("[]") in {"localhost", sockname[0], "127.0.0.1", "::1"}

    def _hand_over(self, request: Request, received: bytes) -> None:
        """Give this connection to aiohttp's server, replaying what was read, for the WebSocket upgrade.

        Its request parser refuses raw UTF-8 in the target, so the target is
        replayed percent-encoded (the same request once normalised for signing).
        Only what both parsers read the same way is handed over: a GET in
        HTTP/1.1 without a body (RFC 6455 4.1), whose head ours has already
        parsed and checked; anything else is refused here, in JSON. A body would
        be read by aiohttp as what follows the upgrade.
        """
        if request.method != "GET" or not request.http11 or request.body_exists:
            raise Refusal("a WebSocket upgrade is a GET in HTTP/1.1, without a body (RFC 6455 4.1)")
        transport = self.transport
        assert transport is not None
        self.front.connections.discard(self)
        self.deadline = None
        target = "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode()) for c in request.target)
        version = "1.1" if request.http11 else "1.0"
        replay = f"{request.method} {target} HTTP/{version}".encode() + received[received.find(b"\r\n") :]
        protocol = self.front.upgrade(self.tunnel)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(replay)

    # ------------------------------------------------------------ CONNECT

    def _connect(self, request: Request) -> None:
        """Ask the front's hook about a CONNECT; refuse, or answer 200 and open what it decided."""
        if self.buffer or self.tunnel is not None:
            raise Refusal("CONNECT must be alone: no bytes before its answer, no tunnel inside a tunnel")
        decision = self.front.connect(request)  # type: ignore[misc]  # raises Refusal
        self.deadline = None
        self.request = request  # busy until the tunnel is open (shutdown waits for it)
        opening = self._terminate(decision) if isinstance(decision, Terminate) else self._blind(decision)
        self.task = asyncio.get_running_loop().create_task(opening)

    async def _terminate(self, decision: Terminate) -> None:
        """TLS with the client, then this connection's requests are served as requests for the tunnel's host."""
        transport = self.transport
        assert transport is not None
        transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.transport = None  # TLS owns it during the handshake: nothing is written, paused or resumed here
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport, self, decision.context, server_side=True, ssl_handshake_timeout=self.front.header_timeout
            )
        except (OSError, ssl.SSLError, TimeoutError) as error:
            # A client that does not trust the CA ends here: say so where a user looks.
            log.info("TLS handshake for %s failed (does the client trust the local CA?): %s", decision.authority,
                     error)  # fmt: skip
            self.task = None
            transport.abort()
            self.connection_lost(None)  # start_tls does not tell the protocol when the handshake fails
            return
        if tls is None:
            return
        self.transport, self.tunnel = tls, decision.authority
        self.request, self.task = None, None
        self._wait_for_head()
        if self.buffer:  # the first request may have come with the end of the handshake
            self._next_request()

    async def _blind(self, decision: Tunnel) -> None:
        transport = self.transport
        assert transport is not None
        try:
            await open_blind(transport, decision, self.front.header_timeout, self.front.tunnels)
        except (OSError, TimeoutError) as error:
            reason = "timed out" if isinstance(error, TimeoutError) else error.strerror or str(error)
            status = 504 if isinstance(error, TimeoutError) else 502
            self.task = None
            self._refuse(Refusal(f"cannot connect to {decision.host}:{decision.port}: {reason}", status,
                                 "upstream_timeout" if status == 504 else "upstream_unreachable"))  # fmt: skip
            return
        self.front.connections.discard(self)  # the tunnel's two protocols own the transport now
        transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if self.buffer:  # sent by the client while the tunnel was being opened
            transport.get_protocol().data_received(self.buffer)
        self.transport, self.request, self.task, self.buffer = None, None, None, b""

    def _refuse(self, error: Refusal) -> None:
        """Answer a request that could not be parsed, and close: what follows it cannot be trusted."""
        self.deadline = None
        self.buffer = b""
        body = error_body(error.message, error.reason)
        extra = "".join(f"{name}: {value}\r\n" for name, value in error.headers)
        self.write(
            (
                f"HTTP/1.1 {error.status} {REASONS.get(error.status, 'Bad Request')}\r\n{extra}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Date: {http_date()}\r\nConnection: close\r\n\r\n"
            ).encode()
            + body
        )
        if error.status == 408:
            self.close()  # a client too slow is not waited for
        else:
            self.linger()

    def overdue(self) -> None:
        """Nothing within ``header_timeout``: 408 for a head or body left unfinished, else just close."""
        self.deadline = None
        request = self.request
        if request is not None:
            if request.body_pending:  # read_body is waiting: the handler answers 408
                request._end_body(Refusal("the request body stopped arriving for header_timeout", 408,
                                          "request_timeout"))  # fmt: skip
        elif self.buffer and self.drain_waiter is None:
            self._refuse(Refusal("the request head did not arrive within header_timeout", 408, "request_timeout"))
        else:
            self.close()  # idle, or not reading our answers

    def answered(self, request: Request) -> None:
        """The answer to ``request`` is sent: read the next one, or close."""
        self.request = None
        self.task = None
        if request.body_pending and request.status != 408:  # a client too slow is not waited for
            self.linger()  # it may still be writing the body we did not read
            return
        if not request.keep_alive or request.body_pending or self.front.stopping or self.transport is None:
            self.close()
            return
        self._wait_for_head()
        self._update_reading()
        if self.buffer and self.drain_waiter is None:  # else resume_writing takes the next request
            self._next_request()

    # ------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def output_idle(self) -> bool:
        """Nothing written is still waiting to be sent (so the socket may be written directly; never under TLS)."""
        transport = self.transport
        return (
            transport is not None
            and transport.get_write_buffer_size() == 0
            and not transport.get_extra_info("ssl_object")
        )

    def writelines(self, data: tuple[bytes, ...]) -> None:
        if self.transport is not None:
            self.transport.writelines(data)

    def close(self) -> None:
        """Close after what was written is sent."""
        self.deadline = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def linger(self) -> None:
        """Close after an answer sent before the request was read to its end, without a reset (see ``linger``)."""
        transport = self.transport
        self.front.connections.discard(self)
        self.deadline = None
        self.transport, self.request, self.task, self.buffer = None, None, None, b""
        if transport is not None:
            LingeringClose(transport, self.front.lingering)


def admit_target(request: Request) -> None:
    """Which request-target forms go on: the one decision, made for every request before anything else.

    Origin-form (``GET /path``) goes on. Absolute-form naming the proxy itself
    is taken as its path (a server must accept it, RFC 9112 3.2.2); naming
    another host, it goes on to the handler, which serves it only for a host a
    forward rule covers and otherwise refuses it before anything is signed
    (``forwarding``). ``CONNECT host:port`` goes to the front's ``connect`` hook,
    which decides the same way. Refused here: ``CONNECT`` without a hook or
    without ``host:port`` (``CONNECT /x``), ``OPTIONS *``, and targets that fit
    no form their method takes (``GET *``, ``GET host:443``). Another policy can
    be given as ``Front(admit=...)``.
    """
    form = request.target_form
    if form == ORIGIN:
        return
    if form == ABSOLUTE:
        scheme, authority, origin = split_absolute(request.target)
        if scheme == "http" and request.connection.addressed_to_me(authority):
            request.target, request.target_form = origin, ORIGIN
        return
    if form == AUTHORITY and request.connection.front.connect is not None:
        return
    if request.method == "CONNECT":
        raise Refusal(
            "CONNECT needs host:port and forward mode (hosts under forward.hosts or forward.tunnel); "
            "this proxy forwards paths",
            reason="bad_request_target",
        )
    if form is None:
        raise Refusal(
            f"the request target fits no form {request.method} takes (RFC 9112 3.2): send a path starting with /",
            reason="bad_request_target",
        )
    raise Refusal(
        "OPTIONS * asks about the proxy itself; signing-proxy only forwards paths", reason="bad_request_target"
    )


def too_large(status: int) -> Refusal:
    advice = {
        URI_TOO_LONG: f"the request line is too long (limit {MAX_LINE} bytes)",
        HEADERS_TOO_LARGE: f"the request headers are too large ({MAX_LINE} bytes a line, {MAX_HEADERS} fields, "
        f"{MAX_HEAD // 1024} KiB in all)",
    }[status]
    return Refusal(advice, status)


REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
