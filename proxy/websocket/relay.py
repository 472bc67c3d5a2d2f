"""The frame relay of one WebSocket connection, once both legs are open: messages both ways, pings,
close codes, backpressure. The handshake that opens the two legs is in ``__init__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import WSMsgType, web
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from ..ops.logs import Exchange

log = logging.getLogger("signing_proxy.websocket")

# The largest message relayed either way: 32 times API Gateway's 128 KB quota (aiohttp's default).
# A message is held whole while relayed, so this bounds memory per connection.
MAX_MESSAGE = 4 * 1024 * 1024
# Messages go upstream in frames of at most this size: under API Gateway's 32 KB frame quota
# however "KB" and the frame header are counted. Every WebSocket server must take fragments.
UPSTREAM_FRAME_SIZE = 16 * 1024
# Frames the upstream connection queues before it stops reading from the socket (backpressure).
UPSTREAM_QUEUE_FRAMES = 4
# How long a closing handshake may take before the connection is dropped.
CLOSE_TIMEOUT = 5.0

# Why an upstream (API Gateway in particular) closes with these codes; logged as warnings.
CLOSE_EXPLANATIONS = {
    1001: "going away (API Gateway closes connections idle for 10 minutes or open for 2 hours)",
    1008: "policy violation",
    1009: "message too big (API Gateway takes frames up to 32 KB and messages up to 128 KB)",
    1011: "internal error in the upstream",
    1012: "service restart",
    1013: "try again later (throttled)",
    1014: "bad gateway behind the upstream",
}
# Sent to the client when the upstream connection ends without a close frame.
UPSTREAM_LOST = (1014, "upstream connection lost")
# Sent upstream when the client connection ends without a close frame.
CLIENT_LOST = (1001, "client went away")
# Sent upstream when the client breaks the protocol or sends a message over MAX_MESSAGE.
CLIENT_FAILED = (1001, "client connection failed")
# Sent both ways when the proxy stops.
SHUTTING_DOWN = (1001, "proxy shutting down")


# Wind-down tasks of cancelled relays, referenced until they finish.
_WINDING: set[asyncio.Future[None]] = set()


class Relay:
    """Both directions of one connection.

    The client-to-upstream direction runs in the request's handler task, the other
    in one extra task: two tasks per connection, nothing else while it is idle.
    Whoever closes first decides the close code and reason the other side gets.
    """

    __slots__ = (
        "client",
        "client_closed",
        "exchange",
        "label",
        "opened",
        "pending_ping",
        "relays",
        "request",
        "upstream",
    )

    def __init__(
        self,
        request: web.BaseRequest,
        client: web.WebSocketResponse,
        upstream: ClientConnection,
        label: str,
        relays: set[Relay],
        exchange: Exchange,
    ) -> None:
        self.request = request
        self.exchange = exchange  # bytes_in and bytes_out: message payloads relayed each way
        self.relays = relays
        self.client = client
        self.upstream = upstream
        self.label = label
        self.opened = time.monotonic()
        self.client_closed = False  # set before we start closing the upstream on the client's behalf
        self.pending_ping: asyncio.Future[float] | None = None

    async def run(self) -> None:
        downstream = asyncio.create_task(self._upstream_to_client())
        self.relays.add(self)
        try:
            close = await self._client_to_upstream()
            await downstream
            if close is not None:
                # The upstream's answer to the client's close (normally the same code) goes back.
                answer = self.upstream.protocol.close_rcvd
                code, reason = (answer.code, answer.reason) if answer is not None else close
                await self.client.close(code=_sendable(code), message=reason.encode())
        finally:
            # Normally both sides are closed by now. When the handler is cancelled (the client
            # connection was lost, or the server is stopping) they are closed here, in a task of
            # its own so that a second cancellation cannot cut the closing handshakes short.
            winding = asyncio.ensure_future(self._wind_down(downstream))
            _WINDING.add(winding)
            winding.add_done_callback(_WINDING.discard)
            await asyncio.shield(winding)

    async def _wind_down(self, downstream: asyncio.Task[None]) -> None:
        if self.upstream.protocol.close_sent is None:
            self.client_closed = True
            transport = self.request.transport
            client_lost = transport is None or transport.is_closing()
            # The downstream task keeps draining the upstream meanwhile, so its close reply is read.
            await close_upstream(self.upstream, *(CLIENT_LOST if client_lost else SHUTTING_DOWN))
        if not downstream.done():
            downstream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await downstream
        if not self.client.closed:
            await self.client.close(code=SHUTTING_DOWN[0], message=SHUTTING_DOWN[1].encode())
        self.relays.discard(self)

    async def close(self, code: int, reason: str) -> None:
        """Close both sides with the same code, from outside the relay (the proxy is stopping)."""
        self.client_closed = True  # nothing the upstream says now is passed on
        await asyncio.gather(
            close_upstream(self.upstream, code, reason),
            self.client.close(code=code, message=reason.encode()),
            return_exceptions=True,
        )

    async def _client_to_upstream(self) -> tuple[int, str] | None:
        """Relay until the client closes; return its close code and reason when it did."""
        client = self.client
        while True:
            message = await client.receive()
            kind = message.type
            if kind is WSMsgType.TEXT:
                if not await self._send_upstream(message.data.encode(), text=True):
                    return None
            elif kind is WSMsgType.BINARY:
                if not await self._send_upstream(message.data, text=False):
                    return None
            elif kind is WSMsgType.PING:
                await client.pong(message.data)
                await self._ping_upstream()
            elif kind is WSMsgType.PONG:
                continue  # we never ping the client: an unsolicited pong needs nothing
            elif kind is WSMsgType.CLOSE:
                code, reason = message.data or 1005, message.extra or ""
                log.debug("%s: client closed with %d %s", self.label, code, reason)
                self.client_closed = True
                await close_upstream(self.upstream, code, reason)
                return code, reason
            elif kind is WSMsgType.CLOSING:
                return None  # the upstream closed first; _upstream_to_client is closing the client
            elif kind is WSMsgType.ERROR:
                # aiohttp has already closed the client with the matching code (1009 for a message
                # over MAX_MESSAGE, 1002 for a protocol error, ...).
                log.warning("%s: closing: the client connection failed: %s", self.label, message.data)
                self.client_closed = True
                await close_upstream(self.upstream, *CLIENT_FAILED)
                return None
            else:  # CLOSED: the client connection is gone
                self.client_closed = True
                await close_upstream(self.upstream, *CLIENT_LOST)
                return None

    async def _send_upstream(self, data: bytes, *, text: bool) -> bool:
        """Send one message upstream in frames API Gateway accepts; False once the upstream is closed."""
        try:
            if len(data) <= UPSTREAM_FRAME_SIZE:
                await self.upstream.send(data, text=text)
            else:
                frames = [data[i : i + UPSTREAM_FRAME_SIZE] for i in range(0, len(data), UPSTREAM_FRAME_SIZE)]
                await self.upstream.send(frames, text=text)
        except ConnectionClosed:
            return False  # _upstream_to_client sees the same closure and tells the client
        self.exchange.bytes_in += len(data)
        return True

    async def _ping_upstream(self) -> None:
        """Pass a client's ping on, so the upstream sees the client's keep-alive too.

        At most one is outstanding: a client pinging an unresponsive upstream
        must not pile up waiters. The upstream's pong ends here.
        """
        if self.pending_ping is not None and not self.pending_ping.done():
            return
        try:
            self.pending_ping = await self.upstream.ping()
        except ConnectionClosed:
            return

    async def _upstream_to_client(self) -> None:
        """Relay until the upstream closes.

        Once the client is gone, messages are read and dropped: the upstream's
        reply to our close is queued behind them, and the closing handshake
        could not complete (it would time out) if reading stopped.
        """
        client, upstream = self.client, self.upstream
        client_gone = False
        try:
            while True:
                data = await upstream.recv()
                if client_gone:
                    continue
                try:
                    if isinstance(data, str):
                        await client.send_str(data)
                        self.exchange.bytes_out += len(data.encode())
                    else:
                        await client.send_bytes(data)
                        self.exchange.bytes_out += len(data)
                except ConnectionError:  # reset, or "Connection lost" while waiting to write
                    client_gone = True  # _client_to_upstream sees it too, and closes the upstream
        except ConnectionClosed as closed:
            if self.client_closed:
                return  # the client closed first; run() answers it
            code, reason = self._log_upstream_close(closed)
            await self.client.close(code=_sendable(code), message=reason.encode())
        except Exception:
            # Never leave the client waiting on a dead relay: closing it wakes _client_to_upstream.
            log.exception("%s: relaying to the client failed", self.label)
            await self.client.close(code=1011, message=b"proxy error")

    def _log_upstream_close(self, closed: ConnectionClosed) -> tuple[int, str]:
        """Log why the upstream closed (warning for quota-like reasons); the code and reason to pass on."""
        age = time.monotonic() - self.opened
        received = closed.rcvd
        if received is None:
            log.warning(
                "%s: upstream connection lost without a close frame after %.0fs; closing the client with %d",
                self.label,
                age,
                UPSTREAM_LOST[0],
            )
            return UPSTREAM_LOST
        code, reason = int(received.code), received.reason
        explanation = CLOSE_EXPLANATIONS.get(code)
        if explanation:
            log.warning(
                "%s: upstream closed the WebSocket after %.0fs with %d %r: %s",
                self.label,
                age,
                code,
                reason,
                explanation,
            )
        else:
            log.debug("%s: upstream closed the WebSocket after %.0fs with %d %r", self.label, age, code, reason)
        return code, reason


def _sendable(code: int) -> int:
    """A close code that may appear in a close frame: 1005 (none given) and 1006 (lost) may not."""
    return 1000 if code in (1005, 1006, 1015) else code


async def close_upstream(upstream: ClientConnection, code: int, reason: str) -> None:
    """Close the upstream with the client's code; an empty close (1005) stays empty."""
    with contextlib.suppress(Exception):
        if code == 1005:
            await upstream.close(code=None, reason="")  # type: ignore[arg-type]  # websockets: no status code
        else:
            await upstream.close(code=code, reason=reason)
