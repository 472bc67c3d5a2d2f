"""Forwarding: the HTTP handler that signs a request, sends it upstream and streams the answer.

The request body is read (and hashed) before anything goes upstream, because
SigV4 signs the payload hash and ``max_body`` must be enforced first. The
response is never collected: each chunk is written to the client as it
arrives, so memory stays flat and server-sent events flow one by one.

What goes upstream is the client's request minus hop-by-hop headers and the
headers we own (Host, Authorization, X-Amz-Date, X-Amz-Security-Token,
X-Amz-Content-Sha256), plus our signature and the body's length. Nothing else
is added: ``upstream`` writes exactly these headers.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import logging
import re
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from . import signing
from .config import Config, Route
from .credentials import CredentialsUnavailable, Provider
from .logs import Exchange, access_log, log_access
from .metrics import Metrics
from .routing import Match, Router
from .upstream import ConnectTimeout, FirstByteTimeout, Pool, UpstreamError, UpstreamResponse

log = logging.getLogger("signing_proxy.forwarding")

# RFC 9110 7.6.1 (plus Proxy-Authorization, which is addressed to us, never upstream).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# Methods whose requests carry a length even when empty (servers may insist on one).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Set by us from what we actually send; whatever the client had is dropped.
OWNED_REQUEST_HEADERS = frozenset(
    {
        "host",
        "authorization",
        "x-amz-date",
        "x-amz-security-token",
        "x-amz-content-sha256",
        "content-length",
        "expect",
    }
)


def error_response(status: int, message: str, reason: str, **headers: str) -> web.Response:
    """The JSON body every proxy-made error carries: what happened and what to do."""
    body = json.dumps({"message": message, "reason": reason}).encode()
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def connection_tokens(headers: Any) -> set[str]:
    """Header names listed in ``Connection`` (they are hop-by-hop too)."""
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def failed(exchange: Exchange, status: int, message: str, reason: str) -> web.Response:
    """An error answer for an upstream failure, counted by kind."""
    exchange.error_kind = reason
    return error_response(status, message, reason)


def has_body(method: str, status: int) -> bool:
    """Whether a response to ``method`` with ``status`` carries a body (RFC 9110 6.4.1)."""
    return method != "HEAD" and status >= 200 and status not in (204, 304)


def too_large_response(max_body: int) -> web.Response:
    """413, closing the connection: the rest of the body is never read."""
    response = error_response(
        413, f"request body is larger than max_body ({max_body} bytes); raise max_body to send it", "body_too_large"
    )
    response.force_close()
    return response


class RelayedResponse(web.StreamResponse):
    """A response that carries only the upstream's headers.

    aiohttp fills in Server and a default Content-Type when they are missing;
    a relay must not invent them. (Date is added when missing, as RFC 9110
    asks of anything that forwards a response.)
    """

    def hold_headers(self) -> None:
        """Send the headers with the first body bytes instead of on their own."""
        self._send_headers_immediately = False

    async def _prepare_headers(self) -> None:
        invented = [name for name in ("Server", "Content-Type") if name not in self.headers]
        await super()._prepare_headers()
        for name in invented:
            self.headers.popall(name, None)


class BodyTooLarge(Exception):
    pass


async def read_body(request: web.Request, max_body: int) -> tuple[list[bytes], int, str]:
    """The whole request body (as the chunks that arrived), its length and SHA-256.

    Refuses more than ``max_body`` bytes. The chunks are never joined: they go
    upstream as they are, which saves copying a large upload once more.
    """
    if request.content_length is not None and request.content_length > max_body:
        raise BodyTooLarge
    if not request.body_exists:
        return [], 0, signing.EMPTY_SHA256
    digest = hashlib.sha256()
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > max_body:
            raise BodyTooLarge
        digest.update(chunk)
        parts.append(chunk)
    return parts, size, digest.hexdigest()


class Forwarder:
    """The aiohttp handler for every proxied request."""

    def __init__(
        self,
        config: Config,
        providers: dict[str, Provider],
        pool: Pool,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.router = Router(config.routes)
        self.providers = providers
        self.pool = pool
        self.clock_offset = 0.0  # seconds to add to our clock when signing (skew correction)

    # ------------------------------------------------------------ request side

    def upstream_headers(self, request: web.Request, route: Route) -> CIMultiDict[str]:
        """The client's headers minus hop-by-hop and the ones we own; repeats kept."""
        drop = HOP_BY_HOP | OWNED_REQUEST_HEADERS | connection_tokens(request.headers)
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            if name.lower() not in drop:
                headers.add(name, value)
        headers["Host"] = route.upstream_host
        if route.api_key:
            headers["x-api-key"] = route.api_key
        return headers

    async def authorize(
        self,
        request_method: str,
        match: Match,
        query: signing.Query,
        headers: CIMultiDict[str],
        payload_sha256: str,
    ) -> str:
        """Add the route's authentication to ``headers`` (SigV4, a Cognito token, or nothing).

        Returns what signed, for the access log: the source name and key id prefix.
        """
        route = match.route
        if route.auth == "none":
            return "-"
        provider = self.providers[route.credentials]
        if route.auth != "sigv4":
            tokens = await provider.user_pool_tokens()
            headers["Authorization"] = tokens.id_token if route.auth == "cognito_id_token" else tokens.access_token
            return f"{route.credentials} ({route.auth})"
        credentials = await provider.aws_credentials()
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() + self.clock_offset))
        headers["X-Amz-Date"] = amz_date
        headers["X-Amz-Content-Sha256"] = payload_sha256
        if credentials.session_token:
            headers["X-Amz-Security-Token"] = credentials.session_token
        signed = [(name, headers.getone(name)) for name in SIGNED_HEADERS if name in headers]
        if "Content-Type" in headers:
            signed += [("Content-Type", value) for value in headers.getall("Content-Type")]
        signature = signing.sign(
            signing.SigningRequest(request_method, match.upstream_path, query.canonical, tuple(signed), payload_sha256),
            access_key_id=credentials.access_key_id,
            secret_access_key=credentials.secret_access_key,
            amz_date=amz_date,
            region=route.resolved_region or "",
            service=route.service,
        )
        headers["Authorization"] = signature.authorization
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "signed %s %s with %s\n--- canonical request ---\n%s\n--- string to sign ---\n%s",
                request_method,
                match.upstream_path,
                credentials.key_prefix,
                redact_canonical(signature.canonical_request),
                signature.string_to_sign,
            )
        return f"{route.credentials} {credentials.key_prefix}"

    # ------------------------------------------------------------ the handler

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        exchange = Exchange(request.method)
        response: web.StreamResponse | None = None
        try:
            response = await self._handle(request, exchange)
        except Exception:
            # A bug of ours: logged with its traceback, answered without one.
            log.exception("%s %s: internal error", request.method, exchange.path)
            response = error_response(500, "signing-proxy failed on this request; see its log", "internal_error")
        finally:
            exchange.duration = time.monotonic() - started
            if response is not None and not exchange.client_gone:
                exchange.status = response.status
            self.observe(exchange)
        return response

    async def _handle(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        if self.config.inbound_token and not self._inbound_authorized(request):
            return error_response(
                407,
                "send Proxy-Authorization: Bearer <inbound_token> to use this proxy",
                "proxy_authentication_required",
                **{"Proxy-Authenticate": 'Bearer realm="signing-proxy"'},
            )
        target = request_target(request.raw_path)
        if target is None:
            return error_response(
                400, "the request target must be a path in UTF-8 (percent-encode other bytes)", "bad_request_target"
            )
        raw_path, _, raw_query = target.partition("?")
        wire_path = signing.normalize_path(raw_path)
        exchange.path = wire_path
        match = self.router.match(wire_path)
        if match is None:
            return error_response(
                404, f"no route matches {wire_path}; add a route whose path_prefix covers it", "no_route"
            )
        exchange.route = match.route.path_prefix
        if request.headers.get("Upgrade", "").lower() == "websocket":
            from .websocket import relay_websocket

            return await relay_websocket(self, request, match, raw_query)
        return await self._forward(request, match, raw_query, exchange)

    def _inbound_authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Proxy-Authorization", "").partition(" ")
        expected = self.config.inbound_token or ""
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())

    async def _forward(
        self, request: web.Request, match: Match, raw_query: str, exchange: Exchange
    ) -> web.StreamResponse:
        route = match.route
        try:
            body, body_size, payload_sha256 = await read_body(request, self.config.max_body)
        except BodyTooLarge:
            return too_large_response(self.config.max_body)
        exchange.bytes_in = body_size
        query = signing.normalize_query(raw_query)
        exchange.query = query.wire
        headers = self.upstream_headers(request, route)
        try:
            exchange.credentials = await self.authorize(request.method, match, query, headers, payload_sha256)
        except CredentialsUnavailable as error:
            exchange.credentials = route.credentials
            return error_response(
                503, f"credentials {route.credentials!r} are unavailable: {error}", error.reason, **{"Retry-After": "5"}
            )
        target = match.upstream_path + (f"?{query.wire}" if query.wire else "")
        return await self._exchange(request, route, target, headers, body, exchange)

    async def _exchange(
        self,
        request: web.Request,
        route: Route,
        target: str,
        headers: CIMultiDict[str],
        body: list[bytes],
        exchange: Exchange,
    ) -> web.StreamResponse:
        timeouts = route.timeouts
        if body or request.body_exists or request.method in BODY_METHODS:
            headers["Content-Length"] = str(exchange.bytes_in)
        sent = time.monotonic()
        try:
            upstream = await self.pool.request(
                request.method, route.upstream_address, target, headers.items(), body,
                connect_timeout=timeouts.connect, first_byte_timeout=timeouts.first_byte,
            )  # fmt: skip
        except (ConnectTimeout, FirstByteTimeout) as error:
            advice = "raise the route's connect_timeout" if isinstance(error, ConnectTimeout) else (
                "raise the route's timeout (or first_byte_timeout) if it is slow"
            )  # fmt: skip
            return failed(exchange, 504, f"{route.upstream_host}: {error}; {advice}", error.reason)
        except UpstreamError as error:
            return failed(exchange, 502, f"{route.upstream_host}: {error}", error.reason)
        upstream.idle_timeout = timeouts.idle
        exchange.upstream_first_byte = time.monotonic() - sent
        try:
            prefetched = await self._check_clock_skew(route, upstream) if upstream.status == 403 else None
            response = await self._relay(request, upstream, exchange, prefetched)
        except BaseException:
            upstream.close()  # a half-read connection never goes back to the pool
            raise
        upstream.release()  # back to the pool when the body was read to the end, closed otherwise
        return response

    async def _check_clock_skew(self, route: Route, upstream: UpstreamResponse) -> bytes | None:
        """Read a small 403 body; when AWS says our time is off, correct the signing clock by its Date.

        Returns the body read (to relay as it is), or None when it was left unread.
        """
        if route.auth != "sigv4" or (upstream.content_length or 0) > 65536 or upstream.content_length is None:
            return None
        body = await upstream.read()
        if SKEW_ERROR.search(body):
            offset = clock_offset(upstream.headers.get("Date"))
            if offset is not None and abs(offset - self.clock_offset) >= 1.0:
                self.clock_offset = offset
                log.warning(
                    "%s says our clock is off: signing with the time corrected by %+.0fs (from its Date header); "
                    "fix this machine's clock",
                    route.upstream_host,
                    offset,
                )
        return body

    async def _relay(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        exchange: Exchange,
        prefetched: bytes | None = None,
    ) -> web.StreamResponse:
        """Stream the upstream response to the client as it arrives (or send ``prefetched``, its whole body).

        Whatever body already arrived with the upstream's headers goes out in the
        same write as our headers; a body that is already complete (most small
        answers) goes out in one write, headers included. Each write is a system
        call, the largest cost per request on loopback.
        """
        response = RelayedResponse(status=upstream.status, reason=upstream.reason)
        drop = HOP_BY_HOP | connection_tokens(upstream.headers)
        for name, value in upstream.headers.items():
            if name.lower() not in drop:
                response.headers.add(name, value)
        if prefetched is None:
            first, complete = upstream.read_nowait(), upstream.is_eof()
        else:
            first, complete = prefetched, True
        if first or complete:
            response.hold_headers()
            if complete and "Content-Length" not in response.headers and has_body(request.method, upstream.status):
                response.content_length = len(first)  # was chunked or close-delimited: now one plain body
        try:
            await response.prepare(request)
            exchange.bytes_out = len(first)
            if complete:
                await response.write_eof(first)
                return response
            if first:
                await response.write(first)
            while True:
                chunk = await upstream.readany()  # idle_timeout bounds each wait
                if not chunk:
                    break
                exchange.bytes_out += len(chunk)
                await response.write(chunk)
        except (UpstreamError, TimeoutError) as error:
            # The body is cut short: abort the client connection so it cannot
            # mistake what it got for the whole body.
            kind = "upstream_idle_timeout" if isinstance(error, TimeoutError) else "upstream_body_cut"
            exchange.error_kind = kind
            log.warning("%s %s: upstream body cut short (%s); aborting the client connection", exchange.method,
                        exchange.path, kind)  # fmt: skip
            abort(request)
            upstream.close()
            return response
        except ConnectionError:
            # The client went away mid-answer: stop reading the upstream (its connection is closed,
            # never pooled half-read). aiohttp finishes the dead response quietly.
            exchange.client_gone = True
            upstream.close()
            return response
        await response.write_eof()
        return response

    def observe(self, exchange: Exchange) -> None:
        """Record a finished request in the metrics and the access log."""
        if self.metrics is not None:
            self.metrics.observe(exchange)
        if access_log.isEnabledFor(logging.INFO):
            log_access(exchange, with_query_values=access_log.isEnabledFor(logging.DEBUG))


