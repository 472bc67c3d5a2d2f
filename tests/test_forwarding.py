"""Forwarding through real sockets: faithful requests, faithful streamed responses, clear errors."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.http import http1
from tests.conftest import TEST_KEY_ID, TEST_SESSION_TOKEN, static_route
from tests.support.rawhttp import raw_request
from tests.support.sigv4_upstream import Received, SigV4Upstream


def names(received: Received) -> list[str]:
    return [k.lower() for k, _ in received.headers]


async def test_get_is_signed_and_carries_only_what_the_client_sent(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    response = await raw_request(
        proxy.url,
        b"GET /items/7?b=2&a=1 HTTP/1.1\r\nHost: localhost\r\nX-Trace: one\r\nX-Trace: two\r\n"
        b"Authorization: Bearer client-token\r\nX-Amz-Date: 19990101T000000Z\r\nConnection: close\r\n\r\n",
    )
    assert response.status == 200, response.body
    got = sigv4_upstream.received[-1]
    assert got.signature_ok, got.signature_error
    assert got.method == "GET"
    assert got.raw_path == "/items/7?b=2&a=1"
    assert got.header_values("x-trace") == ["one", "two"]
    assert got.header_values("host") == [sigv4_upstream.url.split("//")[1]]
    assert got.header_values("x-amz-security-token") == [TEST_SESSION_TOKEN]
    assert got.header_values("authorization")[0].startswith(f"AWS4-HMAC-SHA256 Credential={TEST_KEY_ID}/")
    assert got.header_values("x-amz-date") != ["19990101T000000Z"]
    invented = {"user-agent", "accept", "accept-encoding", "content-type", "content-length"}
    assert invented.isdisjoint(names(got))


async def test_hop_by_hop_and_connection_named_headers_are_dropped(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    response = await raw_request(
        proxy.url,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close, X-Private\r\nX-Private: secret-hop\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Bearer p\r\nUpgrade-Insecure-Requests: 1\r\n"
        b"X-Kept: yes\r\n\r\n",
    )
    assert response.status == 200
    got = names(sigv4_upstream.received[-1])
    for dropped in ("connection", "x-private", "keep-alive", "te", "proxy-authorization"):
        assert dropped not in got
    assert "x-kept" in got and "upgrade-insecure-requests" in got


def test_long_connection_values_are_read_but_never_cached() -> None:
    """Connection values are cached (peers repeat "keep-alive"), but only short ones: a client sending
    8 KB values full of distinct tokens must not pin megabytes in the caches."""
    long_value = ",".join(f"x-{n}" for n in range(2000)) + ", X-Private"
    cached = http1._cached_tokens.cache_info().currsize
    assert "x-private" in http1.connection_tokens([long_value])
    dropped = http1.hop_by_hop(CIMultiDict([("Connection", long_value)]))
    assert {"x-private", "x-1999", "keep-alive"} <= dropped
    assert http1._cached_tokens.cache_info().currsize == cached
    assert http1.hop_by_hop(CIMultiDict([("Connection", "Close, X-Short")])) == http1.HOP_BY_HOP | {"close", "x-short"}


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
async def test_every_method_is_signed(method: str, sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    body = b'{"n": 1}' if method in ("POST", "PUT", "PATCH") else b""
    async with (
        aiohttp.ClientSession() as client,
        client.request(
            method, proxy.url + "/thing", data=body or None, headers={"Content-Type": "application/json"}
        ) as r,
    ):
        await r.read()
        assert r.status == 200
    got = sigv4_upstream.received[-1]
    assert got.signature_ok, got.signature_error
    assert (got.method, got.body) == (method, body)
    assert "content-type" in got.signed_headers


async def test_chunked_upload_without_length_is_hashed_and_sent_with_length(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    request = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    response = await raw_request(proxy.url, request)
    assert response.status == 200
    got = sigv4_upstream.received[-1]
    assert got.signature_ok, got.signature_error
    assert got.body == b"hello world"
    assert got.header_values("content-length") == ["11"]
    assert "transfer-encoding" not in names(got)


async def test_expect_100_continue_with_curl(sigv4_upstream, start_proxy, tmp_path) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect: 100-continue",
        "-H", "Content-Type: application/octet-stream", "--data-binary", f"@{payload}", f"{proxy.url}/upload",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await curl.communicate()
    assert out == b"200"
    got = sigv4_upstream.received[-1]
    assert got.signature_ok and got.body == payload.read_bytes()
    assert "expect" not in names(got)


async def test_curl_end_to_end_with_awkward_path_and_query(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(
        static_route(sigv4_upstream.url, path_prefix="/api", upstream=sigv4_upstream.url + "/prod")
    )
    url = f"{proxy.url}/api/caf%C3%A9/a%2Fb/~x%7e/?q=a+b&q=%7E&flag&e=&sp=a%20b&r=!*'(),;:@/"
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--path-as-is", "-g", url, stdout=asyncio.subprocess.PIPE
    )  # fmt: skip
    out, _ = await curl.communicate()
    echoed = json.loads(out)
    got = sigv4_upstream.received[-1]
    assert got.signature_ok, got.signature_error
    assert echoed["raw_path"] == (
        "/prod/caf%C3%A9/a%2Fb/~x~/?q=a%20b&q=~&flag&e=&sp=a%20b&r=%21%2A%27%28%29%2C%3B%3A%40%2F"
    )


async def test_longest_prefix_wins_and_is_replaced_by_upstream_path(sigv4_upstream, start_proxy) -> None:
    config = static_route(sigv4_upstream.url + "/root")
    config["routes"].append(
        {**config["routes"][0], "path_prefix": "/orders", "upstream": sigv4_upstream.url + "/prod/v1"}
    )
    proxy = await start_proxy(config)
    async with aiohttp.ClientSession() as client:
        for path, expected in [
            ("/orders/7?x=1", "/prod/v1/7?x=1"),
            ("/orders", "/prod/v1"),
            ("/ordersX", "/root/ordersX"),
            ("/other/thing", "/root/other/thing"),
        ]:
            async with client.get(proxy.url + path) as r:
                assert r.status == 200
            assert sigv4_upstream.received[-1].raw_path == expected


async def test_api_key_is_injected(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url, api_key="k-123"))
    async with (
        aiohttp.ClientSession() as client,
        client.get(proxy.url + "/", headers={"x-api-key": "client's"}) as r,
    ):
        assert r.status == 200
    assert sigv4_upstream.received[-1].header_values("x-api-key") == ["k-123"]


# ---------------------------------------------------------------- responses


async def test_response_status_headers_and_gzip_body_pass_unchanged(sigv4_upstream, start_proxy) -> None:
    compressed = gzip.compress(b'{"hello": "world"}' * 100)

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.Response(status=201, body=compressed)
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
        response.headers["Content-Encoding"] = "gzip"
        response.headers["Content-Type"] = "application/json"
        response.headers["X-Custom"] = "kept"
        return response

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    response = await raw_request(proxy.url, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 201
    assert response.header_values("set-cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
    assert response.header_values("content-encoding") == ["gzip"]
    assert response.header_values("x-custom") == ["kept"]
    assert response.body == compressed


@pytest.mark.parametrize("status", [204, 304, 404, 500, 503])
async def test_upstream_statuses_pass_through(status: int, sigv4_upstream, start_proxy) -> None:
    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        return web.Response(status=status, body=None if status in (204, 304) else b"upstream says")

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    response = await raw_request(proxy.url, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == status
    assert response.body == (b"" if status in (204, 304) else b"upstream says")


async def test_head_keeps_content_length_without_body(sigv4_upstream, start_proxy) -> None:
    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        return web.Response(body=b"x" * 1234)

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    response = await raw_request(proxy.url, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 200
    assert response.header_values("content-length") == ["1234"]


async def test_server_sent_events_arrive_one_by_one(sigv4_upstream, start_proxy) -> None:
    first_seen = asyncio.Event()

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await asyncio.wait_for(first_seen.wait(), 5)  # event two only once the client has event one
        await response.write(b"data: two\n\n")
        await response.write_eof()
        return response

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/events") as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        assert await r.content.readuntil(b"\n\n") == b"data: one\n\n"
        first_seen.set()
        assert await r.content.readuntil(b"\n\n") == b"data: two\n\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upstream_dying_mid_body_aborts_the_client(framing: str, sigv4_upstream, start_proxy) -> None:
    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse()
        if framing == "content-length":
            response.content_length = 100_000
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return response

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    response = await raw_request(proxy.url, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 200
    assert not response.complete
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/") as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_client_going_away_cancels_the_upstream_request(sigv4_upstream, start_proxy) -> None:
    upstream_saw_close = asyncio.Event()
    started = asyncio.Event()

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        started.set()
        try:
            while True:  # an endless body: only a closed connection ends it
                await response.write(b"y" * 65536)
        except (ConnectionError, asyncio.CancelledError):
            upstream_saw_close.set()
            raise

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.read(1024)
    await asyncio.wait_for(started.wait(), 5)
    writer.transport.abort()
    await asyncio.wait_for(upstream_saw_close.wait(), 5)


# ---------------------------------------------------------------- errors


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def json_error(url: str, method: str = "GET", **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as client, client.request(method, url, **kwargs) as r:
        assert r.headers["Content-Type"].startswith("application/json")
        return r.status, await r.json()


async def test_unreachable_upstream_is_502(start_proxy) -> None:
    proxy = await start_proxy(static_route(f"http://127.0.0.1:{closed_port()}"))
    status, body = await json_error(proxy.url + "/x")
    assert status == 502 and body["reason"] == "upstream_unreachable"
    assert "cannot connect" in body["message"]


async def test_slow_upstream_is_504(sigv4_upstream, start_proxy) -> None:
    release = asyncio.Event()

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="too late")

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url, timeout="300ms"))
    try:
        status, body = await json_error(proxy.url + "/slow")
    finally:
        release.set()
    assert status == 504 and body["reason"] == "upstream_timeout"


async def test_missing_credentials_is_503_and_other_routes_still_work(sigv4_upstream, start_proxy) -> None:
    config = static_route(sigv4_upstream.url)
    config["credentials"]["nobody"] = {"type": "profile", "profile": "does-not-exist"}
    config["routes"].append({**config["routes"][0], "path_prefix": "/broken", "credentials": "nobody"})
    proxy = await start_proxy(config)
    status, body = await json_error(proxy.url + "/broken/x")
    assert status == 503 and body["reason"] == "profile_not_found"
    assert "does-not-exist" in body["message"]
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/fine") as r:
        assert r.status == 200


async def test_oversized_bodies_are_413_and_nothing_goes_upstream(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy({**static_route(sigv4_upstream.url), "max_body": "1KiB"})
    status, body = await json_error(proxy.url + "/big", "POST", data=b"z" * 2048)
    assert status == 413 and body["reason"] == "body_too_large"
    chunked = await raw_request(
        proxy.url,
        b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"z" * 1024 + b"\r\n"
        b"400\r\n" + b"z" * 1024 + b"\r\n0\r\n\r\n",
    )
    assert chunked.status == 413
    # Expect: 100-continue is answered with 413 at once, before the client sends the body.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413 ")
    assert sigv4_upstream.received == []
    status, _ = await json_error(proxy.url + "/small", "POST", data=b"z" * 1024)
    assert status == 200


async def test_malformed_requests_get_400_and_the_proxy_keeps_serving(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    for garbage in (
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
    ):
        response = await raw_request(proxy.url, garbage)
        assert response.status == 400
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/ok") as r:
        assert r.status == 200


async def test_unmatched_path_is_404_json(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url, path_prefix="/only"))
    status, body = await json_error(proxy.url + "/elsewhere")
    assert status == 404 and body["reason"] == "no_route"


async def test_debug_log_shows_canonical_request_without_secrets(sigv4_upstream, start_proxy, caplog) -> None:
    caplog.set_level("DEBUG", logger="signing_proxy")
    proxy = await start_proxy(static_route(sigv4_upstream.url, api_key="api-key-value"))
    async with aiohttp.ClientSession() as client, client.get(URL(proxy.url + "/dbg?b=1&a=%7e", encoded=True)) as r:
        assert r.status == 200
    text = caplog.text
    assert "GET\n/dbg\na=~&b=1\n" in text  # the canonical request, as AWS would print it
    assert "AWS4-HMAC-SHA256\n" in text  # the string to sign
    for secret in (TEST_SESSION_TOKEN, "test/secret+key", "api-key-value"):
        assert secret not in text


async def test_upstream_with_bad_signature_is_visible_as_403(start_proxy) -> None:
    """The verifying upstream is not fooled: a wrong secret gives API Gateway's 403."""
    async with SigV4Upstream({TEST_KEY_ID: "a-different-secret"}) as upstream:
        proxy = await start_proxy(static_route(upstream.url))
        async with aiohttp.ClientSession() as client, client.get(proxy.url + "/") as r:
            assert r.status == 403
        assert not upstream.received[-1].signature_ok


