"""A web app in a real browser calls a signed API through the proxy (CORS, proxy/cors.py).

Headless Chromium loads a page from a test server on one port; the page calls
the proxy on another with ``fetch`` (a JSON ``POST`` with a custom header, so the
browser sends a preflight first) and posts what it received back to the page's
server. The upstream re-verifies every signature with awscrt and records every
request it gets: a preflight must never reach it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import StartProxy, static_route
from tests.support.sigv4_upstream import Received, SigV4Upstream

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
DEADLINE = 60.0

PAGE = """<!doctype html><meta charset="utf-8"><title>cors</title><script>
async function call(url) {
  try {
    const response = await fetch(url, {
      method: "POST",
      credentials: url.includes("/creds/") ? "include" : "same-origin",
      headers: {"Content-Type": "application/json", "X-Custom": "from-the-page"},
      body: JSON.stringify({name: "rex", note: "café"}),
    });
    return {
      status: response.status,
      body: await response.json(),
      requestId: response.headers.get("X-Request-Id"),
      internal: response.headers.get("X-Internal"),
    };
  } catch (error) {
    return {error: String(error)};
  }
}
(async () => {
  const results = {};
  for (const [name, url] of Object.entries(CALLS)) results[name] = await call(url);
  await fetch("/result", {method: "POST", body: JSON.stringify(results)});
})();
</script>"""


class PageServer:
    """Serves the page and takes the result it posts back (one per test)."""

    def __init__(self) -> None:
        self.result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.calls: dict[str, str] = {}
        self.origin = ""

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE.replace("CALLS", json.dumps(self.calls)), content_type="text/html")

    async def post_result(self, request: web.Request) -> web.Response:
        if not self.result.done():
            self.result.set_result(json.loads(await request.text()))
        return web.Response(status=204)


@pytest.fixture
async def page_server() -> AsyncIterator[PageServer]:
    server = PageServer()
    app = web.Application()
    app.router.add_get("/", server.page)
    app.router.add_post("/result", server.post_result)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    await runner.cleanup()


async def run_chromium(url: str, profile: Path, result: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
    """Open ``url`` in headless Chromium; the page's result.

    A fresh profile, background fetches off, and every host name but 127.0.0.1 unresolvable:
    nothing leaves the machine.
    """
    assert CHROMIUM is not None
    argv = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-domain-reliability", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}", url,
    ]  # fmt: skip
    browser = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True
    )
    try:
        return await asyncio.wait_for(asyncio.shield(result), DEADLINE)
    finally:
        os.killpg(browser.pid, signal.SIGKILL)  # the browser and its helper processes: its own session
        await browser.wait()


async def echo_with_headers(request: web.Request, received: Received) -> web.StreamResponse:
    """The upstream's answer: what it received, one header to expose, one not, and a CORS header of its own."""
    return web.json_response(
        {"method": received.method, "raw_path": received.raw_path, "signature_ok": received.signature_ok,
         "custom": received.header_values("x-custom"), "body": received.body.decode()},
        headers={"X-Request-Id": "r-42", "X-Internal": "secret-ish",
                 "Access-Control-Allow-Origin": "https://elsewhere.example", "Vary": "Accept-Encoding"},
    )  # fmt: skip


async def test_a_page_calls_a_signed_api_through_the_proxy(
    page_server: PageServer, sigv4_upstream: SigV4Upstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    sigv4_upstream.responder = echo_with_headers
    config = static_route(sigv4_upstream.url, path_prefix="/api")
    config["routes"].append(
        {**config["routes"][0], "path_prefix": "/other", "cors": {"allow_origins": ["http://localhost:3999"]}}
    )
    config["routes"].append(
        {**config["routes"][0], "path_prefix": "/creds",
         "cors": {"allow_origins": [page_server.origin], "allow_credentials": True, "expose_headers": "*"}}
    )  # fmt: skip
    config["cors"] = {"allow_origins": [page_server.origin], "expose_headers": ["X-Request-Id"]}
    proxy = await start_proxy(config)
    page_server.calls = {
        "allowed": f"{proxy.url}/api/pets?q=hello+world",  # top-level cors: the page's origin
        "other_origin": f"{proxy.url}/other/pets",  # the route's own cors: another origin only
        "no_route": f"{proxy.url}/nowhere",  # the proxy's own answer, readable by the page
        "credentials": f"{proxy.url}/creds/pets",  # fetch(..., {credentials: "include"}), every header exposed
    }
    results = await run_chromium(page_server.origin + "/", tmp_path / "profile", page_server.result)

    allowed = results["allowed"]
    assert allowed.get("status") == 200, allowed
    assert allowed["body"] == {
        "method": "POST",
        "raw_path": "/pets?q=hello%20world",
        "signature_ok": True,
        "custom": ["from-the-page"],
        "body": '{"name":"rex","note":"café"}',
    }
    assert (allowed["requestId"], allowed["internal"]) == ("r-42", None)  # exposed, and not

    with_credentials = results["credentials"]
    assert with_credentials.get("status") == 200, with_credentials
    assert (with_credentials["requestId"], with_credentials["internal"]) == ("r-42", "secret-ish")

    assert results["other_origin"] == {"error": "TypeError: Failed to fetch"}
    assert results["no_route"]["status"] == 404 and results["no_route"]["body"]["reason"] == "no_route"
    # Only the allowed POST went upstream: no preflight, and nothing for the refused origin.
    assert [(r.method, r.raw_path) for r in sigv4_upstream.received] == [
        ("POST", "/pets?q=hello%20world"),
        ("POST", "/pets"),
    ]
