"""The upstream client: HTTP/1.1 over pooled keep-alive connections, and nothing else.

A general client (aiohttp's) spends most of a small proxied request on work a
relay does not need: URL objects, cookie jars, redirects, tracing, default
headers, re-parsing what we already built. Here a request is one buffer
written to a pooled connection, and the response is parsed just enough to
frame its body (Content-Length, chunked, or until close), which is handed on
chunk by chunk. Reading pauses when the client falls behind, so memory stays
bounded whatever the size.

A streamed request body (``Pool.request``'s ``stream``) is written as it comes,
waiting whenever the socket's buffer is full, so an upload of any size passes
in flat memory; it goes on a fresh connection, since it cannot be sent twice.
It is announced with ``Expect: 100-continue``: an upstream that refuses the
request (S3's 403 for a bad signature) says so before the body is sent, not
with a reset in the middle of it.

A request is sent again on a fresh connection only when a pooled connection
turns out to have been closed by the upstream before a single response byte
came back, and only for idempotent methods: a POST is never replayed.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable, Iterable

from multidict import CIMultiDict, CIMultiDictProxy

from .egress import Egress, EgressError, ProxyEnvironment
from .http1 import CONTROLS, ChunkDecoder, FramingError, malformed_line, parse_fields, response_framing
from .tls import tls_context, tls_failure

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
HIGH_WATER = 1 << 20  # pause reading from the upstream above this much unread body
MAX_HEAD = 64 * 1024  # status line and headers
IDLE_KEEP = 30.0  # the longest an unused pooled connection is kept (at least IDLE_KEEP - IDLE_SWEEP)
IDLE_SWEEP = 10.0  # how often the pool closes unused connections: one timer, not one per request
EXPECT_WAIT = 1.0  # seconds to wait for 100 Continue before sending a streamed body anyway (as curl does)
MAX_INTERIM = 8  # 1xx answers skipped before one request's answer; more is a 502
PIECE_COST = 64  # what holding one body piece costs beyond its bytes, counted towards HIGH_WATER
# A reason phrase has no CR, LF or other control (RFC 9112 4); a missing one is tolerated, as llhttp does.
_STATUS_LINE = re.compile(r"HTTP/1\.([01]) ([0-9]{3})(?: ([^" + CONTROLS.decode() + r"]*+))?")


NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())  # read-only: shared by every response


class UpstreamError(Exception):
    """The upstream could not be talked to; ``reason`` says how, for the error body."""

    reason = "upstream_error"


class ConnectError(UpstreamError):
    reason = "upstream_unreachable"

    @classmethod
    def because(cls, error: EgressError) -> ConnectError:
        """A ``ConnectError`` carrying an egress failure's message and reason (proxy refused, TLS, ...)."""
        failure = cls(str(error))
        failure.reason = error.reason
        return failure


class ConnectTimeout(UpstreamError):
    reason = "upstream_connect_timeout"


def connect_failure(error: OSError) -> str:
    """Why a connection failed, in a few words: refused, DNS, unreachable, ... (TLS: ``tls.tls_failure``).

    asyncio words a refusal as "Connect call failed ('10.0.0.1', 443)", once per address tried, and
    the caller already names the address: only the reason is kept.
    """
    if isinstance(error, socket.gaierror):
        return f"DNS lookup failed: {error.strerror}"
    codes = {error.errno} if error.errno else {int(code) for code in _ERRNO(str(error))}
    if len(codes) == 1:
        return os.strerror(codes.pop()).lower()  # "connection refused", "network is unreachable", ...
    return str(error) or type(error).__name__


_ERRNO = re.compile(r"\[Errno (\d+)\]").findall


class FirstByteTimeout(UpstreamError):
    reason = "upstream_timeout"


class Disconnected(UpstreamError):
    reason = "upstream_disconnected"


class BadResponse(UpstreamError):
    reason = "upstream_bad_response"


