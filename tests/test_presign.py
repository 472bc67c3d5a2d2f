"""``signing-proxy presign``: URLs signed in the query, checked by the demo emulator (API Gateway and S3 modes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from yarl import URL

from proxy.demo import DEMO_ACCESS_KEY_ID, DEMO_SECRET_ACCESS_KEY, emulator_app


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


def write_config(tmp_path: Path, upstream: str, service: str) -> Path:
    path = tmp_path / "config.yaml"
    source = {"type": "static", "access_key_id": DEMO_ACCESS_KEY_ID, "secret_access_key": DEMO_SECRET_ACCESS_KEY,
              "session_token": "a-session/token+value"}  # fmt: skip
    path.write_text(yaml.safe_dump({"credentials": {"demo": source}, "routes": [
        {"path_prefix": "/other", "upstream": "https://abc.execute-api.eu-west-1.amazonaws.com/prod",
         "credentials": "demo"},
        {"upstream": upstream, "region": "us-east-1", "service": service, "credentials": "demo"}]}))  # fmt: skip
    return path


def presign(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "presign", *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    ("service", "stage", "path"),
    [
        ("execute-api", "/prod", "/prod/pets/caf%C3%A9?type=dog&page=1"),
        ("s3", "", "/bucket/logs//2026/./a%2Bb%20c.txt"),
        ("s3", "", "/bucket/k?versionId=3&response-content-type=text/plain"),
    ],
)
async def test_presigned_urls_are_accepted_by_the_emulator(service, stage, path, tmp_path) -> None:
    runner, emulator = await serve(emulator_app(service=service, stage=stage))
    try:
        config = write_config(tmp_path, emulator + stage, service)
        done = presign(emulator + path, "--config", str(config), "--expires", "600")
        assert done.returncode == 0, done.stderr
        url = done.stdout.strip()
        assert url.startswith(emulator) and "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
        async with aiohttp.ClientSession() as client:
            async with client.get(URL(url, encoded=True)) as answer:
                assert answer.status == 200, await answer.text()
            async with client.put(URL(url, encoded=True)) as answer:  # signed for GET only
                assert answer.status == 403
    finally:
        await runner.cleanup()


def test_a_url_no_route_covers_is_a_config_error(tmp_path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", "s3")
    done = presign("https://elsewhere.example.com/x", "--config", str(config))
    assert done.returncode == 2 and "no SigV4 route's upstream covers" in done.stderr
    done = presign("http://127.0.0.1:9/x", "--config", str(config), "--expires", "0")
    assert done.returncode == 2 and "--expires" in done.stderr
