"""Load generators and clients: wrk (when installed), a built-in keep-alive generator, SSE streams.

``run_wrk`` runs ``wrk -tT -cC -dDs --latency`` (a Lua script for POST bodies) and parses
Requests/sec and the latency distribution. ``run_builtin`` is the fallback: T processes,
each with C/T keep-alive connections on raw asyncio sockets, timing every request from
the first byte written to the last byte read (as wrk does). ``sequential_latency`` times
requests one after another on one connection (latency with no load), and ``sse_streams``
holds many server-sent-event streams open and measures each event's delivery latency
from the send time the upstream wrote into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from harness import run_async


@dataclass
class LoadResult:
    tool: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int = 0
    errors: int = 0


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of unsorted values (nan when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def request_bytes(url: str, method: str = "GET", body: bytes = b"") -> bytes:
    parts = urlsplit(url)
    head = (
        f"{method} {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
    )
    if body or method == "POST":
        head += f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


# ---------------------------------------------------------------- wrk

_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_post_script(directory: Path, size: int) -> Path:
    script = directory / f"post-{size}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = string.rep("x", {size})\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    )
    return script


def parse_wrk(output: str) -> LoadResult:
    def latency(percent: str) -> float:
        match = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
        return float(match.group(1)) * _WRK_UNITS[match.group(2)] if match else float("nan")

    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not total or not rate:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return LoadResult(
        tool="wrk",
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _WRK_UNITS[total.group(3)] / 1000,
        rps=float(rate.group(1)),
        p50_ms=latency("50"),
        p99_ms=latency("99"),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(n) for n in sockets.groups()) if sockets else 0,
    )


def run_wrk(url: str, duration: float, connections: int, threads: int = 2, script: Path | None = None) -> LoadResult:
    seconds = max(1, round(duration))
    command = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    command += ["--timeout", "10s"]
    if script is not None:
        command += ["-s", str(script)]
    result = subprocess.run(
        [*command, url], capture_output=True, text=True, timeout=seconds + 60, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr or result.stdout}")
    return parse_wrk(result.stdout)


# ---------------------------------------------------------------- built-in generator


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one whole response; returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    await read_body(reader, head)
    return int(head[9:12])


async def read_body(reader: asyncio.StreamReader, head: bytes) -> None:
    """Read the body that follows ``head`` (Content-Length or chunked)."""
    lower = head.lower()
    marker = lower.find(b"\r\ncontent-length:")
    if marker >= 0:
        length = int(lower[marker + 17 : lower.find(b"\r\n", marker + 2)])
        if length:
            await reader.readexactly(length)
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break


async def _load_connections(
    host: str, port: int, request: bytes, connections: int, duration: float
) -> tuple[int, int, int, list[float]]:
    latencies: list[float] = []
    counts = {"non_2xx": 0, "errors": 0}
    deadline = time.perf_counter() + duration

    async def one() -> None:
        while time.perf_counter() < deadline:
            try:
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
            except OSError:
                counts["errors"] += 1
                await asyncio.sleep(0.01)
                continue
            try:
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    writer.write(request)
                    status = await asyncio.wait_for(read_response(reader), 10)
                    latencies.append(time.perf_counter() - started)
                    if not 200 <= status < 400:
                        counts["non_2xx"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
                counts["errors"] += 1
            finally:
                writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return len(latencies), counts["non_2xx"], counts["errors"], latencies


def _load_worker(host: str, port: int, request: bytes, connections: int, duration: float):  # type: ignore[no-untyped-def]
    return run_async(_load_connections(host, port, request, connections, duration))


def run_builtin(
    url: str, duration: float, connections: int, threads: int = 2, method: str = "GET", body: bytes = b""
) -> LoadResult:
    """``threads`` processes sharing ``connections`` keep-alive connections for ``duration`` seconds."""
    parts = urlsplit(url)
    request = request_bytes(url, method, body)
    threads = max(1, min(threads, connections))
    shares = [connections // threads + (1 if i < connections % threads else 0) for i in range(threads)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=threads, mp_context=context) as pool:
        futures = [pool.submit(_load_worker, parts.hostname, parts.port, request, share, duration) for share in shares]
        results = [future.result(timeout=duration + 60) for future in futures]
    latencies = [value for result in results for value in result[3]]
    count = sum(result[0] for result in results)
    return LoadResult(
        tool="built-in",
        requests=count,
        seconds=duration,
        rps=count / duration,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        non_2xx=sum(result[1] for result in results),
        errors=sum(result[2] for result in results),
    )


def run_load(
    url: str,
    duration: float,
    connections: int,
    *,
    use_wrk: bool,
    body: bytes = b"",
    workdir: Path | None = None,
    threads: int = 2,
) -> LoadResult:
    """GET (no body) or POST ``body`` at ``url`` with wrk when allowed, else the built-in generator."""
    if use_wrk:
        script = None
        if body:
            script = wrk_post_script(workdir or Path(tempfile.gettempdir()), len(body))
        return run_wrk(url, duration, connections, threads, script)
    return run_builtin(url, duration, connections, threads, "POST" if body else "GET", body)


# ---------------------------------------------------------------- latency without load


async def _sequential_keepalive(url: str, count: int, body: bytes) -> list[float]:
    parts = urlsplit(url)
    request = request_bytes(url, "POST" if body else "GET", body)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            times.append(time.perf_counter() - started)
            await read_body(reader, head)
    finally:
        writer.close()
    return times


def sequential_latency(url: str, count: int = 200, body: bytes = b"") -> list[float]:
    """Seconds from writing each request to its response head, one at a time on one keep-alive connection."""
    return run_async(asyncio.wait_for(_sequential_keepalive(url, count, body), 60))


# ---------------------------------------------------------------- server-sent events


@dataclass
class SSEResult:
    streams: int
    expected: int
    delivered: int = 0
    failed_streams: int = 0
    latencies_ms: list[float] = field(default_factory=list)


async def _sse_stream(port: int, path: str, delay: float, result: SSEResult) -> None:
    await asyncio.sleep(delay)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    except OSError:
        result.failed_streams += 1
        return
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if head.split()[1] != b"200":
            result.failed_streams += 1
            return
        chunked = b"\r\ntransfer-encoding: chunked" in head.lower()
        pending = b""
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = (await reader.readexactly(size + 2))[:-2]
                if size == 0:
                    break
            else:
                data = await reader.read(65536)
                if not data:
                    break
            arrived = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            pending += data
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        result.latencies_ms.append((arrived - int(line[6:])) / 1e6)
                        result.delivered += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        result.failed_streams += 1
    finally:
        writer.close()


async def sse_streams(port: int, streams: int, events: int, interval: float) -> SSEResult:
    """``streams`` concurrent SSE streams of ``events`` events each, connections spread over one interval."""
    result = SSEResult(streams=streams, expected=streams * events)
    path = f"/sse?events={events}&interval={interval}"
    tasks = [_sse_stream(port, path, interval * index / streams, result) for index in range(streams)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks), events * interval + 30)
    return result
