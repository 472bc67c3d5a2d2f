"""The listening proxy: wires config, credentials, the front and the forwarder together."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .config import Config, ConfigError, ListenTls
from .cors import any_origin
from .credentials import CredentialsUnavailable, Provider, build_providers
from .forward import ForwardProxy
from .forwarding import Forwarder
from .http.egress import is_loopback
from .http.front import Front, Request
from .http.tunnel import Terminate, Tunnel
from .http.upstream import Pool
from .ops.admin import admin_app
from .ops.logs import flush_periodically
from .ops.metrics import Metrics
from .websocket import Upgrades

if TYPE_CHECKING:
    from .ca import CertificateAuthority, ListenerCertificate

log = logging.getLogger("signing_proxy")

LISTEN_BACKLOG = 1024
FULL_GC_EVERY = 10  # seconds


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
        self._listener: asyncio.AbstractServer | None = None
        self.front: Front | None = None
        self.upgrades: Upgrades | None = None
        self._admin_runner: web.AppRunner | None = None
        self._pool = Pool()
        self._warmups: set[asyncio.Task[None]] = set()
        self.forwarder: Forwarder | None = None
        self.host, self.port = config.listen
        self.admin_port: int | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._log_flusher: asyncio.Task[None] | None = None
        self.ca: CertificateAuthority | None = None
        # listen_tls: auto, fixed for the listener's life (a reload cannot change listen_tls)
        self.listener_certificate: ListenerCertificate | None = None
        self._auto_tls = config.listen_tls == "auto"
        self.forward = self._forward_proxy(config)
        self._tls_renewer: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.config.listen_tls else 'http'}://{host}:{self.port}"

    def _listener_tls(self) -> ssl.SSLContext | None:
        if self.listener_certificate is not None:
            return self.listener_certificate.context
        return self.config.listen_tls.context if isinstance(self.config.listen_tls, ListenTls) else None

    async def _renew_listener_certificate(self) -> None:
        """Keep the ``listen_tls: auto`` leaf fresh while the proxy runs (it lives hours; the proxy, weeks)."""
        assert self.listener_certificate is not None
        while True:
            await asyncio.sleep(self.listener_certificate.renew_in())
            self.listener_certificate.renew()
            log.info("listen_tls: auto: certificate for the listener renewed")

    def _dispatch(self, request: Request) -> Coroutine[Any, Any, None]:
        """The current forwarder's handler coroutine (a reload replaces the forwarder), without a frame of its own."""
        assert self.forwarder is not None
        return self.forwarder.handle(request)

    def _connect(self, request: Request) -> Terminate | Tunnel:
        assert self.forwarder is not None
        return self.forwarder.connect(request)

    def _forward_proxy(self, config: Config) -> ForwardProxy:
        """The forward rules, with the local CA opened (created, or issued again) for their suffixes.

        With ``listen_tls: auto`` the CA also permits the loopback names, and a CA issued
        again signs a new listener certificate at once (clients trust the new ``ca.pem``).
        """
        forward, loopback = config.forward, self._auto_tls
        if not (forward.hosts or loopback):
            return ForwardProxy(forward, None)
        # Imported here: cryptography adds 10 MiB to every worker's resident memory, used or not.
        from .ca import CAError, CertificateAuthority, scope

        if (self.ca is None or self.ca.suffixes != scope(forward.suffixes, loopback) or
                self.ca.directory != CertificateAuthority.path(forward.ca)):  # fmt: skip
            try:
                self.ca = CertificateAuthority.open(forward.ca, forward.suffixes, loopback=loopback)
                if loopback:
                    if self.listener_certificate is None:
                        self.listener_certificate = self.ca.listener()
                    else:
                        self.listener_certificate.renew(self.ca)
            except CAError as error:
                raise ConfigError(f"forward.ca: {error}") from None
        return ForwardProxy(forward, self.ca if forward.hosts else None)

    async def start(self) -> None:
        self.forwarder = Forwarder(self.config, self.providers, self._pool, self.metrics, self.forward)
        self.upgrades = Upgrades(lambda: self.forwarder, self.config.header_timeout)  # type: ignore[arg-type,return-value]
        self.front = Front(
            self._dispatch,
            max_body=self.config.largest_body,
            header_timeout=self.config.header_timeout,
            upgrade=self.upgrades.protocol,
            connect=self._connect,
        )
        loop = asyncio.get_running_loop()
        tls = self._listener_tls()
        if self._sock is not None:
            self._listener = await loop.create_server(self.front, sock=self._sock, backlog=LISTEN_BACKLOG, ssl=tls)
        else:
            self._listener = await loop.create_server(
                self.front, self.host, self.port, reuse_address=True, backlog=LISTEN_BACKLOG, ssl=tls
            )
        self.port = self._listener.sockets[0].getsockname()[1]
        self.metrics.watch(lambda: self.providers)
        self._sampler = asyncio.create_task(self._every_second())
        self._log_flusher = asyncio.create_task(flush_periodically())
        if self.listener_certificate is not None:
            self._tls_renewer = asyncio.create_task(self._renew_listener_certificate())
        if self.config.admin_listen is not None and self.worker == 0:
            await self._start_admin(*self.config.admin_listen)
        if not is_loopback(self.host) and not self.config.inbound_token:
            log.warning(
                "listening on %s, which is not loopback, without inbound_token: anyone who reaches this port "
                "signs requests with this proxy's AWS identity",
                self.host,
            )
        if self.worker == 0 and any_origin(self.config):
            log.warning(
                "cors.allow_origins has *: any web page open in a browser on this machine can call your APIs "
                "through this proxy, with its AWS identity, and read the answers; list your app's origins instead"
            )
        self._warm_all()
        tune_gc()
        tune_malloc()

    async def _start_admin(self, host: str, port: int) -> None:
        self._admin_runner = web.AppRunner(
            admin_app(lambda: (self.config, self.providers), self.metrics), access_log=None, shutdown_timeout=1.0
        )
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, host, port, reuse_address=True)
        await site.start()
        self.admin_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # for port 0

    async def _every_second(self) -> None:
        """Publish the open connection count (summed over workers by prometheus-client); collect garbage.

        With the collector tuned off the request path (``tune_gc``), reference cycles
        that outlive a young-generation pass (aiohttp's WebSocket objects make about
        120 per connection) waited for a full collection that almost never came:
        resident memory crept up by 2 KiB per WebSocket session. A full collection
        every ``FULL_GC_EVERY`` seconds bounds that for a few milliseconds' work.
        """
        seconds = 0
        while True:
            count = len(self.front.connections) + len(self.front.tunnels) // 2 if self.front is not None else 0
            count += len(self.upgrades.server.connections) if self.upgrades is not None else 0
            self.metrics.open_connections.set(count)
            await asyncio.sleep(1.0)
            seconds += 1
            if seconds % FULL_GC_EVERY == 0:
                gc.collect()

    def _warm_all(self) -> None:
        names = {r.credentials for r in self.config.routes if r.auth != "none"}
        names |= {rule.route_keys.get("credentials", "default") for rule in self.config.forward.hosts
                  if rule.route_keys.get("auth") != "none"}  # fmt: skip
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
        if (config.listen, config.admin_listen, config.listen_tls) != (
            self.config.listen,
            self.config.admin_listen,
            self.config.listen_tls,
        ):
            log.warning("reload: listen, listen_tls and admin_listen changes take effect only after a restart")
        forward = self._forward_proxy(config)  # raises ConfigError before anything changes
        fresh = build_providers(config)
        for name in fresh:
            if name in self.providers and source_chain(self.config, name) == source_chain(config, name):
                fresh[name] = self.providers[name]
        self.config, self.providers = config, fresh
        if self.front is not None:
            self.front.max_body, self.front.header_timeout = config.largest_body, config.header_timeout
        previous = self.forwarder
        self.forward = forward
        self.forwarder = Forwarder(config, fresh, self._pool, self.metrics, forward)
        if previous is not None:
            self.forwarder.clock_offset = previous.clock_offset
        self._warm_all()
        log.info("configuration reloaded: %d route(s)", len(config.routes))

    async def close(self) -> None:
        """Stop accepting, give running requests ``shutdown_grace`` to finish, then close."""
        for task in [*self._warmups, self._sampler, self._log_flusher, self._tls_renewer]:
            if task is not None:
                task.cancel()
        if self._listener is not None:
            self._listener.close()  # stop accepting; connections already open are handled below
            self._listener = None
            grace = self.config.shutdown_grace
            assert self.front is not None and self.upgrades is not None
            await asyncio.gather(self.front.stop(grace), self.upgrades.close(grace))
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        self._pool.close()
        self.metrics.flush()


# glibc's mallopt parameters (malloc.h): bytes of free heap top kept instead of returned to the
# system, and the size from which an allocation gets its own mapping.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREE_HEAP = 16 << 20
OWN_MAPPING_FROM = 4 << 20


def tune_malloc() -> None:
    """Keep freed body buffers in the heap for the next request instead of unmapping them.

    A 1 MiB upload arrives as chunks of up to 256 KiB. glibc gave each its own
    mapping, or grew and trimmed the heap around every request: two ``brk``
    calls and 256 fresh zeroed pages per MiB, the kernel's work. Kept, that
    memory is reused. 1 MiB POSTs: kernel time per request 0.8 ms to 0.4 ms,
    25-30 % more requests a second, resident memory flat over 30,000 uploads.
    Nothing happens where the C library has no ``mallopt`` (musl, macOS).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_TRIM_THRESHOLD, KEEP_FREE_HEAP)
    mallopt(M_MMAP_THRESHOLD, OWN_MAPPING_FROM)


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
