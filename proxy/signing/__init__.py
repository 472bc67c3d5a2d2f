"""SigV4 signing as pure functions: no I/O, no credentials lookup, the clock only as an argument.

The proxy never trusts the client's encoding of the path and query. It turns
them into one normal form (``normalize_path``, ``normalize_query``) and puts
*those bytes* on the wire, so the canonical request it signs is exactly the
one AWS rebuilds from the request it receives:

* every path segment and query key/value is percent-decoded to bytes and
  re-encoded with only the RFC 3986 unreserved characters left bare, hex in
  upper case (``%7e`` becomes ``~``, ``:`` becomes ``%3A``, raw UTF-8 becomes
  ``%E2%82%AC``); an encoded slash stays ``%2F`` inside its segment;
* ``+`` in a query is a space, sent as ``%20``: every form encoder (HTML
  forms, ``requests``' ``params``, ``URLSearchParams``, HTTPie, Postman) writes
  a space so, and API Gateway and most AWS query APIs read it so; ``%2B`` stays
  a plus. In a path ``+`` is a literal plus, sent as ``%2B``;
* dot segments and empty segments (``//``) are removed, as AWS does when it
  normalises the canonical URI; a trailing slash is kept.

The canonical URI is then the wire path encoded once more (every service but
S3 double-encodes), and the canonical query is the wire pairs sorted. S3's
paths follow their own rules (``s3_wire_path``; ``services`` says which
service signs how).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_HEX = b"0123456789ABCDEF"
_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
# One entry per byte value: the byte itself when unreserved, else its %XX form.
_ENCODED_BYTE = tuple(chr(b) if b in _UNRESERVED else "%" + chr(_HEX[b >> 4]) + chr(_HEX[b & 15]) for b in range(256))


_PLAIN_PATH = re.compile(r"/[A-Za-z0-9\-_.~/]*")


def uri_encode(raw: bytes) -> str:
    """Percent-encode every byte that is not RFC 3986 unreserved (upper-case hex)."""
    return "".join([_ENCODED_BYTE[b] for b in raw])


def percent_decode(text: str) -> bytes:
    """Decode ``%XX`` escapes to bytes; a ``%`` not followed by two hex digits stays literal.

    ``+`` is left alone: in a path it is a plus (``query_decode`` reads it as a space).
    """
    raw = text.encode("utf-8", "surrogateescape")
    if b"%" not in raw:
        return raw
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        b = raw[i]
        if b == 0x25 and i + 2 < n and raw[i + 1] in _HEXDIGITS and raw[i + 2] in _HEXDIGITS:
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(b)
            i += 1
    return bytes(out)


def query_decode(text: str) -> bytes:
    """A query key or value as bytes, form-decoded: ``+`` is a space, ``%2B`` a plus."""
    return percent_decode(text.replace("+", " ") if "+" in text else text)


def _normalize_segment(segment: str) -> str:
    if segment.isascii() and segment.replace("-", "").replace("_", "").replace(".", "").replace("~", "").isalnum():
        return segment
    return uri_encode(percent_decode(segment))


def remove_dot_segments(raw_path: str) -> str:
    """RFC 3986 dot-segment removal plus empty-segment removal, on a still-encoded path."""
    segments: list[str] = []
    for segment in raw_path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    path = "/" + "/".join(segments)
    return path + "/" if segments and raw_path.endswith("/") else path


def normalize_path(raw_path: str) -> str:
    """The wire form of a client's raw (still encoded) path; see the module docstring."""
    if _PLAIN_PATH.fullmatch(raw_path) and "//" not in raw_path and "/." not in raw_path:
        return raw_path  # already normal: the common case, answered without splitting
    # Segments are re-encoded first, so "%2E%2E" counts as ".." just as a server reads it.
    return remove_dot_segments("/".join(_normalize_segment(segment) for segment in raw_path.split("/")))


def s3_wire_path(raw_path: str) -> str:
    """The wire form of a path under S3's rules: each segment decoded once and encoded once, nothing removed.

    ``//``, ``.`` and ``..`` stay: in S3 they are parts of a key, and S3 signs
    the path as it arrives (see ``services``).
    """
    if _PLAIN_PATH.fullmatch(raw_path):
        return raw_path
    return "/".join(uri_encode(percent_decode(segment)) for segment in raw_path.split("/"))


def join_paths(base: str, tail: str) -> str:
    """Append a normalized ``tail`` path to a normalized ``base`` path (an upstream's path)."""
    if tail in ("", "/"):
        return base if tail == "" or base.endswith("/") else base + "/"
    return base.rstrip("/") + tail


@dataclass(frozen=True, slots=True)
class Query:
    """A query string in wire form and in canonical (sorted) form."""

    wire: str
    canonical: str


NO_QUERY = Query("", "")


