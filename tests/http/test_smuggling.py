"""Request smuggling and response splitting, tried over real sockets as an attacker would.

One request must never ride on another's signature, and one answer must never
reach another request. Each test sends an attack of a class (not one payload)
and reads what the proxy sent with llhttp (tests/support/llhttp.py), an
independent parser, so a framing mistake of ours is never read back by a
parser that shares it.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import static_route
from tests.support.faults import Seen, exchange_bytes, ok, read_body
from tests.support.llhttp import answers, parse

GET = b"GET /%d HTTP/1.1\r\nHost: client\r\n\r\n"
GET_CLOSE = b"GET /x HTTP/1.1\r\nHost: client\r\nConnection: close\r\n\r\n"


def scripted_answers(*answers_by_request: bytes):
    """A script answering the n-th request (over all connections) with the n-th bytes, keeping connections open."""

    async def script(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await read_body(seen, reader)
        index = len(script.seen)  # type: ignore[attr-defined]
        script.seen.append(seen)  # type: ignore[attr-defined]
        writer.write(answers_by_request[min(index, len(answers_by_request) - 1)])
        await writer.drain()
        return True

    script.seen = []  # type: ignore[attr-defined]
    return script


# ---------------------------------------------------------------- answers: framing is never removed


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: Content-Length\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: Transfer-Encoding\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, content-length\r\n\r\nhello",
    ],
    ids=["length-named-in-connection", "chunked-named-in-connection", "length-in-a-list"],
)
async def test_framing_named_in_connection_is_still_framed(answer: bytes, scripted, start_proxy) -> None:
    """Hop-by-hop removal applies to relayed headers, never to how the proxy delimits its own answer."""
    upstream = await scripted(scripted_answers(answer, ok(b"second")))
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, GET % 1 + GET % 2, 2)
    assert [(m.status, m.body, m.complete) for m in messages] == [(200, b"hello", True), (200, b"second", True)], raw


async def test_204_is_relayed_without_content_length(scripted, start_proxy) -> None:
    """A 204 has no body (RFC 9110 15.3.5): a Content-Length on it would make a client wait for bytes."""
    upstream = await scripted(scripted_answers(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", ok(b"next")))
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, GET % 1 + GET % 2, 2)
    assert [(m.status, m.body) for m in messages] == [(204, b""), (200, b"next")], raw
    assert messages[0].header(b"content-length") == [], raw


# ---------------------------------------------------------------- answers: length by RFC 9112 6.3


async def test_chunked_wins_over_content_length_and_the_connection_is_closed(scripted, start_proxy) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    upstream = await scripted(scripted_answers(answer, ok(b"next")))
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, GET % 1 + GET % 2, 2)
    assert [(m.status, m.body) for m in messages] == [(200, b"hello"), (200, b"next")], raw
    assert upstream.connections == 2  # the connection that carried both framings was not reused


async def test_a_final_coding_other_than_chunked_is_read_until_close(scripted, start_proxy) -> None:
    async def gzip_until_close(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nGZIPPED")
        await writer.drain()
        return False

    upstream = await scripted(gzip_until_close)
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, GET % 1, 1)
    assert (messages[0].status, messages[0].body) == (200, b"GZIPPED"), raw
    # The coding is relayed as it came, with the proxy's own chunked framing after it.
    assert messages[0].header(b"transfer-encoding") == [b"gzip, chunked"], raw


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\xc2\x85\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    ],
    ids=["repeated", "list", "19-digits", "signed", "chunked-twice", "unicode-space-after-chunked"],
)
async def test_unusable_response_framing_is_502(head: bytes, scripted, start_proxy) -> None:
    async def answer(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(head)
        await writer.drain()
        return False

    upstream = await scripted(answer)
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, GET_CLOSE, 1)
    assert messages[0].status == 502, raw
    assert json.loads(messages[0].body)["reason"] == "upstream_bad_response"


@pytest.mark.parametrize("count", [9, 3000])
async def test_too_many_interim_answers_are_502_not_a_crash(count: int, scripted, start_proxy) -> None:
    async def interims(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" * count + ok(b"late"))
        await writer.drain()
        return False

    upstream = await scripted(interims)
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, GET_CLOSE, 1)
    assert messages[0].status == 502, raw[:300]
    assert "interim" in json.loads(messages[0].body)["message"]


async def test_a_few_interim_answers_are_skipped(scripted, start_proxy) -> None:
    upstream = await scripted(scripted_answers(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 8 + ok(b"real")))
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, GET_CLOSE, 1)
    assert (messages[0].status, messages[0].body) == (200, b"real"), raw


# ---------------------------------------------------------------- answers: a pooled connection is clean or closed

SMUGGLED = ok(b"SMUGGLED")
LARGE = b"x" * (2 << 20)  # spliced: what is left after the first read is over splice.SPLICE_FROM


@pytest.mark.parametrize(
    ("method", "answer", "body"),
    [
        ("GET", ok(b"first") + SMUGGLED, b"first"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n" + SMUGGLED, b"first"),
        ("GET", ok(LARGE) + SMUGGLED, LARGE),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + SMUGGLED, b""),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n" + SMUGGLED, b""),
        ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n" + SMUGGLED, b""),
        ("GET", b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"first") + SMUGGLED, b"first"),
    ],
    ids=["length", "chunked", "splice", "head", "204", "304", "1xx"],
)
async def test_bytes_after_an_answer_never_reach_the_next_request(
    method: str, answer: bytes, body: bytes, scripted, start_proxy
) -> None:
    """An upstream that sends a second answer right behind the first, in the same write: on every path.

    The next request is pipelined behind the first, so it wants an upstream
    connection the moment the first answer is done, before anything else runs.
    """
    upstream = await scripted(scripted_answers(answer, ok(b"clean")))
    proxy = await start_proxy(static_route(upstream.url))
    first = f"{method} /1 HTTP/1.1\r\nHost: c\r\n\r\n".encode()
    raw = await exchange_bytes(proxy.port, first + GET_CLOSE)
    assert raw.startswith(b"HTTP/1.1 ") and body in raw, raw[:200]
    # The second answer follows the first (whose body may be large, and HEAD's has none), read by llhttp.
    second = raw[raw.index(body) + len(body) :] if body else raw[raw.index(b"\r\n\r\n") + 4 :]
    messages, error = parse(second, response=True, eof=True)
    assert error is None and [(m.status, m.body) for m in messages] == [(200, b"clean")], second[:300]
    assert upstream.connections == 2  # the dirty connection was closed, never pooled


async def test_a_request_is_not_sent_again_once_a_byte_of_its_answer_arrived(scripted, start_proxy) -> None:
    """A pooled connection that dies halfway through an answer's head: a GET is not replayed, the client gets 502."""

    async def cut_second(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.index == 1:
            writer.write(ok(b"first"))
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 O")
        await writer.drain()
        return False

    upstream = await scripted(cut_second)
    proxy = await start_proxy(static_route(upstream.url))
    assert (await answers(proxy.port, GET_CLOSE, 1))[0][0].body == b"first"
    messages, raw = await answers(proxy.port, GET_CLOSE, 1)
    assert messages[0].status == 502, raw
    assert upstream.methods() == ["GET /x", "GET /x"]  # once each: the cut one was not sent a second time


# ---------------------------------------------------------------- requests: only origin-form is served


@pytest.mark.parametrize(
    ("message", "status", "reason"),
    [
        (b"CONNECT /x HTTP/1.1\r\nHost: c\r\n\r\n", 400, "bad_request_target"),
        # With a request pipelined behind it, a CONNECT is refused before its host is even looked at.
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 400, "bad_request"),
        (b"GET example.com:443 HTTP/1.1\r\nHost: c\r\n\r\n", 400, "bad_request_target"),
        (b"GET * HTTP/1.1\r\nHost: c\r\n\r\n", 400, "bad_request_target"),
        (b"OPTIONS * HTTP/1.1\r\nHost: c\r\n\r\n", 400, "bad_request_target"),
        (b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n", 403, "host_not_allowed"),
        (b"GET https://127.0.0.1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 403, "host_not_allowed"),
    ],
    ids=[
        "connect-path",
        "connect-authority",
        "authority-form-get",
        "asterisk-get",
        "options-asterisk",
        "absolute-other-host",
        "absolute-other-port",
    ],
)
async def test_targets_that_are_not_origin_form_are_refused_and_never_signed(
    message: bytes, status: int, reason: str, scripted, start_proxy
) -> None:
    upstream = await scripted(scripted_answers(b"HTTP/1.1 200 Connection established\r\n\r\n"))
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, message + GET % 2, 1)
    assert (messages[0].status, json.loads(messages[0].body)["reason"]) == (status, reason), raw
    assert [seen.target for seen in upstream.seen] in ([], ["/2"])  # refused before anything was sent


async def test_absolute_form_naming_the_proxy_itself_is_served_as_its_path(scripted, start_proxy) -> None:
    """RFC 9112 3.2.2: a server must accept absolute-form addressed to it."""
    upstream = await scripted(scripted_answers(ok(b"fine")))
    proxy = await start_proxy(static_route(upstream.url))
    message = f"GET http://127.0.0.1:{proxy.port}/abs?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    messages, raw = await answers(proxy.port, message.encode(), 1)
    assert messages[0].body == b"fine", raw
    assert upstream.methods() == ["GET /abs?q=1"]


# ---------------------------------------------------------------- requests: headers


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", "exactly one Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "exactly one Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n", "obsolete line folding"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Secret(1): hunter2\r\n\r\n", "header line 3"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization : hunter2\r\n\r\n", "header line 3"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\xc3\xa9t\xc3\xa9: hunter2\r\n\r\n", "header line 3"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01hunter2\r\n\r\n", "header line 3"),
    ],
    ids=["no-host", "two-hosts", "obs-fold", "name-not-a-token", "space-before-colon", "utf8-name", "control"],
)
async def test_malformed_heads_are_400_naming_the_line_never_its_content(
    message: bytes, says: str, scripted, start_proxy
) -> None:
    upstream = await scripted(scripted_answers(ok()))
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, message, 1)
    assert messages[0].status == 400, raw
    assert says in json.loads(messages[0].body)["message"], raw
    assert b"hunter2" not in raw and b"Secret" not in raw and b"Authorization" not in raw
    assert upstream.seen == []


