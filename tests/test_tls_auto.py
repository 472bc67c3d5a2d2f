"""``listen_tls: auto``: HTTPS on the listener with a certificate from the local CA, trusted by real clients.

curl (OpenSSL) and Python's ssl check the chain and the names themselves;
``openssl verify`` checks that letting the CA certify the loopback names did
not let it certify anything else. Every request still reaches the
awscrt-verifying upstream signed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy import ca as ca_module
from proxy.ca import LOOPBACK, CertificateAuthority
from proxy.config import Config, ConfigError, parse_config
from proxy.server import ProxyServer
from tests.conftest import TEST_KEY_ID, TEST_SECRET, StartProxy, static_route
from tests.support.sigv4_upstream import SigV4Upstream

SECRETS = {TEST_KEY_ID: TEST_SECRET}
needs_tools = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("openssl") is None, reason="curl and openssl are needed"
)


def auto_config(upstream_url: str, ca_dir: Path, *forward_hosts: str) -> dict[str, Any]:
    config = static_route(upstream_url)
    config["listen_tls"] = "auto"
    config["forward"] = {"ca": str(ca_dir), "hosts": [{"host": h, "credentials": "test"} for h in forward_hosts]}
    return config


async def run(*command: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


def peer_certificate(port: int, cafile: str, server_hostname: str) -> x509.Certificate:
    """The certificate the listener presents to a fresh, verifying handshake."""
    import socket

    context = ssl.create_default_context(cafile=cafile)
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@needs_tools
async def test_curl_trusts_the_listener_by_address_and_by_name_with_the_ca(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    async with SigV4Upstream(SECRETS) as upstream:
        server = await start_proxy(auto_config(upstream.url, tmp_path / "ca", "*.execute-api.*.amazonaws.com"))
        assert server.url.startswith("https://127.0.0.1:") and server.ca is not None
        cacert = str(server.ca.cert_path)
        for url in (f"https://127.0.0.1:{server.port}/orders", f"https://localhost:{server.port}/orders"):
            code, output = await run("curl", "-sS", "-f", "--cacert", cacert, url)
            assert code == 0, output
        assert len(upstream.received) == 2 and all(r.signature_ok for r in upstream.received)
        # Without the CA, curl refuses the certificate: it is the CA that vouches for it.
        code, output = await run("curl", "-sS", "--cacert", "/dev/null", f"https://127.0.0.1:{server.port}/orders")
        assert code != 0 and len(upstream.received) == 2


@needs_tools
async def test_ca_env_is_all_clients_need(tmp_path: Path) -> None:
    """``signing-proxy ca --env`` for the config, then curl, requests and Python's ssl with no other setting."""
    async with SigV4Upstream(SECRETS) as upstream:
        config_file = tmp_path / "config.yaml"
        config = {**auto_config(upstream.url, tmp_path / "ca"), "listen": "127.0.0.1:0"}
        config_file.write_text(yaml.safe_dump(config))
        code, exports = await run(sys.executable, "-m", "proxy", "ca", "--env", "--config", str(config_file))
        assert code == 0, exports
        code, shown = await run(sys.executable, "-m", "proxy", "ca", "--config", str(config_file))
        assert code == 0 and "127.0.0.0/8, ::1/128, localhost only" in shown and "listen_tls: auto" in shown
        env = dict(os.environ)
        for line in exports.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = shlex.split(value)[0]
        server = ProxyServer(parse(config))  # started after `ca --env`: it uses the CA the command made
        await server.start()
        try:
            url = f"https://localhost:{server.port}/orders"
            assert (await run("curl", "-sS", "-f", url, env=env))[0] == 0
            requests_check = f"import requests; assert requests.get({url!r}).status_code == 200"
            ssl_check = (
                "import urllib.request; "
                f"assert urllib.request.urlopen('https://127.0.0.1:{server.port}/orders').status == 200"
            )
            for check in (requests_check, ssl_check):
                code, output = await run(sys.executable, "-c", check, env=env)
                assert code == 0, output
            assert len(upstream.received) == 3 and all(r.signature_ok for r in upstream.received)
        finally:
            await server.close()


def parse(config: dict[str, Any]) -> Config:
    return parse_config(config)


def test_listen_tls_takes_auto_or_files_and_says_so_otherwise() -> None:
    assert parse(auto_config("http://127.0.0.1:1", Path("ca"))).listen_tls == "auto"
    with pytest.raises(ConfigError, match=r"^listen_tls: expected auto, or a mapping with cert \(and key\), got 'on'$"):
        parse({**static_route("http://127.0.0.1:1"), "listen_tls": "on"})


