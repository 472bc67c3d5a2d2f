"""The pure SigV4 functions, checked against awscrt (the authority) and botocore.

The proxy signs the *wire* form of a request (``normalize_path``/``normalize_query``),
so every comparison builds the reference request from the wire path and query and
asks awscrt to sign it as API Gateway would verify it (double URI encoding, path
normalisation on). ``SHAPES`` is shared with ``test_signing_e2e.py``.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from dataclasses import dataclass
from unittest import mock
from urllib.parse import unquote_to_bytes

import botocore.auth
import pytest
from awscrt.auth import AwsCredentialsProvider, AwsSignedBodyHeaderType, AwsSigningConfig, aws_sign_request
from awscrt.http import HttpHeaders, HttpRequest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.signing import (
    EMPTY_SHA256,
    SigningRequest,
    canonical_headers,
    canonical_uri,
    normalize_path,
    normalize_query,
    own_canonical_headers,
    percent_decode,
    sign,
    uri_encode,
)

KEY_ID = "AKIDEXAMPLESIGNING01"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzE+token/with=odd+chars"
REGION = "eu-west-1"
SERVICE = "execute-api"
HOST = "abc123defg.execute-api.eu-west-1.amazonaws.com"  # only a header value; never contacted
AMZ_DATE = "20240229T235959Z"
DATE = datetime.datetime(2024, 2, 29, 23, 59, 59, tzinfo=datetime.UTC)

# The headers the proxy signs; everything else the client sends is forwarded unsigned.
PROXY_SIGNED = frozenset({"host", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token", "content-type"})


# ---------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Shape:
    """One client request: raw path and query exactly as the client writes them."""

    id: str
    path: str
    query: str | None = None  # None: no "?" at all
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @property
    def target(self) -> str:
        """The request target as it appears in the client's request line."""
        return self.path if self.query is None else f"{self.path}?{self.query}"

    @property
    def ascii_target(self) -> bool:
        """aiohttp's client can send it unchanged (raw UTF-8 needs a raw socket)."""
        return self.target.isascii()


_ALL_BYTES = bytes(range(256))
_JSON = (("Content-Type", "application/json"),)

