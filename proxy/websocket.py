"""WebSocket relay: used when a client's request to the proxy asks to upgrade to a WebSocket.

The front hands every connection whose request carries ``Upgrade: websocket``
to ``Upgrades``, an aiohttp server, which serves that request and closes.
The upgrade is made *upstream first*, signed like any other request (SigV4
headers, or a presigned URL with ``websocket_signing: query``). Only when the
upstream accepts is the client's upgrade accepted, with the subprotocol the
upstream chose; a refusal (403, 429, ...) reaches the client as the plain HTTP
answer it was, status, headers and body. Then messages flow both ways until one
side closes, and its close code and reason are passed to the other side.

The upstream leg uses the ``websockets`` library rather than aiohttp's
``ws_connect`` for two reasons that matter against API Gateway:

* aiohttp discards the body of a refused upgrade (``WSServerHandshakeError``
  keeps the status only); ``websockets.InvalidStatus`` keeps the response;
* aiohttp always sends a message as one frame, and API Gateway closes the
  connection (1009) on a frame over 32 KB even though it takes messages up to
  128 KB; ``websockets`` sends a message in fragments.

The client leg is aiohttp's WebSocket implementation.

Limits. API Gateway allows 32 KB frames, 128 KB messages, 10 minutes idle and
2 hours per connection. The proxy imposes none of these: it relays messages up
to ``MAX_MESSAGE`` (4 MiB) each way, never times an open connection out, and
logs why when the upstream closes for one of them (1001, 1009). Memory per
connection is bounded: a message is held whole while it is relayed, and
neither side is read while the other is not accepting writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.http11 import Response as HandshakeResponse
from websockets.typing import Subprotocol

from . import signing
from .config import Route
from .credentials import CredentialsUnavailable
from .http.egress import Egress, EgressError, Opened, ProxyEnvironment
from .http.front import Refusal, error_body
from .http.http1 import hop_by_hop
from .http.tls import tls_context, tls_failure
from .http.upstream import connect_failure
from .ops.logs import Exchange
from .routing import Match

if TYPE_CHECKING:
    from .forwarding import Forwarder

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
# X-Amz-Expires of a presigned upgrade: it is used at once, so a short life is enough.
PRESIGN_EXPIRES = 300

PRESIGN_PARAMS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
)
_PRESIGN_KEYS = frozenset(name.lower() for name in PRESIGN_PARAMS)
# What the websockets client accepts in a header value (it sends the value UTF-8 encoded, which
# gives back the client's own bytes for these characters).
_SENDABLE_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*").fullmatch

# Each leg of the connection has its own handshake: the client's are never copied upstream
# (Upgrade and Connection are hop-by-hop and already gone). Host is dropped after signing:
# the websockets client sets it from the URL, to the same value.
HANDSHAKE_HEADERS = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Accept",
    "Sec-WebSocket-Protocol",
)

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


# ---------------------------------------------------------------- presigned URL (pure)


def presign_query(
    method: str,
    wire_path: str,
    query: signing.Query,
    host: str,
    *,
    access_key_id: str,
    secret_access_key: str,
    session_token: str | None,
    amz_date: str,
    region: str,
    service: str,
    expires: int = PRESIGN_EXPIRES,
    payload_sha256: str = signing.EMPTY_SHA256,
    double_encode: bool = True,
) -> signing.Query:
    """The client's query plus the X-Amz-* parameters of a presigned (query-signed) request.

    This is what awscrt produces with ``AwsSignatureType.HTTP_REQUEST_QUERY_PARAMS``:
    ``host`` is the only signed header, the payload hash is that of an empty body
    (an upgrade has none, which is what API Gateway's $connect expects), the
    session token is a signed parameter, and ``X-Amz-Signature`` comes last.
    X-Amz-* parameters the client sent itself are replaced, never doubled.
    """
    scope = signing.credential_scope(amz_date[:8], region, service)
    ours = [
        ("X-Amz-Algorithm", signing.ALGORITHM),
        ("X-Amz-Credential", f"{access_key_id}/{scope}"),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    if session_token:
        ours.append(("X-Amz-Security-Token", session_token))
    encoded = [f"{name}={signing.uri_encode(value.encode())}" for name, value in ours]
    kept = [part for part in query.wire.split("&") if part and part.partition("=")[0].lower() not in _PRESIGN_KEYS]
    pairs = sorted((key, value) for key, _, value in (part.partition("=") for part in (*kept, *encoded)))
    canonical_query = "&".join(f"{key}={value}" for key, value in pairs)
    canonical, _ = signing.canonical_request(
        signing.SigningRequest(method, wire_path, canonical_query, (("host", host),), payload_sha256, double_encode)
    )
    to_sign = signing.string_to_sign(amz_date, scope, canonical)
    key = signing.signing_key(secret_access_key, amz_date[:8], region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    wire = "&".join([*kept, *encoded, f"X-Amz-Signature={signature}"])
    return signing.Query(wire, "&".join(f"{k}={v}" for k, v in sorted([*pairs, ("X-Amz-Signature", signature)])))


# ---------------------------------------------------------------- the handler


def offered_subprotocols(headers: Any) -> list[Subprotocol]:
    """The subprotocols a client offers (``Sec-WebSocket-Protocol``, possibly repeated), in order."""
    return [
        Subprotocol(token.strip())
        for value in headers.getall("Sec-WebSocket-Protocol", ())
        for token in value.split(",")
        if token.strip()
    ]


def upstream_ws_url(match: Match, query: signing.Query) -> str:
    """``wss://`` for an ``https://`` upstream, ``ws://`` for ``http://``; path and query in wire form."""
    route = match.route
    scheme = "wss" if route.dial_address[0] == "https" else "ws"  # as dialled (connect_to may be plain)
    return f"{scheme}://{route.upstream_host}{match.upstream_path}" + (f"?{query.wire}" if query.wire else "")


def error_response(status: int, message: str, reason: str, **headers: str) -> web.Response:
    """A JSON answer of the proxy's own, as the aiohttp response this side of the relay sends."""
    return web.Response(
        status=status, body=error_body(message, reason), content_type="application/json", headers=headers
    )


class Upgrades:
    """The aiohttp server the front hands WebSocket upgrades to: each connection serves one and closes."""

    def __init__(self, forwarder: Callable[[], Forwarder], header_timeout: float) -> None:
        self.forwarder = forwarder  # the current one (it changes on reload)
        self.relays: set[_Relay] = set()  # running now, so that a stopping server can close them
        self.server = web.Server(self._handle, handler_cancellation=True, keepalive_timeout=header_timeout)
        # The CONNECT tunnel (host:port) an upgrade came through, by protocol, until its request is handled.
        self.tunnels: dict[Any, str] = {}

    def protocol(self, tunnel: str | None = None) -> Any:
        protocol = self.server()
        if tunnel is not None:
            for gone in [p for p in self.tunnels if p.transport is None]:  # clients that left before asking
                del self.tunnels[gone]
            self.tunnels[protocol] = tunnel
        return protocol

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        forwarder = self.forwarder()
        started = time.monotonic()
        exchange = Exchange(request.method)
        response: web.StreamResponse | None = None
        try:
            tunnel = self.tunnels.pop(request.protocol, None)
            match, raw_query = forwarder.resolve(request.raw_path, request.headers, exchange, tunnel)
            response = await relay_websocket(forwarder, request, match, raw_query, self.relays, exchange)
        except Refusal as refusal:
            response = error_response(refusal.status, refusal.message, refusal.reason, **dict(refusal.headers))
        except Exception:
            log.exception("%s %s: internal error", request.method, exchange.path)
            response = error_response(500, "signing-proxy failed on this request; see its log", "internal_error")
        finally:
            exchange.duration = time.monotonic() - started
            if response is not None:
                exchange.status = response.status
            forwarder.observe(exchange)
        response.force_close()  # what follows on this connection goes to the front, which has let it go
        return response

    async def close(self, grace: float) -> None:
        """Close every relayed WebSocket with 1001 both ways, then the server.

        Without it a stopping server waits its whole grace period for connections
        that never end on their own, then drops them without a close frame.
        """
        relays = list(self.relays)
        if relays:
            log.info("closing %d WebSocket connection(s): the proxy is stopping", len(relays))
            await asyncio.gather(*(relay.close(*SHUTTING_DOWN) for relay in relays), return_exceptions=True)
        await self.server.shutdown(grace)


async def relay_websocket(
    forwarder: Forwarder,
    request: web.BaseRequest,
    match: Match,
    raw_query: str,
    relays: set[_Relay],
    exchange: Exchange,
) -> web.StreamResponse:
    """Open the upstream WebSocket, then accept the client's and relay until either side closes.

    ``exchange`` gets what the access line shows: who signed, the upstream's time to
    accept the upgrade, and the message bytes relayed each way.
    """
    route = match.route
    offered = offered_subprotocols(request.headers)
    if not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
        return error_response(
            400,
            "not a valid WebSocket upgrade (it needs GET, Connection: Upgrade, Sec-WebSocket-Key "
            "and Sec-WebSocket-Version: 13)",
            "bad_websocket_upgrade",
        )
    headers = forwarder.upstream_headers(request.headers, route)
    for name in HANDSHAKE_HEADERS:
        headers.popall(name, None)
    query = signing.normalize_query(raw_query)
    try:
        if route.auth == "sigv4" and route.websocket_signing == "query":
            query, exchange.credentials = await _presigned(forwarder, match, query)
        else:
            exchange.credentials = await forwarder.authorize("GET", match, query, headers, signing.EMPTY_SHA256)
    except CredentialsUnavailable as error:
        exchange.credentials = route.credentials
        return error_response(
            503, f"credentials {route.credentials!r} are unavailable: {error}", error.reason, **{"Retry-After": "5"}
        )
    headers.popall("Host", None)
    unsendable = next((name for name, value in headers.items() if not _SENDABLE_VALUE(value)), None)
    if unsendable is not None:
        return error_response(
            400,
            f"header {unsendable} has a value a WebSocket upgrade cannot carry (bytes that are not UTF-8, "
            "or characters beyond U+00FF); percent-encode it",
            "bad_header",
        )
    url = upstream_ws_url(match, query)
    host = route.upstream_host
    timeouts = route.timeouts
    opening = time.monotonic()
    try:
        opened = await open_socket(route, timeouts.connect)
    except TimeoutError:
        return error_response(
            504, f"cannot connect to {host} within {timeouts.connect:g}s (connect_timeout)", "upstream_timeout"
        )
    except EgressError as error:
        return error_response(502, f"{host}: {error}", error.reason)
    except OSError as error:
        return error_response(502, f"{host}: cannot connect ({connect_failure(error)})", "upstream_unreachable")
    try:
        upstream = await _handshake(url, opened, headers, offered, timeouts.first_byte)
    except InvalidStatus as refused:
        log.info("%s refused the WebSocket upgrade with %d", host, refused.response.status_code)
        return refusal_response(refused.response)
    except TimeoutError:
        return error_response(
            504,
            f"{host} did not answer the WebSocket upgrade within {timeouts.first_byte:g}s; "
            "raise the route's first_byte_timeout if it is slow",
            "upstream_timeout",
        )
    except InvalidHandshake as error:
        return error_response(502, f"{host} answered the WebSocket upgrade wrongly: {error}", "upstream_bad_response")
    except ssl.SSLError as error:
        failure = tls_failure(error, route.upstream_address[1])
        return error_response(502, f"{host}: {failure}", failure.reason)
    except OSError as error:
        return error_response(502, f"{host}: connection failed ({connect_failure(error)})", "upstream_error")

    exchange.upstream_first_byte = time.monotonic() - opening
    client = web.WebSocketResponse(
        protocols=(upstream.subprotocol,) if upstream.subprotocol else (),
        autoping=False,  # pings are answered here *and* passed upstream, see _Relay
        autoclose=False,  # the client's close code goes upstream before the client is answered
        compress=False,
        max_msg_size=MAX_MESSAGE,
        timeout=CLOSE_TIMEOUT,
    )
    try:
        await client.prepare(request)
    except BaseException:
        await _close_upstream(upstream, *CLIENT_LOST)
        raise
    try:
        await _Relay(request, client, upstream, f"{route.path_prefix} {host}", relays, exchange).run()
    except asyncio.CancelledError:
        # aiohttp cancels the handler once the client's TCP connection is gone, and closing a
        # WebSocket closes that connection: a relay that ended normally is often cancelled in
        # its last steps. The upgrade was answered (101) and both sides are closed: not an error.
        transport = request.transport
        if transport is not None and not transport.is_closing():
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
    return client


async def open_socket(route: Route, timeout: float) -> Opened:
    """A TCP connection to the route's upstream (or a tunnel through its egress proxy), within ``timeout``.

    Made here rather than by the websockets client so that connecting and the
    upgrade exchange each get their own deadline (``connect_timeout``,
    ``first_byte_timeout``), as for HTTP.
    """
    scheme, host, port = route.dial_address  # connect_to's, when set
    egress = route.egress or Egress(tls_context(), ProxyEnvironment.read())
    async with asyncio.timeout(timeout):
        return await egress.open(scheme, host, port, tunnel=True)


async def _handshake(
    url: str, opened: Opened, headers: CIMultiDict[str], subprotocols: list[Subprotocol], timeout: float
) -> ClientConnection:
    """The upstream WebSocket over ``opened`` (closed if the upgrade fails); TLS and upgrade within ``timeout``."""
    try:
        return await connect(
            url,
            sock=opened.sock,
            ssl=opened.tls,
            additional_headers=list(headers.items()),
            subprotocols=subprotocols or None,
            compression=None,  # no per-connection zlib state; the relay stays byte-for-byte
            open_timeout=timeout,
            ping_interval=None,  # keep-alive is the client's business; pings it sends are passed on
            ping_timeout=None,
            close_timeout=CLOSE_TIMEOUT,
            max_size=MAX_MESSAGE,
            max_queue=UPSTREAM_QUEUE_FRAMES,
            user_agent_header=None,  # the client's User-Agent, if any, is passed on instead
        )
    except BaseException:
        opened.sock.close()
        raise


async def _presigned(forwarder: Forwarder, match: Match, query: signing.Query) -> tuple[signing.Query, str]:
    """The query with the route's credentials presigned into it (``websocket_signing: query``), and who signed."""
    route = match.route
    credentials = await forwarder.providers[route.credentials].aws_credentials()
    amz_date = signing.amz_date(time.time() + forwarder.clock_offset)
    signed_by = f"{route.credentials} {credentials.key_prefix}"
    return presign_query(
        "GET",
        match.upstream_path,
        query,
        route.upstream_host,
        access_key_id=credentials.access_key_id,
        secret_access_key=credentials.secret_access_key,
        session_token=credentials.session_token,
        amz_date=amz_date,
        region=route.resolved_region or "",
        service=route.service,
    ), signed_by


def refusal_response(response: HandshakeResponse) -> web.Response:
    """The upstream's refusal of the upgrade, as a plain HTTP answer (hop-by-hop headers dropped)."""
    received: CIMultiDict[str] = CIMultiDict(response.headers.raw_items())
    drop = hop_by_hop(received) | {"content-length"}
    headers: CIMultiDict[str] = CIMultiDict((k, v) for k, v in received.items() if k.lower() not in drop)
    return web.Response(
        status=response.status_code, reason=response.reason_phrase, body=bytes(response.body), headers=headers
    )


# ---------------------------------------------------------------- the relay

# Wind-down tasks of cancelled relays, referenced until they finish.
_WINDING: set[asyncio.Future[None]] = set()


class _Relay:
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
        relays: set[_Relay],
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
            await _close_upstream(self.upstream, *(CLIENT_LOST if client_lost else SHUTTING_DOWN))
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
            _close_upstream(self.upstream, code, reason),
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
                await _close_upstream(self.upstream, code, reason)
                return code, reason
            elif kind is WSMsgType.CLOSING:
                return None  # the upstream closed first; _upstream_to_client is closing the client
            elif kind is WSMsgType.ERROR:
                # aiohttp has already closed the client with the matching code (1009 for a message
                # over MAX_MESSAGE, 1002 for a protocol error, ...).
                log.warning("%s: closing: the client connection failed: %s", self.label, message.data)
                self.client_closed = True
                await _close_upstream(self.upstream, *CLIENT_FAILED)
                return None
            else:  # CLOSED: the client connection is gone
                self.client_closed = True
                await _close_upstream(self.upstream, *CLIENT_LOST)
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


async def _close_upstream(upstream: ClientConnection, code: int, reason: str) -> None:
    """Close the upstream with the client's code; an empty close (1005) stays empty."""
    with contextlib.suppress(Exception):
        if code == 1005:
            await upstream.close(code=None, reason="")  # type: ignore[arg-type]  # websockets: no status code
        else:
            await upstream.close(code=code, reason=reason)