class BodyCut(UpstreamError):
    """The body ended before its framing said it would."""

    reason = "upstream_body_cut"


class _Connection(asyncio.Protocol):
    """One upstream connection; parses responses and buffers body bytes for the reader."""

    def __init__(self, pool: Pool, key: Slot) -> None:
        self.pool = pool
        self.key = key
        self.absolute_form = ""  # plain HTTP through an egress proxy: prefix of every request target
        self.proxy_headers: tuple[tuple[str, str], ...] = ()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.response: UpstreamResponse | None = None
        self.head = bytearray()
        self.idle_since = 0.0  # when it was parked in the pool (the loop's clock)
        self.drain_waiter: asyncio.Future[None] | None = None  # set while the socket's send buffer is full
        self.head_deadline = 0.0  # when the current response's head is due (the loop's clock)
        self.head_timeout = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_timer_at = 0.0  # when it fires
        # Looked up once: on Python 3.11 each get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self._abort()  # bytes nobody asked for: this connection is no longer trustworthy
            return
        response.received_any = True  # from here on the request is never sent again
        if response.headers_done:
            response.feed_body(data)
            return
        head = self.head
        if head:  # the head came in pieces: look for its end only in what is new
            searched = max(len(head) - 3, 0)
            head += data
            buffer: bytes | bytearray = head
        else:  # most heads arrive whole in one read: parsed from it without a copy
            searched, buffer = 0, data
        while True:
            end = buffer.find(b"\r\n\r\n", searched)
            if end < 0 or end + 4 > MAX_HEAD:
                if end >= 0 or len(buffer) > MAX_HEAD:
                    response.fail(BadResponse("the response headers are larger than 64 KiB"))
                    self._abort()
                elif buffer is not head:
                    self.head = bytearray(buffer)  # the rest of the head comes with the next read
                return
            block, buffer = bytes(buffer[: end + 2]), buffer[end + 4 :]  # the last header line with its CRLF
            try:
                interim = response.parse_head(block)
            except BadResponse as error:
                response.fail(error)
                self._abort()
                return
            if not interim:  # else a 1xx: the real response follows (a bounded number of them)
                break
            searched = 0
        head.clear()
        response.feed_body(bytes(buffer))

    def pause_writing(self) -> None:
        if self.drain_waiter is None:
            self.drain_waiter = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self, timeout: float) -> None:
        """Wait until the socket takes more (a streamed request body); ``FirstByteTimeout`` after ``timeout``."""
        if self.drain_waiter is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self.drain_waiter
            except TimeoutError:
                raise FirstByteTimeout(f"the upstream read none of the request body for {timeout:g}s") from None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.resume_writing()  # a sender waiting to write learns of the loss from the response
        self.pool.forget(self)
        response, self.response = self.response, None  # no cycle left behind (see front.connection_lost)
        if response is not None:
            if isinstance(exc, ssl.SSLError) and not response.received_any:
                # TLS 1.3: a server refuses a client certificate after the handshake, on the first read.
                response.fail(ConnectError.because(tls_failure(exc, self.key[1])))
            response.connection_lost()

    # ------------------------------------------------------------ used by the pool and the response

    def expect_head(self, seconds: float) -> None:
        """Fail the current response unless its head arrives within ``seconds`` from now.

        One timer per connection, not one per request: it is armed only when none is pending,
        and when it fires before the deadline of the request then under way (a later one on
        the same connection) it is armed again for that deadline. Each request costs a clock
        read; a timer is made about once per ``seconds`` on a busy connection.
        """
        if self.closed:
            return  # its response has failed already; a timer would only keep it alive
        self.head_deadline = self.loop.time() + seconds
        self.head_timeout = seconds
        if self._head_timer is None or self.head_deadline < self._head_timer_at:  # a route with a shorter timeout
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_at(self.head_deadline, self._check_head)
        self._head_timer_at = self.head_deadline

    def _check_head(self) -> None:
        self._head_timer = None
        response = self.response
        if response is None or response.headers_done or self.closed:
            return
        # Armed for this very deadline: due, even when the loop's millisecond timers fire a fraction
        # before it (comparing with loop.time() would arm it again and again until the clock ticks).
        if self._head_timer_at >= self.head_deadline:
            response.time_out(self.head_timeout)
        else:  # armed for an earlier request's deadline: wait for this one's
            self._arm_head_timer()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def finished(self, reusable: bool) -> None:
        """The response is done: back to the pool when it can carry another request."""
        self.response = None
        if reusable and not self.closed and self.transport is not None and not self.transport.is_closing():
            self.pool.park(self)
        else:
            self._abort()


