"""A refused signature explained: each of the five causes, against the demo emulator (which says what it expected).

Between the proxy and the emulator sits, where a cause needs one, a relay that
changes the request the way a misbehaving intermediary would. The client gets
the emulator's answer unchanged; the proxy logs the cause and the diff and
counts the refusal.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.demo import DEMO_ACCESS_KEY_ID, DEMO_SECRET_ACCESS_KEY, emulator_app
from proxy.signing import mismatch

TOKEN = "session-token-that-must-never-be-logged"


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


Change = Callable[[str, dict[str, str]], tuple[str, dict[str, str]]]


def relay_app(target: str, change: Change) -> web.Application:
    """An intermediary that alters (path, headers) before passing a request on."""

    async def handle(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        path, headers = change(request.raw_path, headers)
        body = await request.read()
        async with (
            aiohttp.ClientSession() as client,
            client.request(request.method, URL(target + path, encoded=True), headers=headers, data=body) as answer,
        ):
            return web.Response(status=answer.status, body=await answer.read(), headers={
                "Content-Type": answer.headers.get("Content-Type", "application/json")})  # fmt: skip

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
async def servers() -> AsyncIterator[list[web.AppRunner]]:
    runners: list[web.AppRunner] = []
    yield runners
    for runner in runners:
        await runner.cleanup()


def config(upstream: str, *, secret: str = DEMO_SECRET_ACCESS_KEY, **route: object) -> dict[str, object]:
    source = {"type": "static", "access_key_id": DEMO_ACCESS_KEY_ID, "secret_access_key": secret,
              "session_token": TOKEN}  # fmt: skip
    return {"credentials": {"demo": source},
            "routes": [{"upstream": upstream, "region": "us-east-1", "credentials": "demo", **route}]}  # fmt: skip


def keep(path: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    return path, headers


CASES = {
    "scope": (dict(region="eu-west-2"), keep, "region or service in the scope"),
    "path": ({}, lambda p, h: (p.replace("/pets", "/pets/"), h), "the path was changed"),
    "query": ({}, lambda p, h: (p + "&added=1", h), "the query was changed"),
    "header": ({}, lambda p, h: (p, {**h, "Content-Type": "text/plain"}), "signed header was changed by an intermedi"),
    "secret": (dict(secret="not-the-secret-the-emulator-knows"), keep, "identical canonical requests"),
    "skew": ({}, keep, "clock skew"),
}


@pytest.mark.parametrize("service", ["execute-api", "s3"])
@pytest.mark.parametrize("case", list(CASES))
async def test_each_cause_is_named_with_the_diff(case, service, servers, start_proxy, caplog) -> None:
    route, change, cause = CASES[case]
    stage = "/prod" if service == "execute-api" else ""
    runner, emulator = await serve(emulator_app(service=service, stage=stage))
    servers.append(runner)
    runner, relay = await serve(relay_app(emulator, change))
    servers.append(runner)
    proxy = await start_proxy({**config(relay + stage, service=service, **route), "admin_listen": "127.0.0.1:0"})
    if case == "skew":
        proxy.forwarder.clock_offset = -3600.0
    caplog.set_level(logging.WARNING, "signing_proxy.forwarding")
    async with aiohttp.ClientSession() as client:
        async with client.post(proxy.url + "/pets?type=dog", data=b"{}", headers={"Content-Type": "application/json"}
                               ) as answer:  # fmt: skip
            status, body = answer.status, await answer.read()
        async with client.get(URL(emulator + stage + "/pets?type=dog")) as direct:
            assert direct.status == 403
    assert status == (400 if (case, service) == ("scope", "s3") else 403)  # S3: 400 AuthorizationHeaderMalformed
    if service == "s3":
        assert body.startswith(b"<?xml") and b"<Error>" in body  # relayed as the emulator wrote it
    else:
        assert b'"message"' in body
    explained = [r.getMessage() for r in caplog.records if "refused the signature" in r.getMessage()]
    assert len(explained) == 1, explained
    assert cause in explained[0]
    if case in ("path", "query", "header"):
        assert "\n--- canonical request signed by the proxy" in explained[0]
        assert "x-amz-security-token:<redacted>" in explained[0]
    assert TOKEN not in explained[0] and DEMO_SECRET_ACCESS_KEY not in explained[0]
    metrics_url = f"http://127.0.0.1:{proxy.admin_port}/metrics"
    async with aiohttp.ClientSession() as client, client.get(metrics_url) as metrics:
        assert 'signing_proxy_signature_mismatches_total{route="/"} 1.0' in await metrics.text()


def test_a_body_that_is_not_about_signatures_is_not_explained() -> None:
    assert not mismatch.is_mismatch(b'{"message": "User is not authorized to access this resource"}')
    assert mismatch.is_mismatch(b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
