"""Long-lived HTTP responses through the proxy: SSE, Lambda response streaming, per-phase timeouts.

The upstream is ``SigV4Upstream`` (every request's signature checked by
awscrt) with a responder that writes when the test tells it to: the client and
the upstream handler synchronise on asyncio events, so "event 1 reached the
client before event 2 was written" is shown, not timed. Only the timeout tests
need the clock, with timeouts of a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.config import parse_config
from tests.conftest import TEST_KEY_ID, TEST_REGION, TEST_SECRET, static_route
from tests.support.sigv4_upstream import Received, SigV4Upstream
from tests.support.ws_upstream import pattern

DEADLINE = 10.0

# The Lambda function URL route of docs/streams.md: nothing in it cuts a 15-minute stream.
LAMBDA_ROUTE_YAML = """
path_prefix: /stream
upstream: https://abcdefghijklmnop.lambda-url.eu-west-1.on.aws
service: lambda
first_byte_timeout: 15m
idle_timeout: 15m
"""


@pytest.fixture
async def lambda_upstream() -> AsyncIterator[SigV4Upstream]:
    """A Lambda function URL stand-in: signatures must be scoped to the ``lambda`` service."""
    upstream = SigV4Upstream({TEST_KEY_ID: TEST_SECRET}, region=TEST_REGION, service="lambda")
    await upstream.start()
    yield upstream
    await upstream.close()


async def read_event(content: aiohttp.StreamReader) -> bytes:
    async with asyncio.timeout(DEADLINE):
        return await content.readuntil(b"\n\n")


async def test_sse_events_arrive_one_by_one_unbuffered_and_uncompressed(sigv4_upstream, start_proxy) -> None:
    delivered = [asyncio.Event() for _ in range(3)]
    written: list[int] = []

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for n, seen in enumerate(delivered):
            await response.write(f"id: {n}\nevent: tick\ndata: {n}\n\n".encode())
            written.append(n)
            await seen.wait()  # the next event is written only once the client holds this one
        await response.write_eof()
        return response

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    headers = {"Accept": "text/event-stream", "Accept-Encoding": "gzip, br"}
    async with (
        aiohttp.ClientSession(auto_decompress=False) as client,
        client.get(proxy.url + "/events", headers=headers) as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        assert "Content-Encoding" not in response.headers
        assert response.headers["Transfer-Encoding"] == "chunked"
        for n, seen in enumerate(delivered):
            assert await read_event(response.content) == f"id: {n}\nevent: tick\ndata: {n}\n\n".encode()
            assert written == list(range(n + 1))  # event n+1 is not written yet
            seen.set()
        async with asyncio.timeout(DEADLINE):
            assert await response.content.read() == b""
    assert sigv4_upstream.received[-1].signature_ok, sigv4_upstream.received[-1].signature_error


async def test_lambda_function_url_response_stream_is_signed_for_lambda_and_streamed(
    lambda_upstream, start_proxy
) -> None:
    first_chunk_seen = asyncio.Event()
    chunk = pattern(64 * 1024)
    chunks = 256  # 16 MiB after the first chunk; nothing holds the whole body

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await response.write(chunk)
        await first_chunk_seen.wait()
        for _ in range(chunks):
            await response.write(chunk)
        await response.write_eof()
        return response

    lambda_upstream.responder = respond
    proxy = await start_proxy(static_route(lambda_upstream.url, service="lambda"))
    digest, size = hashlib.sha256(), 0
    async with aiohttp.ClientSession() as client, client.post(proxy.url + "/", data=b'{"q": 1}') as response:
        assert response.status == 200
        async with asyncio.timeout(DEADLINE):
            first = await response.content.readexactly(len(chunk))
            first_chunk_seen.set()
            async for data in response.content.iter_any():
                digest.update(data)
                size += len(data)
    assert first == chunk
    assert size == chunks * len(chunk)
    assert digest.digest() == hashlib.sha256(chunk * chunks).digest()
    received = lambda_upstream.received[-1]
    assert received.signature_ok, received.signature_error
    assert "/lambda/aws4_request" in received.header_values("authorization")[0]


# ---------------------------------------------------------------- per-phase timeouts


def test_the_documented_lambda_route_never_cuts_a_15_minute_stream() -> None:
    route = parse_config({"routes": [yaml.safe_load(LAMBDA_ROUTE_YAML)]}).routes[0]
    timeouts = route.timeouts
    assert timeouts.first_byte >= 15 * 60 and timeouts.idle >= 15 * 60
    # And no overall limit: a stream may last as long as chunks keep coming (next test).
    assert not hasattr(timeouts, "total")


async def test_a_stream_outlives_every_phase_timeout_while_chunks_keep_coming(lambda_upstream, start_proxy) -> None:
    """The documented Lambda route with short overrides: 1 s of stream through 0.2-0.5 s phases."""
    route = yaml.safe_load(LAMBDA_ROUTE_YAML) | {
        "upstream": lambda_upstream.url,
        "region": TEST_REGION,
        "credentials": "test",
        "connect_timeout": "200ms",
        "first_byte_timeout": "200ms",
        "idle_timeout": "500ms",
    }
    config = static_route(lambda_upstream.url) | {"routes": [route]}

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for n in range(10):
            await response.write(f"chunk {n}\n".encode())
            await asyncio.sleep(0.1)  # a steady producer: each gap well within the idle timeout
        await response.write_eof()
        return response

    lambda_upstream.responder = respond
    proxy = await start_proxy(config)
    started = time.monotonic()
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/stream/run") as response:
        body = await response.read()
    assert body == b"".join(f"chunk {n}\n".encode() for n in range(10))
    assert time.monotonic() - started > 0.2 + 0.2 + 0.5  # longer than all phases together


async def test_idle_timeout_cuts_a_stalled_stream_after_what_arrived(sigv4_upstream, start_proxy) -> None:
    never = asyncio.Event()

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await never.wait()
        return response

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url, idle_timeout="200ms"))
    try:
        async with aiohttp.ClientSession() as client, client.get(proxy.url + "/events") as response:
            assert await read_event(response.content) == b"data: first\n\n"
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(DEADLINE):
                    await response.content.read()
    finally:
        never.set()


async def test_connect_timeout_is_its_own_phase(start_proxy, full_backlog_port: int) -> None:
    """A listener whose backlog is full drops the SYN: only connect_timeout can end the wait."""
    route = {"upstream": f"http://127.0.0.1:{full_backlog_port}", "auth": "none"}
    proxy = await start_proxy({"routes": [route | {"connect_timeout": "200ms", "first_byte_timeout": "1m"}]})
    started = time.monotonic()
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/") as response:
        body = await response.json()
    assert response.status == 504 and body["reason"] == "upstream_connect_timeout"
    assert time.monotonic() - started < 30  # the 1-minute first-byte budget played no part


async def test_first_byte_timeout_is_its_own_phase(sigv4_upstream, start_proxy) -> None:
    """Connecting takes a millisecond here; the first-byte wait should get 200 ms, not 200 ms + 2 s."""
    never = asyncio.Event()

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        await never.wait()
        return web.Response()

    sigv4_upstream.responder = respond
    route = {"connect_timeout": "2s", "first_byte_timeout": "200ms"}
    proxy = await start_proxy(static_route(sigv4_upstream.url, **route))
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as client, client.get(proxy.url + "/") as response:
            assert response.status == 504
    finally:
        never.set()
    assert time.monotonic() - started < 1.5


async def test_first_byte_timeout_of_a_shorter_route_on_a_pooled_connection(sigv4_upstream, start_proxy) -> None:
    """Two routes share a pooled connection: the second's 200 ms wait is not stretched to the first's minute.

    One timer per connection (``upstream._Connection.expect_head``) must be armed again
    when a later request on it is due sooner than the timer.
    """
    never = asyncio.Event()
    peers = []

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername")[1] if request.transport else None)
        if request.path.startswith("/slow"):
            await never.wait()
        return web.Response(text="ok")

    sigv4_upstream.responder = respond
    config = static_route(sigv4_upstream.url, path_prefix="/fast", first_byte_timeout="1m")
    slow = {"path_prefix": "/slow", "upstream": sigv4_upstream.url + "/slow", "first_byte_timeout": "200ms"}
    config["routes"].append(config["routes"][0] | slow)
    proxy = await start_proxy(config)
    try:  # if the timer were not armed again for the shorter route, this would wait its minute
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
            async with client.get(proxy.url + "/fast") as response:
                assert response.status == 200
            started = time.monotonic()
            async with client.get(proxy.url + "/slow") as response:
                assert response.status == 504
                assert (await response.json())["reason"] == "upstream_timeout"
    finally:
        never.set()
    assert time.monotonic() - started < 5
    assert len(peers) == 2 and peers[0] == peers[1]  # the same upstream connection


async def test_first_byte_timeout_counts_from_each_request_on_a_pooled_connection(sigv4_upstream, start_proxy) -> None:
    """A connection's timer, armed for an earlier request, does not cut a later one short."""
    peers = []

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername")[1] if request.transport else None)
        if request.path == "/second":
            await asyncio.sleep(0.6)  # within its 1 s, past the first request's deadline
        return web.Response(text="ok")

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url, first_byte_timeout="1s"))
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/first") as response:
            assert response.status == 200
        await asyncio.sleep(0.6)  # the scenario: the next request comes 0.6 s later
        async with client.get(proxy.url + "/second") as response:
            assert response.status == 200, await response.text()
    assert len(peers) == 2 and peers[0] == peers[1]  # the same upstream connection