SHAPES: list[Shape] = [
    # --- queries that are not already canonical
    Shape("q-over-encoded-unreserved", "/items", "a=%7E&b=%41%42&c=%2D%5F%2E%30"),
    Shape("q-raw-reserved", "/items", "sel=!*'()&x=a,b;c:d@e/f&$=1"),
    Shape("q-plus-is-space", "/search", "q=a+b&r=+&+=x&s=a++b+"),
    Shape("q-encoded-plus-and-space", "/search", "q=a%2Bb&r=a%20b"),
    Shape("q-lowercase-hex", "/items", "p=%2f%3a%c3%a9&%7a=%7e"),
    Shape("q-raw-utf8", "/items", "name=é&cur=€&ß=ü"),
    Shape("q-emoji", "/items", "e=😀&😀=1&mix=a😀b"),
    Shape("q-encoded-utf8-lower", "/items", "n=%e2%82%ac&m=%F0%9F%98%80"),
    Shape("q-repeated-key-descending", "/items", "a=3&a=2&a=1"),
    Shape("q-repeated-keys-interleaved", "/items", "b=1&a=2&b=0&a=1&c=&b=10"),
    Shape("q-bare-keys", "/items", "flag&other&a=1"),
    Shape("q-empty-values", "/items", "a=&b=&c"),
    Shape("q-bare-and-empty-same-key", "/items", "a=0&a&a="),
    Shape("q-empty-key", "/items", "=v&=&x=1"),
    Shape("q-double-ampersand", "/items", "a=1&&b=2&"),
    Shape("q-leading-ampersand", "/items", "&a=1"),
    Shape("q-only-ampersands", "/items", "&&&"),
    Shape("q-percent-not-hex", "/items", "p=100%&q=%zz&r=%4&s=%%41"),
    Shape("q-question-in-value", "/items", "next=/a?b=c&x=?"),
    Shape("q-equals-in-value", "/items", "a==b&c=d=e&f=="),
    Shape("q-sort-key-prefixes", "/items", "a%20=1&a=2&a-=3&a.=4&a_=5&a~=6&A=7&a0=8&a%3D=9"),
    Shape("q-sort-case-and-symbols", "/items", "b=1&B=2&_=3&~=4&-=5&.=6"),
    Shape("q-encoded-separators", "/items", "k%26=v%3D&x=%26&y=%3F%23"),
    Shape("q-brackets", "/items", "a[]=1&a[]=2&m[k]=v&j={}&p=|^`"),
    Shape("q-empty-after-question-mark", "/items", ""),
    Shape("q-long-value", "/items", "v=" + "x%20" * 700 + "&w=" + "é" * 300),
    # --- paths
    Shape("p-root", "/"),
    Shape("p-root-with-query", "/", "a=b"),
    Shape("p-encoded-slash", "/a%2Fb/c"),
    Shape("p-encoded-slash-lower", "/a%2fb/%2F"),
    Shape("p-space", "/a%20b/%20"),
    Shape("p-tilde", "/~user/a~b"),
    Shape("p-encoded-tilde", "/%7Euser/%7eb"),
    Shape("p-encoded-utf8", "/caf%C3%A9/%E2%82%AC/%F0%9F%98%80"),
    Shape("p-encoded-utf8-lower", "/caf%c3%a9/%e2%82%ac"),
    Shape("p-raw-utf8", "/café/€/😀", "x=ü"),
    Shape("p-double-slashes", "//a//b//"),
    Shape("p-dot-segments", "/a/./b/."),
    Shape("p-dotdot", "/a/b/../c"),
    Shape("p-dotdot-above-root", "/../../a/.."),
    Shape("p-encoded-dotdot", "/a/%2E%2E/b/%2e/c"),
    Shape("p-encoded-dotdot-mixed", "/a/b/.%2E/c/%2E./"),
    Shape("p-trailing-slash", "/a/b/"),
    Shape("p-trailing-dot", "/a/b/.", "k=v"),
    Shape("p-long-segment", "/" + "x" * 4000 + "/y"),
    Shape("p-long-encoded-segment", "/" + "%41" * 300 + "/" + "%C3%A9" * 200),
    Shape("p-reserved", "/a:b/c@d/e!f/g$h&i'j(k)l*m+n,o;p=q"),
    Shape("p-percent-not-hex", "/100%/a%zz/%4/%"),
    Shape("p-plus", "/a+b/+"),
    Shape("p-over-encoded-unreserved", "/%41%42%2D%2E%5F%30"),
    Shape("p-triple-dots", "/.../..../a"),
    Shape("p-dots-in-names", "/.a/a./b..c/.hidden/"),
    Shape("p-encoded-percent", "/a%25b/%2525/%252F"),
    Shape("p-brackets-and-quotes", '/a[1]/{x}/"q"/<t>/|/^/`/\\'),
    # --- methods, headers, bodies
    Shape("m-post-json", "/orders", "dry_run=true", "POST", _JSON, b'{"id": 1, "name": "caf\xc3\xa9"}'),
    Shape(
        "m-put-all-bytes",
        "/blobs/b%201",
        None,
        "PUT",
        (("Content-Type", "application/octet-stream"),),
        _ALL_BYTES,
    ),
    Shape("m-delete", "/orders/42", None, "DELETE"),
    Shape(
        "m-patch-odd-content-type",
        "/o/1",
        None,
        "PATCH",
        (("Content-Type", "  application/json;   charset=utf-8 "),),
        b"{}",
    ),
    Shape("m-options", "/orders", None, "OPTIONS"),
    Shape(
        "h-unsigned-client-headers",
        "/h",
        "x=1",
        "GET",
        (("X-Custom", "one"), ("X-Repeat", "a"), ("X-Repeat", "b"), ("Accept-Language", "fr, en;q=0.5")),
    ),
    Shape(
        "m-post-large-body",
        "/upload",
        None,
        "POST",
        (("Content-Type", "application/octet-stream"),),
        _ALL_BYTES * 1024,
    ),
    Shape("m-post-form-no-content-type", "/form", None, "POST", (), b"a=1&b=%20"),
    Shape("combo-everything", "/a//b/../c%2F/%7e/./é%20/", "z=1&y&x=%7e+&x=&=&%E2%82%AC=€", "POST", _JSON, b"[]"),
]


