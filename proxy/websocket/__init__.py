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
import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.http11 import Response as HandshakeResponse
from websockets.typing import Subprotocol

from .. import signing
from ..config import Route
from ..credentials import CredentialsUnavailable
from ..http.egress import Egress, EgressError, Opened, ProxyEnvironment
from ..http.front import Refusal, error_body
from ..http.http1 import hop_by_hop
from ..http.tls import tls_context, tls_failure
from ..http.upstream import connect_failure
from ..ops.logs import Exchange
from ..routing import Match
from ..signing.presigned import presign_query
from .relay import (
    CLIENT_LOST,
    CLOSE_TIMEOUT,
    MAX_MESSAGE,
    SHUTTING_DOWN,
    UPSTREAM_QUEUE_FRAMES,
    Relay,
    close_upstream,
)

if TYPE_CHECKING:
    from ..forwarding import Forwarder

log = logging.getLogger("signing_proxy.websocket")

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
        self.relays: set[Relay] = set()  # running now, so that a stopping server can close them
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
    relays: set[Relay],
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
        autoping=False,  # pings are answered here *and* passed upstream, see relay.Relay
        autoclose=False,  # the client's close code goes upstream before the client is answered
        compress=False,
        max_msg_size=MAX_MESSAGE,
        timeout=CLOSE_TIMEOUT,
    )
    try:
        await client.prepare(request)
    except BaseException:
        await close_upstream(upstream, *CLIENT_LOST)
        raise
    try:
        await Relay(request, client, upstream, f"{route.path_prefix} {host}", relays, exchange).run()
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
