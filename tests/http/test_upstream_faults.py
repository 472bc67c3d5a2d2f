"""Upstream faults through real sockets: the client always learns what happened, and nothing is replayed.

The upstreams here are raw asyncio servers running a script per request
(``ScriptedUpstream``), so each fault is exactly the bytes, closes and resets
it claims to be.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import static_route
from tests.support.faults import Seen, exchange_bytes, ok, read_body, reset
from tests.support.rawhttp import parse_response, raw_request

GET_CLOSE = b"GET /x HTTP/1.1\r\nHost: client\r\nConnection: close\r\n\r\n"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def request(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, dict[str, Any] | bytes]:
    """One request over a raw socket (so a malformed relayed answer is seen as it is, not as a client error).

    A JSON body is decoded; anything else is returned as bytes.
    """
    path = "/" + url.split("://", 1)[1].partition("/")[2]
    head = f"{method} {path} HTTP/1.1\r\nHost: client\r\nConnection: close\r\n"
    if data is not None:
        head += f"Content-Length: {len(data)}\r\n"
    answer = await exchange_bytes(int(url.split(":")[2].split("/")[0]), head.encode() + b"\r\n" + (data or b""))
    assert answer.startswith(b"HTTP/1.1 "), answer[:300]
    response = parse_response(answer, method)
    assert response.complete, answer[:300]
    if response.header_values("content-type") == ["application/json"]:
        return response.status, json.loads(response.body)
    return response.status, response.body


async def answer_ok(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await read_body(seen, reader)
    writer.write(ok(f"{seen.method} {seen.target} {len(seen.body)}".encode()))
    await writer.drain()
    return True


# ---------------------------------------------------------------- refused, reset


async def test_refused_connection_is_502_at_once(start_proxy) -> None:
    proxy = await start_proxy(static_route(f"http://127.0.0.1:{closed_port()}"))
    started = time.monotonic()
    status, body = await request(proxy.url + "/x")
    assert time.monotonic() - started < 3
    assert status == 502 and isinstance(body, dict)
    assert body["reason"] == "upstream_unreachable" and "cannot connect" in body["message"]


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_reset_mid_request_is_502_and_a_post_is_sent_once(method: str, scripted, start_proxy) -> None:
    """The upstream reads the head and part of a 1 MiB body, then resets the connection."""

    async def reset_after_part(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await reader.readexactly(min(seen.content_length, 65536))
        reset(writer)
        return False

    upstream = await scripted(reset_after_part)
    proxy = await start_proxy(static_route(upstream.url))
    status, body = await request(proxy.url + "/upload", method, b"u" * (1 << 20))
    assert status == 502 and isinstance(body, dict), body
    assert body["reason"] in ("upstream_disconnected", "upstream_error"), body
    assert "127.0.0.1" in body["message"]
    # A POST is never replayed; an idempotent GET may be retried once, on a fresh connection.
    attempts = [s for s in upstream.seen if s.target == "/upload"]
    if method == "POST":
        assert len(attempts) == 1
    else:
        assert 1 <= len(attempts) <= 2
    upstream.script = answer_ok
    assert await request(proxy.url + "/after") == (200, b"GET /after 0")


# ---------------------------------------------------------------- dying mid-body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("close", ["fin", "rst"])
async def test_upstream_dying_mid_body_aborts_the_client(framing: str, close: str, scripted, start_proxy) -> None:
    async def die(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if framing == "content-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 5000)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n" + b"a" * 5000 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        if close == "rst":
            reset(writer)
        return False

    upstream = await scripted(die)
    proxy = await start_proxy(static_route(upstream.url))
    raw = await raw_request(proxy.url, GET_CLOSE)
    assert raw.status == 200 and not raw.complete, "a cut body must not look complete"
    assert raw.body == b"a" * 5000
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/x") as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    upstream.script = answer_ok
    assert await request(proxy.url + "/after") == (200, b"GET /after 0")


# ---------------------------------------------------------------- slow


async def test_slow_upstream_is_504_after_the_route_timeout(scripted, start_proxy) -> None:
    release = asyncio.Event()

    async def slow(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        return False

    upstream = await scripted(slow)
    proxy = await start_proxy(static_route(upstream.url, timeout="400ms", first_byte_timeout="400ms"))
    started = time.monotonic()
    try:
        status, body = await request(proxy.url + "/slow")
    finally:
        release.set()
    elapsed = time.monotonic() - started
    assert status == 504 and isinstance(body, dict) and body["reason"] == "upstream_timeout"
    assert 0.4 <= elapsed < 2.0, elapsed
    assert "raise the route's timeout" in body["message"]


def test_a_late_head_arms_one_timer_not_a_spin(monkeypatch) -> None:
    """On uvloop (what ``signing-proxy run`` uses) a due first-byte timer times out at once.

    uvloop fires timers on whole milliseconds, a fraction before a deadline like ``now + 0.053``;
    comparing with the clock then armed the timer again and again, up to 355 times for one late
    head, until the millisecond ticked over. Sync: it runs its own uvloop loop.
    """
    uvloop = pytest.importorskip("uvloop")
    from proxy.http.upstream import FirstByteTimeout, Pool, _Connection

    armed: list[_Connection] = []
    arm = _Connection._arm_head_timer

    def counted(connection: _Connection) -> None:
        armed.append(connection)
        arm(connection)

    monkeypatch.setattr(_Connection, "_arm_head_timer", counted)

    async def late_heads() -> list[int]:
        silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        pool = Pool()
        arms = []
        try:
            for attempt in range(10):
                armed.clear()
                with pytest.raises(FirstByteTimeout):
                    await pool.request(
                        "GET", ("http", "127.0.0.1", silent.sockets[0].getsockname()[1]), "/", [("Host", "x")], [],
                        connect_timeout=1.0, first_byte_timeout=0.05 + attempt / 1000 + 0.0003,
                    )  # fmt: skip
                arms.append(len(armed))
        finally:
            pool.close()
            silent.close()
        return arms

    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(late_heads()) == [1] * 10
    finally:
        loop.close()


async def test_upstream_stalling_mid_body_is_cut_after_the_idle_timeout(scripted, start_proxy) -> None:
    release = asyncio.Event()

    async def stall(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await release.wait()
        return False

    upstream = await scripted(stall)
    proxy = await start_proxy(static_route(upstream.url, timeout="5s", idle_timeout="400ms"))
    started = time.monotonic()
    try:
        raw = await raw_request(proxy.url, GET_CLOSE, timeout=5)
    finally:
        release.set()
    assert raw.status == 200 and raw.body == b"abc" and not raw.complete
    assert 0.4 <= time.monotonic() - started < 2.5


# ---------------------------------------------------------------- malformed answers

MALFORMED = {
    "not-http": (b"HELLO WORLD\r\n\r\n", "upstream_bad_response"),
    "http-0.9-body-only": (b"just a body, no status line", "upstream_bad_response|upstream_disconnected"),
    "http-2-status-line": (b"HTTP/2 200\r\nContent-Length: 0\r\n\r\n", "upstream_bad_response"),
    "header-without-colon": (b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n", "upstream_bad_response"),
    "space-in-header-name": (b"HTTP/1.1 200 OK\r\nX A: b\r\nContent-Length: 0\r\n\r\n", "upstream_bad_response"),
    "obs-fold": (b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n", "upstream_bad_response"),
    "bad-content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", "upstream_bad_response"),
    "negative-content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\nabc", "upstream_bad_response"),
    "status-out-of-range": (b"HTTP/1.1 9999 Huge\r\nContent-Length: 0\r\n\r\n", "upstream_bad_response"),
    "status-not-a-number": (b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n", "upstream_bad_response"),
    "closed-mid-headers": (b"HTTP/1.1 200 OK\r\nX-A: b\r\n", "upstream_disconnected|upstream_bad_response"),
    "closed-without-answer": (b"", "upstream_disconnected"),
    "only-100-continue": (b"HTTP/1.1 100 Continue\r\n\r\n", "upstream_disconnected|upstream_bad_response"),
}
# Found by this file against an earlier upstream client, which checked the status line and header names only:
# each was relayed as it came. Now each is refused with 502; ``why`` says why that matters.
RELAYED_MALFORMED = {
    "two-content-lengths": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "both Content-Length headers are relayed to the client (the body framed by the first): conflicting "
        "framing is response splitting material; RFC 9112 6.3 makes it an unrecoverable error (502)",
    ),
    "content-length-with-sign": (
        b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc",
        "Content-Length is parsed with int(), which takes '+3' (and '1_0', ' 3'); the header is relayed as sent "
        "and strict clients refuse it. Content-Length must be 1*DIGIT",
    ),
    "content-length-with-underscore": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n0123456789",
        "int('1_0') == 10: a Content-Length no HTTP parser accepts is relayed to the client",
    ),
    "status-below-100": (
        b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
        "a 3-digit status under 100 passes the check and is relayed as 'HTTP/1.1 99 Odd'",
    ),
    "chunked-not-last": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "'chunked' anywhere in Transfer-Encoding means chunked; with another coding after it the body is "
        "relayed still gzip-coded and the coding dropped (RFC 9112 6.3: 502)",
    ),
    "nul-in-header-value": (
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
        "header values are not checked: aiohttp's writer refuses the NUL when relaying, so the client gets "
        "'500 Internal Server Error' and the log a traceback (ValueError: Forbidden control character)",
    ),
    "bare-cr-in-header-value": (
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
        "as for NUL: a bare CR in a header value turns into a 500 and a traceback instead of a 502",
    ),
}


@pytest.mark.parametrize(
    "name",
    [
        *MALFORMED,
        *RELAYED_MALFORMED,
    ],
)
async def test_malformed_response_is_502_and_the_proxy_keeps_serving(name: str, scripted, start_proxy) -> None:
    answer, reason = MALFORMED.get(name) or (RELAYED_MALFORMED[name][0], "upstream_bad_response")

    async def malformed(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer)
        await writer.drain()
        return False

    upstream = await scripted(malformed)
    proxy = await start_proxy(static_route(upstream.url))
    raw = await exchange_bytes(proxy.port, GET_CLOSE)
    assert raw.startswith(b"HTTP/1.1 502 "), raw[:300]
    body = json.loads(parse_response(raw).body)
    assert body["reason"] in reason.split("|"), body
    assert "Traceback" not in body["message"]
    upstream.script = answer_ok
    assert await request(proxy.url + "/after") == (200, b"GET /after 0")


async def test_oversized_response_head_is_502(scripted, start_proxy) -> None:
    """A response head that never ends (1 MiB of headers, sent in pieces) is refused, not buffered."""

    async def endless_head(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for n in range(1024):
            writer.write(b"X-H%d: %s\r\n" % (n, b"v" * 1000))
            await writer.drain()
        writer.write(b"\r\n")
        await writer.drain()
        return False

    upstream = await scripted(endless_head)
    proxy = await start_proxy(static_route(upstream.url))
    status, body = await request(proxy.url + "/x")
    assert status == 502 and isinstance(body, dict) and body["reason"] == "upstream_bad_response", body


async def test_bad_chunk_after_headers_aborts_the_client_at_once(scripted, start_proxy) -> None:
    """Once the headers are relayed a 502 is impossible: the client connection must be aborted, promptly."""

    async def bad_chunk(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"zz\r\nnot a chunk\r\n")
        await writer.drain()
        await asyncio.sleep(5)  # the proxy must not wait for the upstream to close
        return False

    upstream = await scripted(bad_chunk)
    proxy = await start_proxy(static_route(upstream.url))
    try:
        raw = await raw_request(proxy.url, GET_CLOSE, timeout=3)
    except TimeoutError:
        pytest.fail("the client connection was still open 3 s after the upstream sent a bad chunk")
    assert raw.status == 200 and raw.body == b"abc" and not raw.complete


async def test_unsolicited_101_is_502(scripted, start_proxy) -> None:
    async def switch(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\nxyz")
        await writer.drain()
        await asyncio.sleep(0.2)
        return False

    upstream = await scripted(switch)
    proxy = await start_proxy(static_route(upstream.url))
    answer = await exchange_bytes(proxy.port, GET_CLOSE)
    assert answer.startswith(b"HTTP/1.1 502 "), answer


async def test_unsolicited_bytes_on_an_idle_connection_never_reach_the_next_client(scripted, start_proxy) -> None:
    """An upstream that sends a second, unasked-for response on a pooled connection: it must reach no one."""

    async def poison(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok(f"answer to {seen.target}".encode()))
        await writer.drain()
        if seen.index == 1:
            await asyncio.sleep(0.05)  # arrives while the connection sits idle in the proxy's pool
            writer.write(ok(b"SMUGGLED"))
            await writer.drain()
        return True

    upstream = await scripted(poison)
    proxy = await start_proxy(static_route(upstream.url))
    async with aiohttp.ClientSession() as client:
        bodies = []
        for path in ("/one", "/two", "/three"):
            await asyncio.sleep(0.2)
            async with client.get(proxy.url + path) as r:
                bodies.append(await r.read())
    assert bodies == [b"answer to /one", b"answer to /two", b"answer to /three"], bodies


async def test_non_utf8_response_header_is_not_silently_altered(scripted, start_proxy) -> None:
    async def latin1(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        return False

    upstream = await scripted(latin1)
    proxy = await start_proxy(static_route(upstream.url))
    answer = await exchange_bytes(proxy.port, GET_CLOSE)
    # Either relayed byte for byte, or refused as a bad upstream answer: never quietly changed.
    assert b"\r\nX-Name: caf\xe9\r\n" in answer or answer.startswith(b"HTTP/1.1 502 ")


# ---------------------------------------------------------------- keep-alive closed under the proxy


async def test_idle_pooled_connection_closed_by_upstream_is_replaced(scripted, start_proxy) -> None:
    """The upstream answers, then closes the idle keep-alive connection: the next request opens a new one."""

    async def answer_then_close(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await read_body(seen, reader)
        writer.write(ok(seen.body or b"ok"))
        await writer.drain()
        await asyncio.sleep(0.05)
        return False  # close the connection the proxy just put back in its pool

    upstream = await scripted(answer_then_close)
    proxy = await start_proxy(static_route(upstream.url))
    async with aiohttp.ClientSession() as client:
        for n in range(3):
            await asyncio.sleep(0.2)
            async with client.post(proxy.url + f"/p{n}", data=f"body{n}".encode()) as r:
                assert (r.status, await r.read()) == (200, f"body{n}".encode())
    assert upstream.methods() == ["POST /p0", "POST /p1", "POST /p2"]
    assert upstream.connections == 3


async def test_post_on_a_connection_closed_without_answer_is_never_replayed(scripted, start_proxy) -> None:
    """The upstream reads a request that came on a reused connection, then closes without answering.

    That is the keep-alive race (the server closed an idle connection as the request went
    out). A POST must reach the upstream once and the client get 502; an idempotent GET may
    be retried once on a fresh connection. A fresh connection always works.
    """

    async def drop_reused(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await read_body(seen, reader)
        if seen.index > 1:
            return False  # read it, answer nothing, close
        writer.write(ok(f"{seen.method} {seen.target}".encode()))
        await writer.drain()
        return True

    upstream = await scripted(drop_reused)
    proxy = await start_proxy(static_route(upstream.url))
    assert await request(proxy.url + "/warm") == (200, b"GET /warm")  # leaves a pooled connection
    status, body = await request(proxy.url + "/charge", "POST", b"pay 10 EUR")
    assert status == 502 and isinstance(body, dict) and body["reason"] == "upstream_disconnected"
    charges = [s for s in upstream.seen if s.target == "/charge"]
    assert len(charges) == 1 and charges[0].body == b"pay 10 EUR"
    # the pool is empty now: a fresh connection, answered
    assert await request(proxy.url + "/charge2", "POST", b"x") == (200, b"POST /charge2")
    # an idempotent GET on the pooled connection is retried once, on a fresh connection
    assert await request(proxy.url + "/read") == (200, b"GET /read")
    reads = [(s.connection, s.index) for s in upstream.seen if s.target == "/read"]
    assert len(reads) == 2 and reads[0][1] > 1 and reads[1][1] == 1
    assert [s.target for s in upstream.seen].count("/charge") == 1


async def test_a_403_cut_short_while_checked_for_clock_skew_is_502(scripted, start_proxy) -> None:
    """The proxy reads a small signed route's 403 to look for "Signature expired": a cut there is the upstream's."""

    async def script(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await read_body(seen, reader)
        writer.write(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\n{"message":')
        await writer.drain()
        return False  # and close, 89 bytes short

    upstream = await scripted(script)
    proxy = await start_proxy(static_route(upstream.url))
    response = await raw_request(proxy.url, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 502
    assert json.loads(response.body)["reason"] == "upstream_body_cut"