def test_corpus_is_big_and_unique() -> None:
    """The end-to-end test reuses SHAPES by id; ids must be unique and the corpus wide."""
    assert len(SHAPES) >= 45
    assert len({s.id for s in SHAPES}) == len(SHAPES)


# ---------------------------------------------------------------- references


@dataclass(frozen=True)
class Wire:
    """A shape as the proxy puts it on the wire."""

    path: str
    query: str
    canonical_query: str

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def to_wire(path: str, query: str | None) -> Wire:
    q = normalize_query(query or "")
    return Wire(normalize_path(path), q.wire, q.canonical)


def content_types(headers: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() == "content-type"]


def our_authorization(
    method: str, wire: Wire, client_headers: tuple[tuple[str, str], ...], body: bytes, token: str | None
) -> str:
    """What the proxy's signer produces for this wire request."""
    payload = hashlib.sha256(body).hexdigest()
    headers = [("host", HOST), ("x-amz-date", AMZ_DATE), ("x-amz-content-sha256", payload)]
    if token:
        headers.append(("x-amz-security-token", token))
    headers += content_types(client_headers)
    req = SigningRequest(method, wire.path, wire.canonical_query, tuple(headers), payload)
    return sign(
        req, access_key_id=KEY_ID, secret_access_key=SECRET, amz_date=AMZ_DATE, region=REGION, service=SERVICE
    ).authorization


def crt_authorization(
    method: str,
    target: str,
    client_headers: tuple[tuple[str, str], ...],
    body: bytes,
    token: str | None,
    *,
    content_sha256_header: bool = True,
) -> str:
    """awscrt's Authorization for the request line ``method target`` as a server receives it.

    All client headers are present (so unsigned ones must be left out by name), and awscrt
    adds X-Amz-Date, X-Amz-Security-Token and X-Amz-Content-Sha256 itself.
    """
    headers = HttpHeaders([("Host", HOST), *client_headers])
    request = HttpRequest(method, target, headers)
    config = AwsSigningConfig(
        credentials_provider=AwsCredentialsProvider.new_static(KEY_ID, SECRET, token),
        region=REGION,
        service=SERVICE,
        date=DATE,
        should_sign_header=lambda name: name.lower() in PROXY_SIGNED,
        use_double_uri_encode=True,
        should_normalize_uri_path=True,
        signed_body_value=hashlib.sha256(body).hexdigest(),
        signed_body_header_type=(
            AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256 if content_sha256_header else AwsSignedBodyHeaderType.NONE
        ),
    )
    signed = aws_sign_request(request, config).result(timeout=10)
    return dict(signed.headers)["Authorization"]


def botocore_authorization(
    method: str,
    wire: Wire,
    client_headers: tuple[tuple[str, str], ...],
    body: bytes,
    token: str | None,
    *,
    content_sha256_header: bool = True,
) -> str:
    """botocore's SigV4Auth for the same wire URL, clock pinned to DATE."""
    headers = {"Host": HOST}
    if content_sha256_header:
        headers["X-Amz-Content-SHA256"] = hashlib.sha256(body).hexdigest()
    for name, value in content_types(client_headers):
        headers[name] = value
    request = AWSRequest(method=method, url=f"https://{HOST}{wire.target}", headers=headers, data=body)
    auth = botocore.auth.SigV4Auth(Credentials(KEY_ID, SECRET, token), SERVICE, REGION)
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=DATE.replace(tzinfo=None)):
        auth.add_auth(request)
    return request.headers["Authorization"]


def expected_segments(raw_path: str) -> tuple[list[bytes], bool]:
    """What a server means by a raw path: decoded segments after dot/empty removal, trailing slash.

    Uses urllib's decoder (a ``%`` without two hex digits stays literal), not the proxy's.
    """
    segments: list[bytes] = []
    for segment in raw_path.split("/"):
        decoded = unquote_to_bytes(segment)
        if decoded in (b"", b"."):
            continue
        if decoded == b"..":
            if segments:
                segments.pop()
            continue
        segments.append(decoded)
    return segments, bool(segments) and raw_path.endswith("/")


def wire_segments(wire_path: str) -> tuple[list[bytes], bool]:
    assert wire_path.startswith("/")
    parts = wire_path[1:].split("/")
    trailing = len(parts) > 1 and parts[-1] == ""
    if trailing:
        parts.pop()
    return [unquote_to_bytes(p) for p in parts if p], trailing


