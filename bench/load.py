"""Clients: wrk for request rates, a raw-socket download, server-sent-event streams, idle connections.

wrk (C, keep-alive, ``--latency``) generates every request-rate load; the Python clients here only
do what wrk cannot: time a streamed download's first byte, measure each SSE event's delivery
latency from the send time the upstream wrote into it, and hold idle WebSockets and streams open.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp

T = TypeVar("T")


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers and socket errors (connect, read, write, timeout)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of unsorted values (nan when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(output: str) -> LoadResult:
    def latency(percent: str) -> float:
        match = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
        return float(match.group(1)) * _WRK_UNITS[match.group(2)] if match else float("nan")

    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if not total:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return LoadResult(
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _WRK_UNITS[total.group(3)] / 1000,
        p50_ms=latency("50"),
        p99_ms=latency("99"),
        errors=(int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, sockets.groups())) if sockets else 0),
    )


def post_script(directory: Path, size: int) -> Path:
    """A wrk Lua script that POSTs ``size`` bytes."""
    script = directory / f"post-{size}.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.body = string.rep("x", {size})\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    )
    return script


def paced_script(directory: Path, per_second: float) -> Path:
    """A wrk Lua script: each connection sends about ``per_second`` requests a second (open loop).

    wrk's ``delay()`` holds each request for a random 0.5-1.5 times the mean interval, so the
    connections do not march in step; with the offered rate well below capacity nothing queues, and
    the latencies are the proxy's, not the queue's (a closed loop's p99 is connections over throughput).
    """
    mean_ms = 1000 / per_second
    script = directory / f"paced-{per_second:g}.lua"
    script.write_text(f"function delay()\n  return math.random({mean_ms / 2:.0f}, {mean_ms * 1.5:.0f})\nend\n")
    return script


def wrk(url: str, seconds: int, connections: int, threads: int, script: Path | None = None) -> LoadResult:
    command = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    command += ["--timeout", "10s", *(["-s", str(script)] if script else []), url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr or result.stdout}")
    return parse_wrk(result.stdout)


# ---------------------------------------------------------------- a streamed download


async def _download(url: str) -> tuple[float, float, int]:
    parts = urlsplit(url)
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    received = len(await reader.read(1 << 18))
    ttfb = time.perf_counter() - started
    while received < length:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    total = time.perf_counter() - started
    writer.close()
    return ttfb, total, received


def download(url: str, size: int) -> tuple[float, float]:
    """(seconds to the first body byte, seconds in all) for one GET on a fresh connection, checked complete."""
    ttfb, total, received = asyncio.run(asyncio.wait_for(_download(url), 30 + size / 20e6))
    if received != size:
        raise RuntimeError(f"{url}: {received} bytes received, {size} expected")
    return ttfb, total


async def _upload(url: str, size: int) -> tuple[float, bytes]:
    parts = urlsplit(url)
    piece = memoryview(bytes(1 << 20))
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = f"PUT {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode())
    left = size
    while left:
        writer.write(piece[: min(left, len(piece))])
        left -= min(left, len(piece))
        await writer.drain()
    answer = await reader.read()
    seconds = time.perf_counter() - started
    writer.close()
    return seconds, answer


def upload(url: str, size: int) -> float:
    """Seconds to PUT ``size`` bytes on a fresh connection and read the answer (bench/upstream.py's
    /sink), checked whole."""
    seconds, answer = asyncio.run(asyncio.wait_for(_upload(url, size), 30 + size / 20e6))
    if not answer.startswith(b"HTTP/1.1 200") or f'"received": {size}'.encode() not in answer:
        raise RuntimeError(f"{url}: upload of {size} bytes answered {answer[:300]!r}")
    return seconds


# ---------------------------------------------------------------- keep-alive GETs through CONNECT


@dataclass
class KeepAliveResult:
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


async def tunnel_through(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, context: ssl.SSLContext
) -> None:
    """Turn a connection to the proxy into a tunnel: ``CONNECT host:443``, then TLS with ``context``."""
    writer.write(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"CONNECT refused: {head[:200]!r}")
    await writer.start_tls(context, server_hostname=host)


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """The head of an answer framed by Content-Length, its body read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    if length is None:
        raise RuntimeError(f"no Content-Length: {head[:200]!r}")
    await reader.readexactly(int(length.group(1)))
    return head


async def _keepalive_connection(
    port: int, path: str, tunnel: tuple[str, ssl.SSLContext] | None, until: float, result: KeepAliveResult
) -> None:
    """One client connection: ``CONNECT host:443`` and TLS first if ``tunnel``, then GETs until ``until``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    host = f"127.0.0.1:{port}"
    try:
        if tunnel is not None:
            host, context = tunnel
            await tunnel_through(reader, writer, host, context)
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(request)
            head = await read_answer(reader)
            if head.startswith(b"HTTP/1.1 200"):
                result.requests += 1
                result.latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                result.errors += 1
    except (OSError, asyncio.IncompleteReadError, RuntimeError):
        result.errors += 1
    finally:
        writer.close()


async def keepalive_gets(
    port: int, path: str, connections: int, seconds: float, tunnel: tuple[str, ssl.SSLContext] | None = None
) -> tuple[KeepAliveResult, float]:
    """``connections`` keep-alive clients doing GETs for ``seconds`` (what wrk does, and CONNECT, which it cannot).

    Returns the counts and the seconds they took (each tunnel's CONNECT and handshake included: a few ms).
    """
    result = KeepAliveResult()
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(_keepalive_connection(port, path, tunnel, until, result) for _ in range(connections)))
    return result, time.perf_counter() - started


# ---------------------------------------------------------------- server-sent events


@dataclass
class SSEResult:
    expected: int
    delivered: int = 0
    failed_streams: int = 0
    latencies_ms: list[float] = field(default_factory=list)


async def _sse_stream(url: str, delay: float, result: SSEResult, session: aiohttp.ClientSession) -> None:
    await asyncio.sleep(delay)
    try:
        async with session.get(url, headers={"Accept": "text/event-stream"}) as response:
            if response.status != 200:
                result.failed_streams += 1
                return
            pending = b""
            async for data in response.content.iter_any():
                arrived = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                pending += data
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        if line.startswith(b"data: "):
                            result.latencies_ms.append((arrived - int(line[6:])) / 1e6)
                            result.delivered += 1
    except (aiohttp.ClientError, ValueError):
        result.failed_streams += 1


async def sse_streams(base_url: str, streams: int, events: int, interval: float) -> SSEResult:
    """``streams`` concurrent SSE streams of ``events`` events each, their starts spread over one interval."""
    result = SSEResult(expected=streams * events)
    url = f"{base_url}/sse?events={events}&interval={interval}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [_sse_stream(url, interval * index / streams, result, session) for index in range(streams)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks), events * interval + 30)
    return result


# ---------------------------------------------------------------- idle connections


async def hold_idle(base_url: str, kind: str, count: int, measure: Callable[[], Awaitable[T]]) -> T:
    """Open ``count`` WebSockets (one echo each) or SSE streams (one event each), call ``measure()``, close."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:

        async def open_one():  # type: ignore[no-untyped-def]
            if kind == "ws":
                ws = await session.ws_connect(f"{base_url}/ws")
                await ws.send_str("hello")
                await ws.receive()
                return ws
            response = await session.get(f"{base_url}/sse?events=2&interval=3600")  # one event, then silence
            await response.content.readuntil(b"\n\n")
            return response

        opened = []
        try:
            for start in range(0, count, 100):  # in batches, so no listen backlog overflows
                opened += await asyncio.gather(*(open_one() for _ in range(min(100, count - start))))
            return await measure()
        finally:
            for connection in opened:
                if kind == "ws":
                    await connection.close()
                else:
                    connection.close()
