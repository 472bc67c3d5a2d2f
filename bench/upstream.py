"""The built-in benchmark upstream: one process, up to two listeners.

``--fast-port``: a minimal HTTP/1.1 server on a raw ``asyncio.Protocol`` (keep-alive,
Content-Length bodies) for the request-rate scenarios, used when nginx is not
installed: ``GET`` anything answers a small static JSON, ``POST`` reads the whole
body and only then answers ``{"received": N}``.

``--app-port``: an aiohttp application for what needs streaming:

- ``GET /big?size=N``: N bytes, the first chunk at once (as ``bench/stream.py``'s upstream);
- ``GET /sse?events=N&interval=S&phase=S``: server-sent events, one every S seconds on an
  absolute schedule starting ``phase`` seconds in; each ``data:`` is the send time
  (``CLOCK_MONOTONIC`` nanoseconds, comparable across processes on Linux) so the client
  measures delivery latency;
- ``GET /get``, ``POST /post``: as on the fast port.

uvloop is used when installed (``--no-uvloop`` to refuse it).

    python bench/upstream.py --fast-port 9001 --app-port 9002
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import time

SMALL_JSON = b'{"ok":true}'
CHUNK = 256 * 1024


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class _DateCache:
    """The Date header value, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True).encode()
        return self._value


_DATE = _DateCache()


def _response(body: bytes, close: bool) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nServer: bench-upstream\r\nDate: "
        + _DATE.get()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + (b"\r\nConnection: close" if close else b"")
        + b"\r\n\r\n"
        + body
    )


class FastHTTP(asyncio.Protocol):
    """Just enough HTTP/1.1 for ``GET`` and ``POST`` with Content-Length, pipelining-safe."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.body_left = 0
        self.body_size = 0
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.body_left and not self.buffer and len(data) <= self.body_left:
            self.body_left -= len(data)  # the common case of a large body: count it, keep nothing
            if not self.body_left:
                self._answer()
            return
        self.buffer += data
        self._process()

    def _process(self) -> None:
        buffer = self.buffer
        while self.transport is not None:
            if self.body_left:
                taken = min(self.body_left, len(buffer))
                del buffer[:taken]
                self.body_left -= taken
                if self.body_left:
                    return
                self._answer()
                continue
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > 65536:
                    self.transport.close()
                return
            head = bytes(buffer[:end]).lower()
            del buffer[: end + 4]
            self.close_after = b"\r\nconnection: close" in head
            self.body_size = 0
            marker = head.find(b"\r\ncontent-length:")
            if marker >= 0:
                line_end = head.find(b"\r\n", marker + 2)
                self.body_size = int(head[marker + 17 : line_end if line_end >= 0 else None])
            if self.body_size:
                self.body_left = self.body_size
                continue
            self._answer()

    def _answer(self) -> None:
        assert self.transport is not None
        body = b'{"received":%d}' % self.body_size if self.body_size else SMALL_JSON
        self.transport.write(_response(body, self.close_after))
        if self.close_after:
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def make_app():  # type: ignore[no-untyped-def]
    from aiohttp import web

    block = b"\xab" * CHUNK

    async def small(request: web.Request) -> web.Response:
        size = len(await request.read())
        body = b'{"received":%d}' % size if size else SMALL_JSON
        return web.Response(body=body, content_type="application/json")

    async def big(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", str(1 << 30)))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        remaining = size
        while remaining:
            piece = block if remaining >= CHUNK else block[:remaining]
            await response.write(piece)
            remaining -= len(piece)
        return response

    async def sse(request: web.Request) -> web.StreamResponse:
        events = int(request.query.get("events", "50"))
        interval = float(request.query.get("interval", "0.1"))
        phase = float(request.query.get("phase", "0"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        start = loop.time() + phase
        for number in range(events):
            delay = start + number * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await response.write(b"id: %d\ndata: %d\n\n" % (number, _now_ns()))
        await response.write_eof()
        return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/big", big)
    app.router.add_get("/sse", sse)
    app.router.add_route("*", "/{tail:.*}", small)
    return app


async def serve(fast_port: int | None, app_port: int | None) -> None:
    servers = []
    if fast_port is not None:
        loop = asyncio.get_running_loop()
        servers.append(await loop.create_server(FastHTTP, "127.0.0.1", fast_port, backlog=1024, reuse_address=True))
    if app_port is not None:
        from aiohttp import web

        runner = web.AppRunner(make_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", app_port, backlog=1024, reuse_address=True).start()
    await asyncio.Event().wait()  # until killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast-port", type=int)
    parser.add_argument("--app-port", type=int)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    run = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            pass
    run(serve(args.fast_port, args.app_port))


if __name__ == "__main__":
    main()
