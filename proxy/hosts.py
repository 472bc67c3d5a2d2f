"""Host names: forward-proxy patterns, and the region and service an AWS host name tells.

Pure functions on strings, no I/O (S3's many host styles are read by
``signing.services.s3_scope``, the table reverse routes use too). A pattern is
``host[:port]`` where ``*`` stands for exactly one DNS label (``*.execute-api.*.amazonaws.com``) or the
rest of one (``search-logs-*.eu-west-1.es.amazonaws.com``); the port is 443
unless the pattern names another. A pattern with a wildcard must end in two
literal labels, so that no pattern can cover every host of a top-level domain
(``*.com``): requests to a matched host are signed with the user's AWS
identity, and a signed request sent to a stranger could be replayed to AWS.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .signing.services import s3_scope

DEFAULT_PORT = 443
_LABEL = re.compile(r"[a-z0-9_*](?:[a-z0-9_*-]*[a-z0-9_*])?")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def split_authority(authority: str, default_port: int = DEFAULT_PORT) -> tuple[str, int] | None:
    """``host[:port]`` or ``[v6]:port`` as (lower-cased host without a trailing dot, port); None if malformed."""
    text = authority.strip().lower()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":") if text.count(":") <= 1 else (text, "", "")
    host = host.rstrip(".")
    if not host or (port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536)):
        return None
    return host, int(port_text) if port_text else default_port


@dataclass(frozen=True, slots=True)
class HostPattern:
    """One ``host[:port]`` pattern, matched label by label."""

    text: str
    labels: tuple[str, ...]
    port: int
    _regex: re.Pattern[str]

    def matches(self, host: str, port: int) -> bool:
        return port == self.port and self._regex.fullmatch(host) is not None

    @property
    def suffix(self) -> str:
        """The literal labels after the last one with a wildcard: what every matching host ends in."""
        last = max((index for index, label in enumerate(self.labels) if "*" in label), default=-1)
        return ".".join(self.labels[last + 1 :])


def parse_pattern(text: str, *, allow_ip: bool = False) -> HostPattern:
    """A ``HostPattern`` from ``text``; raises ValueError saying what is wrong with it."""
    parts = split_authority(text)
    if parts is None:
        raise ValueError(f"expected host[:port] (a port from 1 to 65535), got {text!r}")
    host, port = parts
    if is_ip(host):
        if not allow_ip:
            raise ValueError(f"expected a host name, got the address {text!r} (the local CA signs names only)")
        return HostPattern(text, (host,), port, re.compile(re.escape(host)))
    labels = tuple(host.split("."))
    if any(not _LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"expected DNS labels of letters, digits, '-' and '*', got {text!r}")
    if "*" in host and (len(labels) < 3 or "*" in labels[-1] or "*" in labels[-2]):
        raise ValueError(f"a pattern with '*' must end in two labels without one (as in *.amazonaws.com), got {text!r}")
    regex = r"\.".join(re.escape(label).replace(r"\*", "[a-z0-9_-]+") for label in labels)
    return HostPattern(text, labels, port, re.compile(regex))


# ---------------------------------------------------------------- AWS endpoints

_REGION = r"(?P<region>[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d)"
_DOMAIN = r"(?:amazonaws\.com(?:\.cn)?)"
# After S3's (``s3_scope``), first match wins; a named group ``service`` takes the service from the host itself.
_ENDPOINTS: tuple[tuple[re.Pattern[str], str | None, str | None], ...] = tuple(
    (re.compile(pattern), service, region)
    for pattern, service, region in (
        (rf"[^.]+\.lambda-url\.{_REGION}\.on\.aws", "lambda", None),
        (rf"[^.]+\.{_REGION}\.(?P<service>es|aoss)\.{_DOMAIN}", None, None),  # OpenSearch domains, collections
        (rf"(?P<service>sts|iam|route53|cloudfront|organizations)\.{_DOMAIN}", None, "us-east-1"),
        (rf"(?:[^.]+\.)*?(?P<service>[a-z0-9-]+)\.{_REGION}\.{_DOMAIN}", None, None),
    )
)


def aws_endpoint(host: str) -> tuple[str | None, str | None]:
    """The (signing region, signing service) an AWS host name implies; (None, None) for other names.

    ``abc.execute-api.eu-west-1.amazonaws.com`` gives execute-api, ``x.lambda-url.us-east-1.on.aws``
    lambda, ``search-d.eu-west-1.es.amazonaws.com`` es, ``bucket.s3.eu-west-1.amazonaws.com`` s3,
    ``dynamodb.eu-west-1.amazonaws.com`` dynamodb (the first label of ``service.region.amazonaws.com``);
    S3 in any style as ``s3_scope`` reads it (``s3-object-lambda``, ``s3-outposts``, ``*`` for a
    multi-region access point, which a rule must sign with sigv4a).
    """
    s3 = s3_scope(host)
    if s3 is not None:
        return s3[1], s3[0]
    for regex, service, region in _ENDPOINTS:
        match = regex.fullmatch(host)
        if match is not None:
            groups = match.groupdict()
            return groups.get("region") or region, groups.get("service") or service
    return None, None
