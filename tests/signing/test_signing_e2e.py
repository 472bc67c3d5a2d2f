"""Every corpus shape through the running proxy to an awscrt-verifying upstream.

The unit tests prove the signer agrees with awscrt for a wire request; these prove
the proxy actually *sends* the request it signed: the upstream recomputes the
signature from the bytes it receives, and checks the meaning survived the rewrite.
The first block checks the verifier itself, so a lenient upstream cannot pass bad
signatures off as good.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import aiohttp
import pytest
import yarl
from aiohttp import web
from hypothesis import given, settings

from proxy.config import parse_config
from proxy.server import ProxyServer
from proxy.signing import SigningRequest, normalize_query, sign
from tests.conftest import TEST_KEY_ID, TEST_REGION, TEST_SECRET, TEST_SESSION_TOKEN, StartProxy, static_route
from tests.signing.test_signing import (
    SHAPES,
    Shape,
    decoded_pairs,
    expected_segments,
    path_strategy,
    query_strategy,
    to_wire,
    wire_segments,
)
from tests.support.rawhttp import raw_request
from tests.support.sigv4_upstream import Received, SigV4Upstream

AMZ_DATE = "20240229T235959Z"


# ---------------------------------------------------------------- the verifier itself

Tamper = Callable[[list[tuple[str, str]], str, bytes], tuple[list[tuple[str, str]], str, bytes]]


def _set(headers: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    return [(k, value if k.lower() == name else v) for k, v in headers]


def _drop(headers: list[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() != name]


def _signed_directly(
    upstream_url: str, body: bytes, *, service: str = "execute-api"
) -> tuple[list[tuple[str, str]], str]:
    """Headers and target for ``POST /a%20b/?b=2&a=~`` signed by our signer, as the proxy would."""
    host = upstream_url.removeprefix("http://")
    payload = hashlib.sha256(body).hexdigest()
    headers = [
        ("Host", host),
        ("X-Amz-Date", AMZ_DATE),
        ("X-Amz-Content-Sha256", payload),
        ("X-Amz-Security-Token", TEST_SESSION_TOKEN),
        ("Content-Type", "text/plain"),
    ]
    query = normalize_query("b=2&a=~")
    signature = sign(
        SigningRequest("POST", "/a%20b/", query.canonical, tuple(headers), payload),
        access_key_id=TEST_KEY_ID,
        secret_access_key=TEST_SECRET,
        amz_date=AMZ_DATE,
        region=TEST_REGION,
        service=service,
    )
    return [*headers, ("Authorization", signature.authorization)], "/a%20b/?" + query.wire


def _raw_message(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode("utf-8") + body


UNTOUCHED: Tamper = lambda h, t, b: (h, t, b)  # noqa: E731


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (lambda h, t, b: (h, t.replace("%20", "%2520"), b), "does not match"),
        (lambda h, t, b: (h, t.replace("a%20b/", "a%20b"), b), "does not match"),
        (lambda h, t, b: (h, t.replace("a=~", "a=%7E"), b), None),  # same canonical query
        (lambda h, t, b: (h, t.replace("b=2&a=~", "a=~&b=2"), b), None),  # order is not signed
        (lambda h, t, b: (h, t + "&c", b), "does not match"),
        (lambda h, t, b: (h, t, b + b"!"), "X-Amz-Content-Sha256"),
        (lambda h, t, b: (_set(h, "content-type", "text/html"), t, b), "does not match"),
        (lambda h, t, b: ([*h, ("X-Unsigned", "fine")], t, b), None),
        (lambda h, t, b: ([*h, ("X-Amz-Security-Token", "again")], t, b), "more than one"),
        (lambda h, t, b: (_set(h, "x-amz-security-token", "other"), t, b), "does not match"),
        (lambda h, t, b: (_drop(h, "x-amz-security-token"), t, b), "SignedHeaders differ"),
        (lambda h, t, b: (_set(h, "x-amz-date", "20240229T235958Z"), t, b), "does not match"),
        (lambda h, t, b: (_set(h, "x-amz-date", "20240301T000000Z"), t, b), "Credential date"),
        (lambda h, t, b: (_drop(h, "authorization"), t, b), "Missing Authentication Token"),
        (lambda h, t, b: (_set(h, "authorization", "AWS4-HMAC-SHA256 nonsense"), t, b), "malformed"),
        (lambda h, t, b: ([(k, v.replace(TEST_KEY_ID, "AKIDUNKNOWN")) for k, v in h], t, b), "invalid"),
        (lambda h, t, b: ([(k, v.replace("eu-west-1", "us-east-1")) for k, v in h], t, b), "does not match"),
        (lambda h, t, b: ([(k, v.replace("execute-api", "lambda")) for k, v in h], t, b), "service"),
        (lambda h, t, b: (h, t + "&bad=%zz", b), "awscrt could not sign"),
    ],
    ids=[
        "path-double-encoded",
        "trailing-slash-dropped",
        "query-reencoded-equivalently",
        "query-reordered",
        "query-pair-added",
        "body-changed",
        "signed-header-changed",
        "unsigned-header-added",
        "token-repeated",
        "token-changed",
        "token-dropped",
        "date-changed",
        "date-day-changed",
        "no-authorization",
        "malformed-authorization",
        "unknown-key",
        "other-region",
        "other-service",
        "bad-escape-in-query",
    ],
)
async def test_upstream_verifier(tamper: Tamper, error: str | None) -> None:
    """Our signer's request, sent straight to the upstream, passes; each tampered variant fails."""
    async with SigV4Upstream({TEST_KEY_ID: TEST_SECRET}) as upstream:
        headers, target = _signed_directly(upstream.url, b"hello")
        headers, target, body = tamper(headers, target, b"hello")
        response = await raw_request(upstream.url, _raw_message("POST", target, headers, body))
        [got] = upstream.received
    assert got.raw_path == target and got.body == body
    if error is None:
        assert got.signature_ok, got.signature_error
        assert response.status == 200
        assert got.signed_headers == [
            "content-type",
            "host",
            "x-amz-content-sha256",
            "x-amz-date",
            "x-amz-security-token",
        ]
        assert got.access_key_id == TEST_KEY_ID
    else:
        assert not got.signature_ok
        assert got.signature_error is not None and error in got.signature_error, got.signature_error
        assert response.status == 403
        assert TEST_SECRET not in got.signature_error


