"""Credential faults: STS down at start-up and coming back; credentials expiring under a running stream."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from moto.server import ThreadedMotoServer
from moto.sts.models import sts_backends

from proxy.credentials import AwsCredentials, Provider, Refreshing
from proxy.demo import free_port
from tests.conftest import TEST_REGION, static_route
from tests.support.sigv4_upstream import Received, SigV4Upstream

ACCOUNT = "123456789012"  # moto's default account
ROLE = f"arn:aws:iam::{ACCOUNT}:role/robustness"


def moto_secret(access_key_id: str) -> str | None:
    """The secret of a key moto's STS issued (the upstream verifies signatures made with it)."""
    role = sts_backends[ACCOUNT]["aws"].get_assumed_role_from_access_key(access_key_id)
    return role.secret_access_key if role is not None else None


@pytest.fixture
def sts_port() -> Iterator[int]:
    """A loopback port with nothing on it yet; the test starts moto there when it wants STS back."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    yield free_port()


async def get(url: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as client, client.get(url) as r:
        return r.status, dict(r.headers), await r.read()


async def test_sts_down_at_start_gives_503_then_recovers_without_restart(sts_port: int, start_proxy) -> None:
    async with SigV4Upstream(moto_secret, region=TEST_REGION) as upstream:
        config = static_route(upstream.url, credentials="role")
        config["credentials"]["role"] = {
            "type": "assume_role",
            "role_arn": ROLE,
            "source": "test",
            "region": "us-east-1",
            "endpoint_url": f"http://127.0.0.1:{sts_port}",
        }
        config["routes"].append({**config["routes"][0], "path_prefix": "/static", "credentials": "test"})
        proxy = await start_proxy({**config, "admin_listen": "127.0.0.1:0"})
        admin = f"http://127.0.0.1:{proxy.admin_port}"

        status, headers, body = await get(proxy.url + "/orders")
        assert status == 503, body
        assert headers["Content-Type"].startswith("application/json") and headers.get("Retry-After")
        problem = json.loads(body)
        assert problem["reason"] == "endpoint_unreachable"
        assert "cannot reach" in problem["message"] and str(sts_port) in problem["message"]
        assert (await get(admin + "/readyz"))[0] == 503
        assert upstream.received == []  # nothing unsigned ever went upstream
        # the other route, with its own credentials, is unaffected (its upstream refuses them: 403, not 503)
        assert (await get(proxy.url + "/static/x"))[0] == 403

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=sts_port, verbose=False)
        moto.start()
        try:
            deadline = time.monotonic() + 20
            while (status := (await get(proxy.url + "/orders"))[0]) == 503 and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
            assert status == 200, "the route did not recover after STS came back"
            got = upstream.received[-1]
            assert got.signature_ok, got.signature_error
            assert got.access_key_id is not None and moto_secret(got.access_key_id) is not None
            assert (await get(admin + "/readyz"))[0] == 200
        finally:
            moto.stop()


class ShortLived:
    """A test credential source: a new key on every fetch, valid for ``lifetime`` seconds."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self.issued: dict[str, tuple[str, float]] = {}  # key id -> (secret, expires at)
        self._serial = itertools.count(1)

    async def fetch(self) -> AwsCredentials:
        n = next(self._serial)
        key, secret = f"AKIDSHORTLIVED{n:06d}", f"short/lived/secret/{n}"
        expires_at = time.time() + self.lifetime
        self.issued[key] = (secret, expires_at)
        return AwsCredentials(key, secret, f"token-{n}", expires_at, "short-lived test source")

    def secret(self, key: str) -> str | None:
        """What the upstream uses to verify: unknown and expired keys are refused."""
        secret, expires_at = self.issued.get(key, (None, 0.0))
        return secret if time.time() < expires_at else None


async def test_credentials_expiring_during_a_stream(start_proxy) -> None:
    """A 3 s stream signed with 2 s credentials runs to its end; requests made meanwhile use fresh keys."""
    source = ShortLived(lifetime=2.0)
    chunks = 30

    async def stream(request: web.Request, received: Received) -> web.StreamResponse:
        if not received.signature_ok:
            return web.json_response({"message": received.signature_error}, status=403)
        if request.path != "/stream":
            return web.Response(text=received.access_key_id or "")
        response = web.StreamResponse()
        await response.prepare(request)
        for n in range(chunks):
            await response.write(f"{n:04d}\n".encode())
            await asyncio.sleep(0.1)
        await response.write_eof()
        return response

    async with SigV4Upstream(source.secret, region=TEST_REGION) as upstream:
        upstream.responder = stream
        proxy = await start_proxy(static_route(upstream.url))
        proxy.providers["test"] = Provider("test", "static", Refreshing(source.fetch, name="test"))
        started = time.monotonic()
        keys: list[str] = []
        async with aiohttp.ClientSession() as client, client.get(proxy.url + "/stream") as streamed:
            assert streamed.status == 200
            stream_key = upstream.received[0].access_key_id
            while time.monotonic() - started < 2.5:
                async with client.get(proxy.url + "/other") as r:
                    assert r.status == 200, await r.text()
                    keys.append(await r.text())
                await asyncio.sleep(0.2)
            body = await streamed.read()
        assert body == b"".join(f"{n:04d}\n".encode() for n in range(chunks))
        assert time.monotonic() - started > source.lifetime, "the stream must outlive its credentials"
        assert stream_key is not None and source.issued[stream_key][1] < time.time()
        assert len(set(keys)) >= 2 and keys[-1] != stream_key, keys
        assert all(r.signature_ok for r in upstream.received), [r.signature_error for r in upstream.received]
