"""An upstream that cannot be reached: a 502 (or 504) that names it once and says why.

The message used to repeat the address (``127.0.0.1:9: cannot connect to
127.0.0.1:9: Connect call failed ('127.0.0.1', 9)``). Each failure here is real:
a closed port, TLS spoken to a plain-HTTP server, a certificate openssl made that
nobody trusts, a listener whose backlog is full.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.http.upstream import connect_failure
from tests.conftest import StartProxy, static_route
from tests.support.rawhttp import raw_request
from tests.support.sigv4_upstream import SigV4Upstream


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def error_answer(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as client, client.get(url) as response:
        return response.status, await response.json()


async def test_refused(start_proxy: StartProxy) -> None:
    port = closed_port()
    proxy = await start_proxy(static_route(f"http://127.0.0.1:{port}"))
    status, body = await error_answer(proxy.url + "/x")
    assert (status, body["reason"]) == (502, "upstream_unreachable")
    assert body["message"] == f"127.0.0.1:{port}: cannot connect (connection refused)"


async def test_tls_spoken_to_a_plain_http_server(sigv4_upstream: SigV4Upstream, start_proxy: StartProxy) -> None:
    address = sigv4_upstream.url.removeprefix("http://")
    proxy = await start_proxy(static_route(f"https://{address}"))
    status, body = await error_answer(proxy.url + "/x")
    assert (status, body["reason"]) == (502, "upstream_tls_error")
    assert body["message"].startswith(f"{address}: TLS failed: "), body["message"]
    assert body["message"].count(address.split(":")[1]) == 1
    assert sigv4_upstream.received == []


@pytest.fixture
def untrusted_tls(tmp_path: Path) -> ssl.SSLContext:
    """A TLS listener with a self-signed certificate made by openssl, which no trust store holds."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=127.0.0.1", "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


async def test_untrusted_certificate(untrusted_tls: ssl.SSLContext, start_proxy: StartProxy) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=untrusted_tls)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(static_route(f"https://127.0.0.1:{port}"))
        status, body = await error_answer(proxy.url + "/x")
    finally:
        server.close()
    assert (status, body["reason"]) == (502, "upstream_certificate_unknown")
    assert body["message"].startswith(f"127.0.0.1:{port}: TLS failed: "), body["message"]
    assert "self-signed certificate" in body["message"] and body["message"].count(str(port)) == 1


async def test_connect_timeout(full_backlog_port: int, start_proxy: StartProxy) -> None:
    route = static_route(f"http://127.0.0.1:{full_backlog_port}", connect_timeout="300ms")
    proxy = await start_proxy(route)
    status, body = await error_answer(proxy.url + "/x")
    assert (status, body["reason"]) == (504, "upstream_connect_timeout")
    assert body["message"] == (
        f"127.0.0.1:{full_backlog_port}: cannot connect within 0.3s; raise the route's connect_timeout"
    )


def test_dns_failure_is_named() -> None:
    """A real resolver error, made without asking any DNS server (a name where only a number is allowed)."""
    with pytest.raises(socket.gaierror) as failed:
        socket.getaddrinfo("upstream.example", 443, flags=socket.AI_NUMERICHOST)
    assert connect_failure(failed.value) == f"DNS lookup failed: {failed.value.strerror}"


def test_asyncio_multiple_address_refusal_is_one_reason() -> None:
    """asyncio joins one error per address tried ("Multiple exceptions: [Errno 111] ..."): one reason."""
    joined = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 9, 0, 0), "
        "[Errno 111] Connect call failed ('127.0.0.1', 9)"
    )
    assert connect_failure(joined) == "connection refused"


async def test_websocket_upgrade_to_a_closed_port(start_proxy: StartProxy) -> None:
    port = closed_port()
    proxy = await start_proxy(static_route(f"http://127.0.0.1:{port}"))
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    response = await raw_request(proxy.url, upgrade)
    body = json.loads(response.body)
    assert (response.status, body["reason"]) == (502, "upstream_unreachable")
    assert body["message"] == f"127.0.0.1:{port}: cannot connect (connection refused)"
