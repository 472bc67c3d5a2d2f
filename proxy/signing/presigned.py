"""Presigned (query-signed) requests: the X-Amz-* parameters that carry a SigV4 signature in the URL.

Used for WebSocket upgrades with ``websocket_signing: query`` and by ``signing-proxy presign``.
Pure, like the rest of the signing package.
"""

from __future__ import annotations

import hashlib
import hmac

from . import (
    ALGORITHM,
    EMPTY_SHA256,
    Query,
    SigningRequest,
    canonical_request,
    credential_scope,
    signing_key,
    string_to_sign,
    uri_encode,
)

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


def presign_query(
    method: str,
    wire_path: str,
    query: Query,
    host: str,
    *,
    access_key_id: str,
    secret_access_key: str,
    session_token: str | None,
    amz_date: str,
    region: str,
    service: str,
    expires: int = PRESIGN_EXPIRES,
    payload_sha256: str = EMPTY_SHA256,
    double_encode: bool = True,
) -> Query:
    """The client's query plus the X-Amz-* parameters of a presigned (query-signed) request.

    This is what awscrt produces with ``AwsSignatureType.HTTP_REQUEST_QUERY_PARAMS``:
    ``host`` is the only signed header, the payload hash is that of an empty body
    (an upgrade has none, which is what API Gateway's $connect expects), the
    session token is a signed parameter, and ``X-Amz-Signature`` comes last.
    X-Amz-* parameters the client sent itself are replaced, never doubled.
    """
    scope = credential_scope(amz_date[:8], region, service)
    ours = [
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{access_key_id}/{scope}"),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    if session_token:
        ours.append(("X-Amz-Security-Token", session_token))
    encoded = [f"{name}={uri_encode(value.encode())}" for name, value in ours]
    kept = [part for part in query.wire.split("&") if part and part.partition("=")[0].lower() not in _PRESIGN_KEYS]
    pairs = sorted((key, value) for key, _, value in (part.partition("=") for part in (*kept, *encoded)))
    canonical_query = "&".join(f"{key}={value}" for key, value in pairs)
    canonical, _ = canonical_request(
        SigningRequest(method, wire_path, canonical_query, (("host", host),), payload_sha256, double_encode)
    )
    to_sign = string_to_sign(amz_date, scope, canonical)
    key = signing_key(secret_access_key, amz_date[:8], region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    wire = "&".join([*kept, *encoded, f"X-Amz-Signature={signature}"])
    return Query(wire, "&".join(f"{k}={v}" for k, v in sorted([*pairs, ("X-Amz-Signature", signature)])))
