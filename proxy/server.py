"""The listening proxy: wires config, credentials and the forwarder into an aiohttp server."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11

from . import front
from .admin import admin_app
from .config import Config, ConfigError, is_loopback
from .credentials import CredentialsUnavailable, Provider, build_providers
from .forwarding import Forwarder, error_response, request_target, too_large_response
from .logs import flush_periodically
from .metrics import Metrics
from .upstream import Pool
from .websocket import close_websockets

log = logging.getLogger("signing_proxy")


@web.middleware
async def only_http11_paths(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refuse what is no proxied request: HTTP versions other than 1.0/1.1, targets that are not paths.

    aiohttp's Python parser (see ``front``) takes any ``digit.digit`` version, and its router
    answers a plain-text 404 to ``OPTIONS *`` or ``CONNECT host:port``.
    """
    if request.version not in (HttpVersion10, HttpVersion11):
        # The answer's status line echoes the request's version: make it ours, not "HTTP/9.9".
        request._cache["version"] = HttpVersion11  # aiohttp caches the parsed version here (reify)
        response = error_response(505, "signing-proxy speaks HTTP/1.1 (and 1.0)", "http_version_not_supported")
        response.force_close()
        return response
    if not request.raw_path.startswith("/") and request_target(request.raw_path) is None:
        return error_response(
            400, "the request target must be a path (signing-proxy is a reverse proxy, not a tunnel)",
            "bad_request_target",
        )  # fmt: skip
    return await handler(request)


class ProxyServer:
    """One running proxy. ``await start()`` binds and warms credentials; ``await close()`` drains and stops.

    ``reload(config)`` swaps in a new configuration without dropping connections:
    requests already running finish with the old one.
    """

    def __init__(self, config: Config, *, sock: socket.socket | None = None, worker: int = 0) -> None:
        self.config = config
        self.worker = worker  # 0 unless one of several worker processes; worker 0 serves the admin port
        self.providers: dict[str, Provider] = build_providers(config)
        self.metrics = Metrics()
        self._sock = sock
        self._runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._pool = Pool()
        self._warmups: set[asyncio.Task[None]] = set()
        self.forwarder: Forwarder | None = None
        self.host, self.port = config.listen
        self.admin_port: int | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._log_flusher: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        assert self.forwarder is not None
        return await self.forwarder.handle(request)

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
        front.install()
        self.forwarder = Forwarder(self.config, self.providers, self._pool, self.metrics)
        app = web.Application(client_max_size=self.config.max_body, middlewares=[only_http11_paths])
        app.on_shutdown.append(close_websockets)  # 1001 both ways, instead of waiting out the grace period
        app.router.add_route("*", "/{tail:.*}", self._dispatch, expect_handler=self._expect)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=self.config.shutdown_grace,
            # aiohttp's keep-alive timer runs from accept and after each answer, and is not reset by
            # partial data: it is the header timeout (slow-loris) as well as the idle keep-alive limit.
            keepalive_timeout=self.config.header_timeout,
        )
        await self._runner.setup()
        if self._sock is not None:
            site: web.BaseSite = web.SockSite(self._runner, self._sock)
        else:
            site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = bound_port(site) or self.port
        self.metrics.watch(lambda: self.providers)
        self._sampler = asyncio.create_task(self._sample_connections())
        self._log_flusher = asyncio.create_task(flush_periodically())
        if self.config.admin_listen is not None and self.worker == 0:
            await self._start_admin(*self.config.admin_listen)
        if not is_loopback(self.host) and not self.config.inbound_token:
            log.warning(
                "listening on %s, which is not loopback, without inbound_token: anyone who reaches this port "
                "signs requests with this proxy's AWS identity",
                self.host,
            )
        self._warm_all()
        tune_gc()

    async def _start_admin(self, host: str, port: int) -> None:
        self._admin_runner = web.AppRunner(
            admin_app(lambda: (self.config, self.providers), self.metrics), access_log=None, shutdown_timeout=1.0
        )
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, host, port, reuse_address=True)
        await site.start()
        self.admin_port = bound_port(site) or port

    async def _sample_connections(self) -> None:
        """Publish the open connection count each second (summed over workers by prometheus-client)."""
        while True:
            server = self._runner.server if self._runner is not None else None
            self.metrics.open_connections.set(len(server.connections) if server is not None else 0)
            await asyncio.sleep(1.0)

    def _warm_all(self) -> None:
        names = {r.credentials for r in self.config.routes if r.auth != "none"}
        for name in sorted(names):
            task = asyncio.create_task(self._warm(self.providers[name]))
            self._warmups.add(task)
            task.add_done_callback(self._warmups.discard)

    async def _warm(self, provider: Provider) -> None:
        """Fetch credentials at start-up so the first request does not wait (failures retry on use).

        Workers start a little apart, so N workers do not call STS or Cognito in the same instant.
        """
        await asyncio.sleep(0.2 * self.worker)
        try:
            if provider.tokens is not None:
                await provider.user_pool_tokens()
            if provider.credentials is not None:
                await provider.aws_credentials()
        except CredentialsUnavailable:
            pass  # already logged by Refreshing; requests on the route answer 503 until it recovers

    def reload(self, config: Config) -> None:
        """Serve ``config`` from now on. Sources whose settings did not change keep their credentials."""
        if config.listen != self.config.listen or config.admin_listen != self.config.admin_listen:
            log.warning("reload: listen and admin_listen changes take effect only after a restart")
        fresh = build_providers(config)
        for name in fresh:
            if name in self.providers and source_chain(self.config, name) == source_chain(config, name):
                fresh[name] = self.providers[name]
        self.config, self.providers = config, fresh
        previous = self.forwarder
        self.forwarder = Forwarder(config, fresh, self._pool, self.metrics)
        if previous is not None:
            self.forwarder.clock_offset = previous.clock_offset
        self._warm_all()
        log.info("configuration reloaded: %d route(s)", len(config.routes))

    async def close(self) -> None:
        """Stop accepting, give running requests ``shutdown_grace`` to finish, then close."""
        for task in [*self._warmups, self._sampler, self._log_flusher]:
            if task is not None:
                task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        self._pool.close()