async def test_upstream_responder_and_optional_signature() -> None:
    """``responder`` replaces the reply after verification; ``require_signature=False`` lets 200 through."""
    upstream = SigV4Upstream(lambda key: None, require_signature=False)
    async with upstream, aiohttp.ClientSession() as session:
        async with session.get(upstream.url + "/x?y=1") as response:
            assert response.status == 200
            assert (await response.json())["raw_path"] == "/x?y=1"

        seen: list[Received] = []

        async def responder(request: web.Request, received: Received) -> web.StreamResponse:
            seen.append(received)
            return web.Response(status=418, text="teapot")

        upstream.responder = responder
        async with session.put(upstream.url + "/z", data=b"abc") as response:
            assert response.status == 418 and await response.text() == "teapot"
    assert [r.signature_ok for r in upstream.received] == [False, False]
    assert seen == upstream.received[1:] and seen[0].body == b"abc"
    assert seen[0].signature_error == "Missing Authentication Token"


# ---------------------------------------------------------------- the corpus through the proxy


@pytest.fixture
async def through_proxy(start_proxy: StartProxy, sigv4_upstream: SigV4Upstream) -> tuple[str, SigV4Upstream]:
    server = await start_proxy(static_route(sigv4_upstream.url))
    return server.url, sigv4_upstream


async def send_with_aiohttp(proxy_url: str, shape: Shape) -> tuple[int, bytes]:
    """aiohttp's client, with ``encoded=True`` so the target reaches the proxy byte for byte."""
    url = yarl.URL(proxy_url + shape.target, encoded=True)
    session = aiohttp.ClientSession(skip_auto_headers=("Content-Type",))
    headers = list(shape.headers)
    async with session, session.request(shape.method, url, headers=headers, data=shape.body or None) as resp:
        return resp.status, await resp.read()


async def send_raw(proxy_url: str, shape: Shape) -> tuple[int, bytes]:
    """A raw socket, for targets aiohttp's client would not send as they are (raw UTF-8)."""
    host = proxy_url.removeprefix("http://")
    response = await raw_request(
        proxy_url, _raw_message(shape.method, shape.target, [("Host", host), *shape.headers], shape.body)
    )
    return response.status, response.body


