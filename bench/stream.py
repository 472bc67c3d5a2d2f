"""Streaming benchmark: a large download through the proxy vs. straight from the upstream.

Starts a built-in upstream (a separate process that streams N bytes from one
preallocated buffer) and the proxy (``python -m proxy run``, another process),
then downloads the body directly and through the proxy, reporting time to
first byte, throughput, and the proxy's resident memory (VmRSS before, VmHWM
peak) so "memory stays flat" is a measured number.

    python bench/stream.py --size 1GiB
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 256 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def upstream_main(port: int, size: int) -> None:
    """The upstream process: any request gets ``size`` bytes, first chunk at once."""
    from aiohttp import web

    block = b"\xab" * CHUNK

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        remaining = size
        while remaining:
            piece = block if remaining >= CHUNK else block[:remaining]
            await response.write(piece)
            remaining -= len(piece)
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


async def download(url: str) -> tuple[float, float, int]:
    """(time to first byte, total seconds, bytes) for one GET, reading with a raw socket."""
    host, _, rest = url.split("://", 1)[1].partition("/")
    hostname, _, port = host.partition(":")
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(hostname, int(port))
    writer.write(f"GET /{rest} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
    first = await reader.read(CHUNK)
    ttfb = time.perf_counter() - started
    received = len(first)
    while received < length:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    total = time.perf_counter() - started
    writer.close()
    return ttfb, total, received


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def parse_size(text: str) -> int:
    from proxy.config import parse_size as parse

    return parse(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--upstream-only", nargs=2, metavar=("PORT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream_only:
        upstream_main(int(args.upstream_only[0]), int(args.upstream_only[1]))
        return
    size = parse_size(args.size)
    upstream_port, proxy_port = free_port(), free_port()
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream-only", str(upstream_port), str(size)], env=env)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(
            f"listen: 127.0.0.1:{proxy_port}\nlog_level: warning\nworkers: 1\n"
            "credentials:\n  bench: {type: static, access_key_id: AKIDBENCH, secret_access_key: bench-secret}\n"
            f"routes:\n  - {{upstream: 'http://127.0.0.1:{upstream_port}', region: us-east-1, credentials: bench}}\n"
        )
    proxy = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", config.name], cwd=ROOT, env=env)
    try:
        wait_port(upstream_port)
        wait_port(proxy_port)
        asyncio.run(download(f"http://127.0.0.1:{proxy_port}/warm"))  # warm the pool and credentials
        before = memory_kib(proxy.pid)
        direct = asyncio.run(download(f"http://127.0.0.1:{upstream_port}/big"))
        proxied = asyncio.run(download(f"http://127.0.0.1:{proxy_port}/big"))
        after = memory_kib(proxy.pid)
    finally:
        proxy.terminate()
        upstream.terminate()
        proxy.wait()
        upstream.wait()
        os.unlink(config.name)
    mib = size / 2**20
    print(f"streamed {mib:.0f} MiB")
    print(f"  direct:        ttfb {direct[0] * 1000:7.2f} ms   {mib / direct[1]:8.1f} MiB/s")
    print(f"  through proxy: ttfb {proxied[0] * 1000:7.2f} ms   {mib / proxied[1]:8.1f} MiB/s")
    print(f"  ttfb added by the proxy: {(proxied[0] - direct[0]) * 1000:.2f} ms")
    print(f"  throughput ratio proxy/direct: {direct[1] / proxied[1]:.2f}")
    print(
        f"  proxy memory: RSS {before['VmRSS'] / 1024:.1f} MiB before, peak {after['VmHWM'] / 1024:.1f} MiB, "
        f"growth {(after['VmHWM'] - before['VmRSS']) / 1024:.1f} MiB"
    )
    assert proxied[2] == size and direct[2] == size, "a download came back short"


if __name__ == "__main__":
    main()