def decoded_pairs(raw_query: str | None) -> list[tuple[bytes, bytes | None]]:
    """Query pairs form-decoded (``+`` is a space), order kept; ``None`` value for a bare key; empty parts dropped.

    Uses urllib's decoder, as ``unquote_plus`` does, not the proxy's.
    """
    pairs: list[tuple[bytes, bytes | None]] = []
    for part in (raw_query or "").split("&"):
        if not part:
            continue
        key, sep, value = part.replace("+", " ").partition("=")
        pairs.append((unquote_to_bytes(key), unquote_to_bytes(value) if sep else None))
    return pairs


_WIRE_PATH = re.compile(r"^/(?:[A-Za-z0-9\-._~/]|%[0-9A-F]{2})*$")
_WIRE_QUERY = re.compile(r"^(?:[A-Za-z0-9\-._~=&]|%[0-9A-F]{2})*$")


def check_wire_invariants(path: str, query: str | None) -> Wire:
    """Everything the module docstring promises about the wire form of one client request."""
    wire = to_wire(path, query)
    assert _WIRE_PATH.match(wire.path), wire.path
    assert "//" not in wire.path
    assert not any(seg in (".", "..") for seg in wire.path.split("/"))
    assert _WIRE_QUERY.match(wire.query), wire.query
    # Idempotent: the wire form is its own normal form, so re-normalising changes nothing.
    assert normalize_path(wire.path) == wire.path
    again = normalize_query(wire.query)
    assert (again.wire, again.canonical) == (wire.query, wire.canonical_query)
    # Meaning preserved.
    assert wire_segments(wire.path) == expected_segments(path)
    assert decoded_pairs(wire.query) == decoded_pairs(query)
    return wire


# ---------------------------------------------------------------- corpus tests