class UpstreamResponse:
    """Status, headers and a body read chunk by chunk (``readany``)."""

    def __init__(self, connection: _Connection, method: str) -> None:
        self.connection = connection
        self.method = method
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] | CIMultiDictProxy[str] = NO_HEADERS  # until the head arrives
        self.content_length: int | None = None
        self.headers_done = False
        self.received_any = False  # a byte of the answer arrived (so the request cannot be sent again)
        self.interim = 0  # 1xx answers skipped so far
        self.codings: tuple[str, ...] = ()  # transfer codings besides chunked, relayed as they are
        self.idle_timeout: float | None = None  # the longest wait for more body bytes
        self._head_waiter: asyncio.Future[None] = connection.loop.create_future()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: Exception | None = None
        self._keep_alive = True
        self._remaining: int | None = None  # Content-Length left to read
        self._chunked = False
        self._chunk_state: ChunkDecoder | None = None
        self._until_close = False
        self._paused = False
        self.continue_waiter: asyncio.Future[None] | None = None  # set by a sender waiting for 100 Continue

    # ------------------------------------------------------------ parsing (called by the connection)

    def parse_head(self, head: bytes) -> bool:
        """Parse the status line and headers (``head`` ends with CRLF); True for a 1xx interim answer (skipped)."""
        status_line, _, block = head.partition(b"\r\n")
        line = _STATUS_LINE.fullmatch(status_line.decode("utf-8", "surrogateescape"))  # a UTF-8 reason stays
        if line is None:
            raise BadResponse(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        minor, code, reason = line.groups()
        status = int(code)
        if 100 <= status < 200 and status != 101:
            self.interim += 1
            if self.interim > MAX_INTERIM:
                raise BadResponse(f"more than {MAX_INTERIM} interim (1xx) answers to one request")
            if parse_fields(block, "surrogateescape") is None:  # skipped, but it must be well-formed
                raise BadResponse("interim answer: " + malformed_line(block))
            if status == 100 and self.continue_waiter is not None and not self.continue_waiter.done():
                self.continue_waiter.set_result(None)
            return True
        if not 200 <= status <= 599:
            # 101 included: this client never asks to switch protocols (WebSockets go elsewhere).
            raise BadResponse(f"unexpected status {status}")
        try:
            fields = parse_fields(block)
        except UnicodeDecodeError:
            # Relayed as str and written back as UTF-8: anything else would change bytes.
            raise BadResponse("a header value is not UTF-8 and cannot be relayed unchanged") from None
        if fields is None:
            raise BadResponse(malformed_line(block))
        headers = CIMultiDict(fields)
        try:
            framing = response_framing(self.method, status, headers, minor == "1")
        except FramingError as error:
            raise BadResponse(f"unusable framing: {error}") from None
        self.status, self.reason, self.headers = status, reason or "", headers
        self.codings = framing.codings
        self._keep_alive = framing.reusable
        if framing.kind == "none":
            self._finish_body()
        elif framing.kind == "chunked":
            self._chunked = True
            self._chunk_state = ChunkDecoder()
        elif framing.kind == "length":
            self.content_length = self._remaining = framing.length
            if self._remaining == 0:
                self._finish_body()
        else:
            self._until_close = True
        self.headers_done = True
        if not self._head_waiter.done():
            self._head_waiter.set_result(None)
        return False

    def feed_body(self, data: bytes) -> None:
        if not data:
            return
        if self._eof:
            self._keep_alive = False  # more bytes than the framing allowed: never reused
            return
        if self._chunked:
            decoder = self._chunk_state
            assert decoder is not None
            try:
                piece, done = decoder.feed(data)
            except FramingError as error:
                self.fail(BadResponse(str(error)))
                self.connection._abort()
                return
            self._push(piece)
            if done:
                if decoder.rest:
                    self._keep_alive = False
                self._finish_body()
        elif self._remaining is not None:
            piece = data[: self._remaining]
            self._remaining -= len(piece)
            self._push(piece)
            if len(piece) < len(data):
                self._keep_alive = False
            if self._remaining == 0:
                self._finish_body()
        else:
            self._push(data)

    def _push(self, piece: bytes) -> None:
        if not piece:
            return
        self._chunks.append(piece)
        self._buffered += len(piece) + PIECE_COST
        if self._buffered > HIGH_WATER and not self._paused and self.connection.transport is not None:
            self._paused = True
            self.connection.transport.pause_reading()
        self._wake()

    def _finish_body(self) -> None:
        """The whole body has arrived; the connection goes back once the reader has it all (``release``)."""
        self._eof = True
        self._wake()

    def connection_lost(self) -> None:
        if not self.received_any:
            self.fail(Disconnected("the upstream closed the connection without answering"))
        elif not self.headers_done:
            self.fail(BadResponse("the upstream closed the connection in the middle of the headers"))
        elif self._until_close:
            self._eof = True
            self._wake()
        elif not self._eof:
            self.fail(BodyCut("the upstream closed the connection before the end of the body"))

    def fail(self, error: Exception) -> None:
        if self._error is None and not (self._eof and self.headers_done):
            self._error = error
        if not self._head_waiter.done():
            self._head_waiter.set_exception(error)
            self._head_waiter.exception()  # retrieved: the sender may already have given up
        self._wake()

    def time_out(self, seconds: float) -> None:
        """No response head within ``seconds`` (a timer's callback, cheaper than a timeout scope)."""
        if not self.headers_done:
            self.fail(FirstByteTimeout(f"no response within {seconds:g}s"))

    def _wake(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------ reading (called by the relay)

    def read_nowait(self) -> bytes:
        """Whatever body has arrived, without waiting."""
        if not self._chunks:
            return b""
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._consumed()
        return data

    def spliceable(self) -> int:
        """Body bytes still to come that may bypass Python (see ``splice``): a known length over plain TCP."""
        if self._remaining is None or self._error is not None or self.connection.key[0] != "http":
            return 0
        return self._remaining if not self._chunks else 0

    def spliced(self, clean: bool) -> None:
        """The rest of the body went from the socket to the client without passing through here.

        ``clean`` says nothing followed it in the socket; otherwise the connection is never pooled.
        """
        self._remaining = 0
        self._keep_alive = self._keep_alive and clean
        self._finish_body()

    def is_eof(self) -> bool:
        """True once the whole body has arrived and been read."""
        return self._eof and not self._chunks

    async def readany(self) -> bytes:
        """The next body bytes; b"" at the end; raises ``BodyCut`` when the body is cut short."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                self.release()
                return b""
            self._body_waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self.idle_timeout):
                    await self._body_waiter
            finally:
                self._body_waiter = None
        data = self._chunks.popleft()
        self._buffered -= len(data) + PIECE_COST
        self._consumed()
        return data

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def _consumed(self) -> None:
        if self._paused and self._buffered < HIGH_WATER // 2 and self.connection.transport is not None:
            self._paused = False
            self.connection.transport.resume_reading()

    def release(self) -> None:
        """Done with this response: the connection goes back to the pool if the body was read whole."""
        connection = self.connection
        if connection.response is self:
            connection.finished(self._keep_alive and self._eof and not self._chunks and self._error is None)

    def close(self) -> None:
        """Give up on this response: its connection is closed, never reused half-read."""
        connection = self.connection
        if connection.response is self:
            connection.response = None
            connection._abort()


# scheme, host and port dialled, how connections are opened, and the TLS server name when it is not
# the host dialled (a route's connect_to)
Slot = tuple[str, str, int, "Egress | None", str | None]


class Pool:
    """Keep-alive connections per (scheme, host, port, egress settings)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._idle: dict[Slot, list[_Connection]] = {}
        self._ssl = ssl_context
        self._default: Egress | None = None
        self._all: set[_Connection] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def _default_egress(self) -> Egress:
        """For requests that name no egress: the environment's proxy, the system's CAs."""
        if self._default is None:
            self._default = Egress(self._ssl or tls_context(), ProxyEnvironment.read())
        return self._default

    def park(self, connection: _Connection) -> None:
        connection.idle_since = connection.loop.time()
        self._idle.setdefault(connection.key, []).append(connection)
        if self._sweeper is None:
            self._sweeper = connection.loop.create_task(self._sweep_idle())

    async def _sweep_idle(self) -> None:
        """Every ``IDLE_SWEEP`` seconds, close the connections that would be unused for ``IDLE_KEEP`` by the next
        sweep (upstreams close theirs after a while too: a connection is never kept longer than ``IDLE_KEEP``)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(IDLE_SWEEP)
            unused_since = loop.time() - (IDLE_KEEP - IDLE_SWEEP)
            for idle in list(self._idle.values()):
                for connection in [c for c in idle if c.idle_since <= unused_since]:
                    idle.remove(connection)
                    connection._abort()

    def forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _take_idle(self, key: Slot) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    async def _connect(self, key: Slot, timeout: float) -> _Connection:
        scheme, host, port, egress, server_name = key
        server_name = server_name or host  # the TLS name, when the address dialled is not the upstream's
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                # ``open`` closes its socket if it fails; once handed over, the loop closes it on failure.
                opened = await (egress or self._default_egress()).open(scheme, host, port)
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, key),
                    sock=opened.sock,
                    ssl=opened.tls,
                    server_hostname=server_name if opened.tls else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"cannot connect within {timeout:g}s") from None
        except EgressError as error:
            raise ConnectError.because(error) from None
        except ssl.SSLError as error:
            raise ConnectError.because(tls_failure(error, server_name)) from None
        except OSError as error:  # the caller names the upstream: the message says only why
            raise ConnectError(f"cannot connect ({connect_failure(error)})") from None
        connection.absolute_form, connection.proxy_headers = opened.absolute_form, opened.proxy_headers
        self._all.add(connection)
        return connection

    async def request(
        self,
        method: str,
        key: tuple[str, str, int],
        target: str,
        headers: Iterable[tuple[str, str]],
        body: list[bytes],
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        egress: Egress | None = None,
        server_name: str | None = None,
        stream: AsyncIterable[bytes] | None = None,
        chunked: bool = False,
    ) -> UpstreamResponse:
        """Send one request; return once the response headers have arrived.

        Each phase has its own deadline: connecting, then waiting for the
        response headers once the request is sent. Raises ``UpstreamError``
        subclasses, ``ConnectTimeout`` and ``FirstByteTimeout`` included.
        ``egress`` says how new connections are opened (default: the
        environment's proxy settings and the system's CAs); ``server_name``
        is the name TLS sends and verifies when ``key`` dials another address.
        ``stream`` (instead of ``body``) is sent as it comes, framed chunked
        when ``chunked`` (the headers must say so), else as it is.
        """
        slot: Slot = (*key, egress, server_name)
        if stream is not None:
            return await self._request_streamed(
                method, slot, target, headers, stream, chunked, connect_timeout, first_byte_timeout
            )
        head = _head(method, target, headers)
        # Small requests go out in one write; large bodies without being copied into one buffer.
        if not body:
            message: bytes | None = head
        else:
            message = b"".join((head, *body)) if sum(len(part) for part in body) < 64 * 1024 else None
        for attempt in (1, 2):
            connection = self._take_idle(slot)
            reused = connection is not None
            if connection is None:
                connection = await self._connect(slot, connect_timeout)
            response = UpstreamResponse(connection, method)
            connection.response = response
            transport = connection.transport
            assert transport is not None
            if connection.absolute_form:  # through a forward proxy (rare): the head names the upstream
                proxied = _head(method, connection.absolute_form + target, [*headers, *connection.proxy_headers])
                transport.writelines((proxied, *body))
            elif message is not None:
                transport.write(message)
            else:
                transport.writelines((head, *body))
            connection.expect_head(first_byte_timeout)
            try:
                await response._head_waiter
                return response
            except FirstByteTimeout:
                response.close()
                raise
            except Disconnected:
                # A pooled connection the upstream had closed while idle: only a request
                # that may safely run twice is sent again, on a fresh connection.
                if not (reused and attempt == 1 and method in IDEMPOTENT):
                    raise
            except BaseException:
                response.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request_streamed(
        self,
        method: str,
        slot: Slot,
        target: str,
        headers: Iterable[tuple[str, str]],
        stream: AsyncIterable[bytes],
        chunked: bool,
        connect_timeout: float,
        first_byte_timeout: float,
    ) -> UpstreamResponse:
        """``request`` for a streamed body: a fresh connection, written no faster than the upstream reads.

        An upstream that answers before the body is all sent (a 403, a 413)
        stops the sending: its answer is returned, the connection is not
        reused (the body it was reading was cut).
        """
        connection = await self._connect(slot, connect_timeout)
        response = UpstreamResponse(connection, method)
        connection.response = response
        transport = connection.transport
        assert transport is not None
        if connection.absolute_form:  # through a forward proxy: the head names the upstream
            target, headers = connection.absolute_form + target, [*headers, *connection.proxy_headers]
        loop = asyncio.get_running_loop()
        response.continue_waiter = loop.create_future()
        try:
            transport.write(_head(method, target, [*headers, ("Expect", "100-continue")]))
            await asyncio.wait(
                (response.continue_waiter, response._head_waiter), timeout=EXPECT_WAIT, return_when="FIRST_COMPLETED"
            )
            if response._head_waiter.done():
                response._keep_alive = False  # answered before the body: it is never sent (nor read from the client)
            else:
                await self._send_body(response, stream, chunked, first_byte_timeout)
            if not response._head_waiter.done():  # a connection closed meanwhile failed it already
                connection.expect_head(first_byte_timeout)
            await response._head_waiter
        except BaseException:
            response.close()
            raise
        return response

    @staticmethod
    async def _send_body(
        response: UpstreamResponse, stream: AsyncIterable[bytes], chunked: bool, stall_timeout: float
    ) -> None:
        """Write ``stream`` no faster than the upstream reads it; stop when it answers early.

        An upstream that takes none of the body for ``stall_timeout`` (the route's
        first-byte timeout) fails the request with a 504, as one that does not answer.
        """
        connection = response.connection
        transport = connection.transport
        assert transport is not None
        async for piece in stream:
            if response.headers_done or response._error is not None or connection.closed:
                response._keep_alive = False
                return
            if piece:
                transport.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                await connection.drain(stall_timeout)
        if chunked and not connection.closed:
            transport.write(b"0\r\n\r\n")

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self._all):
            connection._abort()
        self._all.clear()
        self._idle.clear()


def _head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    fields = "\r\n".join(map(": ".join, headers))  # in C: no Python frame per header
    text = f"{method} {target} HTTP/1.1\r\n{fields}\r\n\r\n" if fields else f"{method} {target} HTTP/1.1\r\n\r\n"
    return text.encode("utf-8", "surrogateescape")  # header bytes as the client sent them
