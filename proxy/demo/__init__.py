"""The demo: an embedded API Gateway emulator that checks SigV4, and the proxy in front of it.

The emulator refuses what API Gateway refuses (403 with ``{"message": ...}``
for a missing, malformed, stale or wrong signature), so the demo shows the
proxy doing real work with no AWS account and no network. With
``service="s3"`` it verifies and answers as S3 does instead (paths signed as
they arrive, ``UNSIGNED-PAYLOAD``, ``<Error>`` XML naming the canonical
request it expected). Presigned URLs (the signature in the query) are
checked too.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import socket
import time
from typing import Any
from urllib.parse import unquote
from xml.sax.saxutils import escape

from aiohttp import web

from .. import signing
from ..signing.services import STREAMING_PAYLOAD, UNSIGNED_PAYLOAD, rules_for

DEMO_ACCESS_KEY_ID = "AKIADEMOSIGNINGPROXY"
DEMO_SECRET_ACCESS_KEY = "demo/secret/key/not/a/real/aws/secret000"
DEMO_REGION = "us-east-1"
DEMO_STAGE = "/prod"

_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<scope>[^,]+), ?"
    r"SignedHeaders=(?P<signed>[^,]+), ?Signature=(?P<signature>[0-9a-f]{64})$"
)
MAX_SKEW = 300  # seconds, as AWS allows


def _forbidden(message: str) -> web.Response:
    return web.json_response({"message": message}, status=403, headers={"x-amzn-ErrorType": "ForbiddenException"})


def _s3_forbidden(message: str) -> web.Response:
    """S3's answer: ``<Error>`` XML; a signature mismatch names what S3 expected, element by element."""
    expected = _EXPECTED.search(message)
    wrong_scope = _WRONG_SCOPE.search(message)
    if wrong_scope is not None:  # S3 says 400 AuthorizationHeaderMalformed, and which region it wanted
        region = wrong_scope["region"]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AuthorizationHeaderMalformed</Code>'
            f"<Message>The authorization header is malformed; the region '{escape(wrong_scope['got'])}' is wrong; "
            f"expecting '{escape(region)}'</Message><Region>{escape(region)}</Region></Error>"
        )
        return web.Response(text=body, status=400, content_type="application/xml")
    if expected is None:
        elements = f"<Code>AccessDenied</Code><Message>{escape(message)}</Message>"
    else:
        elements = (
            f"<Code>SignatureDoesNotMatch</Code><Message>{escape(message.partition(chr(10))[0])}</Message>"
            f"<StringToSign>{escape(expected['to_sign'])}</StringToSign>"
            f"<CanonicalRequest>{escape(expected['canonical'])}</CanonicalRequest>"
        )
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>{elements}</Error>'
    return web.Response(text=body, status=403, content_type="application/xml")


_WRONG_SCOPE = re.compile(r"should be scoped to a valid region and service \('(?P<region>[^']*)'.*got '(?P<got>[^']*)'")
_EXPECTED = re.compile(
    r"should have been\n'(?P<canonical>.*)'\n\nThe String-to-Sign should have been\n'(?P<to_sign>.*)'\n$", re.S
)


def _presigned(raw_query: str) -> tuple[dict[str, str], str] | None:
    """A presigned request's X-Amz-* parameters and the query without its signature, or None."""
    pairs = [part.partition("=") for part in raw_query.split("&") if part]
    params = {key: unquote(value) for key, _, value in pairs}
    if "X-Amz-Algorithm" not in params:
        return None
    rest = "&".join(f"{key}={value}" for key, _, value in pairs if key != "X-Amz-Signature")
    return params, rest


