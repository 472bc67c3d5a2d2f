"""Forward-proxy mode with real clients: ``HTTPS_PROXY`` at the proxy, the API's real URL, our CA trusted.

The API host (``abc123.execute-api.eu-west-1.amazonaws.com``) is never resolved:
clients send ``CONNECT`` to the proxy, and the forward rule's ``connect_to``
dials the awscrt-checking upstream on loopback, while Host and the signature
stay those of the API host. TLS on the client side is checked by the clients
themselves (curl's OpenSSL, Python's ssl, Node's); name constraints by
``openssl verify``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.client import connect as ws_connect

from proxy.ca import CertificateAuthority
from proxy.config import parse_config
from proxy.forward import ForwardProxy
from proxy.server import ProxyServer
from tests.conftest import TEST_KEY_ID, TEST_REGION, TEST_SECRET, TEST_SESSION_TOKEN, static_route
from tests.signing.test_s3 import HOSTS as S3_HOSTS
from tests.support.faults import first_response, settle, start_proxy_process
from tests.support.sigv4_upstream import SigV4Upstream

API = "abc123.execute-api.eu-west-1.amazonaws.com"
PATTERN = "*.execute-api.*.amazonaws.com"
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def forward_config(upstream_url: str, ca_dir: Path, **rule: Any) -> dict[str, Any]:
    """The test key's credentials, no route, one forward rule dialling ``upstream_url``."""
    config = static_route(upstream_url)
    del config["routes"]
    config["forward"] = {
        "hosts": [{"host": PATTERN, "credentials": "test", "connect_to": upstream_url, **rule}],
        "ca": str(ca_dir),
    }
    return config


@pytest.fixture
async def forward_proxy(sigv4_upstream: SigV4Upstream, start_proxy, tmp_path: Path) -> ProxyServer:
    return await start_proxy(forward_config(sigv4_upstream.url, tmp_path / "ca"))


def ca_file(proxy: ProxyServer) -> str:
    assert proxy.ca is not None
    return str(proxy.ca.cert_path)


def client_env(**extra: str) -> dict[str, str]:
    """The environment of a client process: no proxy settings of the machine's, only ``extra``."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.endswith("CA_BUNDLE")}
    return {**env, **extra}


async def curl(*args: str, env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Run curl; returns (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "15", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out, err


def echoed(body: bytes) -> dict[str, Any]:
    """The upstream's JSON echo of a request, with its headers as a dict (lower-case names)."""
    data = json.loads(body)
    data["header_map"] = {k.lower(): v for k, v in data["headers"]}
    return data


# ---------------------------------------------------------------- curl


@needs_curl
async def test_curl_get_through_https_proxy_is_signed_for_the_api_host(forward_proxy, sigv4_upstream) -> None:
    env = client_env(HTTPS_PROXY=forward_proxy.url)
    code, out, err = await curl("--cacert", ca_file(forward_proxy), f"https://{API}/prod/pets?type=dog", env=env)
    assert code == 0, err
    seen = sigv4_upstream.received[-1]
    assert seen.signature_ok, seen.signature_error
    assert seen.method == "GET" and seen.raw_path == "/prod/pets?type=dog"
    assert seen.header_values("host") == [API]
    assert echoed(out)["raw_path"] == "/prod/pets?type=dog"


@needs_curl
async def test_curl_post_with_a_body_and_keep_alive_inside_the_tunnel(forward_proxy, sigv4_upstream) -> None:
    env = client_env(HTTPS_PROXY=forward_proxy.url)
    body = json.dumps({"name": "rex", "blob": "x" * 50_000})
    code, _out, err = await curl(
        "--cacert", ca_file(forward_proxy), "-H", "Content-Type: application/json", "--data-binary", body,
        f"https://{API}/prod/pets", "--next", "--cacert", ca_file(forward_proxy), f"https://{API}/prod/second",
        env=env,
    )  # fmt: skip
    assert code == 0, err
    first, second = sigv4_upstream.received[-2:]
    assert first.signature_ok and second.signature_ok, (first.signature_error, second.signature_error)
    assert first.method == "POST" and first.body == body.encode()
    assert second.raw_path == "/prod/second"
    assert b"Re-using existing connection" in (await curl(
        "-v", "--cacert", ca_file(forward_proxy), f"https://{API}/a", "--next", "--cacert", ca_file(forward_proxy),
        f"https://{API}/b", env=env,
    ))[2]  # fmt: skip