@pytest.mark.parametrize(
    "coding",
    [b"chunked\xc2\x85", b"chun\xe2\x84\xaaed", b"\xc2\xa0chunked", b"chunked\x0b"],
    ids=["next-line-after", "kelvin-sign", "no-break-space-before", "vertical-tab"],
)
async def test_transfer_encoding_is_compared_as_ascii_tokens(coding: bytes, scripted, start_proxy) -> None:
    """A value another parser reads differently is never taken for "chunked"."""
    upstream = await scripted(scripted_answers(ok()))
    proxy = await start_proxy(static_route(upstream.url))
    message = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + coding + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    messages, raw = await answers(proxy.port, message, 1)
    assert messages[0].status == 400, raw
    assert upstream.seen == []


# ---------------------------------------------------------------- requests: chunked bodies


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "split-reads"])
async def test_a_chunk_extension_is_capped_however_the_reads_split_it(split: bool, scripted, start_proxy) -> None:
    upstream = await scripted(scripted_answers(ok()))
    proxy = await start_proxy(static_route(upstream.url))
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"3;x=" + b"y" * 100_000 + b"\r\nabc\r\n0\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    raw = b""
    try:
        if split:
            writer.write(head)
            for start in range(0, len(chunk), 1000):
                writer.write(chunk[start : start + 1000])
                await writer.drain()
        else:
            writer.write(head + chunk)
        async with asyncio.timeout(5):
            raw = await reader.read()
    except ConnectionResetError:
        pass  # refused while still sending: the 400 may be lost to the reset (lingering close is issue 14)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 400 ") or (split and not raw), raw[:300]
    assert upstream.seen == []


