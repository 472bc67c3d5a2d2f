"""The command line as a user runs it: real processes, real ports, curl."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from proxy.demo import free_port
from tests.conftest import TEST_KEY_ID, TEST_SECRET, TEST_SESSION_TOKEN

ROOT = Path(__file__).resolve().parent.parent


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def curl(*args: str) -> tuple[str, str]:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-w", "\n%{http_code}", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    body, _, status = out.decode().rpartition("\n")
    return status, body


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("routes: []\n", "routes: expected at least one route"),
        (
            "listen: nowhere\nroutes: [{upstream: 'https://a.execute-api.eu-west-1.amazonaws.com'}]\n",
            "listen:",
        ),
        ("routes: [{upstream: 'ftp://x'}]\n", "routes.0.upstream: expected an http:// or https:// URL"),
        ("routes: [{upstream: 'http://127.0.0.1:1'}]\n", "set region explicitly"),
        ("max_body: lots\nroutes: [{upstream: 'http://h', region: r}]\n", "max_body: expected a size"),
        (
            "routes: [{upstream: 'http://h', region: r, timeout: soon}]\n",
            "routes.0.timeout: expected a duration",
        ),
        ("routes: [{upstream: 'http://h', region: r, credentials: ghost}]\n", "unknown credentials 'ghost'"),
        ("credentials: {x: {type: magic}}\nroutes: [{upstream: 'http://h', region: r}]\n", "credentials.x:"),
        ("routes: [{upstream: 'http://h', region: r, colour: red}]\n", "routes.0.colour: Extra inputs"),
        ("routes: [{upstream: '${NOT_SET_ANYWHERE}', region: r}]\n", "NOT_SET_ANYWHERE is not set"),
        ("routes: [{upstream: http://h\n", "not valid YAML at line"),
    ],
)
async def test_config_errors_name_the_key_and_exit_2(yaml_text: str, expected: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    code, _, err = await run_cli("run", "--config", str(config))
    assert code == 2
    assert expected in err


async def test_secret_values_never_appear_in_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "credentials:\n  c: {type: static, access_key_id: AKIDX, secret_access_key: 12345, session_token: [tok-en]}\n"
        "routes: [{upstream: 'http://h', region: r, credentials: c, api_key: [the-api-key]}]\n"
    )
    code, out, err = await run_cli("run", "--config", str(config))
    assert code == 2
    assert "12345" not in err + out and "tok-en" not in err + out and "the-api-key" not in err + out


async def test_env_substitution_with_defaults(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "credentials:\n  c: {type: static, access_key_id: '${KEY_ID}', secret_access_key: '${SECRET:-s3cr3t}'}\n"
        "routes: [{upstream: 'http://127.0.0.1:1/${STAGE:-prod}', region: eu-west-1, credentials: c}]\n"
    )
    code, out, err = await run_cli("check", "--config", str(config), env={"KEY_ID": "AKIDFROMENV1234"})
    assert code == 0, err
    assert "AKIDFROM…" in out and "http://127.0.0.1:1/prod" in out
    assert "s3cr3t" not in out + err


async def test_check_reports_credentials_without_secrets(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"credentials:\n  fixed: {{type: static, access_key_id: {TEST_KEY_ID}, secret_access_key: '{TEST_SECRET}',"
        f" session_token: '{TEST_SESSION_TOKEN}'}}\n  gone: {{type: profile, profile: nope}}\n"
        "routes:\n  - {upstream: 'https://a.execute-api.eu-west-1.amazonaws.com/prod', credentials: fixed}\n"
        "  - {path_prefix: /b, upstream: 'https://a.execute-api.eu-west-1.amazonaws.com/prod', credentials: gone}\n"
    )
    code, out, err = await run_cli("check", "--config", str(config))
    assert code == 1  # one source cannot be had
    assert "fixed (static): OK" in out and "AKIDTEST…" in out and "does not expire" in out
    assert "gone (profile): UNAVAILABLE" in out and "'nope' not found" in out
    assert "eu-west-1" in out  # the region read from the host name
    for secret in (TEST_SECRET, TEST_SESSION_TOKEN, TEST_KEY_ID):
        assert secret not in out + err


async def wait_for_line(stream: asyncio.StreamReader, pattern: str, timeout: float = 20) -> str:
    seen = ""
    async with asyncio.timeout(timeout):
        while not re.search(pattern, seen):
            line = await stream.readline()
            if not line:
                raise AssertionError(f"process ended before printing {pattern!r}: {seen}")
            seen += line.decode()
    return seen


async def test_demo_from_the_command_line_with_curl() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--listen", f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        banner = await wait_for_line(process.stdout, r"Ctrl-C")
        through_proxy, direct = re.findall(r"curl -s '([^']+)'", banner)
        assert through_proxy.startswith(f"http://127.0.0.1:{port}/")
        status, body = await curl(through_proxy)
        assert status == "200" and json.loads(body)["caller"] == "AKIADEMOSIGNINGPROXY"
        status, body = await curl(direct)
        assert status == "403" and json.loads(body) == {"message": "Missing Authentication Token"}
        status, _ = await curl("-X", "POST", "--data-binary", "x=1", through_proxy)
        assert status == "200"
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_quick_start_run_with_upstream_flag(sigv4_upstream) -> None:
    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--upstream", sigv4_upstream.url + "/prod", "--region", "eu-west-1",
        "--listen", str(port), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, **env}, cwd=ROOT,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        await wait_for_line(process.stdout, "listening on http://127.0.0.1:")
        status, _ = await curl(f"http://127.0.0.1:{port}/hello?x=1")
        assert status == "200"
        got = sigv4_upstream.received[-1]
        assert got.signature_ok and got.raw_path == "/prod/hello?x=1"
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 10)


def test_example_config_is_valid_and_documents_every_key() -> None:
    import yaml

    from proxy import config as cfg

    example = ROOT / "config.example.yaml"
    cfg.load_config(example)
    text = example.read_text()
    models = [
        cfg.Config,
        cfg.Route,
        cfg.Cors,
        cfg.Forward,
        cfg.ForwardRule,
        *[m for m in vars(cfg).values() if isinstance(m, type) and m.__name__.endswith("Source")],
    ]
    for model in models:
        for key in model.model_fields:
            assert re.search(rf"^\s*#?\s*(- )?{key}:", text, re.M), (
                f"{model.__name__}.{key} is not in config.example.yaml"
            )
    assert yaml.safe_load(text)


def test_auto_workers_follow_a_container_cpu_quota(tmp_path: Path) -> None:
    from proxy.config import usable_cores

    all_cores = usable_cores(str(tmp_path / "missing"))
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert usable_cores(str(quota)) == all_cores
    quota.write_text("50000 100000\n")
    assert usable_cores(str(quota)) == 1
    quota.write_text(f"{150000 * all_cores} 100000\n")
    assert usable_cores(str(quota)) == all_cores
