"""SigV4a through the proxy, checked without awscrt: the ECDSA key is derived here as the SigV4a rules say.

The upstream rebuilds the canonical request from what arrived, derives the
P-256 key from the secret (HMAC-SHA256 KDF in counter mode over "AWS4A" +
secret, label ``AWS4-ECDSA-P256-SHA256``, the access key id and a counter),
and verifies the DER signature with ``cryptography``. awscrt, which signed,
takes no part in the check.
"""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import TEST_KEY_ID, TEST_SECRET, static_route

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def derive_private_key(access_key_id: str, secret: str) -> ec.EllipticCurvePrivateKey:
    """The SigV4a key: NIST SP 800-108 KDF (HMAC-SHA256, counter mode), first candidate below n-1, plus one."""
    for counter in range(1, 255):
        fixed = (
            (1).to_bytes(4, "big")
            + b"AWS4-ECDSA-P256-SHA256"
            + b"\x00"
            + access_key_id.encode()
            + bytes([counter])
            + (256).to_bytes(4, "big")
        )
        candidate = int.from_bytes(hmac.new(("AWS4A" + secret).encode(), fixed, hashlib.sha256).digest(), "big")
        if candidate <= P256_ORDER - 2:
            return ec.derive_private_key(candidate + 1, ec.SECP256R1())
    raise AssertionError("no key within 254 counters")


def canonical_request(request: web.Request, signed: list[str], s3: bool) -> str:
    path, _, query = request.raw_path.partition("?")
    if not s3:
        path = path.replace("%", "%25")
    pairs = sorted(part.partition("=")[::2] for part in query.split("&") if part)
    lines = "".join(
        f"{name}:{','.join(' '.join(v.split()) for v in request.headers.getall(name))}\n" for name in signed
    )
    payload = request.headers["x-amz-content-sha256"]
    return "\n".join((request.method, path, "&".join(f"{k}={v}" for k, v in pairs), lines, ";".join(signed), payload))


def verifier(s3: bool, seen: list[dict[str, str]]) -> web.Application:
    public = derive_private_key(TEST_KEY_ID, TEST_SECRET).public_key()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        authorization = request.headers.get("Authorization", "")
        algorithm, _, rest = authorization.partition(" ")
        fields = dict(part.strip().split("=", 1) for part in rest.split(","))
        signed = fields["SignedHeaders"].split(";")
        key_id, scope = fields["Credential"].split("/", 1)
        canonical = canonical_request(request, signed, s3)
        to_sign = "\n".join(
            (algorithm, request.headers["x-amz-date"], scope, hashlib.sha256(canonical.encode()).hexdigest())
        )
        try:
            public.verify(bytes.fromhex(fields["Signature"]), to_sign.encode(), ec.ECDSA(hashes.SHA256()))
            ok = key_id == TEST_KEY_ID and algorithm == "AWS4-ECDSA-P256-SHA256"
        except InvalidSignature:
            ok = False
        payload = request.headers["x-amz-content-sha256"]
        ok = ok and payload in ("UNSIGNED-PAYLOAD", hashlib.sha256(body).hexdigest())
        seen.append({"scope": scope, "region_set": request.headers.get("x-amz-region-set", ""),
                     "signed": fields["SignedHeaders"], "path": request.raw_path, "body": body.decode()})  # fmt: skip
        return web.json_response({"ok": ok}, status=200 if ok else 403)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.mark.parametrize(
    ("service", "payload", "region_set"),
    [("s3", "unsigned", "*"), ("s3", "signed", "us-east-1,eu-west-1"), ("execute-api", "signed", "*")],
)
async def test_sigv4a_signatures_verify_with_an_independently_derived_key(service, payload, region_set,
                                                                           start_proxy) -> None:  # fmt: skip
    seen: list[dict[str, str]] = []
    runner = web.AppRunner(verifier(service == "s3", seen), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        config = static_route(url, service=service, signing="sigv4a", region_set=region_set, payload=payload)
        del config["routes"][0]["region"]
        proxy = await start_proxy(config)
        async with aiohttp.ClientSession() as client:
            for path in ("/bucket/a//b/c%20d", "/x?b=2&a=1"):
                async with client.put(proxy.url + path, data=b"hello", headers={"x-amz-meta-k": "v"}) as answer:
                    assert answer.status == 200, await answer.text()
    finally:
        await runner.cleanup()
    assert seen[0]["scope"].endswith(f"/{service}/aws4_request") and seen[0]["region_set"] == region_set
    assert "x-amz-region-set" in seen[0]["signed"] and seen[0]["body"] == "hello"
    if service == "s3":
        assert seen[0]["path"] == "/bucket/a//b/c%20d" and "x-amz-meta-k" in seen[0]["signed"]


def test_sigv4a_without_awscrt_is_a_clear_config_error(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "routes:\n  - upstream: https://mfzwi23gnjvgw.mrap.accesspoint.s3-global.amazonaws.com\n    signing: sigv4a\n"
    )
    hide = "import sys; sys.modules['awscrt'] = None; from proxy.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", hide, "check", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "routes.0" in done.stderr and "pip install 'signing-proxy[sigv4a]'" in done.stderr


def test_a_multi_region_host_needs_sigv4a(tmp_path) -> None:
    from proxy.config import ConfigError, parse_config

    mrap = "https://mfzwi23gnjvgw.mrap.accesspoint.s3-global.amazonaws.com"
    with pytest.raises(ConfigError, match="set signing: sigv4a"):
        parse_config({"routes": [{"upstream": mrap}]})
    route = parse_config({"routes": [{"upstream": mrap, "signing": "sigv4a"}]}).routes[0]
    assert route.service == "s3" and route.payload_mode == "unsigned"


async def test_a_refused_sigv4a_signature_is_logged_and_counted(start_proxy, caplog) -> None:
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        message = "The request signature we calculated does not match the signature you provided."
        return web.json_response({"message": message}, status=403)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        config = static_route(url, service="s3", signing="sigv4a")
        del config["routes"][0]["region"]
        proxy = await start_proxy({**config, "admin_listen": "127.0.0.1:0"})
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy.url + "/b/k") as answer:
                assert answer.status == 403
            async with client.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as metrics:
                assert 'signing_proxy_signature_mismatches_total{route="/"} 1.0' in await metrics.text()
    finally:
        await runner.cleanup()
    assert any("SigV4a signature refused: The request signature" in r.getMessage() for r in caplog.records)
