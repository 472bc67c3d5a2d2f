"""A fuzz pass over the HTTP front: hundreds of broken requests, all at once, then a normal one.

Messages are valid requests mutated by a seeded generator (random bytes,
truncation, flipped and inserted bytes, bad chunk sizes, thousands of headers,
long lines, bare LF or CR, conflicting framing, odd versions). Each goes on its
own connection. The proxy must answer with a well-formed status it is allowed to
give (never 500, never a traceback), or wait for the rest of an incomplete
message; afterwards it serves normally, with no descriptor or task left behind
and nothing but 400s in its error log. ``FUZZ_SEED`` replays another run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re

import aiohttp
import pytest
from aiohttp.http_exceptions import HttpProcessingError

from proxy.demo import free_port
from tests.conftest import static_route
from tests.support.faults import UNVERIFIABLE, open_fds, settle, start_proxy_process

SEED = int(os.environ.get("FUZZ_SEED", "7"))
MESSAGES = 400
CONCURRENCY = 50
WAIT = 1.0  # seconds a connection is given to answer before the fuzzer gives up on it
# 200/403: whatever the upstream says (403 only with a bad signature: checked separately);
# 400 malformed; 403 the proxy's own for absolute-form to another host (host_not_allowed); 404 aiohttp's
# router (OPTIONS *); 413 body over max_body; 417 odd Expect.
ALLOWED = {200, 400, 403, 404, 413, 414, 417, 431, 501, 505}
# aiohttp echoes the request's version ("HTTP/9.9 200 OK"): see test_unsupported_http_version_is_505.
STATUS_LINE = re.compile(rb"^HTTP/\d\.\d (\d{3}) ")
INTERIM = re.compile(rb"^HTTP/1\.1 1\d\d [^\r\n]*\r\n\r\n")

BASES = [
    b"GET /items/7?b=2&a=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nX-Trace: one\r\n\r\n",
    b'POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"id": "7"}\r\n',
    b"PUT /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"PATCH /p HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET http://x/abs?q=%7e HTTP/1.1\r\nHost: x\r\n\r\n",
    b"DELETE /caf%C3%A9/%2F HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
]
BAD_CHUNK_SIZES = [b"zz", b"-1", b"FFFFFFFFFFFFFFFFFFFF", b"5;ext=\x00", b" 5", b"5 ", b"0x5", b"", b"+5", b"5\n"]


def mutate(rng: random.Random) -> bytes:
    base = bytearray(rng.choice(BASES))
    kind = rng.randrange(12)
    if kind == 0:
        return rng.randbytes(rng.randrange(600))
    if kind == 1:
        return bytes(base[: rng.randrange(len(base))])
    if kind == 2:
        for _ in range(rng.randint(1, 5)):
            base[rng.randrange(len(base))] = rng.randrange(256)
        return bytes(base)
    if kind == 3:
        for _ in range(rng.randint(1, 5)):
            at = rng.randrange(len(base))
            base[at:at] = rng.randbytes(rng.randint(1, 8))
        return bytes(base)
    if kind == 4:
        at = rng.randrange(len(base))
        del base[at : at + rng.randint(1, 20)]
        return bytes(base)
    if kind == 5:
        head, sep, body = bytes(base).partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(lines))
        return b"\r\n".join(lines) + sep + body
    if kind == 6:
        size = rng.choice(BAD_CHUNK_SIZES)
        return b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n0\r\n\r\n"
    if kind == 7:
        count = rng.choice([100, 127, 128, 129, 1000, 5000])
        headers = b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(count))
        return b"GET /many HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    if kind == 8:
        length = rng.choice([8000, 8190, 8191, 9000, 20000])
        if rng.random() < 0.5:
            return b"GET /" + b"p" * length + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        return b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"v" * length + b"\r\n\r\n"
    if kind == 9:
        return bytes(base).replace(b"\r\n", rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r"]))
    if kind == 10:
        framing = rng.choice(
            [
                b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
                b"Content-Length: 3\r\nContent-Length: 4\r\n",
                b"Content-Length: 99999999999999999999\r\n",
                b"Content-Length: 1e3\r\n",
                b"Transfer-Encoding: chunked, gzip\r\n",
                b"Transfer-Encoding: identity\r\n",
                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            ]
        )
        return b"POST /f HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\nabc0\r\n\r\n"
    version = rng.choice([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9", b"HTTP/1.1x", b"http/1.1", b"HTTP/1", b"HTTP/01.1"])
    return bytes(base).replace(b"HTTP/1.1", version, 1)


def utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def excused(message: bytes, status: int) -> str | None:
    """Why this answer, outside ALLOWED, is not the proxy's fault (or is a bug pinned elsewhere), or None."""
    head, _, body = message.partition(b"\r\n\r\n")
    fields = head.partition(b"\r\n")[2]
    if status == 403 and not utf8(fields):
        return "non-UTF-8 header bytes are forwarded unchanged, and awscrt cannot verify them (TolerantUpstream)"
    if status == 500 and b"chunked" in fields.lower() and not utf8(body):
        return "known bug: test_non_utf8_chunk_size_line_is_400"
    return None


