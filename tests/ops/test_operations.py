"""Operations: admin endpoints, access logs, inbound token, signals (real processes, real signals)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.demo import free_port
from tests.conftest import TEST_KEY_ID, TEST_SECRET, TEST_SESSION_TOKEN, static_route
from tests.support.sigv4_upstream import Received
from tests.test_cli import ROOT, run_cli, wait_for_line

TOKEN = "inbound-token-0123456789"


async def get(url: str, **kwargs: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as client, client.get(url, **kwargs) as r:
        return r.status, await r.text()


async def test_admin_health_ready_and_metrics(sigv4_upstream, start_proxy) -> None:
    config = static_route(sigv4_upstream.url)
    config["credentials"]["missing"] = {"type": "profile", "profile": "absent"}
    config["routes"].append({**config["routes"][0], "path_prefix": "/broken", "credentials": "missing"})
    proxy = await start_proxy({**config, "admin_listen": "127.0.0.1:0"})
    admin = f"http://127.0.0.1:{proxy.admin_port}"
    assert await get(admin + "/healthz") == (200, '{"status": "ok"}')

    async with aiohttp.ClientSession() as client:
        for path in ("/ok", "/ok", "/broken/x"):
            async with client.post(proxy.url + path, data=b"12345") as r:
                await r.read()
    status, text = await get(admin + "/readyz")
    assert status == 503
    problems = json.loads(text)["not_ready"]
    assert [p["credentials"] for p in problems] == ["missing"]
    assert problems[0]["routes"] == ["/broken"] and "absent" in problems[0]["error"]

    status, metrics = await get(admin + "/metrics")
    assert status == 200
    assert 'signing_proxy_requests_total{method="POST",route="/",status_class="2xx"} 2.0' in metrics
    assert 'signing_proxy_requests_total{method="POST",route="/broken",status_class="5xx"} 1.0' in metrics
    assert 'signing_proxy_request_body_bytes_total{route="/"} 10.0' in metrics
    assert 'signing_proxy_upstream_first_byte_seconds_count{route="/"} 2.0' in metrics
    # histogram buckets are cumulative and end with every observation in +Inf
    buckets = re.findall(r'signing_proxy_request_duration_seconds_bucket\{le="([^"]+)",route="/"\} (\S+)', metrics)
    counts = [float(count) for _, count in buckets]
    assert buckets[-1] == ("+Inf", "2.0") and counts == sorted(counts) and counts[0] < 2
    [total] = re.findall(r'signing_proxy_request_duration_seconds_sum\{route="/"\} (\S+)', metrics)
    assert 0 < float(total) < 10
    assert 'signing_proxy_credential_refreshes_total{result="failure",source="missing"}' in metrics
    assert "signing_proxy_open_connections" in metrics
    # the main port reserves no path: /healthz there goes upstream
    await get(proxy.url + "/healthz")
    assert sigv4_upstream.received[-1].raw_path == "/healthz"


async def test_ready_when_every_route_has_credentials(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy({**static_route(sigv4_upstream.url), "admin_listen": "127.0.0.1:0"})
    await proxy.providers["test"].aws_credentials()
    assert (await get(f"http://127.0.0.1:{proxy.admin_port}/readyz"))[0] == 200


async def test_upstream_errors_are_counted_by_kind(start_proxy) -> None:
    proxy = await start_proxy({**static_route(f"http://127.0.0.1:{free_port()}"), "admin_listen": "127.0.0.1:0"})
    assert (await get(proxy.url + "/x"))[0] == 502
    _, metrics = await get(f"http://127.0.0.1:{proxy.admin_port}/metrics")
    assert 'signing_proxy_upstream_errors_total{kind="upstream_unreachable",route="/"} 1.0' in metrics


async def test_inbound_token_is_required_and_never_forwarded(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy({**static_route(sigv4_upstream.url), "inbound_token": TOKEN})
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/a") as r:
            assert r.status == 407 and r.headers["Proxy-Authenticate"].startswith("Bearer")
            assert (await r.json())["reason"] == "proxy_authentication_required"
        async with client.get(proxy.url + "/a", headers={"Proxy-Authorization": "Bearer wrong-token"}) as r:
            assert r.status == 407
        async with client.get(proxy.url + "/a", headers={"Proxy-Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
    assert len(sigv4_upstream.received) == 1
    assert sigv4_upstream.received[0].header_values("proxy-authorization") == []


def write_config(path: Path, upstream: str, **extra: Any) -> Path:
    extra.setdefault("workers", 1)
    lines = [f"{key}: {json.dumps(value)}" for key, value in extra.items()]
    path.write_text(
        "\n".join(lines) + "\ncredentials:\n"
        f"  s: {{type: static, access_key_id: {TEST_KEY_ID}, secret_access_key: '{TEST_SECRET}',"
        f" session_token: '{TEST_SESSION_TOKEN}'}}\n"
        f"routes:\n  - {{upstream: '{upstream}', region: eu-west-1, credentials: s, api_key: the-api-key-value}}\n"
    )
    return path


async def start_process(config: Path, *args: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=os.environ.copy(),
    )  # fmt: skip
    assert process.stdout is not None
    await wait_for_line(process.stdout, "listening on")
    return process


async def stop(process: asyncio.subprocess.Process, *, already_signalled: bool = False) -> tuple[int, str]:
    """SIGTERM (unless sent already: a second one during shutdown forces an exit), then wait."""
    if process.returncode is None and not already_signalled:
        process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    err = await asyncio.wait_for(process.stderr.read(), 20)
    return await asyncio.wait_for(process.wait(), 20), err.decode()


async def test_access_log_json_has_every_field_and_no_secret(sigv4_upstream, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "c.yaml", sigv4_upstream.url, listen=port, log_format="json")
    process = await start_process(config)
    try:
        status, _ = await get(f"http://127.0.0.1:{port}/orders/7?user=alice&token=abc", data=b"xyz")
        assert status == 200
    finally:
        code, err = await stop(process)
    assert code == 0
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "signing_proxy.access"]
    assert len(access) == 1
    entry = access[0]
    assert entry["route"] == "/" and entry["method"] == "GET" and entry["status"] == 200
    assert entry["path"] == "/orders/7?user=…&token=…"  # query values only at debug
    assert entry["bytes_in"] == 3 and entry["bytes_out"] > 0
    assert entry["duration_ms"] >= entry["upstream_ttfb_ms"] > 0
    assert entry["credentials"] == "s AKIDTEST…"
    for secret in (TEST_SECRET, TEST_SESSION_TOKEN, TEST_KEY_ID, "the-api-key-value", "alice", "Authorization"):
        assert secret not in err


async def test_debug_logs_carry_no_secret_either(sigv4_upstream, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "c.yaml", sigv4_upstream.url, listen=port, log_level="debug")
    process = await start_process(config)
    try:
        await get(f"http://127.0.0.1:{port}/x?q=1", headers={"Authorization": "Bearer client-secret-value"})
    finally:
        _, err = await stop(process)
    assert "canonical request" in err and "/x?q=1" in err
    for secret in (TEST_SECRET, TEST_SESSION_TOKEN, "the-api-key-value", "client-secret-value", "Signature="):
        assert secret not in err


async def test_sigterm_drains_in_flight_streams(sigv4_upstream, tmp_path: Path) -> None:
    release = asyncio.Event()
    streaming = asyncio.Event()

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first;")
        streaming.set()
        await release.wait()
        await response.write(b"last")
        return response

    sigv4_upstream.responder = respond
    port = free_port()
    process = await start_process(write_config(tmp_path / "c.yaml", sigv4_upstream.url, listen=port))
    async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{port}/stream") as r:
        assert await r.content.readexactly(6) == b"first;"
        process.send_signal(signal.SIGTERM)
        # new connections are refused while the running stream goes on
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
            except ConnectionRefusedError:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the proxy still accepts connections after SIGTERM")
        release.set()
        assert await r.content.read() == b"last"
    code, _ = await stop(process, already_signalled=True)
    assert code == 0


async def test_sighup_reloads_and_a_bad_config_keeps_the_old(sigv4_upstream, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "c.yaml", sigv4_upstream.url + "/v1", listen=port)
    process = await start_process(config)
    try:
        await get(f"http://127.0.0.1:{port}/a")
        assert sigv4_upstream.received[-1].raw_path == "/v1/a"

        write_config(config, sigv4_upstream.url + "/v2", listen=port)
        process.send_signal(signal.SIGHUP)
        assert process.stderr is not None
        await wait_for_line(process.stderr, "configuration reloaded")
        await get(f"http://127.0.0.1:{port}/a")
        assert sigv4_upstream.received[-1].raw_path == "/v2/a"

        config.write_text("routes: [{upstream: 'ftp://broken'}]\n")
        process.send_signal(signal.SIGHUP)
        await wait_for_line(process.stderr, "reload rejected")
        status, _ = await get(f"http://127.0.0.1:{port}/a")
        assert status == 200, sigv4_upstream.received[-1].signature_error
        assert sigv4_upstream.received[-1].raw_path == "/v2/a"
    finally:
        await stop(process)


async def test_non_loopback_listen_warns_without_inbound_token(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    port = free_port()
    config.write_text(f"listen: 0.0.0.0:{port}\nroutes: [{{upstream: 'http://127.0.0.1:1', region: r}}]\n")
    process = await start_process(config)
    assert process.stderr is not None
    await wait_for_line(process.stderr, "not loopback, without inbound_token")
    await stop(process)


async def test_health_command_for_container_healthchecks(sigv4_upstream, start_proxy) -> None:
    proxy = await start_proxy({**static_route(sigv4_upstream.url), "admin_listen": "127.0.0.1:0"})
    code, _, _ = await run_cli("health", "--url", f"http://127.0.0.1:{proxy.admin_port}/healthz")
    assert code == 0
    code, _, err = await run_cli("health", "--url", f"http://127.0.0.1:{free_port()}/healthz")
    assert code == 1 and "refused" in err.lower()


async def test_workers_share_the_port_sum_metrics_and_survive_a_crash(sigv4_upstream, tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    config = write_config(tmp_path / "c.yaml", sigv4_upstream.url, listen=port, admin_listen=admin, workers=2)
    process = await start_process(config)
    try:
        workers = [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        assert len(workers) == 2
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
            for _ in range(20):
                async with client.get(f"http://127.0.0.1:{port}/w") as r:
                    assert r.status == 200
        # each worker counts its requests within metrics.FLUSH_DELAY: scrape until both have
        total = 'signing_proxy_requests_total{method="GET",route="/",status_class="2xx"} 20.0'
        async with asyncio.timeout(5):
            while total not in (await get(f"http://127.0.0.1:{admin}/metrics"))[1]:
                pass
        os.kill(workers[1], signal.SIGKILL)  # a crashed worker is replaced; the port keeps answering
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
            for _ in range(20):
                async with client.get(f"http://127.0.0.1:{port}/w") as r:
                    assert r.status == 200
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) == 2 and str(workers[1]) not in children
    finally:
        code, err = await stop(process)
    assert code == 0, err
    assert "restarting it" in err
