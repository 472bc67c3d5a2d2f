"""How upstream connections leave this machine: directly or through a forward proxy, and with which TLS.

Inside companies and locked-down clusters the way out is a forward proxy named
by ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``, and the upstream's
certificate may be signed by a private CA. ``Egress`` holds one set of these
settings (a route's) and opens connections with them, the way curl and
botocore do:

* HTTPS goes through the proxy in a ``CONNECT`` tunnel (TLS runs end to end);
  plain HTTP is sent to the proxy in absolute form (``GET http://host/path``).
  ``Proxy-Authorization: Basic`` comes from the proxy URL's user info, whose
  password is never shown (``ProxyURL`` prints without it).
* ``NO_PROXY`` takes names (a suffix matches subdomains, a leading ``.`` or
  ``*.`` is the same), IP addresses, CIDR ranges, an optional ``:port``, and
  ``*`` for everything. Loopback upstreams go through the proxy too unless
  listed, as with curl.
* A proxy at this proxy's own listen address (``HTTPS_PROXY`` exported for
  other tools in the same shell) would send each request back to us: it is
  ignored, with one warning.

Failures are ``EgressError`` with a ``reason`` for the 502 body: the proxy
refused the tunnel (its status is in the message) or wanted credentials;
``tls`` names TLS failures the same way.

Nothing here knows about AWS; the caller decides which CA bundle and proxy apply.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

log = logging.getLogger("signing_proxy.egress")

MAX_PROXY_HEAD = 16 * 1024


class EgressError(OSError):
    """A connection could not be set up; ``reason`` names the cause for the error body."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])