async def test_a_slow_first_byte_is_not_cut_by_a_shorter_idle_timeout(sigv4_upstream, start_proxy) -> None:
    """A function that takes a while to start, then streams with short gaps (SSE with heartbeats)."""

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        await asyncio.sleep(0.5)  # a slow start: longer than idle_timeout, well within first_byte_timeout
        return web.Response(text="data: late but in time\n\n", content_type="text/event-stream")

    sigv4_upstream.responder = respond
    route = {"first_byte_timeout": "5s", "idle_timeout": "200ms"}
    proxy = await start_proxy(static_route(sigv4_upstream.url, **route))
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/events") as response:
        assert response.status == 200, await response.text()


# ---------------------------------------------------------------- many idle streams


async def test_200_concurrent_idle_sse_streams(sigv4_upstream, start_proxy) -> None:
    release = asyncio.Event()
    streams = 200

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"event: hello\ndata: {}\n\n")
        await release.wait()  # idle until every client holds its first event
        await response.write(b"event: bye\ndata: {}\n\n")
        await response.write_eof()
        return response

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client,
        contextlib.AsyncExitStack() as stack,
    ):
        responses = await asyncio.gather(
            *(stack.enter_async_context(client.get(f"{proxy.url}/events?n={n}")) for n in range(streams))
        )
        firsts = await asyncio.gather(*(read_event(r.content) for r in responses))
        assert set(firsts) == {b"event: hello\ndata: {}\n\n"}
        assert len(sigv4_upstream.received) == streams
        assert all(r.signature_ok for r in sigv4_upstream.received)
        release.set()
        async with asyncio.timeout(DEADLINE):
            rests = await asyncio.gather(*(r.content.read() for r in responses))
        assert set(rests) == {b"event: bye\ndata: {}\n\n"}
