"""Forwarding: the HTTP handler that signs a request, sends it upstream and streams the answer.

The request body is read (and hashed) before anything goes upstream, because
SigV4 signs the payload hash and ``max_body`` must be enforced first, unless
the route's payload mode streams it (see ``payload``). The
response is never collected: each chunk is written to the client as it
arrives, so memory stays flat and server-sent events flow one by one.

What goes upstream is the client's request minus hop-by-hop headers and the
headers we own (Host, Authorization, X-Amz-Date, X-Amz-Security-Token,
X-Amz-Content-Sha256), plus our signature and the body's length. Nothing else
is added: ``upstream`` writes exactly these headers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hmac
import logging
import re
import time
from typing import Any

from multidict import CIMultiDict

from . import cors, signing
from .config import Config, Route
from .credentials import CredentialsUnavailable, Provider
from .forward import Allowed, ForwardProxy
from .hosts import split_authority
from .http import splice
from .http.front import Refusal, Request, Response
from .http.http1 import HOP_BY_HOP, has_body, hop_by_hop
from .http.tunnel import Terminate, Tunnel
from .http.upstream import ConnectTimeout, FirstByteTimeout, Pool, UpstreamError, UpstreamResponse
from .ops.logs import Exchange, access_log, log_access
from .ops.metrics import Metrics
from .payload import Payload, chain, gather_small, no_body, read_payload
from .routing import Match, Router
from .signing import mismatch, sigv4a

log = logging.getLogger("signing_proxy.forwarding")

# What a 407 offers: a bearer token, or Basic with the token as the password (a proxy URL's user:password).
CHALLENGES = (
    ("Proxy-Authenticate", 'Bearer realm="signing-proxy"'),
    ("Proxy-Authenticate", 'Basic realm="signing-proxy"'),
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
NOT_FORWARDED = HOP_BY_HOP | OWNED_REQUEST_HEADERS  # what a request whose Connection names nothing more loses


def failed(exchange: Exchange, message: str, status: int, reason: str) -> Refusal:
    """An upstream failure before the answer began (502 or 504), counted by kind."""
    exchange.error_kind = reason
    return Refusal(message, status, reason)


def unavailable(route: Route, error: CredentialsUnavailable) -> Refusal:
    return Refusal(
        f"credentials {route.credentials!r} are unavailable: {error}", 503, error.reason, (("Retry-After", "5"),)
    )


class Forwarder:
    """The handler for every proxied request (``front`` calls ``handle``)."""

    def __init__(
        self,
        config: Config,
        providers: dict[str, Provider],
        pool: Pool,
        metrics: Metrics | None = None,
        forward: ForwardProxy | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.router = Router(config.routes)
        self.forward = forward or ForwardProxy(config.forward, None)
        self.providers = providers
        self.pool = pool
        self.clock_offset = 0.0  # seconds to add to our clock when signing (skew correction)
        self.cors, self.route_cors = cors.policies(config)
        self._route_ids = {id(route) for route in config.routes}  # the rest are forward hosts' routes

    # ------------------------------------------------------------ request side

    def resolve(
        self, raw_target: str, headers: Any, exchange: Exchange, tunnel: str | None = None
    ) -> tuple[Match, str]:
        """The route and raw query of a request, after the inbound token check; raises ``Refusal``.

        ``tunnel``: the host:port of the CONNECT the request came through (its
        token was checked then); the request is for that host, whatever it says.
        """
        if tunnel is None:
            self._check_inbound(headers)
        target = request_target(raw_target)
        if target is None:
            raise Refusal(
                "the request target must be a path in UTF-8 (signing-proxy is a reverse proxy, not a tunnel)",
                reason="bad_request_target",
            )
        raw_path, _, raw_query = target.partition("?")
        wire_path = signing.normalize_path(raw_path)
        exchange.path = wire_path
        allowed = self._forward_host(raw_target, tunnel)
        match = self.router.match(wire_path) if allowed is None else Match(allowed.route, wire_path)
        if match is None and self.forward.active and "Host" in headers:  # origin form for a forward host
            allowed = self.forward.allowed(*(split_authority(headers["Host"]) or ("", 0)))
            match = Match(allowed.route, wire_path) if allowed is not None else None
        if match is None:
            raise Refusal(f"no route matches {wire_path}; add a route whose path_prefix covers it", 404, "no_route")
        if match.route.rules.s3_paths:
            # The route is chosen on the normalised path; an S3 key is sent as it is, dot segments and all.
            s3_path = signing.s3_wire_path(raw_path)
            s3_match = self.router.match(s3_path) if allowed is None else Match(match.route, s3_path)
            if s3_match is None or s3_match.route is not match.route:
                raise Refusal(f"{s3_path} leaves the route {match.route.path_prefix} once its dot segments count")
            match, exchange.path = s3_match, s3_path
        exchange.route = match.route.path_prefix if allowed is None else allowed.rule.host
        return match, raw_query

    def cors_policy(self, route: Route) -> cors.Policy | None:
        """A route's CORS policy; a forward host's is its rule's own ``cors``, else the top-level one."""
        if id(route) in self._route_ids:
            return self.route_cors[route.path_prefix]
        return cors.Policy(route.cors) if route.cors is not None else self.cors

    def _forward_host(self, raw_target: str, tunnel: str | None) -> Allowed | None:
        """The forward rule's route for a request inside a tunnel or in absolute form (sent to
        ``https://`` its host whatever scheme it names); None when it routes by path. Raises ``Refusal``."""
        if tunnel is not None:
            return self.forward.for_target(tunnel, 443)
        if raw_target.startswith("/"):
            return None  # origin-form (absolute-form naming the proxy itself arrives as such): routed by path
        # Absolute-form naming another host: served only for a host a forward rule covers (else 403), never
        # sent to a route's upstream as if it had been asked for (the front's admit_target passes it here).
        return self.forward.for_target(raw_target.partition("://")[2].partition("/")[0].partition("?")[0], 443)

    def connect(self, request: Request) -> Terminate | Tunnel:
        """The front's hook for ``CONNECT host:port`` (see ``forward``); raises ``Refusal``.

        Logged and counted like a request (route ``forward`` or ``tunnel``), refused ones included.
        """
        exchange = Exchange("CONNECT", path=request.target[:300])
        try:
            self._check_inbound(request.headers)
            decision = self.forward.connect(request.target)
        except Refusal as refusal:
            exchange.status = refusal.status
            self.observe(exchange)
            raise
        exchange.status, exchange.route = 200, "tunnel" if isinstance(decision, Tunnel) else "forward"
        self.observe(exchange)
        return decision

    def _check_inbound(self, headers: Any) -> None:
        if self.config.inbound_token and not self._inbound_authorized(headers):
            raise Refusal(
                "send Proxy-Authorization: Bearer <inbound_token> (or Basic with it as the password, "
                "as in HTTPS_PROXY=http://user:TOKEN@host:port) to use this proxy",
                407,
                "proxy_authentication_required",
                CHALLENGES,
            )

    def _inbound_authorized(self, headers: Any) -> bool:
        scheme, _, token = headers.get("Proxy-Authorization", "").partition(" ")
        expected = self.config.inbound_token or ""
        if scheme.lower() == "basic":  # what clients send for a proxy URL with user:password
            try:
                token = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), expected.encode())

    def upstream_headers(self, client_headers: Any, route: Route) -> CIMultiDict[str]:
        """The client's headers minus hop-by-hop and the ones we own; repeats kept."""
        hop = hop_by_hop(client_headers)
        drop = NOT_FORWARDED if hop is HOP_BY_HOP else hop | OWNED_REQUEST_HEADERS
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in client_headers.items():
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
        payload: Payload | None = None,
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
        credentials = provider.fresh_credentials() or await provider.aws_credentials()
        amz_date = signing.amz_date(time.time() + self.clock_offset)
        headers["X-Amz-Date"] = amz_date
        headers["X-Amz-Content-Sha256"] = payload_sha256
        # SIGNED_HEADERS, each set here or by upstream_headers (Host), never by the client (OWNED_REQUEST_HEADERS).
        signed = [("Host", route.upstream_host), ("X-Amz-Date", amz_date), ("X-Amz-Content-Sha256", payload_sha256)]
        if credentials.session_token:
            headers["X-Amz-Security-Token"] = credentials.session_token
            signed.append(("X-Amz-Security-Token", credentials.session_token))
        own = len(signed)
        if "Content-Type" in headers:
            signed += [("Content-Type", value) for value in headers.getall("Content-Type")]
        rules = route.rules
        if rules.sign_amz_headers:  # S3 refuses x-amz-* headers that are not signed
            signed += [(name, value) for name, value in headers.items() if amz_unsigned(name)]
        region = route.resolved_region or ""
        if route.signing == "sigv4a":
            await self._sign_sigv4a(request_method, match, query, headers, signed, amz_date, credentials)
            return f"{route.credentials} {credentials.key_prefix}"
        canonical = None  # SigV4's own headers only (most requests): their canonical form in one step
        if len(signed) == own:
            canonical = signing.own_canonical_headers(
                route.upstream_host, amz_date, payload_sha256, credentials.session_token
            )
        signature = signing.sign(
            signing.SigningRequest(
                request_method, match.upstream_path, query.canonical, tuple(signed), payload_sha256,
                double_encode=not rules.s3_paths, canonical_headers=canonical,
            ),
            access_key_id=credentials.access_key_id,
            secret_access_key=credentials.secret_access_key,
            amz_date=amz_date,
            region=region,
            service=route.service,
        )  # fmt: skip
        headers["Authorization"] = signature.authorization
        if payload is not None:
            payload.signature = signature
            chain(payload, credentials.secret_access_key, amz_date, region, route.service)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "signed %s %s with %s\n--- canonical request ---\n%s\n--- string to sign ---\n%s",
                request_method,
                match.upstream_path,
                credentials.key_prefix,
                signing.redact_canonical(signature.canonical_request),
                signature.string_to_sign,
            )
        return f"{route.credentials} {credentials.key_prefix}"

    async def credentials_ready(self, route: Route, exchange: Exchange) -> None:
        """Have (or fetch) what the route authenticates with; a 503 ``Refusal`` when it cannot be had.

        Asked before ``100 Continue``: a large upload is never invited only to be refused.
        ``authorize`` then finds the credentials cached.
        """
        if route.auth == "none":
            return
        provider = self.providers[route.credentials]
        try:
            await (provider.aws_credentials() if route.auth == "sigv4" else provider.user_pool_tokens())
        except CredentialsUnavailable as error:
            exchange.credentials = route.credentials
            raise unavailable(route, error) from None

    async def _sign_sigv4a(
        self,
        method: str,
        match: Match,
        query: signing.Query,
        headers: CIMultiDict[str],
        signed: list[tuple[str, str]],
        amz_date: str,
        credentials: Any,
    ) -> None:
        """SigV4a through awscrt (``signing.sigv4a``): its headers replace the SigV4 ones set before."""
        route = match.route
        target = match.upstream_path + (f"?{query.wire}" if query.wire else "")
        payload_sha256 = headers.popall("X-Amz-Content-Sha256")[0]
        for name in ("X-Amz-Date", "X-Amz-Security-Token"):
            headers.popall(name, None)
        added = await sigv4a.sign(
            method, target, signed,
            access_key_id=credentials.access_key_id, secret_access_key=credentials.secret_access_key,
            session_token=credentials.session_token, amz_date=amz_date,
            region_set=route.region_set, service=route.service, payload_sha256=payload_sha256,
            double_encode=not route.rules.s3_paths,
        )  # fmt: skip
        for name, value in added:
            headers[name] = value

    # ------------------------------------------------------------ the handler

    async def handle(self, request: Request) -> None:
        started = time.monotonic()
        exchange = Exchange(request.method)
        policy = self.cors  # the route's, once it is known
        try:
            match, raw_query = self.resolve(request.target, request.headers, exchange, request.connection.tunnel)
            policy = self.cors_policy(match.route)
            if policy is not None and cors.is_preflight(request.method, request.headers):
                answer_preflight(request, policy)  # never signed, never forwarded
                return
            await self._forward(request, match, raw_query, exchange, policy)
        except Refusal as refusal:
            if policy is None:
                request.refuse(refusal)
            elif refusal.reason == "no_route" and cors.is_preflight(request.method, request.headers):
                answer_preflight(request, policy)  # so that the page reads the 404 its request then gets
            else:  # the page may read why (as JSON) rather than see a network error
                refusal.headers = tuple(policy.answer_headers(request.headers.get("Origin"), refusal.headers))
                request.refuse(refusal)
        except asyncio.CancelledError:
            exchange.client_gone = True  # the client closed its connection: nobody is waiting any more
            raise
        except Exception:
            # A bug of ours: logged with its traceback, answered without one.
            log.exception("%s %s: internal error", request.method, exchange.path)
            if request.status:
                request.connection.abort()  # an answer was under way: cut it rather than corrupt it
            else:
                request.refuse(Refusal("signing-proxy failed on this request; see its log", 500, "internal_error"))
        finally:
            exchange.duration = time.monotonic() - started
            if request.status and not exchange.client_gone:
                exchange.status = request.status
            self.observe(exchange)

    async def _forward(
        self, request: Request, match: Match, raw_query: str, exchange: Exchange, policy: cors.Policy | None
    ) -> None:
        route = match.route
        if request.expect_continue:  # "100 Continue" only once nothing local can refuse the body
            await self.credentials_ready(route, exchange)
        if request.body_exists:
            limit = self.config.max_body if route.max_body is None else route.max_body
            streamed_limit = self.config.streamed_max_body if route.max_body is None else route.max_body
            payload = await read_payload(request, route.payload_mode, limit, streamed_limit)
        else:
            payload = no_body()  # no limit to apply, nothing to wait for
        exchange.bytes_in = payload.size or 0
        query = signing.normalize_query(raw_query)
        exchange.query = query.wire
        headers = self.upstream_headers(request.headers, route)
        for name, value in payload.headers:
            headers.popall(name, None)
            if value is not None:
                headers[name] = value
        try:
            exchange.credentials = await self.authorize(request.method, match, query, headers, payload.sha256, payload)
        except CredentialsUnavailable as error:
            exchange.credentials = route.credentials
            raise unavailable(route, error) from None
        if payload.stream is not None:
            await gather_small(payload)
        if payload.size is not None and (payload.size or request.body_exists or request.method in BODY_METHODS):
            headers["Content-Length"] = str(payload.size)
        elif payload.size is None:
            headers["Transfer-Encoding"] = "chunked"
        target = match.upstream_path + (f"?{query.wire}" if query.wire else "")
        upstream = await self._send(request.method, route, target, headers, payload, exchange)
        try:
            # S3 answers a wrong region with 400 AuthorizationHeaderMalformed, everything else with 403.
            refused = upstream.status == 403 or (upstream.status == 400 and route.rules.s3_paths)
            prefetched = await self._check_clock_skew(route, upstream, exchange) if refused else None
            if prefetched is not None and route.auth == "sigv4":
                self._explain_mismatch(route, payload.signature, prefetched)
            await self._relay(request, upstream, exchange, prefetched, policy)
        except BaseException:
            upstream.close()  # a half-read connection never goes back to the pool
            raise
        upstream.release()  # back to the pool when the body was read to the end, closed otherwise

    async def _send(
        self, method: str, route: Route, target: str, headers: CIMultiDict[str], payload: Payload, exchange: Exchange
    ) -> UpstreamResponse:
        """Send the signed request; the response once its head has arrived. Failures become 502 or 504."""
        timeouts = route.timeouts
        sent = time.monotonic()
        try:
            upstream = await self.pool.request(
                method, route.dial_address, target, headers.items(), payload.body, egress=route.egress,
                connect_timeout=timeouts.connect, first_byte_timeout=timeouts.first_byte,
                server_name=route.upstream_address[1] if route.connect_to else None,
                stream=payload.stream, chunked=payload.size is None,
            )  # fmt: skip
        except (ConnectTimeout, FirstByteTimeout) as error:
            advice = "raise the route's connect_timeout" if isinstance(error, ConnectTimeout) else (
                "raise the route's timeout (or first_byte_timeout) if it is slow"
            )  # fmt: skip
            raise failed(exchange, f"{route.upstream_host}: {error}; {advice}", 504, error.reason) from None
        except UpstreamError as error:
            raise failed(exchange, f"{route.upstream_host}: {error}", 502, error.reason) from None
        upstream.idle_timeout = timeouts.idle
        exchange.upstream_first_byte = time.monotonic() - sent
        return upstream

    async def _check_clock_skew(self, route: Route, upstream: UpstreamResponse, exchange: Exchange) -> bytes | None:
        """Read a small 403 body; when AWS says our time is off, correct the signing clock by its Date.

        Returns the body read (to relay as it is), or None when it was left unread.
        """
        if route.auth != "sigv4" or (upstream.content_length or 0) > 65536 or upstream.content_length is None:
            return None
        try:
            body = await upstream.read()
        except TimeoutError:
            message = f"{route.upstream_host}: the 403 body stopped arriving"
            raise failed(exchange, message, 504, "upstream_idle_timeout") from None
        except UpstreamError as error:
            raise failed(exchange, f"{route.upstream_host}: {error}", 502, error.reason) from None
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

    def _explain_mismatch(self, route: Route, signature: signing.Signature | None, body: bytes) -> None:
        """A refused signature: log what AWS expected against what we signed, and the likely cause.

        ``signature`` is None for SigV4a, whose canonical request awscrt keeps to itself: AWS's message is logged.
        """
        if not mismatch.is_mismatch(body):
            return
        if signature is None:
            message = mismatch.expected_by_aws(body)[2].partition("\n")[0]
            explanation = mismatch.Explanation(f"SigV4a signature refused: {message[:200]}", "")
        else:
            explanation = mismatch.explain(signature.canonical_request, signature.string_to_sign, body)
        if self.metrics is not None:
            self.metrics.signature_mismatch(route.path_prefix)
        log.warning(
            "%s refused the signature (route %s): %s%s",
            route.upstream_host,
            route.path_prefix,
            explanation.cause,
            f"\n{explanation.diff}" if explanation.diff else "",
        )

    async def _relay(
        self,
        request: Request,
        upstream: UpstreamResponse,
        exchange: Exchange,
        prefetched: bytes | None = None,
        policy: cors.Policy | None = None,
    ) -> None:
        """Stream the upstream response to the client as it arrives (or send ``prefetched``, its whole body).

        Only the upstream's headers go back (minus hop-by-hop ones; Date is
        added when missing, as RFC 9110 asks of anything that forwards a
        response). Whatever body already arrived with them goes out in the
        same write; a body that is already complete (most small answers)
        goes out in one write, headers included. Each write is a system call,
        the largest cost per request on loopback.
        """
        drop = hop_by_hop(upstream.headers)
        if policy is None:
            response = request.respond(upstream.status, upstream.reason, upstream.headers.items(), drop)
        else:
            headers = [(name, value) for name, value in upstream.headers.items() if name.lower() not in drop]
            headers = policy.answer_headers(request.headers.get("Origin"), headers)
            response = request.respond(upstream.status, upstream.reason, headers)
        if prefetched is None:
            first, complete = upstream.read_nowait(), upstream.is_eof()
        else:
            first, complete = prefetched, True
        exchange.bytes_out = len(first)
        if not has_body(request.method, upstream.status):
            response.send()
            return
        if complete and not upstream.codings:
            response.send(first)  # a chunked or close-delimited body becomes a plain one
            return
        length = upstream.spliceable()
        if length >= splice.SPLICE_FROM and splice.AVAILABLE and request.connection.output_idle():
            await self._splice(request, response, upstream, first, length, exchange)
            return
        response.start(first, length=upstream.content_length, codings=upstream.codings)
        try:
            while chunk := await upstream.readany():  # idle_timeout bounds each wait
                exchange.bytes_out += len(chunk)
                response.write(chunk)
                await response.drain()
        except (UpstreamError, TimeoutError) as error:
            cut_short(response, upstream, exchange, error)
            return
        response.finish()

    async def _splice(
        self,
        request: Request,
        response: Response,
        upstream: UpstreamResponse,
        first: bytes,
        length: int,
        exchange: Exchange,
    ) -> None:
        """Send a large body of known length socket to socket (see ``splice``)."""
        upstream_transport, client_transport = upstream.connection.transport, request.connection.transport
        assert upstream_transport is not None and client_transport is not None
        head = response.head(length=upstream.content_length)
        try:
            clean = await splice.splice_body(
                upstream_transport, client_transport, head + first, length, upstream.idle_timeout
            )
        except (splice.UpstreamClosed, TimeoutError) as error:
            cut_short(response, upstream, exchange, error)
            return
        except splice.ClientClosed:
            exchange.client_gone = True
            response.abort()
            upstream.close()
            return
        exchange.bytes_out = len(first) + length
        upstream.spliced(clean)
        response.finish()

    def observe(self, exchange: Exchange) -> None:
        """Record a finished request in the metrics and the access log."""
        if self.metrics is not None:
            self.metrics.observe(exchange)
        if access_log.isEnabledFor(logging.INFO):
            log_access(exchange, with_query_values=access_log.isEnabledFor(logging.DEBUG))