def source_chain(config: Config, name: str) -> list[object]:
    """A source's settings and those of every source it is signed by (assumed roles)."""
    chain: list[object] = []
    while name not in chain:
        source = config.source(name)
        chain += [name, source]
        name = getattr(source, "source", name)
    return chain


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path.

    Objects made at start-up (modules, config, clients) are frozen out of its
    scans, and collections run after 50,000 net allocations instead of 700: a
    request allocates hundreds of short-lived objects that reference counting
    frees anyway. About 5 % of CPU per small request in interleaved runs.
    """
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def bound_port(site: web.BaseSite) -> int | None:
    """The port a site actually bound (for ``listen: ...:0``)."""
    server = site._server  # aiohttp keeps the asyncio server private
    sockets = getattr(server, "sockets", None)
    return int(sockets[0].getsockname()[1]) if sockets else None


async def serve_forever(
    server: ProxyServer,
    on_ready: str | None = None,
    reload: Callable[[], Config] | None = None,
    *,
    announce: bool = True,
) -> None:
    """Run until SIGINT or SIGTERM, draining in-flight requests; SIGHUP calls ``reload`` and applies it.

    A configuration that fails to load on SIGHUP is logged and ignored: the old one keeps serving.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if reload is not None:

        def on_hangup() -> None:
            try:
                server.reload(reload())
            except ConfigError as error:
                log.error("reload rejected, the previous configuration keeps serving:\n%s", error)

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await server.start()
    if announce:
        print(on_ready or f"signing-proxy listening on {server.url}", flush=True)
    try:
        await stop.wait()
        log.info("stopping: draining requests for up to %gs", server.config.shutdown_grace)
    finally:
        await server.close()