def normalize_query(raw_query: str) -> Query:
    """Re-encode each key and value of a raw query; keep the client's order on the wire.

    Empty pairs (``a=1&&b``) are dropped; a key without ``=`` stays bare on the
    wire and counts as an empty value in the canonical form, as AWS reads it.
    """
    if not raw_query:
        return NO_QUERY
    wire_parts: list[str] = []
    canonical_pairs: list[tuple[str, str]] = []
    for part in raw_query.split("&"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        encoded_key = uri_encode(query_decode(key))
        encoded_value = uri_encode(query_decode(value))
        wire_parts.append(f"{encoded_key}={encoded_value}" if sep else encoded_key)
        canonical_pairs.append((encoded_key, encoded_value))
    canonical_pairs.sort()
    return Query("&".join(wire_parts), "&".join(f"{k}={v}" for k, v in canonical_pairs))


def canonical_uri(wire_path: str) -> str:
    """The canonical URI of a normalized wire path: encoded a second time."""
    return wire_path.replace("%", "%25")


def canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """``(canonical_headers, signed_headers)`` for the given (name, value) pairs.

    Names are lower-cased, values trimmed with inner runs of spaces folded,
    repeated headers joined with commas in the order they came.
    """
    merged: dict[str, str] = {}
    for name, value in headers:
        name, value = name.lower(), " ".join(value.split())
        merged[name] = f"{merged[name]},{value}" if name in merged else value
    names = sorted(merged)
    return "".join([f"{name}:{merged[name]}\n" for name in names]), ";".join(names)


@dataclass(slots=True)  # not frozen: one is made per request, and a frozen one costs three times as much
class SigningRequest:
    """Everything that goes into a signature, already in wire form."""

    method: str
    wire_path: str
    canonical_query: str
    headers: tuple[tuple[str, str], ...]  # the headers to sign, host and x-amz-* included
    payload_sha256: str
    double_encode: bool = True  # False for S3, whose canonical URI is the wire path itself
    # ``canonical_headers(headers)`` when the caller already has it (``own_canonical_headers``)
    canonical_headers: tuple[str, str] | None = None


def own_canonical_headers(host: str, amz_date: str, payload_sha256: str, session_token: str | None) -> tuple[str, str]:
    """``canonical_headers`` of exactly the headers SigV4 adds itself, built in one step.

    Host, X-Amz-Content-Sha256, X-Amz-Date and X-Amz-Security-Token are what
    most requests sign and nothing else: their names are known (and sorted) and
    only the token could carry whitespace to fold. The general function costs
    six times as much.
    """
    lines = f"host:{host}\nx-amz-content-sha256:{payload_sha256}\nx-amz-date:{amz_date}\n"
    if session_token:
        token = " ".join(session_token.split())
        return f"{lines}x-amz-security-token:{token}\n", "host;x-amz-content-sha256;x-amz-date;x-amz-security-token"
    return lines, "host;x-amz-content-sha256;x-amz-date"


def canonical_request(req: SigningRequest) -> tuple[str, str]:
    """``(canonical_request, signed_headers)``."""
    header_lines, signed_headers = req.canonical_headers or canonical_headers(req.headers)
    text = "\n".join(
        (
            req.method,
            canonical_uri(req.wire_path) if req.double_encode else req.wire_path,
            req.canonical_query,
            header_lines,
            signed_headers,
            req.payload_sha256,
        )
    )
    return text, signed_headers


def redact_canonical(canonical_request: str) -> str:
    """The canonical request with the session token's value hidden (it is a secret), for logs."""
    return "\n".join(
        "x-amz-security-token:<redacted>" if line.startswith("x-amz-security-token:") else line
        for line in canonical_request.split("\n")
    )


def credential_scope(datestamp: str, region: str, service: str) -> str:
    return f"{datestamp}/{region}/{service}/aws4_request"


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


_amz_second = 0
_amz_value = ""


def amz_date(now: float) -> str:
    """``now`` (epoch seconds) as an X-Amz-Date value, ``YYYYMMDDTHHMMSSZ``; formatted once a second."""
    global _amz_second, _amz_value
    second = int(now)
    if second != _amz_second:
        _amz_second, _amz_value = second, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
    return _amz_value


@lru_cache(maxsize=64)
def signing_key(secret_access_key: str, datestamp: str, region: str, service: str) -> bytes:
    """The derived key; cached because it changes once a day per secret, region and service."""
    key = hmac.digest(("AWS4" + secret_access_key).encode(), datestamp.encode(), "sha256")
    for part in (region, service, "aws4_request"):
        key = hmac.digest(key, part.encode(), "sha256")
    return key


class PreparedKey:
    """HMAC-SHA256 with one key, its padded inner and outer hash states computed once.

    ``hmac.digest`` sets OpenSSL's HMAC up again on every call (about 1.7 µs);
    copying two prepared SHA-256 states costs a third of that, and a signing
    key serves every request of a day.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        padded = key.ljust(64, b"\0")  # SHA-256's block; a signing key is 32 bytes, never longer
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def hexdigest(self, message: bytes) -> str:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


@lru_cache(maxsize=64)
def _scope_and_key(secret_access_key: str, datestamp: str, region: str, service: str) -> tuple[str, PreparedKey]:
    """The credential scope and the prepared signing key of a day, region and service."""
    return (
        credential_scope(datestamp, region, service),
        PreparedKey(signing_key(secret_access_key, datestamp, region, service)),
    )


@dataclass(slots=True)  # not frozen, as SigningRequest
class Signature:
    """A computed signature and what it was computed from (for debug logs and tests)."""

    authorization: str
    canonical_request: str
    string_to_sign: str


def sign(
    req: SigningRequest,
    *,
    access_key_id: str,
    secret_access_key: str,
    amz_date: str,
    region: str,
    service: str,
) -> Signature:
    """Sign ``req``; ``amz_date`` is ``YYYYMMDDTHHMMSSZ`` and must equal its X-Amz-Date header."""
    canonical, signed_headers = canonical_request(req)
    scope, key = _scope_and_key(secret_access_key, amz_date[:8], region, service)
    to_sign = string_to_sign(amz_date, scope, canonical)
    signature = key.hexdigest(to_sign.encode())
    authorization = (
        f"{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
    )
    return Signature(authorization, canonical, to_sign)


def receiver_canonical_uri(raw_path: str) -> str:
    """The canonical URI a SigV4 *receiver* computes from a raw path as it arrived.

    Used by the demo's API Gateway emulator: normalize, then encode every byte
    but unreserved characters and ``/`` once more, as AWS does.
    """
    normalized = remove_dot_segments(raw_path).encode("utf-8", "surrogateescape")
    return "/".join(uri_encode(part) for part in normalized.split(b"/"))
