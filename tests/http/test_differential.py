"""A second parser as the referee: our HTTP/1.1 parsers against llhttp, on byte streams rich in framing edge cases.

As signatures are checked with an independent signer, framing is checked with
an independent parser (llhttp, through httptools). Hypothesis builds request
and response streams (Content-Length and Transfer-Encoding combinations,
chunk sizes with leading zeros, extensions, whitespace, bare CR and LF, NUL,
obs-text, pipelining) and cuts them into reads at arbitrary offsets. Our
front and our upstream client take the reads through their real code
(``data_received``, as asyncio calls it, on a transport that records what is
written); llhttp takes the whole stream. Then: every message we accept,
llhttp accepts too, identical in method, target, status, headers and body,
and at the same place in the stream. We may refuse what llhttp accepts
(stricter is fine), never the other way round, except for the deliberate
differences documented in docs/forwarding.md, which are asserted here as such.

The seed is fixed (``derandomize``): CI runs the same few thousand examples every time.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.http.front import BodyTooLarge, Connection, Front, Refusal, Request
from proxy.http.upstream import Pool, UpstreamError, UpstreamResponse, _Connection
from tests.support.llhttp import Message, parse
from tests.support.transport import RecordingTransport

EXAMPLES = 2500
PROFILE = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


LOOP = asyncio.new_event_loop()


def cuts(data: bytes, offsets: list[int]) -> list[bytes]:
    points = sorted({o % (len(data) + 1) for o in offsets} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# ---------------------------------------------------------------- requests: our front


@dataclass
class Accepted:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class FrontRun:
    accepted: list[Accepted] = field(default_factory=list)
    refused: bool = False


def run_front(reads: list[bytes]) -> FrontRun:
    run = FrontRun()

    async def handler(request: Request) -> None:
        try:
            body, _, _ = await request.read_body()
        except (Refusal, BodyTooLarge):
            run.refused = True
            request.refuse(Refusal("refused"))
            return
        run.accepted.append(Accepted(request.method, request.target, list(request.headers.items()), b"".join(body)))
        request.respond(200, "OK", []).send(b"")

    async def drive() -> None:
        front = Front(handler, max_body=1 << 20, header_timeout=30.0, upgrade=lambda: None)
        connection = Connection(front)
        transport = RecordingTransport()
        transport.protocol = connection
        connection.connection_made(transport)  # type: ignore[arg-type]
        for data in reads:
            if transport.closed:
                break
            transport.protocol.data_received(data)
            for _ in range(3):
                await asyncio.sleep(0)  # let the handler read the body and answer
        for _ in range(5):
            await asyncio.sleep(0)
        if connection.task is not None and not connection.task.done():
            connection.task.cancel()  # waiting for more body: what it has is not a message yet
        run.refused = (
            run.refused
            or b" 4" in bytes(transport.written[:13])
            or (transport.closed and b"HTTP/1.1 4" in transport.written)
        )

    LOOP.run_until_complete(drive())
    return run


# Building blocks: each a list of ordinary choices and a list of edge cases, taken one time in ten, so that
# most streams are nearly valid and the edge cases meet real framing. A stream is built from a seed that
# hypothesis draws (derandomized): drawing every part through hypothesis costs ~20 ms an example, this microseconds.
METHODS = ([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD"], [b"get", b"FOO", b"G\x00T", b""])
TARGETS = ([b"/", b"/a?b=c", b"/%41/b", b"//x", b"/a/../b"],
           [b"/a b", b"*", b"/caf\xc3\xa9", b"/\x00", b"/a#f", b"/a\tb", b"/\x7f", b"/\xff"])  # fmt: skip
VERSIONS = ([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1.01", b"HTTP/2"])
EOLS = ([b"\r\n"], [b"\n", b"\r", b"\r\r\n", b" \r\n"])
NAMES = ([b"X-A", b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection", b"Expect", b"Trailer",
          b"Te", b"Host"],
         [b"X-A ", b" X-A", b"X\x00A", b"X(A)", b"X-\xc3\xa9", b"", b"X\tA"])  # fmt: skip
LENGTHS = ([b"0", b"3", b"5", b"005"], [b" 5", b"5 ", b"+5", b"-1", b"5, 5", b"0x5", b"1" * 20, b"5\x00", b""])
CODINGS = ([b"chunked", b"Chunked", b"gzip, chunked"],
           [b"chunked, gzip", b"chunked, chunked", b"identity", b"chunked\xc2\x85", b"\tchunked", b"chunked;q=1",
            b"", b",chunked", b"chunked,", b"chunked ", b"chun ked"])  # fmt: skip
TEXTS = ([b"a", b"a b", b"close", b"keep-alive", b"100-continue", b"", b"caf\xc3\xa9", b"\x80\xff"],
         [b"  a  ", b"a\tb", b"a\x00b", b"a\x7fb", b"a\rb", b"a\nb", b"nothing"])  # fmt: skip
SEPARATORS = ([b": ", b":"], [b":  ", b":\t", b" : ", b"\t: ", b""])
CHUNK_SIZES = ([b"%x", b"%X", b"0%x", b"%x;a=b", b'%x;a="q r"', b"%x;a"],
               [b"%x ", b" %x", b"%x ;a", b"%x;a=b;c", b"%x;=", b"%x\x00", b"+%x", b"0x%x", b'%x;a="\\"',
                b"%x;a=\xff", b"%x;a b", b"%x\t;a", b"%x; a"])  # fmt: skip
LAST_CHUNKS = ([b"0", b"00", b"0;a=b"], [b"0 ", b"0" * 20, b"0\x00", b""])
TRAILERS = ([b"X-T: 1\r\n"], [b"X-T:\x00\r\n", b"bad\r\n", b"Content-Length: 5\r\n", b" X: y\r\n"])
STATUS_LINES = ([b"HTTP/1.1 200 OK", b"HTTP/1.1 200 ", b"HTTP/1.1 404 Not Found", b"HTTP/1.0 200 OK",
                 b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 500 Oops"],
                [b"HTTP/1.1 200", b"HTTP/1.1 404 Not\x80Found", b"HTTP/1.1 2000 OK", b"HTTP/2 200 OK",
                 b"HTTP/1.1 200 O\x00K", b"HTTP/1.1 101 Switching", b"HTTP/1.1 099 Low", b"HTTP/1.1  200 OK",
                 b"HTTP/1.2 200 OK"])  # fmt: skip
INTERIMS = ([b""], [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early\r\nLink: <a>\r\n\r\n"])


def pick(rng: random.Random, choices: tuple[list[bytes], list[bytes]]) -> bytes:
    """An ordinary choice, or one time in ten an edge case."""
    return rng.choice(choices[1] if rng.random() < 0.1 else choices[0])


def header_line(rng: random.Random) -> bytes:
    name = pick(rng, NAMES)
    lower = name.strip().lower()
    if lower == b"content-length":
        value = pick(rng, LENGTHS)
    elif lower == b"transfer-encoding":
        value = pick(rng, CODINGS)
    else:
        value = pick(rng, TEXTS)
    fold = b"\r\n folded" if rng.random() < 0.03 else b""
    return name + pick(rng, SEPARATORS) + value + fold + pick(rng, EOLS)


def headers(rng: random.Random, hosts: int) -> bytes:
    lines = [b"Host: h\r\n"] * hosts + [header_line(rng) for _ in range(rng.randrange(4))]
    rng.shuffle(lines)
    return b"".join(lines)


def body(rng: random.Random) -> bytes:
    """Bytes after a head: plain (as many as a Content-Length may say, or not), or chunks."""
    if rng.random() < 0.4:
        return rng.choice([b"", b"abc", b"hello", b"abcdefgh", rng.randbytes(rng.randrange(9))])
    out = b""
    for _ in range(rng.randrange(4)):
        data = rng.randbytes(rng.randint(1, 20))
        size = pick(rng, CHUNK_SIZES).replace(b"%x", b"%x" % len(data)).replace(b"%X", b"%X" % len(data))
        out += size + pick(rng, EOLS) + data + pick(rng, EOLS)
    out += pick(rng, LAST_CHUNKS) + pick(rng, EOLS)
    out += b"".join(pick(rng, TRAILERS) for _ in range(rng.choice([0, 0, 0, 1, 2])))
    return out + pick(rng, EOLS)


def request(rng: random.Random) -> bytes:
    line = pick(rng, METHODS) + b" " + pick(rng, TARGETS) + b" " + pick(rng, VERSIONS) + pick(rng, EOLS)
    hosts = 1 if rng.random() < 0.9 else rng.choice([0, 2])
    return (b"\r\n" if rng.random() < 0.05 else b"") + line + headers(rng, hosts) + pick(rng, EOLS) + body(rng)


def response(rng: random.Random) -> bytes:
    status = pick(rng, INTERIMS) + pick(rng, STATUS_LINES) + pick(rng, EOLS)
    return status + headers(rng, 0) + pick(rng, EOLS) + body(rng)


def reads(rng: random.Random, stream: bytes) -> list[bytes]:
    """``stream`` cut into reads at a few offsets (often at every byte of a short stretch)."""
    if rng.random() < 0.1:
        return [stream[i : i + 1] for i in range(len(stream))]
    return cuts(stream, [rng.randrange(len(stream) + 1) for _ in range(rng.randrange(6))])


def agree_request(ours: Accepted, theirs: Message) -> None:
    assert ours.method.encode() == theirs.method, (ours, theirs)
    assert ours.target.encode("utf-8", "surrogateescape") == theirs.target, (ours, theirs)
    # llhttp keeps a value's trailing whitespace, which RFC 9110 5.5 excludes from the value: compared without.
    their_headers = [(n.decode("latin-1").lower(), v.rstrip(b" \t")) for n, v in theirs.headers]
    our_headers = [(n.lower(), v.encode("utf-8", "surrogateescape")) for n, v in ours.headers]
    assert our_headers == their_headers, (ours, theirs)
    assert ours.body == theirs.body, (ours, theirs)


def deliberate_request_difference(ours: Accepted, raw: bytes, error: str | None) -> bool:
    """Requests we accept and llhttp refuses, on purpose (docs/forwarding.md, "Deliberate differences")."""
    if error and "method" in error.lower():
        return True  # any token is a method here (extension methods), upper-cased as aiohttp did
    return not ours.target.isascii()  # raw UTF-8 in a target (curl sends ?q=café), forwarded as sent


@PROFILE
@given(seed=st.integers(0, 2**64))
def test_our_front_accepts_only_what_llhttp_reads_the_same(seed: int) -> None:
    rng = random.Random(seed)
    stream = b"".join(request(rng) for _ in range(rng.randint(1, 3)))
    run = run_front(reads(rng, stream))
    theirs, error = parse(stream, response=False)
    complete = [m for m in theirs if m.complete]
    for index, ours in enumerate(run.accepted):
        if index >= len(complete) or not _same_request(ours, complete[index]):
            assert deliberate_request_difference(ours, stream, error), (stream, ours, theirs, error)
            return  # past a deliberate difference the two are no longer reading the same stream
        agree_request(ours, complete[index])


def _same_request(ours: Accepted, theirs: Message) -> bool:
    try:
        agree_request(ours, theirs)
    except AssertionError:
        return False
    return True


# ---------------------------------------------------------------- responses: our upstream client


@dataclass
class UpstreamRun:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False  # the body ended as its framing said
    reusable: bool = False  # the connection would go back to the pool
    error: str | None = None


def run_upstream(reads: list[bytes], closes: bool) -> UpstreamRun:
    run = UpstreamRun()

    async def drive() -> None:
        pool = Pool()
        connection = _Connection(pool, ("http", "upstream", 80))
        transport = RecordingTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        response = UpstreamResponse(connection, "GET")
        connection.response = response
        for data in reads:
            if transport.closed:
                break
            connection.data_received(data)
        if closes and not transport.closed:
            connection.connection_lost(None)
        if not response.headers_done:
            run.error = repr(response._error)
            return
        run.status, run.headers = response.status, list(response.headers.items())
        body = b""
        try:
            while not response.is_eof() or response._chunks:
                piece = response.read_nowait()
                if not piece:
                    if response._error is not None:
                        raise response._error
                    break
                body += piece
            run.complete = response.is_eof()
        except UpstreamError as exc:
            run.error = repr(exc)
        run.body = body
        run.reusable = run.complete and response._keep_alive and not transport.closed

    LOOP.run_until_complete(drive())
    return run


def agree_response(ours: UpstreamRun, theirs: Message) -> None:
    assert ours.status == theirs.status, (ours, theirs)
    their_headers = [(n.decode("latin-1").lower(), v.rstrip(b" \t")) for n, v in theirs.headers]
    our_headers = [(n.lower(), v.encode("utf-8", "surrogateescape")) for n, v in ours.headers]
    assert our_headers == their_headers, (ours, theirs)
    assert ours.body == theirs.body, (ours, theirs)


def deliberate_response_difference(ours: UpstreamRun) -> bool:
    """Answers we take and llhttp refuses, on purpose: Transfer-Encoding ending in chunked wins over a
    Content-Length (RFC 9112 6.3, llhttp refuses both), and the connection is then never reused."""
    names = {name.lower() for name, _ in ours.headers}
    return {"content-length", "transfer-encoding"} <= names and not ours.reusable


@PROFILE
@given(seed=st.integers(0, 2**64))
def test_our_upstream_client_accepts_only_what_llhttp_reads_the_same(seed: int) -> None:
    rng = random.Random(seed)
    after = rng.choice([b"", b"", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nX", b"X"])
    closes = rng.random() < 0.5
    stream = response(rng) + after
    ours = run_upstream(reads(rng, stream), closes)
    theirs, error = parse(stream, response=True, eof=closes)
    final = [m for m in theirs if m.complete and m.status >= 200]
    if not ours.complete or ours.error is not None:
        return  # refused, or still waiting: never relayed as a whole answer
    if not final or not _same_response(ours, final[0]):
        assert deliberate_response_difference(ours), (stream, ours, theirs, error)
        return
    agree_response(ours, final[0])
    # Where the answer ends: a connection goes back to the pool only if nothing followed it.
    if ours.reusable:
        assert after == b"" and final[0].keep_alive, (stream, ours, theirs)


def _same_response(ours: UpstreamRun, theirs: Message) -> bool:
    try:
        agree_response(ours, theirs)
    except AssertionError:
        return False
    return True