async def test_no_response_header_is_invented(start_proxy) -> None:
    """An upstream that sends only Content-Length gets nothing added but Date."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Only: this\r\n\r\nabc")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        proxy = await start_proxy(static_route(f"http://127.0.0.1:{port}"))
        response = await raw_request(proxy.url, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.body == b"abc"
    assert {k.lower() for k, _ in response.headers} == {"content-length", "x-only", "date", "connection"}


async def test_raw_utf8_is_encoded_and_invalid_utf8_is_400(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    ok = await raw_request(
        proxy.url, "GET /caf\u00e9?q=\u20ac HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert ok.status == 200
    assert sigv4_upstream.received[-1].raw_path == "/caf%C3%A9?q=%E2%82%AC"
    bad = await raw_request(proxy.url, b"GET /caf\xe9?q=\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert bad.status == 400 and json.loads(bad.body)["reason"] == "bad_request_target"
    assert len(sigv4_upstream.received) == 1


async def test_clock_skew_is_measured_from_date_and_corrected(sigv4_upstream, start_proxy) -> None:
    """An upstream whose clock is an hour ahead refuses stale signatures until the proxy corrects its clock."""
    import calendar
    import email.utils
    import time

    skew = 3600.0

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        upstream_now = time.time() + skew
        signed_at = calendar.timegm(time.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
        date = email.utils.formatdate(upstream_now, usegmt=True)
        if abs(upstream_now - signed_at) > 300:
            body = {"message": "Signature expired: 20261122T040000Z is now earlier than 20261122T050000Z"}
            return web.json_response(body, status=403, headers={"Date": date})
        return web.json_response({"ok": received.signature_ok}, headers={"Date": date})

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    async with aiohttp.ClientSession() as client:
        async with client.post(proxy.url + "/a", data=b"x") as r:
            assert r.status == 403
            assert "Signature expired" in (await r.json())["message"]  # relayed as the upstream sent it
        async with client.post(proxy.url + "/a", data=b"x") as r:
            assert r.status == 200 and await r.json() == {"ok": True}
    assert abs(proxy.forwarder.clock_offset - skew) < 5
