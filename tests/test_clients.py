"""Everyday clients exactly as users run them: requests, HTTPie, curl and Node's fetch.

Each builds its query with its own form encoder, which writes a space as ``+``.
The upstream re-verifies the signature with awscrt and the test decodes what it
received with urllib: the API must see the values the client meant.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
import requests

from tests.conftest import StartProxy, static_route
from tests.support.sigv4_upstream import SigV4Upstream

# What the user means; every form encoder writes the spaces as "+" and the pluses as "%2B".
MEANT = {"q": "hello world", "tag": "a+b", "sum": "1+1=2", "name": "café crème", "edge": " + "}


def client_env(tmp_path: Path) -> dict[str, str]:
    """The environment for a client process: no proxy settings from outside, a private HTTPie config."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    config_dir = tmp_path / "httpie"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "config.json").write_text(json.dumps({"disable_update_warnings": True}))
    return {**env, "HTTPIE_CONFIG_DIR": str(config_dir), "NODE_NO_WARNINGS": "1"}


async def run(argv: list[str], env: dict[str, str]) -> str:
    """Run a client to its end; its standard output, or a failure with what it said."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode(errors="replace")
    return out.decode()


def assert_meant(upstream: SigV4Upstream) -> None:
    """The request arrived signed, with the query the client meant and no ``+`` left to misread."""
    got = upstream.received[-1]
    assert got.signature_ok, got.signature_error
    query = got.raw_path.partition("?")[2]
    assert "+" not in query, query  # a raw "+" means a space to some servers and a plus to others
    assert dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True)) == MEANT


async def test_requests_params(sigv4_upstream: SigV4Upstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))

    def get() -> tuple[int, str]:
        with requests.Session() as session:
            session.trust_env = False
            response = session.get(proxy.url + "/search", params=MEANT, timeout=10)
            return response.status_code, response.request.url or ""

    status, sent = await asyncio.to_thread(get)
    assert status == 200
    assert "q=hello+world" in sent  # the client did write a space as "+"
    assert_meant(sigv4_upstream)


async def test_httpie_query_items(sigv4_upstream: SigV4Upstream, start_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    items = [f"{name}=={value}" for name, value in MEANT.items()]
    argv = [sys.executable, "-m", "httpie", "--ignore-stdin", "--check-status", "--print=b", "GET"]
    out = await run([*argv, proxy.url + "/search", *items], client_env(tmp_path))
    assert json.loads(out)["method"] == "GET"
    assert_meant(sigv4_upstream)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)")
async def test_curl_data_urlencode_get(sigv4_upstream: SigV4Upstream, start_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    fields = [arg for name, value in MEANT.items() for arg in ("--data-urlencode", f"{name}={value}")]
    argv = ["curl", "-sS", "--fail", "--noproxy", "*", "-G", *fields, proxy.url + "/search"]
    await run(argv, client_env(tmp_path))
    assert_meant(sigv4_upstream)


NODE_FETCH = """
const [url, meant] = process.argv.slice(1);
const response = await fetch(`${url}/search?${new URLSearchParams(JSON.parse(meant))}`);
if (!response.ok) throw new Error(`status ${response.status}: ${await response.text()}`);
console.log(await response.text());
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (.ci/run installs it)")
async def test_node_fetch_url_search_params(
    sigv4_upstream: SigV4Upstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    argv = ["node", "--input-type=module", "-e", NODE_FETCH, proxy.url, json.dumps(MEANT)]
    await run(argv, client_env(tmp_path))
    assert_meant(sigv4_upstream)


UPLOAD = 2 << 20
# Each local refusal, and what the route config and request must be to get it.
REFUSED_BEFORE_CONTINUE = {
    "503-no-credentials": ({"credentials": "default"}, {}, "/u", 503),  # nothing in the default chain here
    "413-too-large": ({}, {"max_body": "1MiB"}, "/u", 413),
    "407-no-inbound-token": ({}, {"inbound_token": "letmein-0123456789"}, "/u", 407),
    "404-no-route": ({"path_prefix": "/api"}, {}, "/elsewhere", 404),
    "200-accepted": ({}, {}, "/u", 200),
}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)")
@pytest.mark.parametrize("case", REFUSED_BEFORE_CONTINUE)
async def test_curl_expect_100_continue_uploads_only_what_will_be_forwarded(
    sigv4_upstream: SigV4Upstream, start_proxy: StartProxy, tmp_path: Path, case: str
) -> None:
    """``100 Continue`` comes only after route, length, inbound token and credentials passed: a refused
    upload is never sent (curl's ``size_upload`` counts the body bytes it wrote)."""
    route, config, path, status = REFUSED_BEFORE_CONTINUE[case]
    base = static_route(sigv4_upstream.url, **route)
    proxy = await start_proxy({**base, **config})
    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(UPLOAD))
    argv = ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}"]
    argv += ["-H", "Expect: 100-continue", "--expect100-timeout", "30", "--data-binary", f"@{payload}"]
    out = await run([*argv, proxy.url + path], client_env(tmp_path))
    assert out.split() == [str(status), str(UPLOAD if status == 200 else 0)]
    assert len(sigv4_upstream.received) == (status == 200)