# ---------------------------------------------------------------- proxy URLs and the environment


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """``http://[user:password@]host[:port]``; printed without the user info."""

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)  # "Basic ..." or None

    @classmethod
    def parse(cls, url: str) -> ProxyURL:
        """Parse a proxy URL; the ``ValueError`` says what was expected and never repeats the password."""
        text = url.strip()
        if "://" not in text:
            text = "http://" + text  # "proxy:3128", as curl and botocore accept it
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            port = 0
        shown = f"{parts.scheme}://{parts.hostname or ''}" + (f":{port}" if port else "")
        if parts.scheme != "http":
            raise ValueError(
                f"expected an http:// proxy URL, got {shown!r} (HTTPS and SOCKS proxies are not supported)"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment or "#" in text:
            # Not shown: what looks like a path may be the rest of a password with a '/', '?' or '#' in it.
            raise ValueError(
                "expected http://[user:password@]host[:port] with nothing after the port "
                "(percent-encode '/', '?', '#' and '@' in a user name or password)"
            )
        if not parts.hostname or port == 0:
            raise ValueError(f"expected http://[user:password@]host[:port], got {shown!r}")
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
        return cls(parts.hostname, port or 80, authorization)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _variable(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """``(NAME as set, value)`` of the lower-case or upper-case variable (lower case wins, as in curl)."""
    for candidate in (name.lower(), name.upper()):
        if environ.get(candidate, "").strip():
            return candidate, environ[candidate].strip()
    return None


@dataclass(frozen=True, slots=True)
class ProxyEnvironment:
    """``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY``, parsed once.

    ``ALL_PROXY`` is left alone, as botocore leaves it: the credential calls
    botocore makes and the requests made here go the same way.
    """

    https: ProxyURL | None = None
    http: ProxyURL | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> ProxyEnvironment:
        """From the environment; ``ValueError`` names a variable whose URL is unusable."""
        environ = os.environ if environ is None else environ
        urls = {}
        for scheme in ("https", "http"):
            found = _variable(environ, f"{scheme}_proxy")
            try:
                urls[scheme] = ProxyURL.parse(found[1]) if found else None
            except ValueError as error:
                raise ValueError(f"{found[0]}: {error}") from None  # type: ignore[index]
        listed = _variable(environ, "no_proxy")
        entries = tuple(e for e in (listed[1].replace(",", " ").lower().split() if listed else ()) if e)
        return cls(urls["https"], urls["http"], entries)

    def proxy_for(self, scheme: str, host: str, port: int) -> ProxyURL | None:
        """The proxy for ``scheme://host:port``, or None: direct (none set, or ``NO_PROXY`` lists it)."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or bypassed(self.no_proxy, host, port):
            return None
        return proxy


def bypassed(no_proxy: tuple[str, ...], host: str, port: int) -> bool:
    """True when a ``NO_PROXY`` entry covers ``host:port`` (names by suffix, IPs, CIDRs, ``*``)."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy:
        if entry == "*":
            return True
        pattern, wanted_port = _split_port(entry)
        if wanted_port is not None and wanted_port != port:
            continue
        if "/" in pattern:
            try:
                if address is not None and address in ipaddress.ip_network(pattern, strict=False):
                    return True
            except ValueError:
                pass
            continue
        pattern = pattern.removeprefix("*").lstrip(".").rstrip(".")
        if not pattern:
            continue
        if address is not None:
            try:
                if address == ipaddress.ip_address(pattern):
                    return True
            except ValueError:
                pass
            continue
        if host == pattern or host.endswith("." + pattern):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    """``("host", 8080)`` from ``host:8080`` or ``[::1]:8080``; a bare IPv6 address has no port."""
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
        return inside, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        if port.isdigit():
            return name, int(port)
    return entry, None


# ---------------------------------------------------------------- opening connections


@dataclass(frozen=True, slots=True)
class Opened:
    """A TCP connection on its way to an upstream, before TLS."""

    sock: socket.socket
    tls: ssl.SSLContext | None  # start TLS with this (server name: the upstream's) for https
    absolute_form: str = ""  # plain HTTP via a proxy: "http://host:port" goes before every target
    proxy_headers: tuple[tuple[str, str], ...] = ()  # sent with every request in absolute form


class Egress:
    """One way out: TLS settings plus a forward proxy (a fixed one, the environment's, or none).

    Equal settings should share one ``Egress``: the connection pool keeps
    connections apart by it, so routes with the same settings share connections.
    """

    def __init__(
        self,
        tls: ssl.SSLContext,
        proxy: ProxyURL | ProxyEnvironment | None,
        own_address: tuple[str, int] | None = None,
    ) -> None:
        self.tls = tls
        self.proxy = proxy
        self.own_address = own_address
        self._warned = False

    def proxy_for(self, scheme: str, host: str, port: int) -> ProxyURL | None:
        proxy = self.proxy.proxy_for(scheme, host, port) if isinstance(self.proxy, ProxyEnvironment) else self.proxy
        if proxy is not None and self._is_own(proxy):
            if not self._warned:
                self._warned = True
                log.warning(
                    "egress proxy %s is this proxy's own listen address (HTTPS_PROXY exported for other tools?): "
                    "ignored, connecting directly",
                    proxy,
                )
            return None
        return proxy

    def _is_own(self, proxy: ProxyURL) -> bool:
        if self.own_address is None:
            return False
        own_host, own_port = self.own_address
        if proxy.port != own_port:
            return False
        return proxy.host == own_host or (
            is_loopback(proxy.host) and (is_loopback(own_host) or own_host in ("0.0.0.0", "::"))
        )

    async def open(self, scheme: str, host: str, port: int, *, tunnel: bool = False) -> Opened:
        """A connected socket towards ``host:port`` (direct, or through the proxy); bound it with a timeout.

        ``tunnel`` asks for a ``CONNECT`` tunnel even for plain HTTP (a WebSocket
        upgrade cannot be sent in absolute form).
        """
        tls = self.tls if scheme == "https" else None
        proxy = self.proxy_for(scheme, host, port)
        if proxy is None:
            return Opened(await connect_tcp(host, port), tls)
        sock = await connect_tcp(proxy.host, proxy.port, what=f"egress proxy {proxy}")
        if scheme == "http" and not tunnel:
            authority = f"[{host}]" if ":" in host else host
            headers = (("Proxy-Authorization", proxy.authorization),) if proxy.authorization else ()
            return Opened(sock, None, f"http://{authority}:{port}", headers)
        try:
            await connect_tunnel(sock, proxy, host, port)
        except BaseException:
            sock.close()
            raise
        return Opened(sock, tls)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def connect_tcp(host: str, port: int, what: str = "") -> socket.socket:
    """A non-blocking TCP socket connected to ``host:port``; addresses tried in resolver order."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise OSError(error.errno, f"{what or host}: {error.strerror or error}") from None
    failure: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as error:
            sock.close()
            failure = OSError(error.errno, f"{what}: {error.strerror or error}") if what else error
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise failure


async def connect_tunnel(sock: socket.socket, proxy: ProxyURL, host: str, port: int) -> None:
    """Ask ``proxy`` (connected on ``sock``) for a tunnel to ``host:port``; raise ``EgressError`` if refused."""
    loop = asyncio.get_running_loop()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
    head = bytearray()
    while b"\r\n\r\n" not in head:
        data = await loop.sock_recv(sock, 4096)
        if not data:
            raise EgressError(
                f"egress proxy {proxy} closed the connection instead of answering CONNECT", "egress_proxy_error"
            )
        head += data
        if len(head) > MAX_PROXY_HEAD:
            raise EgressError(f"egress proxy {proxy} sent an oversized answer to CONNECT", "egress_proxy_error")
    end = head.index(b"\r\n\r\n")
    if len(head) > end + 4:
        # Bytes after the answer before we said anything: not a tunnel we can trust.
        raise EgressError(f"egress proxy {proxy} sent data after its answer to CONNECT", "egress_proxy_error")
    status_line = head[: head.find(b"\r\n")].decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise EgressError(f"egress proxy {proxy} did not answer CONNECT in HTTP", "egress_proxy_error")
    status = int(code)
    if status == 407:
        hint = "the credentials in its URL were refused" if proxy.authorization else "put user:password@ in its URL"
        raise EgressError(f"egress proxy {proxy} requires authentication (407): {hint}", "egress_proxy_auth_required")
    if not 200 <= status < 300:
        said = rest[4:].strip()[:80]
        raise EgressError(
            f"egress proxy {proxy} refused CONNECT to {authority}: {status}{f' {said}' if said else ''}",
            "egress_proxy_refused",
        )