@needs_curl
async def test_curl_streams_a_large_download_through_the_tls_tunnel(forward_proxy, sigv4_upstream, tmp_path) -> None:
    """3 MiB of known length: the splice path (plain TCP only) must not be taken for a TLS client."""
    payload = os.urandom(3 * 1024 * 1024)

    async def big(request: web.Request, received: Any) -> web.StreamResponse:
        return web.Response(body=payload, content_type="application/octet-stream")

    sigv4_upstream.responder = big
    target = tmp_path / "download"
    env = client_env(HTTPS_PROXY=forward_proxy.url)
    code, _, err = await curl("--cacert", ca_file(forward_proxy), "-o", str(target), f"https://{API}/prod/big", env=env)
    assert code == 0, err
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert sigv4_upstream.received[-1].signature_ok


@needs_curl
async def test_absolute_form_http_proxy_request_is_signed_and_sent_as_https(forward_proxy, sigv4_upstream) -> None:
    code, _out, err = await curl(
        f"http://{API}/prod/pets", env=client_env(http_proxy=forward_proxy.url)
    )  # curl ignores HTTP_PROXY
    assert code == 0, err
    seen = sigv4_upstream.received[-1]
    assert seen.signature_ok and seen.raw_path == "/prod/pets" and seen.header_values("host") == [API]


@needs_curl
async def test_origin_form_whose_host_a_rule_allows_is_signed_for_that_host(forward_proxy, sigv4_upstream) -> None:
    """``curl --connect-to``: the proxy as the host's address; no route, so Host picks the forward rule."""
    code, _out, err = await curl(
        "--connect-to", f"{API}:80:127.0.0.1:{forward_proxy.port}", f"http://{API}/prod/pets", env=client_env()
    )
    assert code == 0, err
    assert sigv4_upstream.received[-1].signature_ok and sigv4_upstream.received[-1].header_values("host") == [API]


@needs_curl
async def test_an_untrusted_client_fails_the_handshake_and_nothing_goes_upstream(forward_proxy, sigv4_upstream) -> None:
    code, _, err = await curl(f"https://{API}/prod/pets", env=client_env(HTTPS_PROXY=forward_proxy.url))
    assert code == 60, err  # curl: peer certificate cannot be authenticated with known CA certificates
    assert sigv4_upstream.received == []
    assert forward_proxy.front is not None
    ok, _, _ = await curl(
        "--cacert", ca_file(forward_proxy), f"https://{API}/x", env=client_env(HTTPS_PROXY=forward_proxy.url)
    )
    assert ok == 0


# ---------------------------------------------------------------- refused and tunnelled hosts


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        b"CONNECT abc123.execute-api.eu-west-1.amazonaws.com:8443 HTTP/1.1\r\nHost: x\r\n\r\n",  # port not named
        b"CONNECT a.b.execute-api.eu-west-1.amazonaws.com:443 HTTP/1.1\r\nHost: x\r\n\r\n",  # * is one label
        b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n",
    ],
    ids=["other-host", "other-port", "two-labels", "absolute-form"],
)
async def test_a_host_no_rule_allows_is_refused_with_403_naming_it(
    forward_proxy, sigv4_upstream, request_bytes
) -> None:
    response = await first_response(forward_proxy.port, request_bytes)
    assert response.status == 403
    body = json.loads(response.body)
    host = request_bytes.split(b" ")[1].decode().removeprefix("http://").partition("/")[0]
    assert body["reason"] == "host_not_allowed" and host.partition(":")[0] in body["message"]
    assert sigv4_upstream.received == []


async def test_requests_proxy_error_for_a_refused_host(forward_proxy) -> None:
    def call() -> Exception | None:
        try:
            requests.get("https://example.com/", proxies={"https": forward_proxy.url}, timeout=10)
        except requests.exceptions.ProxyError as error:
            return error
        return None

    error = await asyncio.to_thread(call)
    assert error is not None and "403" in str(error)


@pytest.fixture
def test_ca() -> trustme.CA:
    return trustme.CA()


