"""A loopback stand-in for API Gateway that checks every SigV4 signature with awscrt.

The proxy's own signer is never used here: the signature is recomputed by the
AWS Common Runtime from the request *exactly as it arrived* (raw path and query,
headers in order, body bytes), so a test passes only if what the proxy put on
the wire is what it signed.

``service="s3"`` (and the other S3 services) verifies as S3 does: awscrt with
double encoding and path normalisation off, every ``x-amz-*`` header signed,
``UNSIGNED-PAYLOAD`` accepted, and an aws-chunked body's chunk signatures each
checked, with a signing key derived here from the published SigV4 rules.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web, web_protocol
from aiohttp.http_parser import HttpRequestParserPy
from awscrt.auth import (
    AwsCredentialsProvider,
    AwsSignedBodyHeaderType,
    AwsSigningConfig,
    aws_sign_request,
)
from awscrt.http import HttpHeaders, HttpRequest

# aiohttp's C parser (llhttp) refuses methods it does not know (X-CUSTOM) and raw UTF-8 in the
# target, both of which the proxy forwards and API Gateway accepts: the stand-in parses like the
# Python parser does. (This affects every aiohttp server in the test process.)
web_protocol.HttpRequestParser = HttpRequestParserPy  # type: ignore[misc]

ALGORITHM = "AWS4-HMAC-SHA256"
S3_SERVICES = frozenset({"s3", "s3-object-lambda", "s3-outposts"})
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
# Headers awscrt adds itself and refuses to find already present on a request it signs.
_ADDED_BY_SIGNER = frozenset({"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"})

Secrets = dict[str, str] | Callable[[str], str | None]


@dataclass
class Received:
    """One request as the upstream saw it, and what awscrt thought of its signature."""

    method: str
    raw_path: str  # path + '?' + query exactly as on the wire
    headers: list[tuple[str, str]]  # as received, order and repeats kept
    body: bytes
    signature_ok: bool
    signature_error: str | None  # why verification failed (no secrets in it)
    signed_headers: list[str] = field(default_factory=list)
    access_key_id: str | None = None
    chunk_sizes: list[int] = field(default_factory=list)  # an aws-chunked body's chunks, each verified

    def header_values(self, name: str) -> list[str]:
        """Every value of ``name`` (case-insensitive), in arrival order."""
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]


Responder = Callable[[web.Request, Received], Awaitable[web.StreamResponse]]


class SignatureError(Exception):
    """The request is not signed as API Gateway would accept; the message says why."""


@dataclass(frozen=True)
class _Authorization:
    access_key_id: str
    datestamp: str
    region: str
    service: str
    signed_headers: list[str]
    signature: str


def parse_authorization(value: str) -> _Authorization:
    """Split ``AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...``."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise SignatureError(f"Authorization algorithm is {algorithm!r}, expected {ALGORITHM}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, val = part.strip().partition("=")
        if not sep:
            raise SignatureError(f"Authorization header has a malformed element {part.strip()!r}")
        if name in fields:
            raise SignatureError(f"Authorization header repeats {name}")
        fields[name] = val
    missing = [n for n in ("Credential", "SignedHeaders", "Signature") if n not in fields]
    if missing:
        raise SignatureError(f"Authorization header requires {', '.join(missing)}")
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise SignatureError(f"Credential scope is malformed: {'/'.join(scope[1:])!r}")
    signed = fields["SignedHeaders"].split(";")
    if signed != sorted(signed) or any(h != h.lower() or not h for h in signed):
        raise SignatureError(f"SignedHeaders must be lower case and sorted: {fields['SignedHeaders']!r}")
    return _Authorization(scope[0], scope[1], scope[2], scope[3], signed, fields["Signature"])


