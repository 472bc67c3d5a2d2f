"""The built-in upstream, for what nginx cannot serve: timed server-sent events and a WebSocket echo.

- ``GET /sse?events=N&interval=S``: N events, one every S seconds on an absolute schedule; each
  ``data:`` is its send time (``CLOCK_MONOTONIC`` nanoseconds, comparable across processes on
  Linux), so the client measures delivery latency;
- ``GET /ws``: echoes every text message;
- ``GET /get``: a small JSON (the proxy's readiness probe).

    python bench/upstream.py PORT
"""

from __future__ import annotations

import asyncio
import sys
import time

from aiohttp import WSMsgType, web


async def sse(request: web.Request) -> web.StreamResponse:
    events = int(request.query.get("events", "50"))
    interval = float(request.query.get("interval", "0.1"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for number in range(events):
        delay = start + number * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await response.write(b"id: %d\ndata: %d\n\n" % (number, time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
    await response.write_eof()
    return response


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
    return ws


async def small(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def sink(request: web.Request) -> web.Response:
    """Reads an upload to its end, keeping nothing: how many bytes arrived."""
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.json_response({"received": received})


def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", echo)
    app.router.add_get("/get", small)
    app.router.add_put("/sink", sink)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        backlog=4096,
        handler_cancellation=True,
        loop=loop_factory() if loop_factory else None,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]))