@needs_tools
async def test_the_loopback_permission_does_not_widen_the_ca(tmp_path: Path) -> None:
    """Leaves minted with the CA's own key: loopback names verify, anything else fails ``openssl verify``."""
    ca = CertificateAuthority.open(tmp_path / "ca", ["amazonaws.com"], loopback=True)
    assert ca.suffixes == ("127.0.0.0/8", "::1/128", "amazonaws.com", "localhost")
    constraints = ca.certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    assert constraints.excluded_subtrees is None  # addresses outside the permitted subtrees are refused anyway
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    cases = [
        (("localhost", "127.0.0.1", "::1"), True),
        (("s3.eu-west-1.amazonaws.com",), True),
        (("localhost", "127.1.2.3"), True),
        (("example.com",), False),
        (("localhost", "example.com"), False),
        (("10.0.0.1",), False),
        (("localhost", "192.168.1.1"), False),
        (("::2",), False),
        (("2001:db8::1",), False),
        (("localhost.evil.net",), False),
    ]
    for names, valid in cases:
        leaf = ca.leaf(names[0], leaf_key, also=names[1:])
        path = tmp_path / f"leaf-{len(list(tmp_path.iterdir()))}.pem"
        path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        result = subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca.cert_path), str(path)], capture_output=True, text=True
        )
        assert (result.returncode == 0) == valid, (names, result.stdout + result.stderr)
        if not valid:
            assert "subtree violation" in result.stdout + result.stderr

    # The listener's own leaf, as served: SAN localhost, 127.0.0.1 and ::1, hours of life.
    listener = ca.listener()
    path = tmp_path / "listener.pem"
    path.write_bytes(listener.certificate.public_bytes(serialization.Encoding.PEM))
    result = subprocess.run(["openssl", "verify", "-CAfile", str(ca.cert_path), str(path)], capture_output=True)
    assert result.returncode == 0, result
    san = listener.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    life = listener.certificate.not_valid_after_utc - listener.certificate.not_valid_before_utc
    assert life == ca_module.LEAF_LIFETIME + ca_module.BACKDATE


async def test_the_ca_is_issued_again_when_loopback_is_added_or_dropped(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    only_loopback = CertificateAuthority.open(directory, None, loopback=True)  # listen_tls: auto, no forward hosts
    assert only_loopback.suffixes == tuple(sorted(LOOPBACK))
    with_hosts = CertificateAuthority.open(directory, ["amazonaws.com"], loopback=True)
    assert with_hosts.suffixes == ("127.0.0.0/8", "::1/128", "amazonaws.com", "localhost")
    assert with_hosts.certificate.public_key() != only_loopback.certificate.public_key()
    assert CertificateAuthority.open(directory, ["amazonaws.com"], loopback=True).certificate == with_hosts.certificate
    without = CertificateAuthority.open(directory, ["amazonaws.com"])
    assert without.suffixes == ("amazonaws.com",)
    constraints = without.certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    assert {str(n.value) for n in constraints.excluded_subtrees or ()} == {"0.0.0.0/0", "::/0"}
    with pytest.raises(ca_module.CAError, match="does not permit the loopback names"):
        without.listener()


async def test_the_listener_certificate_is_renewed_while_the_proxy_runs(
    start_proxy: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renewal is due one second after minting here; new handshakes then see a new leaf, open ones keep theirs."""
    monkeypatch.setattr(ca_module, "LEAF_RENEW_BEFORE", ca_module.LEAF_LIFETIME.total_seconds() - 1)
    async with SigV4Upstream(SECRETS) as upstream:
        server = await start_proxy(auto_config(upstream.url, tmp_path / "ca"))
        assert server.listener_certificate is not None and server.ca is not None
        assert server.ca.suffixes == tuple(sorted(LOOPBACK))  # no forward hosts: the loopback names only
        cafile = str(server.ca.cert_path)
        first = await asyncio.to_thread(peer_certificate, server.port, cafile, "localhost")
        assert first == server.listener_certificate.certificate
        async with asyncio.timeout(15):
            while server.listener_certificate.certificate == first:
                await asyncio.sleep(0.1)  # polls the renewal the server's own timer makes
        second = await asyncio.to_thread(peer_certificate, server.port, cafile, "127.0.0.1")
        assert second.serial_number != first.serial_number
        assert second.not_valid_after_utc > first.not_valid_after_utc


async def test_a_reload_that_issues_the_ca_again_renews_the_listener_at_once(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    async with SigV4Upstream(SECRETS) as upstream:
        server = await start_proxy(auto_config(upstream.url, tmp_path / "ca"))
        assert server.listener_certificate is not None and server.ca is not None
        server.reload(parse({"listen": "127.0.0.1:0", **auto_config(upstream.url, tmp_path / "ca", "*.on.aws")}))
        assert "on.aws" in server.ca.suffixes
        served = await asyncio.to_thread(peer_certificate, server.port, str(server.ca.cert_path), "localhost")
        assert served.issuer == server.ca.certificate.subject
        assert served == server.listener_certificate.certificate