async def send(port: int, message: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = bytearray()
    try:
        writer.write(message)
        async with asyncio.timeout(WAIT):
            while chunk := await reader.read(65536):
                answer += chunk
    except (TimeoutError, ConnectionError):
        pass  # an incomplete request may wait for more; a refused one may be reset
    finally:
        writer.transport.abort()
    return bytes(answer)


async def test_fuzzed_requests_never_crash_or_leak(tolerant_upstream, start_proxy, caplog) -> None:
    caplog.set_level(logging.ERROR)
    upstream = tolerant_upstream
    proxy = await start_proxy({**static_route(upstream.url), "max_body": "64KiB"})
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/warm") as r:
        assert r.status == 200
    await asyncio.sleep(0.1)
    fds, tasks = open_fds(), len(asyncio.all_tasks())

    rng = random.Random(SEED)
    messages = [mutate(rng) for _ in range(MESSAGES)]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(message: bytes) -> bytes:
        async with gate:
            return await send(proxy.port, message)

    answers = await asyncio.wait_for(asyncio.gather(*(one(m) for m in messages)), 120)

    statuses: dict[int, int] = {}
    for message, answer in zip(messages, answers, strict=True):
        context = f"seed {SEED}: {message[:120]!r} -> {answer[:200]!r}"
        assert b"Traceback" not in answer and b'File "' not in answer, context
        if not answer:
            continue  # closed or still waiting for the rest: both fine
        while interim := INTERIM.match(answer):  # 100 Continue before the final answer (or the rest of a body)
            answer = answer[interim.end() :]
        if not answer:
            continue
        match = STATUS_LINE.match(answer)
        assert match, f"not an HTTP response: {context}"
        status = int(match.group(1))
        statuses[status] = statuses.get(status, 0) + 1
        if excused(message, status):
            continue
        assert status in ALLOWED, context
    assert statuses.get(400, 0) > MESSAGES // 4, statuses  # the fuzzer does reach the parser's refusals
    assert statuses.get(200, 0) > 10, statuses  # and some mutants are still requests
    bad = [
        f"{r.method} {r.raw_path!r}: {r.signature_error}"
        for r in upstream.received
        if not r.signature_ok and not (r.signature_error or "").startswith(UNVERIFIABLE)
    ]
    assert bad == [], f"seed {SEED}: the proxy sent badly signed requests"

    async with aiohttp.ClientSession() as client, client.post(proxy.url + "/after", data=b"fine") as r:
        assert r.status == 200
    # Valid mutants ran concurrently, so the proxy pools several idle upstream connections: not a leak.
    # Closing the upstream closes them; whatever stays open beyond the baseline is leaked.
    await upstream.close()
    assert await settle(open_fds, fds) <= fds, "file descriptors leaked"
    assert await settle(lambda: len(asyncio.all_tasks()), tasks) <= tasks, "tasks leaked"
    # 400s are logged with a traceback (test_malformed_requests_leave_no_traceback_in_the_log); the
    # UnicodeEncodeError is the known 500 of test_non_utf8_chunk_size_line_is_400. Anything else is new.
    unexpected = [
        record
        for record in caplog.records
        if record.levelno >= logging.ERROR
        and not (
            record.name == "aiohttp.server"
            and record.exc_info is not None
            and isinstance(record.exc_info[1], HttpProcessingError | UnicodeEncodeError)
        )
    ]
    assert unexpected == [], [(r.name, r.getMessage(), r.exc_info and repr(r.exc_info[1])) for r in unexpected]


@pytest.mark.parametrize("seed", [SEED])
def test_the_fuzzer_is_deterministic(seed: int) -> None:
    first = [mutate(random.Random(seed)) for _ in range(3)]
    assert first == [mutate(random.Random(seed)) for _ in range(3)]


@pytest.mark.parametrize("version", [b"HTTP/9.9", b"HTTP/2.0"])
async def test_unsupported_http_version_is_505(version: bytes, sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    answer = await send(proxy.port, b"GET / " + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 505 "), answer[:100]
    assert sigv4_upstream.received == []


async def test_non_utf8_chunk_size_line_is_400(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    message = b"PUT /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\xc3hello\r\n0\r\n\r\n"
    answer = await send(proxy.port, message)
    assert answer.startswith(b"HTTP/1.1 400 ") or answer.startswith(b"HTTP/1.0 400 "), answer[:100]


async def test_malformed_requests_leave_no_traceback_in_the_log(sigv4_upstream, tmp_path) -> None:
    proxy = await start_proxy_process(static_route(sigv4_upstream.url), tmp_path, free_port())
    try:
        for message in (
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ):
            answer = await send(proxy.port, message)
            assert answer[:12] in (b"HTTP/1.0 400", b"HTTP/1.1 400", b"HTTP/1.0 431", b"HTTP/1.1 431"), answer[:80]
    finally:
        code = await proxy.stop()
    assert code == 0
    log = proxy.stderr.decode(errors="replace")
    assert "Traceback" not in log, log[-3000:]