# What AWS says when X-Amz-Date is too far from its clock (API Gateway, STS, Lambda, S3 wordings).
SKEW_ERROR = re.compile(rb"signature expired|too skewed|RequestExpired|RequestTimeTooSkewed", re.IGNORECASE)


def clock_offset(date_header: str | None) -> float | None:
    """Seconds the peer's clock (its Date header) is ahead of ours."""
    if not date_header:
        return None
    try:
        return email.utils.parsedate_to_datetime(date_header).timestamp() - time.time()
    except (TypeError, ValueError):
        return None


SIGNED_HEADERS = ("Host", "X-Amz-Date", "X-Amz-Content-Sha256", "X-Amz-Security-Token")


def request_target(raw_target: str) -> str | None:
    """The origin-form path and query of a request target, or None when there is none or it is not UTF-8.

    Absolute-form targets (``GET http://host/path``, what clients configured
    with ``HTTP_PROXY`` send) are reduced to their path; a fragment is dropped.
    """
    target = raw_target.partition("#")[0]
    if not target.startswith("/"):
        scheme, sep, rest = target.partition("://")
        if not sep or not scheme.isalpha():
            return None  # "*" (OPTIONS *) or garbage: nothing to forward
        target = "/" + rest.partition("/")[2]
    try:
        target.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8
        return None
    return target


def abort(request: web.Request) -> None:
    """Close the client connection at once, without ending the response properly."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def redact_canonical(canonical_request: str) -> str:
    """The canonical request with the session token value hidden (it is a secret)."""
    lines = canonical_request.split("\n")
    return "\n".join(
        "x-amz-security-token:<redacted>" if line.startswith("x-amz-security-token:") else line for line in lines
    )
