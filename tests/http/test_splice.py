"""Bodies of known length from 1 MiB up, which the proxy moves socket to socket (``proxy/http/splice.py``).

Each test uses a body above ``SPLICE_FROM`` so the kernel path is the one
exercised: bytes arrive unchanged and the connections are reusable after it,
and a cut, a stall or a client leaving ends it the way the Python relay does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import aiohttp
import pytest
from aiohttp import web

from proxy.http.splice import SPLICE_FROM
from tests.conftest import static_route
from tests.support.faults import open_fds, settle
from tests.support.rawhttp import raw_request
from tests.support.sigv4_upstream import Received

DEADLINE = 20.0
SIZE = 3 * SPLICE_FROM + 12_345  # odd, so a lost or repeated pipe-full would show


def body_of(size: int) -> bytes:
    """Bytes whose every 64 KiB block differs, so a block sent twice or skipped changes the hash."""
    return b"".join(hashlib.sha256(b"%d" % n).digest() * 2048 for n in range(size // 65536 + 1))[:size]


async def test_a_large_body_arrives_whole_and_both_connections_are_reused(sigv4_upstream, start_proxy) -> None:
    body = body_of(SIZE)
    upstream_peers: list[object] = []

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        assert request.transport is not None
        upstream_peers.append(request.transport.get_extra_info("peername"))
        return web.Response(body=body, content_type="application/octet-stream")

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as client:
        for _ in range(3):  # one client connection, kept alive across the three
            async with client.get(proxy.url + "/big") as r:
                assert r.status == 200 and r.content_length == SIZE
                assert hashlib.sha256(await r.read()).digest() == hashlib.sha256(body).digest()
        async with client.get(proxy.url + "/big", headers={"Range": "x"}) as r:
            assert len(await r.read()) == SIZE
    assert len(set(upstream_peers)) == 1, "the upstream connection was not pooled after a spliced body"
    assert all(r.signature_ok for r in sigv4_upstream.received)


async def test_a_large_body_cut_by_the_upstream_aborts_the_client(sigv4_upstream, start_proxy, caplog) -> None:
    caplog.set_level(logging.INFO, logger="signing_proxy.access")

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 8 * SPLICE_FROM
        await response.prepare(request)
        await response.write(body_of(2 * SPLICE_FROM))
        assert request.transport is not None
        request.transport.close()
        return response

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    response = await raw_request(proxy.url, b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n", timeout=DEADLINE)
    assert response.status == 200 and not response.complete
    assert len(response.body) < 8 * SPLICE_FROM
    assert any("error=upstream_body_cut" in r.getMessage() for r in caplog.records)


async def test_a_stalled_large_body_is_cut_after_the_idle_timeout(sigv4_upstream, start_proxy) -> None:
    never = asyncio.Event()

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 4 * SPLICE_FROM
        await response.prepare(request)
        await response.write(body_of(2 * SPLICE_FROM))
        await never.wait()
        return response

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url, idle_timeout="300ms"))
    try:
        response = await raw_request(proxy.url, b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n", timeout=DEADLINE)
        assert response.status == 200 and not response.complete
        assert len(response.body) >= SPLICE_FROM  # what arrived before the stall was passed on
    finally:
        never.set()


async def test_a_client_leaving_mid_body_stops_the_upstream_and_leaks_nothing(
    sigv4_upstream, start_proxy, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="signing_proxy.access")
    stopped = asyncio.Event()

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        if request.path == "/warm":
            return web.Response(text="warm")
        response = web.StreamResponse()
        response.content_length = 1 << 40  # far more than will ever be read
        await response.prepare(request)
        chunk = body_of(1 << 20)
        try:
            while True:
                await response.write(chunk)
        except (ConnectionError, asyncio.CancelledError):
            stopped.set()
            raise

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/warm") as r:
        assert r.status == 200
    fds = open_fds()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readexactly(4 * SPLICE_FROM), DEADLINE)
    writer.transport.abort()
    await asyncio.wait_for(stopped.wait(), DEADLINE)
    assert await settle(open_fds, fds) <= fds, "file descriptors leaked (pipe or duplicated sockets)"
    statuses = [r.getMessage().split()[3] for r in caplog.records if r.name == "signing_proxy.access"]
    assert statuses[-1] == "499"
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/warm") as r:
        assert r.status == 200


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
async def test_http10_and_11_clients_get_the_same_spliced_bytes(version: bytes, sigv4_upstream, start_proxy) -> None:
    body = body_of(SIZE)

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        return web.Response(body=body)

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    response = await raw_request(
        proxy.url, b"GET /v HTTP/" + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=DEADLINE
    )
    assert response.status == 200 and response.complete and response.body == body