def check_arrived(shape: Shape, got: Received) -> None:
    """The request the upstream saw is correctly signed and means what the client sent."""
    context = f"{shape.id}: {shape.method} {shape.target[:200]!r} arrived as {got.raw_path[:200]!r}"
    assert got.signature_ok, f"{context}: {got.signature_error}"
    assert got.method == shape.method, context
    path, _, query = got.raw_path.partition("?")
    assert wire_segments(path) == expected_segments(shape.path), context
    assert decoded_pairs(query) == decoded_pairs(shape.query), context
    # The design sends exactly the normal form it signs.
    assert got.raw_path == to_wire(shape.path, shape.query).target, context
    assert got.body == shape.body, context
    for name in {k.lower() for k, _ in shape.headers}:
        sent = [v.strip() for k, v in shape.headers if k.lower() == name]
        assert got.header_values(name) == sent, f"{context}: header {name}"
    expected_signed = {"host", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"}
    if any(k.lower() == "content-type" for k, _ in shape.headers):
        expected_signed.add("content-type")
    assert set(got.signed_headers) == expected_signed, context
    assert got.header_values("x-amz-security-token") == [TEST_SESSION_TOKEN], context
    assert got.access_key_id == TEST_KEY_ID, context


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
async def test_shape_through_proxy(through_proxy: tuple[str, SigV4Upstream], shape: Shape) -> None:
    proxy_url, upstream = through_proxy
    send = send_with_aiohttp if shape.ascii_target else send_raw
    status, body = await send(proxy_url, shape)
    assert len(upstream.received) == 1, f"{shape.id}: status {status}, {body[:300]!r}"
    check_arrived(shape, upstream.received[0])
    assert status == 200, f"{shape.id}: {body[:300]!r}"


@pytest.mark.parametrize("shape", [s for s in SHAPES if s.ascii_target], ids=lambda s: s.id)
async def test_ascii_shape_over_raw_socket(through_proxy: tuple[str, SigV4Upstream], shape: Shape) -> None:
    """The same bytes without aiohttp's client: no Accept/User-Agent, Connection: close."""
    proxy_url, upstream = through_proxy
    status, body = await send_raw(proxy_url, shape)
    assert len(upstream.received) == 1, f"{shape.id}: status {status}, {body[:300]!r}"
    check_arrived(shape, upstream.received[0])
    assert status == 200, f"{shape.id}: {body[:300]!r}"


async def test_keep_alive_session_sends_every_shape(through_proxy: tuple[str, SigV4Upstream]) -> None:
    """All shapes on one pooled client session: nothing from one request leaks into the next."""
    proxy_url, upstream = through_proxy
    ascii_shapes = [s for s in SHAPES if s.ascii_target]
    async with aiohttp.ClientSession(skip_auto_headers=("Content-Type",)) as session:
        for shape in ascii_shapes:
            url = yarl.URL(proxy_url + shape.target, encoded=True)
            async with session.request(shape.method, url, headers=list(shape.headers), data=shape.body or None) as r:
                assert r.status == 200, f"{shape.id}: {(await r.read())[:300]!r}"
    assert len(upstream.received) == len(ascii_shapes)
    for shape, got in zip(ascii_shapes, upstream.received, strict=True):
        check_arrived(shape, got)


# What a request line can carry bare (no space, no '#', ASCII): the rest is sent as escapes.
_LINE_CHARS = "abcXYZ019-._~!$&'()*+,;=:@%\"<>[]\\^`{|}"


def test_property_arbitrary_targets_through_proxy() -> None:
    """Generated raw paths and queries, sent over a raw socket, arrive signed and meaning the same.

    Sync on purpose: one proxy and upstream on a private loop serve every hypothesis example.
    """
    loop = asyncio.new_event_loop()
    upstream = SigV4Upstream({TEST_KEY_ID: TEST_SECRET})
    loop.run_until_complete(upstream.start())
    server = ProxyServer(parse_config({"listen": "127.0.0.1:0", **static_route(upstream.url)}))
    try:
        loop.run_until_complete(server.start())

        @settings(max_examples=150, deadline=None)
        @given(
            path=path_strategy(_LINE_CHARS),
            query=query_strategy(_LINE_CHARS.replace("&", "").replace("=", "") + "?/"),
        )
        def check(path: str, query: str | None) -> None:
            shape = Shape("generated", path, query, "POST", (("Content-Type", "text/plain"),), b"x")
            upstream.received.clear()
            status, body = loop.run_until_complete(send_raw(server.url, shape))
            assert len(upstream.received) == 1, f"{shape.target!r}: status {status}, {body[:300]!r}"
            check_arrived(shape, upstream.received[0])
            assert status == 200

        check()
    finally:
        loop.run_until_complete(server.close())
        loop.run_until_complete(upstream.close())
        loop.close()


async def test_chunked_and_expect_continue_bodies(through_proxy: tuple[str, SigV4Upstream]) -> None:
    """Bodies without a Content-Length up front are still hashed and signed as they arrive."""
    proxy_url, upstream = through_proxy
    host = proxy_url.removeprefix("http://")
    chunked = (
        f"POST /c?x=%7e HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: text/plain\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    ).encode()
    expect = (
        f"PUT /e HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    ).encode()
    assert (await raw_request(proxy_url, chunked)).status == 200
    assert (await raw_request(proxy_url, expect)).status == 200
    first, second = upstream.received
    assert (first.signature_ok, first.raw_path, first.body) == (True, "/c?x=~", b"hello world"), first.signature_error
    assert (second.signature_ok, second.raw_path, second.body) == (True, "/e", b"abc"), second.signature_error


async def test_absolute_form_target(through_proxy: tuple[str, SigV4Upstream]) -> None:
    """RFC 9112 3.2.2: a server must accept absolute-form; the path is what follows the authority."""
    proxy_url, upstream = through_proxy
    host = proxy_url.removeprefix("http://")
    message = f"GET http://{host}/abs?q=1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    response = await raw_request(proxy_url, message)
    assert response.status == 200
    assert upstream.received[0].raw_path == "/abs?q=1"