@needs_curl
async def test_a_tunnel_host_is_passed_through_blind(sigv4_upstream, start_proxy, tmp_path, test_ca) -> None:
    """The client sees the tunnelled server's own certificate (trustme's CA), not one of ours: nothing is signed."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("localhost").configure_cert(server_context)
    tls_upstream = SigV4Upstream({TEST_KEY_ID: TEST_SECRET}, require_signature=False, tls=server_context)
    await tls_upstream.start()
    try:
        port = int(tls_upstream.url.rpartition(":")[2])
        config = forward_config(sigv4_upstream.url, tmp_path / "ca")
        config["forward"]["tunnel"] = [f"localhost:{port}"]
        proxy = await start_proxy(config)
        ca_pem = tmp_path / "trustme.pem"
        test_ca.cert_pem.write_to_path(str(ca_pem))
        code, _out, err = await curl(
            "--cacert", str(ca_pem), "--data-binary", "hello", f"https://localhost:{port}/blind",
            env=client_env(HTTPS_PROXY=proxy.url),
        )  # fmt: skip
        assert code == 0, err
        seen = tls_upstream.received[-1]
        assert seen.body == b"hello" and seen.header_values("authorization") == []
        assert sigv4_upstream.received == []
    finally:
        await tls_upstream.close()


async def test_a_tunnel_to_a_closed_port_is_502(sigv4_upstream, start_proxy, tmp_path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    config = forward_config(sigv4_upstream.url, tmp_path / "ca")
    config["forward"]["tunnel"] = [f"127.0.0.1:{port}"]
    proxy = await start_proxy(config)
    response = await first_response(proxy.port, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert response.status == 502 and json.loads(response.body)["reason"] == "upstream_unreachable"


# ---------------------------------------------------------------- Python requests, Node, WebSockets


async def test_python_requests_with_proxies_and_verify(forward_proxy, sigv4_upstream) -> None:
    def calls() -> list[int]:
        with requests.Session() as session:
            session.proxies = {"https": forward_proxy.url}
            trust = ca_file(forward_proxy)  # per request: REQUESTS_CA_BUNDLE would override session.verify
            first = session.get(f"https://{API}/prod/pets", params={"q": "a b"}, verify=trust, timeout=10)
            second = session.post(f"https://{API}/prod/pets", json={"name": "rex"}, verify=trust, timeout=10)
            return [first.status_code, second.status_code]

    assert await asyncio.to_thread(calls) == [200, 200]
    get, post = sigv4_upstream.received[-2:]
    assert get.signature_ok and post.signature_ok, (get.signature_error, post.signature_error)
    assert post.body == b'{"name": "rex"}'


NODE_CLIENT = r"""
const http = require('http'), tls = require('tls');
const [proxyPort, host] = process.argv.slice(1);
const req = http.request({host: '127.0.0.1', port: proxyPort, method: 'CONNECT', path: host + ':443'});
req.on('connect', (res, socket) => {
  if (res.statusCode !== 200) { console.log(JSON.stringify({connect: res.statusCode})); process.exit(1); }
  const secure = tls.connect({socket, servername: host}, () => {  // trusts NODE_EXTRA_CA_CERTS
    secure.write(`POST /prod/node HTTP/1.1\r\nHost: ${host}\r\nContent-Type: text/plain\r\n` +
                 `Content-Length: 5\r\nConnection: close\r\n\r\nhello`);
  });
  let answer = '';
  secure.on('data', (d) => { answer += d; });
  secure.on('end', () => {
    console.log(JSON.stringify({status: answer.split(' ')[1], authorized: secure.authorized}));
  });
  secure.on('error', (e) => { console.log(JSON.stringify({error: e.code || String(e)})); process.exit(1); });
});
req.end();
"""


@needs_node
async def test_node_through_connect_trusting_node_extra_ca_certs(forward_proxy, sigv4_upstream) -> None:
    process = await asyncio.create_subprocess_exec(
        "node", "-e", NODE_CLIENT, str(forward_proxy.port), API,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=client_env(NODE_EXTRA_CA_CERTS=ca_file(forward_proxy)),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert json.loads(out) == {"status": "200", "authorized": True}, (out, err)
    seen = sigv4_upstream.received[-1]
    assert seen.signature_ok and seen.body == b"hello" and seen.raw_path == "/prod/node"


async def test_websocket_through_the_tunnel_is_signed(ws_upstream, start_proxy, tmp_path) -> None:
    config = forward_config(ws_upstream.url, tmp_path / "ca")
    proxy = await start_proxy(config)
    context = ssl.create_default_context(cafile=ca_file(proxy))
    async with ws_connect(f"wss://{API}/prod/chat?room=1", proxy=proxy.url, ssl=context) as ws:
        await ws.send("hello through the tunnel")
        assert await asyncio.wait_for(ws.recv(), 10) == "hello through the tunnel"
    handshake = ws_upstream.connections[-1].handshake
    assert handshake.signature_ok, handshake.error
    assert handshake.header_values("host") == [API]


# ---------------------------------------------------------------- the CA


@needs_openssl
async def test_name_constraints_make_openssl_refuse_an_out_of_scope_leaf(tmp_path) -> None:
    """A leaf minted with the CA's own key for a name outside its suffixes fails ``openssl verify``."""
    ca = CertificateAuthority.open(tmp_path / "ca", ["amazonaws.com"])
    key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    for name, expected in ((API, 0), ("www.example.com", 2), ("amazonaws.com.evil.net", 2)):
        leaf = ca.leaf(name, leaf_key)
        assert leaf.signature == leaf.signature and leaf.issuer == ca.certificate.subject
        path = tmp_path / f"{name}.pem"
        path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        result = subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca.cert_path), str(path)], capture_output=True, text=True
        )
        assert result.returncode == expected, result.stdout + result.stderr
        if expected:
            assert "permitted subtree violation" in result.stdout + result.stderr
    # An IP address cannot be certified either: every address is an excluded subtree.
    constraints = ca.certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    assert {str(n.value) for n in constraints.excluded_subtrees or ()} == {"0.0.0.0/0", "::/0"}