def verify(
    method: str, raw_path: str, headers: Any, body: bytes, secrets: dict[str, str], region: str, service: str
) -> str | None:
    """Check a request's SigV4 signature as a receiver would; return why it fails, or None."""
    path, _, query = raw_path.partition("?")
    presigned = _presigned(query)
    if presigned is not None:
        params, query = presigned
        credential = params.get("X-Amz-Credential", "")
        authorization = (
            f"AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders={params.get('X-Amz-SignedHeaders', '')}, "
            f"Signature={params.get('X-Amz-Signature', '')}"
        )
        amz_date = params.get("X-Amz-Date", "")
        expires = int(params.get("X-Amz-Expires", "0") or 0)
    else:
        authorization, amz_date, expires = headers.get("Authorization"), headers.get("X-Amz-Date", ""), 0
    if not authorization:
        return "Missing Authentication Token"
    match = _AUTHORIZATION.match(authorization)
    if not match:
        return "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters."
    key_id, scope, signed_names = match["key"], match["scope"], match["signed"].split(";")
    datestamp, scope_region, scope_service, _ = ([*scope.split("/"), "", "", ""])[:4]
    secret = secrets.get(key_id)
    if secret is None:
        return "The security token included in the request is invalid."
    if (scope_region, scope_service) != (region, service):
        return (
            f"Credential should be scoped to a valid region and service ('{region}', '{service}'); "
            f"got '{scope_region}'."
        )
    try:
        signed_at = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header."
    if presigned is not None and not 0 <= time.time() - signed_at <= expires:
        return "Request has expired"
    if (presigned is None and abs(time.time() - signed_at) > MAX_SKEW) or not amz_date.startswith(datestamp):
        return "Signature expired: the request time is too skewed from the server's time."
    s3 = rules_for(service).s3_paths
    payload_sha256 = hashlib.sha256(body).hexdigest()
    claimed = headers.get("X-Amz-Content-Sha256")
    if presigned is not None and s3:
        payload_sha256 = UNSIGNED_PAYLOAD
    elif s3 and claimed in (UNSIGNED_PAYLOAD, STREAMING_PAYLOAD):
        payload_sha256 = claimed
    header_lines, signed_headers = signing.canonical_headers(
        (name, value) for name in signed_names for value in headers.getall(name, ())
    )
    canonical = "\n".join(
        (
            method,
            path if s3 else signing.receiver_canonical_uri(path),
            signing.normalize_query(query).canonical,
            header_lines,
            signed_headers,
            payload_sha256,
        )
    )
    to_sign = signing.string_to_sign(amz_date, scope, canonical)
    key = signing.signing_key(secret, datestamp, region, service)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, match["signature"]):
        return (
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.\n\n"
            f"The Canonical String for this request should have been\n'{canonical}'\n\n"
            f"The String-to-Sign should have been\n'{to_sign}'\n"
        )
    return None


def emulator_app(
    secrets: dict[str, str] | None = None,
    region: str = DEMO_REGION,
    stage: str = DEMO_STAGE,
    service: str = "execute-api",
) -> web.Application:
    """An aiohttp app that answers like an IAM-authorized API Gateway stage (or, as ``service``, like S3)."""
    secrets = secrets if secrets is not None else {DEMO_ACCESS_KEY_ID: DEMO_SECRET_ACCESS_KEY}
    refuse = _s3_forbidden if rules_for(service).s3_paths else _forbidden

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        problem = verify(request.method, request.raw_path, request.headers, body, secrets, region, service)
        if problem:
            return refuse(problem)
        path = request.raw_path.partition("?")[0]
        if not (path == stage or path.startswith(stage + "/")):
            return _forbidden("Missing Authentication Token")
        return web.json_response(
            {
                "message": "Hello from the API Gateway emulator: your request was signed correctly.",
                "method": request.method,
                "path": request.path,
                "query": {k: request.query.getall(k) for k in request.query},
                "caller": (
                    request.headers.get("Authorization", "").partition("Credential=")[2]
                    or request.query.get("X-Amz-Credential", "")
                ).split("/")[0],
                "body_bytes": len(body),
            }
        )

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def demo_config(listen: str, emulator_url: str) -> dict[str, Any]:
    return {
        "listen": listen,
        "credentials": {
            "demo": {
                "type": "static",
                "access_key_id": DEMO_ACCESS_KEY_ID,
                "secret_access_key": DEMO_SECRET_ACCESS_KEY,
            }
        },
        "routes": [
            {
                "path_prefix": "/",
                "upstream": emulator_url + DEMO_STAGE,
                "region": DEMO_REGION,
                "credentials": "demo",
            }
        ],
    }


def banner(proxy_url: str, emulator_url: str) -> str:
    sample = "/pets?type=dog&page=1"
    return (
        f"API Gateway emulator (checks SigV4): {emulator_url}{DEMO_STAGE}\n"
        f"signing-proxy (signs as {DEMO_ACCESS_KEY_ID[:8]}…): {proxy_url} -> {emulator_url}{DEMO_STAGE}\n\n"
        "Through the proxy, signed, answers 200:\n"
        f"  curl -s '{proxy_url}{sample}'\n"
        "Straight to the emulator, unsigned, refused with 403:\n"
        f"  curl -s '{emulator_url}{DEMO_STAGE}{sample}'\n\n"
        "Press Ctrl-C to stop."
    )
