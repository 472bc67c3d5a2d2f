"""Real networks: an egress proxy (CONNECT and absolute form), private CAs, mutual TLS, all over loopback.

Every upstream still re-verifies the signature with awscrt: going through a
proxy or a tunnel must not change what was signed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import ConfigError, parse_config
from proxy.demo import free_port
from tests.conftest import TEST_KEY_ID, TEST_SECRET, StartProxy, static_route
from tests.support.connect_proxy import ConnectProxy
from tests.support.faults import start_proxy_process
from tests.support.sigv4_upstream import SigV4Upstream
from tests.support.tls import Pki, openssl_server

SECRETS = {TEST_KEY_ID: TEST_SECRET}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.make(tmp_path)


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


# ---------------------------------------------------------------- egress proxy


async def test_https_goes_through_the_environment_proxy_in_a_reused_tunnel(
    start_proxy: StartProxy, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ConnectProxy() as egress, SigV4Upstream(SECRETS, tls=pki.server()) as upstream:
        monkeypatch.setenv("HTTPS_PROXY", egress.url)
        server = await start_proxy(static_route(upstream.url, ca_bundle=str(pki.ca_file)))
        for _ in range(3):
            status, _ = await get(f"{server.url}/orders")
            assert status == 200
    assert egress.tunnels == [upstream.url.removeprefix("https://")]  # one tunnel, kept alive and reused
    assert len(upstream.received) == 3 and all(r.signature_ok for r in upstream.received)


async def test_proxy_basic_auth_from_the_url_and_the_password_is_never_logged(
    start_proxy: StartProxy, pki: Pki, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "s3cret-proxy-pässword"
    async with (
        ConnectProxy(username="dev", password=password) as egress,
        SigV4Upstream(SECRETS, tls=pki.server()) as upstream,
    ):
        monkeypatch.setenv("https_proxy", egress.url.replace(password, "s3cret-proxy-p%C3%A4ssword"))
        server = await start_proxy(static_route(upstream.url, ca_bundle=str(pki.ca_file)))
        status, _ = await get(f"{server.url}/orders")
        assert status == 200
        assert egress.authorizations[-1] is not None and egress.authorizations[-1].startswith("Basic ")
        assert not upstream.received[-1].header_values("Proxy-Authorization")  # only the proxy sees it

        wrong = egress.url.replace(password, "wrong-password")
        server = await start_proxy(static_route(upstream.url, ca_bundle=str(pki.ca_file), egress_proxy=wrong))
        status, body = await get(f"{server.url}/orders")
    assert status == 502 and body["reason"] == "egress_proxy_auth_required"
    assert "407" in body["message"] and "refused" in body["message"]
    assert "wrong-password" not in body["message"] and "wrong-password" not in caplog.text
    assert password not in caplog.text and "p%C3%A4ssword" not in caplog.text
    assert "wrong-password" not in repr(server.config)


async def test_a_refused_connect_is_a_502_with_the_proxy_status(
    start_proxy: StartProxy, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ConnectProxy(refuse_with=403) as egress, SigV4Upstream(SECRETS, tls=pki.server()) as upstream:
        monkeypatch.setenv("HTTPS_PROXY", egress.url)
        server = await start_proxy(static_route(upstream.url, ca_bundle=str(pki.ca_file)))
        status, body = await get(f"{server.url}/orders")
    assert status == 502 and body["reason"] == "egress_proxy_refused"
    assert "403 Blocked By Policy" in body["message"] and upstream.received == []


async def test_plain_http_goes_to_the_proxy_in_absolute_form(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ConnectProxy(username="u", password="p") as egress, SigV4Upstream(SECRETS) as upstream:
        monkeypatch.setenv("HTTP_PROXY", egress.url)
        server = await start_proxy(static_route(upstream.url + "/prod"))
        status, _ = await get(f"{server.url}/orders?id=7")
    assert status == 200
    assert egress.forwarded == [f"{upstream.url}/prod/orders?id=7"] and egress.tunnels == []
    received = upstream.received[-1]
    assert received.signature_ok and received.raw_path == "/prod/orders?id=7"
    assert not received.header_values("Proxy-Authorization")


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "127.0.0.0/8", "*", "localhost,.example.com, 127.0.0.1:{port}"])
async def test_no_proxy_entries_connect_directly(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch, no_proxy: str
) -> None:
    async with ConnectProxy() as egress, SigV4Upstream(SECRETS) as upstream:
        monkeypatch.setenv("HTTP_PROXY", egress.url)
        monkeypatch.setenv("no_proxy", no_proxy.format(port=upstream.url.rpartition(":")[2]))
        server = await start_proxy(static_route(upstream.url))
        status, _ = await get(f"{server.url}/orders")
    assert status == 200 and egress.forwarded == [] and egress.authorizations == []


async def test_a_route_egress_proxy_overrides_the_environment(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ConnectProxy() as env_proxy, ConnectProxy() as route_proxy, SigV4Upstream(SECRETS) as upstream:
        monkeypatch.setenv("HTTP_PROXY", env_proxy.url)
        config = static_route(upstream.url, egress_proxy=route_proxy.url)
        config["routes"].append({**config["routes"][0], "path_prefix": "/direct", "egress_proxy": "none"})
        server = await start_proxy(config)
        assert (await get(f"{server.url}/orders"))[0] == 200
        assert (await get(f"{server.url}/direct/x"))[0] == 200
    assert len(route_proxy.forwarded) == 1 and env_proxy.forwarded == []
    assert [r.raw_path for r in upstream.received] == ["/orders", "/x"]


async def test_a_proxy_at_our_own_listen_address_is_ignored_with_one_warning(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://localhost:{port}")
    async with SigV4Upstream(SECRETS) as upstream:
        server = await start_proxy({**static_route(upstream.url), "listen": f"127.0.0.1:{port}"})
        for _ in range(2):
            status, _ = await get(f"{server.url}/orders")
            assert status == 200
    assert len(upstream.received) == 2
    warnings = [r for r in caplog.records if "own listen address" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


async def test_a_websocket_upgrade_goes_through_a_connect_tunnel(
    start_proxy: StartProxy, ws_upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade cannot be sent in absolute form: even a ws:// upstream is reached through CONNECT."""
    async with ConnectProxy(username="u", password="p") as egress:
        monkeypatch.setenv("HTTP_PROXY", egress.url)
        server = await start_proxy(static_route(ws_upstream.url))
        async with aiohttp.ClientSession() as session, session.ws_connect(f"ws://127.0.0.1:{server.port}/chat") as ws:
            await ws.send_str("through the tunnel")
            assert (await ws.receive()).data == "through the tunnel"
    assert egress.tunnels == [ws_upstream.url.removeprefix("http://")] and egress.forwarded == []