class SigV4Upstream:
    """A real HTTP server on 127.0.0.1 that verifies SigV4 like API Gateway, via awscrt.

    ``region``/``service`` (keyword-only) pin what the credential scope must name;
    ``region=None`` accepts any region.
    """

    def __init__(
        self,
        secrets: Secrets,
        *,
        require_signature: bool = True,
        region: str | None = None,
        service: str = "execute-api",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._secrets = secrets
        self.tls = tls  # serve HTTPS with this server context
        self.require_signature = require_signature
        self.region = region
        self.service = service
        self.received: list[Received] = []
        self.responder: Responder | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls)
        await site.start()
        sockets = getattr(site._server, "sockets", None)  # the port actually bound for port 0
        assert sockets, "the upstream did not bind a socket"
        port = sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SigV4Upstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ handling

    def _secret_for(self, access_key_id: str) -> str | None:
        if callable(self._secrets):
            return self._secrets(access_key_id)
        return self._secrets.get(access_key_id)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = [
            (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for k, v in request.raw_headers
        ]
        received = Received(
            method=request.method,
            raw_path=request.raw_path,
            headers=headers,
            body=body,
            signature_ok=False,
            signature_error=None,
        )
        try:
            auth = await self.verify(received)
            received.signature_ok = True
            received.signed_headers = auth.signed_headers
            received.access_key_id = auth.access_key_id
        except SignatureError as exc:
            received.signature_error = str(exc)
        self.received.append(received)

        if self.responder is not None:
            return await self.responder(request, received)
        if not received.signature_ok and self.require_signature:
            return web.json_response({"message": received.signature_error}, status=403)
        return web.json_response(
            {
                "method": received.method,
                "raw_path": received.raw_path,
                "headers": [list(h) for h in received.headers],
                "body_b64": base64.b64encode(body).decode("ascii"),
                "signed_headers": received.signed_headers,
            }
        )

    async def verify(self, received: Received) -> _Authorization:
        """Recompute the signature with awscrt; raise ``SignatureError`` saying why it is wrong."""
        auth_values = received.header_values("authorization")
        if not auth_values:
            # Records which key was used even when the rest fails, for the tests' messages.
            raise SignatureError("Missing Authentication Token")
        if len(auth_values) > 1:
            raise SignatureError("more than one Authorization header")
        auth = parse_authorization(auth_values[0])
        received.signed_headers = auth.signed_headers
        received.access_key_id = auth.access_key_id

        if auth.service != self.service:
            raise SignatureError(
                f"Credential should be scoped to correct service: '{self.service}', got {auth.service!r}"
            )
        if self.region is not None and auth.region != self.region:
            raise SignatureError(f"Credential should be scoped to a valid region: '{self.region}', got {auth.region!r}")
        secret = self._secret_for(auth.access_key_id)
        if secret is None:
            raise SignatureError(f"The security token included in the request is invalid (key {auth.access_key_id!r})")

        dates = received.header_values("x-amz-date")
        if len(dates) != 1:
            raise SignatureError(f"expected exactly one X-Amz-Date header, got {len(dates)}")
        try:
            date = datetime.datetime.strptime(dates[0], AMZ_DATE_FORMAT).replace(tzinfo=datetime.UTC)
        except ValueError:
            raise SignatureError(f"X-Amz-Date {dates[0]!r} is not YYYYMMDDTHHMMSSZ") from None
        if auth.datestamp != dates[0][:8]:
            raise SignatureError(f"Credential date {auth.datestamp} does not match X-Amz-Date {dates[0]}")

        s3 = self.service in S3_SERVICES
        body_sha256 = hashlib.sha256(received.body).hexdigest()
        content_hashes = received.header_values("x-amz-content-sha256")
        if len(content_hashes) > 1:
            raise SignatureError("more than one X-Amz-Content-Sha256 header")
        if s3 and not content_hashes:
            raise SignatureError("Missing required header for this request: x-amz-content-sha256")
        if s3:
            unsigned = [k.lower() for k, _ in received.headers if k.lower().startswith("x-amz-")]
            unsigned = [name for name in unsigned if name not in auth.signed_headers]
            if unsigned:
                raise SignatureError(f"There were headers present in the request which were not signed: {unsigned}")
        if s3 and content_hashes[0] in (UNSIGNED, STREAMING):
            body_sha256 = content_hashes[0]
        elif content_hashes and content_hashes[0] != body_sha256:
            raise SignatureError(
                f"X-Amz-Content-Sha256 {content_hashes[0]!r} is not the SHA-256 of the "
                f"{len(received.body)}-byte body received ({body_sha256})"
            )
        tokens = received.header_values("x-amz-security-token")
        if len(tokens) > 1:
            raise SignatureError("more than one X-Amz-Security-Token header")
        token = tokens[0] if tokens else None
        signed = set(auth.signed_headers)

        # awscrt refuses to re-sign a request carrying the headers it adds; it adds them back
        # itself (date from the config, token from the provider, content hash from the body).
        crt_headers = HttpHeaders([(k, v) for k, v in received.headers if k.lower() not in _ADDED_BY_SIGNER])
        crt_request = HttpRequest(received.method, received.raw_path, crt_headers)
        config = AwsSigningConfig(
            credentials_provider=AwsCredentialsProvider.new_static(auth.access_key_id, secret, token),
            region=auth.region,
            service=auth.service,
            date=date,
            should_sign_header=lambda name: name.lower() in signed,
            use_double_uri_encode=not s3,
            should_normalize_uri_path=not s3,
            signed_body_value=body_sha256,
            signed_body_header_type=(
                AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256
                if "x-amz-content-sha256" in signed
                else AwsSignedBodyHeaderType.NONE
            ),
            omit_session_token=token is not None and "x-amz-security-token" not in signed,
        )
        try:
            signed_request = await asyncio.wrap_future(aws_sign_request(crt_request, config))
        except Exception as exc:  # awscrt reports malformed input (e.g. a bad % escape) this way
            raise SignatureError(f"awscrt could not sign the request as received: {exc}") from None

        added = dict((k.lower(), v) for k, v in signed_request.headers)
        if added.get("x-amz-date") != dates[0]:
            raise SignatureError("awscrt used a different X-Amz-Date than the one received")
        if added.get("x-amz-security-token") != token:
            raise SignatureError("awscrt used a different session token than the one received")
        expected = parse_authorization(added["authorization"])
        if expected.signed_headers != auth.signed_headers:
            raise SignatureError(
                "SignedHeaders differ: request lists "
                f"{';'.join(auth.signed_headers)}, awscrt signs {';'.join(expected.signed_headers)}"
            )
        if not hmac.compare_digest(expected.signature, auth.signature):
            raise SignatureError(
                "The request signature we calculated does not match the signature you provided "
                f"({received.method} {received.raw_path!r}, SignedHeaders={';'.join(auth.signed_headers)})"
            )
        if body_sha256 == STREAMING:
            key = derive_signing_key(secret, auth.datestamp, auth.region, auth.service)
            scope = f"{auth.datestamp}/{auth.region}/{auth.service}/aws4_request"
            received.body, received.chunk_sizes = verify_chunks(received.body, key, dates[0], scope, auth.signature)
            decoded = received.header_values("x-amz-decoded-content-length")
            if decoded != [str(len(received.body))]:
                raise SignatureError(f"x-amz-decoded-content-length {decoded} for {len(received.body)} bytes")
        return auth


def derive_signing_key(secret: str, datestamp: str, region: str, service: str) -> bytes:
    """The SigV4 signing key, as the AWS documentation derives it (kSecret, kDate, kRegion, kService, kSigning)."""
    key = ("AWS4" + secret).encode()
    for part in (datestamp, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def verify_chunks(body: bytes, key: bytes, amz_date: str, scope: str, seed: str) -> tuple[bytes, list[int]]:
    """The data of an aws-chunked body whose every chunk signature is right; ``SignatureError`` otherwise.

    Written from the S3 documentation ("Signature calculation: transfer payload
    in multiple chunks"): each chunk's string to sign is
    ``AWS4-HMAC-SHA256-PAYLOAD``, the date, the scope, the previous signature,
    the hash of the empty string and the hash of the chunk's data.
    """
    data, sizes, previous, at = bytearray(), [], seed, 0
    empty = hashlib.sha256(b"").hexdigest()
    while True:
        end = body.find(b"\r\n", at)
        if end < 0:
            raise SignatureError("aws-chunked body ends inside a chunk header")
        size_hex, _, extension = body[at:end].decode("ascii").partition(";")
        name, _, signature = extension.partition("=")
        if name != "chunk-signature":
            raise SignatureError(f"chunk {len(sizes)} has no chunk-signature")
        size = int(size_hex, 16)
        chunk = body[end + 2 : end + 2 + size]
        if len(chunk) != size or body[end + 2 + size : end + 4 + size] != b"\r\n":
            raise SignatureError(f"chunk {len(sizes)} is not {size} bytes followed by CRLF")
        to_sign = "\n".join(
            ("AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, previous, empty, hashlib.sha256(chunk).hexdigest())
        )
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise SignatureError(f"chunk {len(sizes)} ({size} bytes): the chunk signature does not match")
        previous, at = signature, end + 4 + size
        sizes.append(size)
        data += chunk
        if size == 0:
            if at != len(body):
                raise SignatureError("bytes after the final chunk")
            return bytes(data), sizes