async def test_ca_files_modes_and_reissue_when_suffixes_change(tmp_path) -> None:
    directory = tmp_path / "ca"
    first = CertificateAuthority.open(directory, ["amazonaws.com"])
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(first.key_path.stat().st_mode) == 0o600
    for trust_file in (first.cert_path, first.bundle_path):
        assert b"PRIVATE KEY" not in trust_file.read_bytes()
    assert first.bundle_path.read_bytes().endswith(first.cert_path.read_bytes())
    again = CertificateAuthority.open(directory, ["amazonaws.com"])
    assert again.certificate == first.certificate  # same suffixes: kept
    kept = CertificateAuthority.open(directory)  # none asked for (`signing-proxy ca`): kept
    assert kept.certificate == first.certificate
    wider = CertificateAuthority.open(directory, ["amazonaws.com", "on.aws"])
    assert wider.suffixes == ("amazonaws.com", "on.aws") and wider.certificate != first.certificate
    assert wider.certificate.public_key() != first.certificate.public_key()  # a new key too
    renewed = CertificateAuthority.open(directory, renew=True)
    assert renewed.certificate != wider.certificate and renewed.suffixes == wider.suffixes  # suffixes kept


async def test_a_key_file_others_may_read_is_refused(tmp_path) -> None:
    ca = CertificateAuthority.open(tmp_path / "ca", ["amazonaws.com"])
    ca.key_path.chmod(0o644)
    with pytest.raises(Exception, match="may be read by others"):
        CertificateAuthority.open(tmp_path / "ca", ["amazonaws.com"])


@needs_curl
async def test_no_private_key_material_is_logged(sigv4_upstream, start_proxy, tmp_path, caplog) -> None:
    caplog.set_level("DEBUG")
    proxy = await start_proxy({**forward_config(sigv4_upstream.url, tmp_path / "ca"), "log_level": "debug"})
    env = client_env(HTTPS_PROXY=proxy.url)
    assert (await curl("--cacert", ca_file(proxy), f"https://{API}/prod/pets", env=env))[0] == 0
    assert proxy.ca is not None
    key_body = b"".join(proxy.ca.key_path.read_bytes().splitlines()[1:-1]).decode()
    logged = caplog.text
    assert "PRIVATE KEY" not in logged and key_body[:40] not in logged
    assert TEST_SECRET not in logged and TEST_SESSION_TOKEN not in logged
    assert "local CA issued" in logged  # where it is, and what it may sign


