"""The HTTP/1.1 front: keep-alive, pipelining, HTTP/1.0 clients, framing of streamed answers, timeouts.

Everything here goes over raw sockets, so the bytes on the wire are what is checked.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from tests.conftest import static_route
from tests.support.rawhttp import parse_response
from tests.support.sigv4_upstream import Received

DEADLINE = 10


async def exchange(port: int, message: bytes) -> bytes:
    """Send ``message``; everything the proxy sends back until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(message)
        async with asyncio.timeout(DEADLINE):
            return await reader.read(-1)
    finally:
        writer.close()


def split_responses(data: bytes) -> list[bytes]:
    """Consecutive responses with Content-Length bodies, each as head + body bytes."""
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(int(line[15:]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        responses.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return responses


async def test_pipelined_requests_are_answered_in_order(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    data = await exchange(
        proxy.port,
        b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    responses = [parse_response(r) for r in split_responses(data)]
    assert [r.status for r in responses] == [200, 200, 200]
    assert [r.raw_path for r in sigv4_upstream.received] == ["/one", "/two", "/three"]
    assert sigv4_upstream.received[0].body == b"hello"
    assert all(r.signature_ok for r in sigv4_upstream.received)
    assert responses[-1].header_values("connection") == ["close"]


async def test_http10_client_is_closed_after_its_answer_unless_it_asks_for_keep_alive(
    sigv4_upstream, start_proxy
) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    plain = parse_response(await exchange(proxy.port, b"GET /a HTTP/1.0\r\n\r\n"))
    assert plain.status == 200 and plain.header_values("connection") == ["close"]

    data = await exchange(
        proxy.port,
        b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /c HTTP/1.0\r\n\r\n",
    )
    first, second = (parse_response(r) for r in split_responses(data))
    assert first.header_values("connection") == ["keep-alive"]
    assert second.status == 200 and second.header_values("connection") == ["close"]
    assert [r.raw_path for r in sigv4_upstream.received] == ["/a", "/b", "/c"]


async def test_a_streamed_answer_is_chunked_for_http11_and_close_delimited_for_http10(
    sigv4_upstream, start_proxy
) -> None:
    first_seen = asyncio.Event()

    async def streamed(request: web.Request, received: Received) -> web.StreamResponse:
        """Two writes without a Content-Length, the second once the client has the first."""
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"first ")
        await asyncio.wait_for(first_seen.wait(), DEADLINE)
        await response.write(b"second")
        await response.write_eof()
        return response

    sigv4_upstream.responder = streamed
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    for version in (b"1.1", b"1.0"):
        first_seen.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /s HTTP/" + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(DEADLINE):
            data = await reader.readuntil(b"first ")
            first_seen.set()
            data += await reader.read(-1)
        writer.close()
        response = parse_response(data)
        assert response.status == 200 and response.complete
        assert response.body == b"first second"
        chunked = response.header_values("transfer-encoding") == ["chunked"]
        assert chunked == (version == b"1.1"), data
        assert response.header_values("content-length") == []


async def test_a_request_head_left_unfinished_gets_408(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy({**static_route(sigv4_upstream.url), "header_timeout": "0.3s"})
    response = parse_response(await exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n"))
    assert response.status == 408
    assert json.loads(response.body)["reason"] == "request_timeout"
    assert sigv4_upstream.received == []


async def test_an_idle_keep_alive_connection_is_closed_silently(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy({**static_route(sigv4_upstream.url), "header_timeout": "0.3s"})
    data = await exchange(proxy.port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    [response] = [parse_response(r) for r in split_responses(data)]
    assert response.status == 200  # then nothing: the connection closes with no second answer
