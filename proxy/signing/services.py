"""What differs between SigV4 services: one table, and the S3 host names that say service and region.

Every service but S3 builds its canonical URI from a normalised path (dot and
empty segments removed) encoded twice. S3 keeps the key exactly: the path is
encoded once and never normalised, so ``logs//2026/./a`` and ``x/../y`` are
keys of their own. S3 also wants ``x-amz-content-sha256`` on every request and
every ``x-amz-*`` header signed, and it accepts bodies it cannot hash first
(``UNSIGNED-PAYLOAD``, and aws-chunked ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PAYLOAD_MODES = ("signed", "unsigned", "streaming")
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_PAYLOAD = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"


@dataclass(frozen=True, slots=True)
class ServiceRules:
    """How one service wants its requests signed."""

    s3_paths: bool  # canonical URI: the wire path as it is (single encoding, no normalisation)
    content_sha256_required: bool  # x-amz-content-sha256 on every request
    sign_amz_headers: bool  # every x-amz-* header the client sends must be signed
    payload_modes: tuple[str, ...]  # allowed values of a route's ``payload``
    default_payload_over_https: str  # ``payload`` when not set (plain http upstreams: always signed)


_S3 = ServiceRules(True, True, True, PAYLOAD_MODES, "unsigned")
_DEFAULT = ServiceRules(False, False, False, ("signed", "unsigned"), "signed")

SERVICES: dict[str, ServiceRules] = {"s3": _S3, "s3-object-lambda": _S3, "s3-outposts": _S3}


def rules_for(service: str) -> ServiceRules:
    """The rules of ``service``; anything not in the table signs as API Gateway, Lambda or OpenSearch do."""
    return SERVICES.get(service, _DEFAULT)


_REGION = r"(?P<region>[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d)"
_SUFFIX = r"\.amazonaws\.com(?:\.cn)?$"
# Most specific first. Each names the service; a missing region group means us-east-1.
_S3_HOSTS = (
    # Multi-Region Access Points: alias.mrap.accesspoint.s3-global.amazonaws.com (SigV4a, every region)
    (re.compile(r"(?:^|\.)accesspoint\.s3-global" + _SUFFIX), "s3"),
    # name-123456789012.op-0123456789abcdef0.s3-outposts.eu-west-1.amazonaws.com
    (re.compile(r"(?:^|\.)s3-outposts\." + _REGION + _SUFFIX), "s3-outposts"),
    # name-123456789012.s3-object-lambda.eu-west-1.amazonaws.com
    (re.compile(r"(?:^|\.)s3-object-lambda\." + _REGION + _SUFFIX), "s3-object-lambda"),
    # name-123456789012.s3-accesspoint[.dualstack].eu-west-1.amazonaws.com
    (re.compile(r"(?:^|\.)s3-accesspoint(?:\.dualstack)?\." + _REGION + _SUFFIX), "s3"),
    # bucket.s3[-fips][.dualstack].eu-west-1.amazonaws.com, s3.eu-west-1.amazonaws.com (path style)
    (re.compile(r"(?:^|\.)s3(?:-fips)?(?:\.dualstack)?\." + _REGION + _SUFFIX), "s3"),
    # legacy dash style: bucket.s3-eu-west-1.amazonaws.com
    (re.compile(r"(?:^|\.)s3-" + _REGION + _SUFFIX), "s3"),
    # the global endpoint: s3.amazonaws.com, bucket.s3.amazonaws.com, s3.dualstack... (us-east-1)
    (re.compile(r"(?:^|\.)s3(?:-external-1)?(?:\.dualstack)?" + _SUFFIX), "s3"),
)


def s3_scope(host: str) -> tuple[str, str] | None:
    """``(service, region)`` of an S3 host name in any of its styles, or None when it is not one."""
    host = host.lower().rstrip(".")
    for pattern, service in _S3_HOSTS:
        match = pattern.search(host)
        if match:
            if "s3-global" in pattern.pattern:
                return service, "*"
            return service, match.groupdict().get("region") or "us-east-1"
    return None