# ---------------------------------------------------------------- connect_to, inbound token, CLI


async def test_connect_to_on_a_reverse_route_dials_elsewhere_and_signs_for_the_api(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(f"https://{API}/prod", connect_to=sigv4_upstream.url))
    response = await first_response(proxy.port, b"GET /pets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert response.status == 200
    seen = sigv4_upstream.received[-1]
    assert seen.signature_ok and seen.raw_path == "/prod/pets" and seen.header_values("host") == [API]


async def test_connect_to_https_sends_the_api_host_as_tls_name(start_proxy, test_ca, tmp_path, monkeypatch) -> None:
    """A TLS upstream whose certificate names the API host only, dialled at 127.0.0.1: SNI and checks use the name."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert(API).configure_cert(server_context)
    names: list[str | None] = []
    server_context.sni_callback = lambda sock, name, context: names.append(name)  # type: ignore[assignment,misc,func-returns-value]
    upstream = SigV4Upstream({TEST_KEY_ID: TEST_SECRET}, region=TEST_REGION, tls=server_context)
    await upstream.start()
    try:
        ca_pem = tmp_path / "upstream-ca.pem"
        test_ca.cert_pem.write_to_path(str(ca_pem))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem))  # read when the proxy makes its client context
        proxy = await start_proxy(static_route(f"https://{API}/prod", connect_to=upstream.url))
        response = await first_response(proxy.port, b"GET /pets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert response.status == 200, response
        assert names == [API] and upstream.received[-1].signature_ok
    finally:
        await upstream.close()


@needs_curl
async def test_inbound_token_as_the_proxy_urls_password(sigv4_upstream, start_proxy, tmp_path) -> None:
    token = "a-long-inbound-token-0123456789"
    proxy = await start_proxy({**forward_config(sigv4_upstream.url, tmp_path / "ca"), "inbound_token": token})
    host_port = proxy.url.removeprefix("http://")
    without = await first_response(proxy.port, f"CONNECT {API}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert without.status == 407 and without.header_values("proxy-authenticate")
    env = client_env(HTTPS_PROXY=f"http://me:{token}@{host_port}")
    code, out, err = await curl("--cacert", ca_file(proxy), f"https://{API}/prod/pets", env=env)
    assert code == 0, err
    assert sigv4_upstream.received and sigv4_upstream.received[-1].signature_ok, out
    basic = base64.b64encode(f"me:{token}".encode()).decode()
    absolute = await first_response(
        proxy.port, f"GET http://{API}/p HTTP/1.1\r\nHost: {API}\r\nProxy-Authorization: Basic {basic}\r\n\r\n".encode()
    )
    assert absolute.status == 200


def signing_proxy(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line in a process of its own (it sets up logging for the whole process)."""
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60)


