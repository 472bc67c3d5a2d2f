"""``signing-proxy presign URL``: a presigned (query-signed) URL, signed as the route that covers it would sign.

The URL is the API's own (``https://bucket.s3.eu-west-1.amazonaws.com/report.pdf``);
the route is the one whose upstream it falls under (same scheme, host and
port, and a path below the upstream's). The path and query are put in the
route's wire form first, so the URL printed is the one that was signed. S3
signs presigned URLs with ``UNSIGNED-PAYLOAD``; other services with the hash
of an empty body.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from . import signing
from .config import Config, ConfigError, Route
from .credentials import Provider
from .signing.presigned import presign_query
from .signing.services import UNSIGNED_PAYLOAD

MAX_EXPIRES = 7 * 24 * 3600  # what SigV4 allows


def route_for(config: Config, url: str) -> tuple[Route, str]:
    """The route whose upstream covers ``url``, and the URL's path in that route's wire form."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"presign: expected an http:// or https:// URL, got {url!r}")
    address = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    candidates = []
    for route in config.routes:
        if route.upstream_address != address or route.auth != "sigv4":
            continue
        raw_path = parts.path or "/"
        path = signing.s3_wire_path(raw_path) if route.rules.s3_paths else signing.normalize_path(raw_path)
        base = route.upstream_path
        if path == base or path.startswith(base + "/") or not base:
            candidates.append((len(base), route, path))
    if not candidates:
        hosts = sorted({r.upstream for r in config.routes if r.auth == "sigv4"})
        raise ConfigError(f"presign: no SigV4 route's upstream covers {url!r}; upstreams: {hosts}")
    _, route, path = max(candidates, key=lambda found: found[0])
    return route, path


async def presign(
    config: Config, providers: dict[str, Provider], url: str, *, method: str = "GET", expires: int = 3600
) -> str:
    """``url`` presigned with the credentials its route uses, valid for ``expires`` seconds."""
    if not 1 <= expires <= MAX_EXPIRES:
        raise ConfigError(f"presign: --expires must be from 1 to {MAX_EXPIRES} seconds, got {expires}")
    route, wire_path = route_for(config, url)
    credentials = await providers[route.credentials].aws_credentials()
    query = presign_query(
        method.upper(),
        wire_path,
        signing.normalize_query(urlsplit(url).query),
        route.upstream_host,
        access_key_id=credentials.access_key_id,
        secret_access_key=credentials.secret_access_key,
        session_token=credentials.session_token,
        amz_date=signing.amz_date(time.time()),
        region=route.resolved_region or "",
        service=route.service,
        expires=expires,
        payload_sha256=UNSIGNED_PAYLOAD if route.rules.s3_paths else signing.EMPTY_SHA256,
        double_encode=not route.rules.s3_paths,
    )
    scheme, _, _ = route.upstream_address
    return f"{scheme}://{route.upstream_host}{wire_path}?{query.wire}"
