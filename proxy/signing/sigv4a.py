"""SigV4a (``AWS4-ECDSA-P256-SHA256``): one signature valid in a set of regions, through awscrt.

S3 Multi-Region Access Points and other global endpoints take SigV4a: the
key is an ECDSA P-256 key derived from the secret access key, the scope
names no region, and ``X-Amz-Region-Set`` (``*`` for every region) is a
signed header. The AWS Common Runtime implements it (the ``sigv4a`` extra,
``pip install 'signing-proxy[sigv4a]'``); nothing here is imported without it.

``sign`` returns the headers to add (date, region set, content hash, session
token, Authorization) and what was signed, for a mismatch explanation.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterable
from typing import Any

ALGORITHM = "AWS4-ECDSA-P256-SHA256"
_ADDED = ("x-amz-date", "x-amz-region-set", "x-amz-content-sha256", "x-amz-security-token", "authorization")


def available() -> bool:
    """True when awscrt (the ``sigv4a`` extra) can be imported."""
    try:
        import awscrt.auth  # noqa: F401
    except ImportError:
        return False
    return True


async def sign(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    *,
    access_key_id: str,
    secret_access_key: str,
    session_token: str | None,
    amz_date: str,
    region_set: str,
    service: str,
    payload_sha256: str,
    double_encode: bool,
) -> list[tuple[str, str]]:
    """The headers SigV4a adds to a request with ``headers`` (the ones to sign, wire form), in awscrt's order.

    awscrt signs in its own threads; the event loop only waits for the result.
    """
    from awscrt.auth import (
        AwsCredentialsProvider,
        AwsSignedBodyHeaderType,
        AwsSigningAlgorithm,
        AwsSigningConfig,
        aws_sign_request,
    )
    from awscrt.http import HttpHeaders, HttpRequest

    to_sign = [(name, value) for name, value in headers if name.lower() not in _ADDED]
    names = frozenset(name.lower() for name, _ in to_sign)
    config = AwsSigningConfig(
        algorithm=AwsSigningAlgorithm.V4_ASYMMETRIC,
        credentials_provider=AwsCredentialsProvider.new_static(access_key_id, secret_access_key, session_token),
        region=region_set,
        service=service,
        date=datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC),
        should_sign_header=lambda name: name.lower() in names,
        use_double_uri_encode=double_encode,
        should_normalize_uri_path=False,  # the wire path is already in its final form
        signed_body_value=payload_sha256,
        signed_body_header_type=AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
    )
    request: Any = HttpRequest(method, target, HttpHeaders(to_sign))
    signed = await asyncio.wrap_future(aws_sign_request(request, config))
    return [(name, value) for name, value in signed.headers if name.lower() in _ADDED]
