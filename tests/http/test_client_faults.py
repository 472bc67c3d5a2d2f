"""Client faults: going away mid-request, slow or oversized or malformed requests, 1,000 at once.

Leaks are measured, not guessed: open file descriptors (``/proc/<pid>/fd``) and
asyncio tasks are counted before and after. In-process tests count the test
process (proxy, upstream and clients together); the 1,000-connection test runs
the proxy as its own process and counts only its descriptors.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time

import aiohttp
import pytest
from aiohttp import web

from proxy.demo import free_port
from proxy.http import front, upstream
from tests.conftest import TEST_KEY_ID, TEST_SECRET, static_route
from tests.support.faults import (
    Seen,
    first_response,
    ok,
    open_fds,
    raise_fd_limit,
    read_body,
    settle,
    start_proxy_process,
)
from tests.support.rawhttp import raw_request
from tests.support.sigv4_upstream import Received, SigV4Upstream

CLIENTS = 20


async def baseline(proxy_url: str) -> tuple[int, int]:
    """One warm-up request (pools, lazy imports), then the fd and task counts to return to."""
    async with aiohttp.ClientSession() as client, client.get(proxy_url + "/warm") as r:
        assert r.status == 200
        await r.read()
    await asyncio.sleep(0.1)
    return open_fds(), len(asyncio.all_tasks())


async def assert_nothing_leaked(fds: int, tasks: int) -> None:
    assert await settle(open_fds, fds) <= fds, "file descriptors leaked"
    assert await settle(lambda: len(asyncio.all_tasks()), tasks) <= tasks, "tasks leaked"


def access_statuses(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split()[3] for r in caplog.records if r.name == "signing_proxy.access"]


# ---------------------------------------------------------------- going away


async def test_client_gone_mid_upload_sends_nothing_upstream_and_leaks_nothing(
    sigv4_upstream, start_proxy, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="signing_proxy.access")
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    fds, tasks = await baseline(proxy.url)
    sigv4_upstream.received.clear()

    async def half_upload() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n" + b"u" * 65536)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()

    await asyncio.gather(*(half_upload() for _ in range(CLIENTS)))
    await assert_nothing_leaked(fds, tasks)
    assert sigv4_upstream.received == [], "a half-received body must never go upstream"
    assert access_statuses(caplog).count("499") == CLIENTS
    async with aiohttp.ClientSession() as client, client.put(proxy.url + "/whole", data=b"w" * 1000) as r:
        assert r.status == 200


async def test_client_gone_while_waiting_cancels_the_upstream_request(start_proxy) -> None:
    closed: list[str] = []

    async def hold(request: web.Request, received: Received) -> web.StreamResponse:
        if request.path == "/warm":
            return web.Response(text="warm")
        for _ in range(200):  # until the proxy closes its upstream connection (at most 10 s)
            if request.transport is None or request.transport.is_closing():
                closed.append(request.path)
                break
            await asyncio.sleep(0.05)
        return web.Response(text="too late")

    async with SigV4Upstream({TEST_KEY_ID: TEST_SECRET}) as upstream:
        upstream.responder = hold
        proxy = await start_proxy(static_route(upstream.url))
        fds, tasks = await baseline(proxy.url)

        async def wait_then_leave(n: int) -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(f"POST /wait/{n} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".encode())
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.transport.abort()

        await asyncio.gather(*(wait_then_leave(n) for n in range(CLIENTS)))
        deadline = time.monotonic() + 5
        while len(closed) < CLIENTS and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sorted(closed) == sorted(f"/wait/{n}" for n in range(CLIENTS)), "upstream requests left running"
        await asyncio.sleep(0.1)  # the upstream handlers return
        await assert_nothing_leaked(fds, tasks)


async def test_client_gone_mid_download_cancels_the_upstream_stream(start_proxy, caplog) -> None:
    caplog.set_level(logging.INFO, logger="signing_proxy.access")
    stopped: list[str] = []

    async def endless(request: web.Request, received: Received) -> web.StreamResponse:
        if request.path == "/warm":
            return web.Response(text="warm")
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(100_000):  # bounded: 6 GiB, far more than the proxy is allowed to buffer
                await response.write(b"d" * 65536)
        except (ConnectionError, asyncio.CancelledError):
            stopped.append(request.path)
            raise
        return response

    async with SigV4Upstream({TEST_KEY_ID: TEST_SECRET}) as upstream:
        upstream.responder = endless
        proxy = await start_proxy(static_route(upstream.url))
        fds, tasks = await baseline(proxy.url)

        async def read_then_leave(n: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(f"GET /dl/{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await reader.readexactly(200_000)
            writer.transport.abort()

        await asyncio.wait_for(asyncio.gather(*(read_then_leave(n) for n in range(CLIENTS))), 20)
        deadline = time.monotonic() + 5
        while len(stopped) < CLIENTS and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sorted(stopped) == sorted(f"/dl/{n}" for n in range(CLIENTS)), "upstream streams left running"
        await assert_nothing_leaked(fds, tasks)
        # the access log says the client went away (499), not that the download succeeded
        assert access_statuses(caplog).count("499") == CLIENTS


# ---------------------------------------------------------------- slow, oversized, malformed


async def test_slow_loris_headers_are_cut_off(sigv4_upstream, start_proxy) -> None:
    async def slow_stream(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for n in range(8):  # 2 s: longer than the header timeout, and must not be cut by it
            await response.write(b"%d" % n)
            await asyncio.sleep(0.25)
        return response

    sigv4_upstream.responder = slow_stream
    proxy = await start_proxy({**static_route(sigv4_upstream.url), "header_timeout": "1s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    started = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    try:
        for n in range(40):  # one header line every 100 ms, never the blank line: 4 s at most
            await asyncio.sleep(0.1)
            if reader.at_eof():
                break
            writer.write(b"X-Drip-%d: y\r\n" % n)
            await writer.drain()
    except ConnectionError:
        pass
    cut_after = time.monotonic() - started
    writer.close()
    assert reader.at_eof() or writer.is_closing()
    assert cut_after < 2.0, f"a slow-loris request was still open after {cut_after:.1f}s"
    # a response that takes longer than the header timeout is not cut
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/slow") as r:
        assert await r.read() == b"01234567"


@pytest.mark.parametrize(
    "message",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 1_000_000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(20_000)) + b"\r\n",
        b"GET /" + b"p" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /?" + b"q=1&" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["header-9KB", "header-1MB", "200-headers", "20000-headers", "path-9KB", "query-20KB"],
)
async def test_oversized_request_heads_are_431_or_414(message: bytes, sigv4_upstream, start_proxy) -> None:
    """Heads over 8190 bytes a line or 128 headers: 431 for header fields, 414 for the request line."""
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    response = await raw_request(proxy.url, message)
    assert response.status == (414 if message.startswith(b"GET /p") or message.startswith(b"GET /?") else 431)
    assert json.loads(response.body)["reason"] == "bad_request"
    assert b"Traceback" not in response.body
    assert sigv4_upstream.received == []
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/after") as r:
        assert r.status == 200


MALFORMED_REQUESTS = {
    "no-version": b"GET /\r\nHost: x\r\n\r\n",
    "only-method": b"GET\r\n\r\n",
    "extra-token": b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "bad-version": b"GET / HTTX/1.1\r\nHost: x\r\n\r\n",
    "method-with-bad-chars": b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "binary-garbage": bytes(range(256)) + b"\r\n\r\n",
    "tls-hello": bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40 + b"\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "nul-in-header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "two-content-lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "length-and-chunked": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "negative-length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "unknown-transfer-coding": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "bad-chunk-size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "non-utf8-path": b"GET /caf\xe9 HTTP/1.1\r\nHost: x\r\n\r\n",
    "non-utf8-query": b"GET /a?q=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "lone-utf8-continuation": b"GET /\x80 HTTP/1.1\r\nHost: x\r\n\r\n",
    "overlong-utf8": b"GET /\xc0\xaf HTTP/1.1\r\nHost: x\r\n\r\n",
}
TARGETS_THAT_ARE_NOT_PATHS = {
    "asterisk-form": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
}  # CONNECT and absolute-form to other hosts: tests/http/test_smuggling.py


@pytest.mark.parametrize("name", [*MALFORMED_REQUESTS, *TARGETS_THAT_ARE_NOT_PATHS])
async def test_malformed_requests_are_400_and_the_proxy_keeps_serving(name: str, sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    response = await first_response(proxy.port, {**MALFORMED_REQUESTS, **TARGETS_THAT_ARE_NOT_PATHS}[name])
    assert response.status == 400, response
    assert b"Traceback" not in response.body and b'File "' not in response.body
    assert response.header_values("content-type") == ["application/json"]
    assert json.loads(response.body)["reason"] in ("bad_request", "bad_request_target")
    assert sigv4_upstream.received == []
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/after") as r:
        assert r.status == 200


async def test_non_utf8_request_header_values_are_forwarded_byte_for_byte(scripted, start_proxy) -> None:
    """obs-text (Latin-1 bytes) in header values, Content-Type (signed) included, goes upstream unchanged.

    awscrt cannot take such values, so the upstream here is a raw one that records the bytes it got.
    """

    async def record(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await read_body(seen, reader)
        writer.write(ok())
        await writer.drain()
        return False

    upstream = await scripted(record)
    proxy = await start_proxy(static_route(upstream.url))
    response = await raw_request(
        proxy.url,
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Name: caf\xe9\r\nContent-Type: text/plain; name=\xff\r\n"
        b"Content-Length: 1\r\nConnection: close\r\n\r\nx",
    )
    assert response.status == 200
    [seen] = upstream.seen
    assert b"\r\nX-Name: caf\xe9\r\n" in seen.raw and b"\r\nContent-Type: text/plain; name=\xff\r\n" in seen.raw
    assert b"SignedHeaders=content-type;host;" in seen.raw and seen.body == b"x"


# ---------------------------------------------------------------- many at once


async def test_a_thousand_concurrent_connections(tmp_path) -> None:
    """1,000 connections open at once, each with a request in flight: every one answered, no fd left behind."""
    clients = 1000
    raise_fd_limit(8192)  # this process holds 1,000 client and 1,000 upstream sockets
    release = asyncio.Event()
    arrived = 0

    async def hold_until_all_arrived(request: web.Request, received: Received) -> web.StreamResponse:
        nonlocal arrived
        if request.path != "/warm":
            arrived += 1
            if arrived == clients:
                release.set()
            await asyncio.wait_for(release.wait(), 30)
        return web.Response(text="ok" if received.signature_ok else received.signature_error or "?")

    async with SigV4Upstream({TEST_KEY_ID: TEST_SECRET}) as upstream:
        upstream.responder = hold_until_all_arrived
        config = {**static_route(upstream.url), "log_level": "warning"}
        proxy = await start_proxy_process(config, tmp_path, free_port())
        try:
            status = await raw_request(proxy.url, b"GET /warm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert status.status == 200
            await asyncio.sleep(0.2)
            before = open_fds(proxy.pid)

            connections = await asyncio.wait_for(
                asyncio.gather(*(asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(clients))), 30
            )
            for n, (_, writer) in enumerate(connections):
                writer.write(f"GET /c/{n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            await asyncio.wait_for(release.wait(), 30)  # all 1,000 are in flight at the same time
            peak = open_fds(proxy.pid)

            async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
                try:
                    return await reader.read()
                finally:
                    writer.close()

            answers = await asyncio.wait_for(asyncio.gather(*(answer(r, w) for r, w in connections)), 30)
            failures = [a[:200] for a in answers if not (a.startswith(b"HTTP/1.1 200 ") and a.endswith(b"\r\n\r\nok"))]
            assert failures == [], f"{len(failures)} failed, e.g. {failures[:3]}"
            assert len(upstream.received) == clients + 1
            assert peak >= before + clients, "the connections were not all open at once"
            # the proxy's pooled upstream connections stay open; closing them on the upstream side
            # must release every descriptor in the proxy
            await upstream.close()
            after = await settle(lambda: open_fds(proxy.pid), before, timeout=10)
            assert after <= before, f"fds: {before} before, {peak} at peak, {after} after"
            assert proxy.process.returncode is None
        finally:
            code = await proxy.stop()
        assert code == 0, proxy.stderr.decode()[-3000:]
        assert b"Traceback" not in proxy.stderr, proxy.stderr.decode()[-3000:]


async def test_an_internal_failure_is_recorded_as_500_not_499(sigv4_upstream, start_proxy, caplog) -> None:
    caplog.set_level(logging.INFO, logger="signing_proxy.access")
    proxy = await start_proxy(static_route(sigv4_upstream.url))

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected fault")

    assert proxy.forwarder is not None
    proxy.forwarder.pool.request = broken  # type: ignore[method-assign]
    response = await raw_request(proxy.url, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 500
    assert b"injected fault" not in response.body and b"Traceback" not in response.body
    assert access_statuses(caplog) == ["500"]


async def test_a_client_leaving_mid_request_leaves_nothing_for_the_garbage_collector(
    sigv4_upstream, start_proxy
) -> None:
    """Whatever a request held (its body, its upstream response) is freed when its client leaves.

    The proxy runs the cyclic garbage collector rarely (server.tune_gc): a reference cycle left
    behind by a client that went away kept its whole request body alive, about 100 KiB of
    resident memory per dropped upload under load. With the collector off, only what reference
    counting frees is freed, so anything left here is held by a cycle.
    """
    release = asyncio.Event()

    async def slow(request: web.Request, received: Received) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="late")

    sigv4_upstream.responder = slow
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    body = b"b" * 300_000
    gc.collect()
    gc.disable()
    try:
        for message in (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + body,  # gone mid-body
            b"POST /wait HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n" + body,  # gone mid-wait
        ):
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(message)
            await writer.drain()
            await settle(lambda: 0 if proxy.front.connections and all(
                c.request is not None for c in proxy.front.connections) else 1, 0)  # fmt: skip
            if message.startswith(b"POST /wait"):
                await settle(lambda: 1 - len(sigv4_upstream.received), 0)  # the upstream has it
            writer.transport.abort()

        def held() -> int:
            kinds = (front.Request, front.Connection, upstream.UpstreamResponse)
            return sum(isinstance(o, kinds) for o in gc.get_objects())

        assert await settle(held, 0) == 0, "a request's objects stayed alive after its client left"
    finally:
        gc.enable()
        release.set()