# ---------------------------------------------------------------- requests: the WebSocket upgrade

UPGRADE = (
    b"Host: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


@pytest.mark.parametrize(
    "message",
    [
        b"GET /ws HTTP/1.1\r\n" + UPGRADE + b"Content-Length: 5\r\n\r\nhello",
        b"GET /ws HTTP/1.1\r\n" + UPGRADE + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /ws HTTP/1.1\r\n" + UPGRADE + b"\r\n",
        b"GET /ws HTTP/1.1\r\n" + UPGRADE + b"Transfer-Encoding: chunked\xc2\x85\r\n\r\n",
    ],
    ids=["length-body", "chunked-body", "post", "bad-framing"],
)
async def test_an_upgrade_request_aiohttp_would_read_differently_is_refused_in_json(
    message: bytes, scripted, start_proxy
) -> None:
    """The upgrade is parsed and judged by our parser; only a body-less GET goes on to the WebSocket server."""
    upstream = await scripted(scripted_answers(ok()))
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, message, 1)
    assert messages[0].status == 400, raw
    assert json.loads(messages[0].body)["reason"] == "bad_request", raw
    assert upstream.seen == []


async def test_a_malformed_interim_answer_is_502(scripted, start_proxy) -> None:
    """An interim answer is skipped, never trusted: a malformed one (here an obs-fold) is as bad as any other."""

    async def folded(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 103 Early\r\nLink: </a>\r\n folded\r\n\r\n" + ok(b"late"))
        await writer.drain()
        return False

    upstream = await scripted(folded)
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, GET_CLOSE, 1)
    assert messages[0].status == 502, raw
    assert "obsolete line folding" in json.loads(messages[0].body)["message"], raw


async def test_a_connect_to_a_host_no_forward_rule_covers_is_refused(scripted, start_proxy) -> None:
    upstream = await scripted(scripted_answers(ok()))
    proxy = await start_proxy(static_route(upstream.url))
    messages, raw = await answers(proxy.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 1)
    assert (messages[0].status, json.loads(messages[0].body)["reason"]) == (400, "bad_request_target"), raw
    assert upstream.seen == []