@pytest.mark.parametrize("token", [TOKEN, None], ids=["token", "no-token"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_signature_matches_awscrt(shape: Shape, token: str | None) -> None:
    wire = to_wire(shape.path, shape.query)
    ours = our_authorization(shape.method, wire, shape.headers, shape.body, token)
    assert ours == crt_authorization(shape.method, wire.target, shape.headers, shape.body, token)


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_signature_matches_botocore(shape: Shape) -> None:
    """botocore re-quotes the path with quote(safe='/~'); on a wire path that is double encoding."""
    wire = to_wire(shape.path, shape.query)
    ours = our_authorization(shape.method, wire, shape.headers, shape.body, TOKEN)
    assert ours == botocore_authorization(shape.method, wire, shape.headers, shape.body, TOKEN)


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_wire_invariants(shape: Shape) -> None:
    check_wire_invariants(shape.path, shape.query)


# ---------------------------------------------------------------- exact expectations


@pytest.mark.parametrize(
    ("raw", "wire"),
    [
        ("/", "/"),
        ("//", "/"),
        ("/a%2fb", "/a%2Fb"),
        ("/%7Ea/%41", "/~a/A"),
        ("/a:b@c", "/a%3Ab%40c"),
        ("/é€", "/%C3%A9%E2%82%AC"),
        ("/a/%2E%2E/b", "/b"),
        ("/a/b/", "/a/b/"),
        ("/a/b/..", "/a"),
        ("/a/b/../", "/a/"),
        ("/../..", "/"),
        ("/a//b///", "/a/b/"),
        ("/100%", "/100%25"),
        ("/a%zz", "/a%25zz"),
        ("/a+b", "/a%2Bb"),
        ("/...", "/..."),
    ],
)
def test_normalize_path_examples(raw: str, wire: str) -> None:
    assert normalize_path(raw) == wire


@pytest.mark.parametrize(
    ("raw", "wire", "canonical"),
    [
        ("", "", ""),
        ("a=%7e", "a=~", "a=~"),
        ("q=a+b", "q=a%20b", "q=a%20b"),
        ("q=a%2Bb&r=a%2bb", "q=a%2Bb&r=a%2Bb", "q=a%2Bb&r=a%2Bb"),
        ("a+b=+&++", "a%20b=%20&%20%20", "%20%20=&a%20b=%20"),
        ("q=a%20b+c", "q=a%20b%20c", "q=a%20b%20c"),
        ("b=2&a=1&b=1", "b=2&a=1&b=1", "a=1&b=1&b=2"),
        ("flag", "flag", "flag="),
        ("a&a=", "a&a=", "a=&a="),
        ("=v", "=v", "=v"),
        ("a=1&&b", "a=1&b", "a=1&b="),
        ("p=100%", "p=100%25", "p=100%25"),
        ("a==b", "a=%3Db", "a=%3Db"),
        ("x=y?z", "x=y%3Fz", "x=y%3Fz"),
        # Sorted by key, then value: "a" < "a%20" although "a%20=1" < "a=2" as whole strings.
        ("a%20=1&a=2", "a%20=1&a=2", "a=2&a%20=1"),
        ("a-=1&a=2", "a-=1&a=2", "a=2&a-=1"),
    ],
)
def test_normalize_query_examples(raw: str, wire: str, canonical: str) -> None:
    q = normalize_query(raw)
    assert (q.wire, q.canonical) == (wire, canonical)


def test_canonical_uri_double_encodes() -> None:
    assert canonical_uri("/a%20b/~c/%2F") == "/a%2520b/~c/%252F"


def test_canonical_headers_fold_and_join() -> None:
    lines, signed = canonical_headers(
        [("Host", "h"), ("Content-Type", "  a/b;\t c=d  "), ("X-Amz-Date", AMZ_DATE), ("content-type", "x")]
    )
    assert lines == f"content-type:a/b; c=d,x\nhost:h\nx-amz-date:{AMZ_DATE}\n"
    assert signed == "content-type;host;x-amz-date"


@given(
    st.sampled_from([HOST, "127.0.0.1:8080", "s3.eu-west-1.amazonaws.com"]),
    st.sampled_from([EMPTY_SHA256, "UNSIGNED-PAYLOAD", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"]),
    st.one_of(st.none(), st.just(""), st.just(TOKEN), st.text(alphabet=" \tAb+/=", max_size=12)),
)
def test_own_canonical_headers_is_canonical_headers_of_the_same(host: str, payload: str, token: str | None) -> None:
    """The one-step form of SigV4's own headers says exactly what the general function says of them."""
    own = [("Host", host), ("X-Amz-Date", AMZ_DATE), ("X-Amz-Content-Sha256", payload)]
    own += [("X-Amz-Security-Token", token)] if token else []
    assert own_canonical_headers(host, AMZ_DATE, payload, token) == canonical_headers(own)


def test_uri_encode_and_percent_decode_round_trip() -> None:
    assert percent_decode(uri_encode(_ALL_BYTES)) == _ALL_BYTES
    assert uri_encode(b"-_.~") == "-_.~"
    assert percent_decode("%4") == b"%4" and percent_decode("%%41") == b"%A" and percent_decode("+") == b"+"


def test_aws_documented_get_vanilla_example() -> None:
    """The get-vanilla case of the AWS SigV4 test suite (service/region/date from that suite)."""
    req = SigningRequest(
        "GET",
        "/",
        "",
        (("host", "example.amazonaws.com"), ("x-amz-date", "20150830T123600Z")),
        EMPTY_SHA256,
    )
    sig = sign(
        req,
        access_key_id="AKIDEXAMPLE",
        secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        amz_date="20150830T123600Z",
        region="us-east-1",
        service="service",
    )
    assert sig.authorization.endswith(
        "SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )


def test_payload_not_in_content_sha256_header_still_signed() -> None:
    """Without an X-Amz-Content-Sha256 header the body hash is still the last canonical line."""
    wire = to_wire("/a", "b=1")
    payload = hashlib.sha256(b"body").hexdigest()
    req = SigningRequest("POST", wire.path, wire.canonical_query, (("host", HOST), ("x-amz-date", AMZ_DATE)), payload)
    ours = sign(req, access_key_id=KEY_ID, secret_access_key=SECRET, amz_date=AMZ_DATE, region=REGION, service=SERVICE)
    assert ours.canonical_request.endswith("\nhost;x-amz-date\n" + payload)
    theirs = crt_authorization("POST", wire.target, (), b"body", None, content_sha256_header=False)
    assert ours.authorization == theirs


# ---------------------------------------------------------------- properties

_RICH = (
    "abcXYZ019-._~"  # unreserved
    "!$&'()*+,;=:@"  # sub-delims and pchar extras
    "%% "  # escapes, invalid escapes, space
    '"<>[]\\^`{|}'  # never allowed bare
    "é€ß😀\u00a0\u200b"  # UTF-8 of 2, 3 and 4 bytes, odd spaces
)
_ESCAPES = [
    "%2F",
    "%2f",
    "%7E",
    "%7e",
    "%41",
    "%25",
    "%2E",
    "%2e",
    "%E2%82%AC",
    "%c3%a9",
    "%F0%9F%98%80",
    "%",
    "%z",
    "%4",
]
_PATH_CHARS = _RICH.replace("%%", "%")
_QUERY_CHARS = _PATH_CHARS.replace("&", "").replace("=", "") + "?/#"


def path_strategy(chars: str) -> st.SearchStrategy[str]:
    """Raw client paths: segments of ``chars``, dot segments, empty segments and escapes."""
    segment = st.one_of(
        st.text(alphabet=chars, max_size=8),
        st.sampled_from(["", ".", "..", *_ESCAPES]),
        st.lists(st.sampled_from(_ESCAPES), min_size=1, max_size=3).map("".join),
    )
    return st.lists(segment, max_size=6).map(lambda segs: "/" + "/".join(segs))


def query_strategy(chars: str) -> st.SearchStrategy[str | None]:
    """Raw client queries (or none): pairs, bare keys, ``==``, empty parts, escapes."""
    token = st.one_of(st.text(alphabet=chars, max_size=6), st.sampled_from([*_ESCAPES, "+", "%2B", "%26", "%3D"]))
    part = st.tuples(token, st.sampled_from(["=", "", "==", "=a="]), token).map("".join)
    return st.one_of(st.none(), st.lists(part, max_size=6).map("&".join))


paths = path_strategy(_PATH_CHARS)
queries = query_strategy(_QUERY_CHARS)

_PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(path=paths, query=queries, token=st.sampled_from([None, TOKEN]))
def test_property_signature_matches_awscrt(path: str, query: str | None, token: str | None) -> None:
    wire = check_wire_invariants(path, query)
    ours = our_authorization("GET", wire, (), b"", token)
    assert ours == crt_authorization("GET", wire.target, (), b"", token)


@_PROPERTY
@given(path=paths, query=queries)
def test_property_signature_matches_botocore(path: str, query: str | None) -> None:
    wire = to_wire(path, query)
    ours = our_authorization("GET", wire, (), b"", None)
    assert ours == botocore_authorization("GET", wire, (), b"", None)


_plain_segment = st.one_of(st.sampled_from(["", ".", "..", "..."]), st.text(alphabet="ab~-_.", min_size=1, max_size=4))


@_PROPERTY
@given(segments=st.lists(_plain_segment, max_size=7))
def test_property_path_normalization_agrees_with_awscrt(segments: list[str]) -> None:
    """For raw paths that need no encoding, our dot/empty-segment removal is awscrt's.

    awscrt normalises the raw path itself, so signing the client's path with awscrt and
    signing our wire path with our signer must agree: the proxy removes exactly what AWS
    would, no more and no less (trailing slash included).
    """
    raw = "/" + "/".join(segments)
    wire = to_wire(raw, None)
    assert our_authorization("GET", wire, (), b"", None) == crt_authorization("GET", raw, (), b"", None)


@pytest.mark.parametrize("raw_query", ["x=%7e", "q=a+b", "x=:", "x=é", "x=%2f", "s=a,b;c"])
def test_raw_queries_are_ambiguous_wire_queries_are_not(raw_query: str) -> None:
    """Why the proxy rewrites the query: verifiers disagree on raw ones, agree on the wire form.

    awscrt decodes and re-encodes raw query values; botocore signs them verbatim. A proxy
    that forwarded ``q=a+b`` unchanged would be right for one and wrong for the other.
    """
    raw = Wire("/a", raw_query, "")
    assert crt_authorization("GET", raw.target, (), b"", None, content_sha256_header=False) != (
        botocore_authorization("GET", raw, (), b"", None, content_sha256_header=False)
    )
    wire = to_wire("/a", raw_query)
    assert crt_authorization("GET", wire.target, (), b"", None) == botocore_authorization("GET", wire, (), b"", None)
