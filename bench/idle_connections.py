"""Resident memory a proxy process spends per idle WebSocket connection and per idle SSE stream.

Run from the repository root::

    python bench/idle_connections.py [--connections 1000] [--kind ws|sse|both]

It starts a loopback upstream in this process (a WebSocket echo and an SSE
endpoint that sends one event, then stays silent), and for each kind a fresh
proxy as a separate process (``python -m proxy run --config FILE``, SigV4 with
static dummy credentials; the upstream does not check them). After a warm-up
(so that lazily imported modules and first-use allocations are not counted),
it reads the proxy's VmRSS from /proc/<pid>/status, opens N connections that
each exchange one message (or receive one event) and then idle, lets the
process settle, and reads VmRSS again. It prints numbers; it asserts nothing.

A fresh proxy per kind matters: memory freed by closing one kind's
connections would otherwise be reused by the next and hide its cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 20
SETTLE = 1.0  # seconds for the proxy to finish handshakes and the allocator to settle before reading RSS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc (Linux only)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------- the upstream (in this process)


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str(message.data)
    return ws


async def sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(b"event: hello\ndata: {}\n\n")
    await asyncio.Event().wait()  # idle until the client goes away (the handler is cancelled)
    return response


async def start_upstream() -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    app.router.add_get("/sse", sse)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


# ---------------------------------------------------------------- the proxy (a separate process)


async def start_proxy(upstream_port: int, config_dir: Path) -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    config = config_dir / f"proxy-{port}.yaml"
    config.write_text(
        f"""listen: 127.0.0.1:{port}
log_level: warning
workers: 1  # one process: the one whose memory is read
credentials:
  bench:
    type: static
    access_key_id: AKIDBENCHIDLECONNS
    secret_access_key: bench-secret-not-checked-by-the-upstream
routes:
  - path_prefix: /
    upstream: http://127.0.0.1:{upstream_port}
    region: eu-west-1
    credentials: bench
"""
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--config",
        str(config),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    async with asyncio.timeout(30):
        line = await process.stdout.readline()  # serve_forever prints one line once it listens
    if b"listening" not in line:
        process.kill()
        raise RuntimeError(f"the proxy did not start: {line!r}")
    return process, port


# ---------------------------------------------------------------- idle clients


async def open_ws(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(url)
    await ws.send_str("hello")
    await ws.receive()
    return ws


async def open_sse(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    response = await session.get(url)
    await response.content.readuntil(b"\n\n")
    return response


async def close(connection: aiohttp.ClientWebSocketResponse | aiohttp.ClientResponse) -> None:
    if isinstance(connection, aiohttp.ClientWebSocketResponse):
        await connection.close()
    else:
        connection.close()


async def measure(kind: str, count: int, upstream_port: int, config_dir: Path) -> tuple[int, int]:
    """(RSS before, RSS after) in KiB for ``count`` idle connections of ``kind`` through a fresh proxy."""
    process, port = await start_proxy(upstream_port, config_dir)
    url = f"http://127.0.0.1:{port}/{kind}"
    opener: Callable[[aiohttp.ClientSession, str], Awaitable[Any]] = open_ws if kind == "ws" else open_sse
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
            warm = await asyncio.gather(*(opener(session, url) for _ in range(WARM_UP)))
            await asyncio.gather(*(close(connection) for connection in warm))
            await asyncio.sleep(SETTLE)
            before = rss_kib(process.pid)
            opened = []
            for start in range(0, count, 100):  # in batches, so the listen backlog never overflows
                opened += await asyncio.gather(*(opener(session, url) for _ in range(min(100, count - start))))
            await asyncio.sleep(SETTLE)
            after = rss_kib(process.pid)
            await asyncio.gather(*(close(connection) for connection in opened))
        return before, after
    finally:
        process.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await process.wait()
        if process.returncode is None:
            process.kill()


async def main(count: int, kinds: list[str]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * count + 256  # this process holds a client and an upstream socket per connection
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    runner, upstream_port = await start_upstream()
    print(f"python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, {count} idle connections per kind")
    print(f"{'kind':<6}{'RSS before':>14}{'RSS after':>14}{'per connection':>18}")
    try:
        with tempfile.TemporaryDirectory() as config_dir:
            for kind in kinds:
                started = time.monotonic()
                before, after = await measure(kind, count, upstream_port, Path(config_dir))
                per = (after - before) / count
                print(f"{kind:<6}{before:>11} KiB{after:>11} KiB{per:>14.1f} KiB   ({time.monotonic() - started:.1f}s)")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="idle connections per kind (default 1000)")
    parser.add_argument("--kind", choices=("ws", "sse", "both"), default="both")
    args = parser.parse_args()
    if not os.path.exists("/proc/self/status"):
        sys.exit("this measurement reads /proc/<pid>/status: Linux only")
    asyncio.run(main(args.connections, ["ws", "sse"] if args.kind == "both" else [args.kind]))
