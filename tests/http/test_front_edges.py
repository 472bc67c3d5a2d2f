"""The HTTP/1.1 front (proxy/http/: front.py, http1.py, splice.py) at its edges: backpressure, injection, framing.

Each test was written, failing, by a review of the front before the fix it now guards.
Everything listens on 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from tests.conftest import static_route
from tests.support.faults import Seen, exchange_bytes, ok, read_body
from tests.support.sigv4_upstream import Received

DEADLINE = 10.0


# ---------------------------------------------------------------- backpressure


async def test_a_client_that_pipelines_without_reading_is_not_read_until_it_catches_up(
    sigv4_upstream, start_proxy
) -> None:
    """Answers small enough to go out whole pile up in the proxy if it keeps taking requests: it must
    stop reading them once the client stops reading answers, and go on once the client reads."""
    body = b"x" * 32 * 1024
    count = 1000  # 28 KB of requests, 32 MiB of answers: far more than the kernel's socket buffers hold

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        return web.Response(body=body)

    sigv4_upstream.responder = respond
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n" * count)
    [connection] = proxy.front.connections
    async with asyncio.timeout(DEADLINE):
        while connection.transport is not None and connection.transport.is_reading():
            await asyncio.sleep(0.01)  # until the proxy holds back (a state of the proxy, not a duration)
    buffered = connection.transport.get_write_buffer_size() if connection.transport else 0
    assert buffered < 4 << 20, f"the proxy buffered {buffered >> 20} MiB for a client that reads nothing"
    assert len(sigv4_upstream.received) < count
    async with asyncio.timeout(DEADLINE):  # reading resumes it: every answer arrives, in order
        for _ in range(count):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            await reader.readexactly(len(body))
    writer.close()
    assert len(sigv4_upstream.received) == count


# ---------------------------------------------------------------- header injection


async def test_an_upstream_reason_phrase_with_a_bare_lf_cannot_inject_response_headers(scripted, start_proxy) -> None:
    """A bare LF in the upstream's reason phrase would start a header line of the upstream's choosing."""

    async def script(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\nSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok")
        return True

    upstream = await scripted(script)
    proxy = await start_proxy(static_route(upstream.url))
    data = await exchange_bytes(proxy.port, b"GET /r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = data.partition(b"\r\n\r\n")[0]
    assert b"\n" not in head.replace(b"\r\n", b""), f"bare LF relayed into the response head: {head!r}"
    assert b"\r" not in head.replace(b"\r\n", b"")


# ---------------------------------------------------------------- splice


async def test_a_client_leaving_during_a_stalled_splice_releases_the_upstream_promptly(scripted, start_proxy) -> None:
    """During a splice the client transport is paused: a client that leaves while the upstream is quiet
    must still be noticed, not held (task, duplicated descriptors, pipe, upstream) until idle_timeout."""
    upstream_closed = asyncio.Event()

    async def script(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n" + b"a" * 1000)
        await writer.drain()
        await reader.read()  # until the proxy lets go of this connection
        upstream_closed.set()
        return False

    upstream = await scripted(script)
    proxy = await start_proxy(static_route(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    writer.transport.abort()  # the client is gone while the upstream is quiet
    try:
        await asyncio.wait_for(upstream_closed.wait(), 3.0)
    except TimeoutError:
        raise AssertionError("the client left 3 s ago and the proxy still holds the spliced upstream") from None


# ---------------------------------------------------------------- framing leniency


async def test_a_crlf_before_a_pipelined_request_line_is_ignored(sigv4_upstream, start_proxy) -> None:
    """RFC 9112 2.2: a server SHOULD ignore at least one empty line before a request-line (clients add a CRLF
    after a POST body)."""
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    data = await exchange_bytes(
        proxy.port,
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\r\n"
        b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert data.count(b"HTTP/1.1 200") == 2, data[-300:]


async def test_bare_cr_or_lf_inside_a_chunk_line_is_refused(scripted, start_proxy) -> None:
    """A bare LF in a chunk-size line is the line's end to another parser and an extension to a lax one:
    request smuggling starts there. Trailer lines must be header fields."""

    async def script(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await read_body(seen, reader)
        writer.write(ok())
        return True

    upstream = await scripted(script)
    proxy = await start_proxy(static_route(upstream.url))
    accepted = []
    for body in (
        b"5;a\nb\r\nhello\r\n0\r\n\r\n",
        b"5;a\rb\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\nno colon\x00\r\n\r\n",
    ):
        data = await exchange_bytes(
            proxy.port,
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body,
        )
        if not data.startswith(b"HTTP/1.1 400"):
            accepted.append(body)
    assert not accepted, f"malformed chunk lines accepted: {accepted!r}"


async def test_a_head_over_64_kib_is_431_even_when_it_arrives_in_one_read(sigv4_upstream, start_proxy) -> None:
    """MAX_HEAD (README: 64 KiB in all) holds however the head arrives, not only while it is incomplete."""
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    fields = b"".join(b"X-F%d: %s\r\n" % (n, b"v" * 1000) for n in range(100))  # 100 KB, 100 lines
    data = await exchange_bytes(proxy.port, b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fields + b"\r\n")
    assert data.startswith(b"HTTP/1.1 431"), data[:40]


async def test_an_upload_that_stops_arriving_gets_408(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy({**static_route(sigv4_upstream.url), "header_timeout": "300ms"})
    data = await exchange_bytes(proxy.port, b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf")
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    assert b'"request_timeout"' in data and b"Connection: close" in data
    assert sigv4_upstream.received == []


async def test_a_malformed_credential_header_is_refused_without_echoing_its_value(
    sigv4_upstream, start_proxy, caplog
) -> None:
    """A 400 names the bad line, never its value: it may be an Authorization or a session token."""
    caplog.set_level(logging.DEBUG)
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    secret = "s3cr3t-Bearer-token-value"
    for message in (
        b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer " + secret.encode() + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Amz-Security-Token: a\x00" + secret.encode() + b"\r\n\r\n",
        b"GET /?X-Amz-Security-Token=" + secret.encode() + b" HTTP/1.1 x\r\nHost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nAuthorization "
        + secret.encode()
        + b"\r\n\r\n",
    ):
        data = await exchange_bytes(proxy.port, message)
        assert data.startswith(b"HTTP/1.1 400 "), data[:80]
        assert secret.encode() not in data
    assert secret not in caplog.text
    assert sigv4_upstream.received == []