def answer_preflight(request: Request, policy: cors.Policy) -> None:
    """``204`` with the policy's CORS headers, or a ``403`` saying what the config does not allow."""
    headers = request.headers
    origin = headers.get("Origin")
    try:
        allowed = policy.preflight(
            origin, headers["Access-Control-Request-Method"], headers.get("Access-Control-Request-Headers")
        )
    except cors.Rejected as rejected:
        request.refuse(Refusal(str(rejected), 403, "cors_not_allowed", tuple(policy.answer_headers(origin, ()))))
        return
    request.respond(204, "No Content", allowed).send()


def cut_short(response: Response, upstream: UpstreamResponse, exchange: Exchange, error: Exception) -> None:
    """The upstream's body stopped (closed, or idle too long) after the answer began.

    The client connection is aborted so that it cannot mistake what it got for
    the whole body; the upstream connection is closed, never pooled half-read.
    """
    kind = "upstream_idle_timeout" if isinstance(error, TimeoutError) else "upstream_body_cut"
    exchange.error_kind = kind
    log.warning("%s %s: upstream body cut short (%s); aborting the client connection", exchange.method,
                exchange.path, kind)  # fmt: skip
    response.abort()
    upstream.close()


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
_SIGNED_LOWER = frozenset(name.lower() for name in SIGNED_HEADERS)


def amz_unsigned(name: str) -> bool:
    """An ``x-amz-*`` header that ``SIGNED_HEADERS`` leaves out (S3 wants them all signed)."""
    lower = name.lower()
    return lower.startswith("x-amz-") and lower not in _SIGNED_LOWER


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
