"""The listening proxy: wires config, credentials and the forwarder into an aiohttp server."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import aiohttp
from aiohttp import web

from .config import Config, is_loopback
from .credentials import CredentialsUnavailable, Provider, build_providers
from .forwarding import NO_AUTO_HEADERS, Forwarder, error_response, too_large_response

log = logging.getLogger("signing_proxy")


def accept_raw_utf8_in_request_lines() -> None:
    """Parse requests with aiohttp's Python HTTP parser instead of its C (llhttp) one.

    curl sends non-ASCII query characters raw (``?q=café``), and llhttp refuses
    such a request line with 400 before the proxy sees it. The Python parser
    keeps the bytes, and ``forwarding`` percent-encodes them (or answers 400 when
    they are not UTF-8). aiohttp has no option for this, hence the swap.
    """
    from aiohttp import http_parser, web_protocol

    web_protocol.HttpRequestParser = http_parser.HttpRequestParserPy  # type: ignore[misc]


def client_session() -> aiohttp.ClientSession:
    """The upstream client: pooled keep-alive, no cookie jar, no decompression, no invented headers."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=NO_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
    )


class ProxyServer:
    """One running proxy. ``await start()`` binds and warms credentials; ``await close()`` stops."""

    def __init__(self, config: Config, *, sock: socket.socket | None = None) -> None:
        self.config = config
        self.providers: dict[str, Provider] = build_providers(config)
        self._sock = sock
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._warmups: list[asyncio.Task[None]] = []
        self.forwarder: Forwarder | None = None
        self.host, self.port = config.listen

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def make_app(self) -> web.Application:
        self._session = client_session()
        self.forwarder = Forwarder(self.config, self.providers, self._session)
        app = web.Application(client_max_size=self.config.max_body)
        app.router.add_route("*", "/{tail:.*}", self.forwarder.handle, expect_handler=self._expect)
        return app

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """Answer ``Expect: 100-continue``: refuse an oversized body before the client sends it."""
        expect = request.headers.get("Expect", "").lower()
        if expect != "100-continue":
            return error_response(417, f"unsupported Expect value {expect!r}", "expectation_failed")
        if request.content_length is not None and request.content_length > self.config.max_body:
            return too_large_response(self.config.max_body)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    async def start(self) -> None:
        accept_raw_utf8_in_request_lines()
        app = self.make_app()
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        if self._sock is not None:
            site: web.BaseSite = web.SockSite(self._runner, self._sock)
        else:
            site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server  # the asyncio server: read the port actually bound (listen: ...:0)
        if server is not None and server.sockets:  # type: ignore[union-attr]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if not is_loopback(self.host):
            log.warning(
                "listening on %s, which is not loopback: anyone who reaches this port signs requests "
                "with this proxy's AWS identity",
                self.host,
            )
        self._warmups = [asyncio.create_task(self._warm(p)) for p in self._used_providers()]

    def _used_providers(self) -> list[Provider]:
        names = {r.credentials for r in self.config.routes if r.auth != "none"}
        return [self.providers[n] for n in sorted(names)]

    async def _warm(self, provider: Provider) -> None:
        """Fetch credentials at start-up so the first request does not wait (failures retry on use)."""
        try:
            if provider.tokens is not None:
                await provider.user_pool_tokens()
            if provider.credentials is not None:
                await provider.aws_credentials()
        except CredentialsUnavailable:
            pass  # already logged by Refreshing; requests on the route answer 503 until it recovers

    async def close(self) -> None:
        for task in self._warmups:
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


async def serve_forever(server: ProxyServer, on_ready: str | None = None) -> None:
    """Run until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    print(on_ready or f"signing-proxy listening on {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()