def test_cli_ca_env_and_check_list_forward_rules(tmp_path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(json.dumps(forward_config("http://127.0.0.1:9", tmp_path / "ca")))
    exports = signing_proxy("ca", "--config", str(config), "--env").stdout
    assert f"export NODE_EXTRA_CA_CERTS={tmp_path / 'ca' / 'ca.pem'}" in exports
    assert f"export REQUESTS_CA_BUNDLE={tmp_path / 'ca' / 'bundle.pem'}" in exports
    shown = signing_proxy("ca", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "keytool" in shown.stdout and "NODE_EXTRA_CA_CERTS" in shown.stdout
    assert "PRIVATE" not in shown.stdout + shown.stderr
    checked = signing_proxy("check", "--config", str(config)).stdout
    assert f"forward {PATTERN}:443" in checked and "credentials: test" in checked, checked
    assert "test (static): OK" in checked


def test_cli_run_forward_flag_builds_the_rules() -> None:
    from proxy.cli import load, parser

    config = load(parser().parse_args(["run", "--forward", PATTERN, "--forward", "x.lambda-url.us-east-1.on.aws"]))
    assert [rule.host for rule in config.forward.hosts] == [PATTERN, "x.lambda-url.us-east-1.on.aws"]
    assert config.forward.suffixes == ("amazonaws.com", "x.lambda-url.us-east-1.on.aws")


async def tls_through_connect(
    port: int, cafile: str, host: str = API
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client: CONNECT, read the 200, then TLS to ``host`` over the same connection (Python's ssl checks it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await writer.start_tls(ssl.create_default_context(cafile=cafile), server_hostname=host)
    return reader, writer


async def test_inside_a_tunnel_the_connect_host_wins_over_host(forward_proxy, sigv4_upstream) -> None:
    """The tunnel was allowed for one host: a different Host header inside it changes nothing."""
    reader, writer = await tls_through_connect(forward_proxy.port, ca_file(forward_proxy))
    writer.write(b"GET /prod/one HTTP/1.1\r\nHost: evil.example.com\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    seen = sigv4_upstream.received[-1]
    assert seen.signature_ok and seen.header_values("host") == [API]


async def test_tls_connections_are_let_go_when_clients_leave(forward_proxy) -> None:
    assert forward_proxy.front is not None
    for _ in range(3):
        _, writer = await tls_through_connect(forward_proxy.port, ca_file(forward_proxy))
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", forward_proxy.port)  # leaves mid-handshake
    writer.write(f"CONNECT {API}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert await settle(lambda: len(forward_proxy.front.connections), 0) == 0


@needs_curl
async def test_curl_through_the_proxy_process(sigv4_upstream, tmp_path) -> None:
    """The proxy as users run it (``python -m proxy run``, on uvloop where installed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = await start_proxy_process(forward_config(sigv4_upstream.url, tmp_path / "ca"), tmp_path, port)
    try:
        env = client_env(HTTPS_PROXY=running.url)
        cacert = str(tmp_path / "ca" / "ca.pem")
        code, _, err = await curl("--cacert", cacert, f"https://{API}/a", "--next", "--cacert", cacert,
                                  f"https://{API}/b", env=env)  # fmt: skip
        assert code == 0, err
        assert [r.signature_ok for r in sigv4_upstream.received] == [True, True]
    finally:
        assert await running.stop() == 0
    assert b"PRIVATE KEY" not in running.stderr


def loaded_cryptography(pid: int) -> bool:
    """Whether process ``pid`` has cryptography's compiled module mapped (it was imported)."""
    return "cryptography" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
async def test_cryptography_is_loaded_only_when_forward_mode_is_on(sigv4_upstream, tmp_path) -> None:
    """The local CA's library costs 10 MiB per worker: a proxy without forward rules never loads it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for config, expected in ((static_route(sigv4_upstream.url), False),
                             (forward_config(sigv4_upstream.url, tmp_path / "ca"), True)):  # fmt: skip
        running = await start_proxy_process(config, tmp_path, port)
        try:
            await first_response(port, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            assert loaded_cryptography(running.pid) is expected, config
        finally:
            assert await running.stop() == 0


async def test_connect_is_logged_and_counted_refused_or_not(forward_proxy, caplog) -> None:
    caplog.set_level("INFO", logger="signing_proxy.access")
    _, writer = await tls_through_connect(forward_proxy.port, ca_file(forward_proxy))
    writer.close()
    await first_response(forward_proxy.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    lines = [r.getMessage() for r in caplog.records if r.name == "signing_proxy.access"]
    assert any(line.startswith(f"forward CONNECT {API}:443 200") for line in lines), lines
    assert any(line.startswith("- CONNECT example.com:443 403") for line in lines), lines


async def test_reload_with_new_suffixes_issues_a_new_ca(sigv4_upstream, start_proxy, tmp_path) -> None:
    from proxy.config import parse_config

    config = forward_config(sigv4_upstream.url, tmp_path / "ca")
    proxy = await start_proxy(config)
    assert proxy.ca is not None and proxy.ca.suffixes == ("amazonaws.com",)
    before = proxy.ca.cert_path.read_bytes()
    config["forward"]["hosts"].append({"host": "*.lambda-url.*.on.aws", "credentials": "test"})
    proxy.reload(parse_config({"listen": "127.0.0.1:0", **config}))
    assert proxy.ca.suffixes == ("amazonaws.com", "on.aws")
    assert proxy.ca.cert_path.read_bytes() != before
    env = client_env(HTTPS_PROXY=proxy.url)
    code, _, err = await curl("--cacert", ca_file(proxy), f"https://{API}/after-reload", env=env)
    assert code == 0 and sigv4_upstream.received[-1].signature_ok, err


async def test_max_body_per_forward_rule_above_and_below_the_global_one(sigv4_upstream, start_proxy, tmp_path) -> None:
    config = forward_config(sigv4_upstream.url, tmp_path / "ca", max_body="2KiB")
    config["max_body"] = "1KiB"
    config["forward"]["hosts"].append({"host": "*.lambda-url.*.on.aws", "credentials": "test",
                                       "connect_to": sigv4_upstream.url, "max_body": "100B"})  # fmt: skip
    proxy = await start_proxy(config)

    def post(host: str, size: int, chunked: bool = False) -> bytes:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
        body = b"%x\r\n%b\r\n0\r\n\r\n" % (size, b"x" * size) if chunked else b"x" * size
        return f"POST http://{host}/p HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n\r\n".encode() + body

    lambda_host = "abc.lambda-url.eu-west-1.on.aws"
    assert (await first_response(proxy.port, post(API, 1500))).status == 200  # over 1 KiB, the rule allows 2
    for request in (post(API, 2049), post(API, 2049, chunked=True), post(lambda_host, 101, chunked=True)):
        refused = await first_response(proxy.port, request)
        assert refused.status == 413 and json.loads(refused.body)["reason"] == "body_too_large"
    assert len(sigv4_upstream.received) == 1


@needs_curl
async def test_the_recipe_eval_ca_env_then_https_proxy(forward_proxy, sigv4_upstream, tmp_path) -> None:
    """``eval "$(signing-proxy ca --env)"`` in a shell, then curl and requests trust what it exported."""
    config = tmp_path / "proxy.yaml"
    assert forward_proxy.ca is not None
    config.write_text(json.dumps(forward_config(sigv4_upstream.url, forward_proxy.ca.directory)))
    script = (
        f'eval "$({sys.executable} -m proxy ca --config {config} --env)" && '
        f"HTTPS_PROXY={forward_proxy.url} curl -sS --max-time 15 https://{API}/prod/recipe && "
        f"HTTPS_PROXY={forward_proxy.url} {sys.executable} -c "
        f"'import requests; print(requests.get(\"https://{API}/prod/requests\", timeout=10).status_code)'"
    )
    process = await asyncio.create_subprocess_exec(
        "sh", "-c", script, env=client_env(), cwd=str(Path(__file__).resolve().parents[1]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err
    assert out.strip().endswith(b"200")
    assert [r.raw_path for r in sigv4_upstream.received] == ["/prod/recipe", "/prod/requests"]
    assert all(r.signature_ok for r in sigv4_upstream.received)


async def test_the_leaf_names_the_host_and_lives_hours(forward_proxy) -> None:
    _, writer = await tls_through_connect(forward_proxy.port, ca_file(forward_proxy))
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    leaf = x509.load_der_x509_certificate(der)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [API]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= datetime.timedelta(hours=13)


async def test_stopping_the_proxy_closes_blind_tunnels(sigv4_upstream, tmp_path) -> None:
    from proxy.config import parse_config

    port = int(sigv4_upstream.url.rpartition(":")[2])
    config = forward_config(sigv4_upstream.url, tmp_path / "ca")
    config["forward"]["tunnel"] = [f"127.0.0.1:{port}"]
    proxy = ProxyServer(parse_config({"listen": "127.0.0.1:0", **config, "shutdown_grace": "1s"}))
    await proxy.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.write(b"GET /through HTTP/1.1\r\nHost: x\r\n\r\n")  # the upstream answers 403 (unsigned), keeps alive
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 403")
    assert proxy.front is not None and len(proxy.front.tunnels) == 2
    await asyncio.wait_for(proxy.close(), 10)
    await asyncio.wait_for(reader.read(), 5)  # the rest of the 403's body, then the end: the tunnel was closed
    assert proxy.front.tunnels == set()
    writer.close()


def test_an_unusable_ca_directory_is_a_config_error_exit_2(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = tmp_path / "proxy.yaml"
    config.write_text(json.dumps({**forward_config("http://127.0.0.1:9", blocker / "ca"), "workers": 1}))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--config", str(config), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "forward.ca: cannot use the CA directory" in result.stderr and "Traceback" not in result.stderr


async def test_many_pipelined_requests_right_after_the_handshake(forward_proxy, sigv4_upstream) -> None:
    """Over 64 KiB of requests may arrive with the end of the handshake: all are answered, in order."""
    reader, writer = await tls_through_connect(forward_proxy.port, ca_file(forward_proxy))
    padding = "p" * 2000
    writer.write(
        b"".join(f"GET /prod/{i} HTTP/1.1\r\nHost: {API}\r\nX-Pad: {padding}\r\n\r\n".encode() for i in range(60))
    )
    for i in range(60):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        assert echoed(await reader.readexactly(length))["raw_path"] == f"/prod/{i}"
    writer.close()
    assert all(r.signature_ok for r in sigv4_upstream.received) and len(sigv4_upstream.received) == 60


async def test_a_preflight_inside_a_tunnel_is_answered_by_the_cors_policy(
    sigv4_upstream, start_proxy, tmp_path
) -> None:
    """A browser whose proxy is signing-proxy: the preflight for the real API URL is answered, never signed."""
    origin = "http://localhost:3000"
    proxy = await start_proxy(
        {**forward_config(sigv4_upstream.url, tmp_path / "ca"), "cors": {"allow_origins": [origin]}}
    )
    reader, writer = await tls_through_connect(proxy.port, ca_file(proxy))
    writer.write(
        f"OPTIONS /prod/pets HTTP/1.1\r\nHost: {API}\r\nOrigin: {origin}\r\n"
        "Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n".encode()
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 204"), answer[:300]
    assert f"access-control-allow-origin: {origin}".encode() in answer.lower()
    assert sigv4_upstream.received == []


async def test_a_forward_rules_ca_bundle_and_connect_to_https(start_proxy, test_ca, tmp_path) -> None:
    """The rule's network keys apply to each host it matches: its ca_bundle verifies the upstream (SNI: the API)."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert(API).configure_cert(server_context)
    upstream = SigV4Upstream({TEST_KEY_ID: TEST_SECRET}, region=TEST_REGION, tls=server_context)
    await upstream.start()
    try:
        bundle = tmp_path / "upstream-ca.pem"
        test_ca.cert_pem.write_to_path(str(bundle))
        config = forward_config(upstream.url, tmp_path / "ca", ca_bundle=str(bundle))
        proxy = await start_proxy(config)
        response = await first_response(proxy.port, f"GET http://{API}/prod/x HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert response.status == 200, response
        assert upstream.received[-1].signature_ok
        without = await start_proxy(forward_config(upstream.url, tmp_path / "ca"))  # the system's CAs: refused
        refused = await first_response(
            without.port, f"GET http://{API}/prod/x HTTP/1.1\r\nHost: {API}\r\n\r\n".encode()
        )
        assert refused.status == 502 and len(upstream.received) == 1
    finally:
        await upstream.close()


S3_NAMES = [(host, scope) for host, scope in S3_HOSTS if scope is not None]


@pytest.mark.parametrize(("host", "scope"), S3_NAMES, ids=[host for host, _ in S3_NAMES])
def test_s3_hosts_get_the_service_and_region_a_route_gets(host: str, scope: tuple[str, str]) -> None:
    """Forward mode reads S3 host names with the reverse routes' table (Object Lambda, FIPS, ... alike)."""
    forward = parse_config({"forward": {"hosts": [{"host": host}]}}).forward
    allowed = ForwardProxy(forward, None).allowed(host, 443)
    assert allowed is not None and (allowed.route.service, allowed.route.resolved_region) == scope


def test_a_forward_rule_repr_hides_what_a_route_hides() -> None:
    """Route keys on a rule are pydantic extras, which repr would print: the secrets among them are left out."""
    config = parse_config(
        {
            "forward": {
                "hosts": [
                    {
                        "host": "*.execute-api.*.amazonaws.com",
                        "egress_proxy": "http://u:EGRESS-SECRET@127.0.0.1:3128",
                        "api_key": "API-KEY-SECRET",
                        "timeout": "5s",
                    }
                ]
            }
        }
    )
    shown = repr(config)
    assert "EGRESS-SECRET" not in shown and "API-KEY-SECRET" not in shown
    assert "timeout='5s'" in repr(config.forward.hosts[0])  # what is not secret still shows