def test_an_unusable_proxy_url_is_a_config_error_naming_where(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ConfigError,
        match=r"routes\.0\.egress_proxy: expected an http:// proxy URL, got 'socks5://proxy:1080' .*; or none",
    ):
        parse_config(static_route("http://127.0.0.1:1", egress_proxy="socks5://u:hidden@proxy:1080"))
    monkeypatch.setenv("HTTPS_PROXY", "socks5://u:hidden@proxy:1080")
    with pytest.raises(ConfigError, match=r"HTTPS_PROXY: expected an http:// proxy URL") as raised:
        parse_config(static_route("http://127.0.0.1:1"))
    assert "hidden" not in str(raised.value)


# ---------------------------------------------------------------- trust


async def test_a_private_ca_from_aws_ca_bundle(
    start_proxy: StartProxy, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SigV4Upstream(SECRETS, tls=pki.server()) as upstream:
        server = await start_proxy(static_route(upstream.url))
        status, body = await get(f"{server.url}/orders")
        assert status == 502 and body["reason"] == "upstream_certificate_unknown"
        assert "AWS_CA_BUNDLE" in body["message"]
        monkeypatch.setenv("AWS_CA_BUNDLE", str(pki.ca_file))
        server = await start_proxy(static_route(upstream.url))
        assert server.config.routes[0].trusted_cas == f"{pki.ca_file} from AWS_CA_BUNDLE"
        status, _ = await get(f"{server.url}/orders")
    assert status == 200 and upstream.received[-1].signature_ok


async def test_a_private_ca_from_the_profile_and_from_ssl_cert_file(
    start_proxy: StartProxy, pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shared = tmp_path / "aws-config"
    shared.write_text(f"[profile corp]\nca_bundle = {pki.ca_file}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(shared))
    monkeypatch.setenv("AWS_PROFILE", "corp")
    async with SigV4Upstream(SECRETS, tls=pki.server()) as upstream:
        server = await start_proxy(static_route(upstream.url))
        assert server.config.routes[0].trusted_cas == f"{pki.ca_file} from profile corp in {shared}"
        assert (await get(f"{server.url}/orders"))[0] == 200
        monkeypatch.delenv("AWS_PROFILE")
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
        server = await start_proxy(static_route(upstream.url))
        assert (await get(f"{server.url}/orders"))[0] == 200


@pytest.mark.parametrize(
    ("names", "expired", "reason"),
    [
        (("wrong.example",), False, "upstream_certificate_name_mismatch"),
        ((), True, "upstream_certificate_expired"),
    ],
)
async def test_certificate_failures_are_named(
    start_proxy: StartProxy, pki: Pki, names: tuple[str, ...], expired: bool, reason: str
) -> None:
    async with SigV4Upstream(SECRETS, tls=pki.server(*names, expired=expired)) as upstream:
        server = await start_proxy(static_route(upstream.url, ca_bundle=str(pki.ca_file)))
        status, body = await get(f"{server.url}/orders")
    assert status == 502 and body["reason"] == reason and upstream.received == []


async def test_mutual_tls_with_an_encrypted_key(
    start_proxy: StartProxy, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = pki.client(password=b"key-password")
    monkeypatch.setenv("CLIENT_KEY_PASSWORD", "key-password")
    tls = {"ca_bundle": str(pki.ca_file), "client_cert": str(cert), "client_key": str(key)}
    async with SigV4Upstream(SECRETS, tls=pki.server(client_certs=True)) as upstream:
        server = await start_proxy(static_route(upstream.url, **tls, client_key_password="${CLIENT_KEY_PASSWORD}"))
        status, _ = await get(f"{server.url}/orders")
    assert status == 200 and upstream.received[-1].signature_ok
    assert "key-password" not in repr(server.config)


@pytest.mark.parametrize("presented", ["none", "signed by another CA"])
async def test_a_refused_client_certificate_is_named(start_proxy: StartProxy, pki: Pki, presented: str) -> None:
    tls = {"ca_bundle": str(pki.ca_file)}
    if presented != "none":
        cert, key = pki.client(signed_by=pki.ca)  # a CA the server does not accept for clients
        tls |= {"client_cert": str(cert), "client_key": str(key)}
    async with openssl_server(pki) as url:
        server = await start_proxy(static_route(url, **tls))
        status, body = await get(f"{server.url}/orders")
    assert status == 502 and body["reason"] == "upstream_client_certificate_refused", body
    assert "client_cert" in body["message"]


async def test_the_command_line_proxy_on_its_own_loop_tunnels_and_names_tls_failures(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``signing-proxy run`` (on uvloop when installed): a pooled tunnel, then a refused client certificate."""
    async with (
        ConnectProxy() as egress,
        SigV4Upstream(SECRETS, tls=pki.server()) as upstream,
        openssl_server(pki) as refusing,
    ):
        monkeypatch.setenv("HTTPS_PROXY", egress.url)
        config = static_route(upstream.url, ca_bundle=str(pki.ca_file))
        config["routes"].append({**config["routes"][0], "path_prefix": "/mtls", "upstream": refusing})
        proxy = await start_proxy_process(config, tmp_path, free_port())
        try:
            assert [(await get(f"{proxy.url}/orders"))[0] for _ in range(2)] == [200, 200]
            status, body = await get(f"{proxy.url}/mtls/x")
        finally:
            await proxy.stop()
    assert len(egress.tunnels) == 2  # one for the API (reused), one for the refusing server
    assert status == 502 and body["reason"] == "upstream_client_certificate_refused"


def test_unusable_tls_files_are_config_errors_naming_the_key(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.client(password=b"right")
    with pytest.raises(ConfigError, match=r"routes\.0\.client_cert: cannot load") as raised:
        parse_config(static_route("https://h", client_cert=str(cert), client_key=str(key), client_key_password="wrong"))
    assert "wrong" not in str(raised.value).replace("a wrong client_key_password", "")
    with pytest.raises(ConfigError, match=r"routes\.0\.ca_bundle: cannot load CA certificates .*No such file"):
        parse_config(static_route("https://h", ca_bundle=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match=r"routes\.0: client_cert: expected a certificate file beside client_key"):
        parse_config(static_route("https://h", client_key=str(key)))


# ---------------------------------------------------------------- a local TLS listener


async def test_listen_tls_serves_https_to_curl_including_large_bodies_and_websockets(
    start_proxy: StartProxy, pki: Pki, ws_upstream: Any
) -> None:
    """curl (OpenSSL) and aiohttp check the certificate; a 2 MiB body is not spliced past TLS."""
    leaf = pki.ca.issue_cert("localhost", "127.0.0.1")
    cert, key = pki.directory / "localhost.pem", pki.directory / "localhost.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    big = bytes(range(256)) * (8 * 1024)  # 2 MiB, above the splice threshold

    async def large(request: Any, received: Any) -> Any:
        return web.Response(body=big)

    async with SigV4Upstream(SECRETS) as upstream:
        upstream.responder = large
        config = static_route(upstream.url)
        config["routes"].append({**config["routes"][0], "path_prefix": "/ws", "upstream": ws_upstream.url})
        server = await start_proxy({**config, "listen_tls": {"cert": str(cert), "key": str(key)}})
        assert server.url.startswith("https://127.0.0.1:")
        process = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--cacert", str(pki.ca_file), f"{server.url}/orders", stdout=asyncio.subprocess.PIPE
        )
        body, _ = await process.communicate()
        assert process.returncode == 0 and body == big
        assert upstream.received[-1].signature_ok
        client_tls = ssl.create_default_context(cafile=str(pki.ca_file))
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"wss://127.0.0.1:{server.port}/ws/chat", ssl=client_tls) as ws:
                await ws.send_str("hello over TLS")
                assert (await ws.receive()).data == "hello over TLS"
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(f"{server.url}/orders")  # the system CAs do not know this certificate


def test_tls_files_are_checked_at_load_and_may_start_with_a_tilde(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"listen_tls: cert: cannot load the certificate and key"):
        parse_config({**static_route("http://127.0.0.1:1"), "listen_tls": {"cert": str(tmp_path / "none.pem")}})
    monkeypatch.setenv("HOME", str(tmp_path))
    pki.ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "localhost.pem"))
    config = parse_config(
        {**static_route("https://h", ca_bundle="~/corp-ca.pem"), "listen_tls": {"cert": "~/localhost.pem"}}
    )
    assert config.listen_tls is not None and config.routes[0].egress is not None
