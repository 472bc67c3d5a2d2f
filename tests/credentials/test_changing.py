"""Credentials that change under a running proxy, and the providers pods and laptops use.

Each test runs a real proxy (in this process, or as its own process where
botocore reads ``HOME`` at import) against an upstream that re-verifies the
signature with awscrt, with botocore reaching stand-ins over loopback: a
rotated credentials file, the SSO portal, an ECS/EKS container endpoint, moto's
STS for IRSA web identity, a ``credential_process`` script.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.credentials import AwsCredentials, CredentialSource, CredentialsUnavailable, Refreshing, base
from proxy.demo import free_port
from tests.conftest import StartProxy
from tests.credentials.conftest import Moto, ShiftedClock
from tests.credentials.moto_harness import ACCOUNT, REGION
from tests.support.connect_proxy import ConnectProxy
from tests.support.faults import start_proxy_process
from tests.support.sigv4_upstream import SigV4Upstream

KEYS = {
    "AKIDROTATEDKEY000001": "first/secret/0000000000000000000000001",
    "AKIDROTATEDKEY000002": "second/secret/000000000000000000000002",
    "ASIASSOROLEKEY000001": "sso/secret/0000000000000000000000000001",
    "ASIACONTAINERKEY0001": "container/secret/00000000000000000000001",
    "AKIDPROCESSKEY000001": "process/secret/0000000000000000000000001",
}


def route(upstream: SigV4Upstream, credentials: str = "default") -> dict[str, Any]:
    return {"upstream": upstream.url, "region": REGION, "credentials": credentials}


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


def credentials_file(path: Path, key_id: str) -> None:
    path.write_text(f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {KEYS[key_id]}\n")


@pytest.fixture
async def upstream() -> AsyncIterator[SigV4Upstream]:
    async with SigV4Upstream(KEYS, region=REGION) as server:
        yield server


async def test_a_rewritten_credentials_file_is_used_by_the_next_request(
    upstream: SigV4Upstream, start_proxy: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "CHANGE_CHECK_EVERY", 0.0)  # look at the files on every request, not once a second
    shared = tmp_path / "credentials"
    credentials_file(shared, "AKIDROTATEDKEY000001")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    proxy = await start_proxy({"routes": [route(upstream)]})
    assert (await get(f"{proxy.url}/a"))[0] == 200
    credentials_file(shared, "AKIDROTATEDKEY000002")  # rotation, or `aws configure`
    assert (await get(f"{proxy.url}/b"))[0] == 200
    assert (await get(f"{proxy.url}/c"))[0] == 200
    keys = [r.access_key_id for r in upstream.received]
    assert keys == ["AKIDROTATEDKEY000001", "AKIDROTATEDKEY000002", "AKIDROTATEDKEY000002"]
    assert all(r.signature_ok for r in upstream.received)


class Rotating(CredentialSource):
    """A source whose files are said to change whenever ``rewritten`` is set; counts the looks."""

    kind = "static"

    def __init__(self) -> None:
        self.looks = 0
        self.rewritten = False
        self.key = "AKIDROTATEDKEY000001"

    def changed(self) -> bool:
        self.looks += 1
        rewritten, self.rewritten = self.rewritten, False
        return rewritten

    async def fetch(self) -> AwsCredentials:
        if not self.key:
            raise CredentialsUnavailable("nothing in the files", "no_credentials")
        return AwsCredentials(self.key, KEYS[self.key])


async def test_files_are_looked_at_once_a_second_while_healthy_and_on_every_request_while_failing() -> None:
    clock = ShiftedClock()
    source = Rotating()
    refreshing = Refreshing(source.fetch, name="rotating", clock=clock, changed=source.changed)
    assert (await refreshing.get()).access_key_id == "AKIDROTATEDKEY000001"
    source.key, source.rewritten = "AKIDROTATEDKEY000002", True
    assert (await refreshing.get()).access_key_id == "AKIDROTATEDKEY000001"  # within the second: not looked
    assert source.looks == 1
    clock.jump_to(clock() + 1.0)
    assert (await refreshing.get()).access_key_id == "AKIDROTATEDKEY000002"

    failing = Rotating()
    failing.key = ""  # nothing usable in the files yet (an expired SSO session)
    refreshing = Refreshing(failing.fetch, name="failing", clock=clock, changed=failing.changed)
    for _ in range(3):  # failing: every request looks, so a fix is picked up at once, backoff or not
        with pytest.raises(CredentialsUnavailable):
            await refreshing.get()
    assert failing.looks == 3
    failing.key, failing.rewritten = "AKIDROTATEDKEY000001", True
    assert (await refreshing.get()).access_key_id == "AKIDROTATEDKEY000001"


# ---------------------------------------------------------------- SSO


class SsoPortal:
    """The SSO portal's GetRoleCredentials: role credentials for the one access token it accepts."""

    def __init__(self) -> None:
        self.valid_token = ""
        self.calls = 0

    async def role_credentials(self, request: web.Request) -> web.Response:
        self.calls += 1
        if request.headers.get("x-amz-sso_bearer_token") != self.valid_token:
            return web.json_response(
                {"message": "Session token not found or invalid"},
                status=401,
                headers={"x-amzn-ErrorType": "UnauthorizedException"},
            )
        expiration = int((datetime.datetime.now(datetime.UTC).timestamp() + 3600) * 1000)
        key = "ASIASSOROLEKEY000001"
        return web.json_response(
            {
                "roleCredentials": {
                    "accessKeyId": key,
                    "secretAccessKey": KEYS[key],
                    "sessionToken": "sso-session",
                    "expiration": expiration,
                }
            }
        )


Serve = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(app)`` runs an aiohttp app on loopback and returns its URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    yield start
    for runner in runners:
        await runner.cleanup()


def sso_token(home: Path, start_url: str, token: str, expires_in: float, session: str = "") -> None:
    """What `aws sso login` writes: the token in ~/.aws/sso/cache/<sha1 of the sso-session, else the start URL>.json."""
    cache = home / ".aws" / "sso" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expires_in)
    (cache / f"{hashlib.sha1((session or start_url).encode()).hexdigest()}.json").write_text(
        json.dumps(
            {
                "startUrl": start_url,
                "region": REGION,
                "accessToken": token,
                "expiresAt": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    )


@pytest.mark.parametrize("session", ["", "corp"], ids=["legacy profile", "sso-session"])
async def test_an_expired_sso_session_says_how_to_log_in_and_a_new_login_is_used_without_restart(
    upstream: SigV4Upstream, serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, session: str
) -> None:
    portal = SsoPortal()
    app = web.Application()
    app.router.add_get("/federation/credentials", portal.role_credentials)
    start_url = "https://corp.awsapps.com/start"
    config = tmp_path / "aws-config"
    sso = f"sso_start_url = {start_url}\nsso_region = {REGION}\n"
    role = f"sso_account_id = {ACCOUNT}\nsso_role_name = Developer\n"
    if session:
        config.write_text(f"[profile dev]\nsso_session = {session}\n{role}[sso-session {session}]\n{sso}")
    else:
        config.write_text(f"[profile dev]\n{sso}{role}")
    sso_token(tmp_path, start_url, "yesterday-token", expires_in=-3600, session=session)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSO", await serve(app))
    proxy = await start_proxy_process(
        {"credentials": {"dev": {"type": "profile", "profile": "dev"}}, "routes": [route(upstream, "dev")]},
        tmp_path,
        free_port(),
    )
    try:
        status, body = await get(f"{proxy.url}/orders")
        assert status == 503 and body["reason"] == "sso_login_required"
        assert "aws sso login --profile dev" in body["message"]
        portal.valid_token = "fresh-token"
        sso_token(tmp_path, start_url, "fresh-token", expires_in=8 * 3600, session=session)  # aws sso login
        status, _ = await get(f"{proxy.url}/orders")
        assert status == 200
    finally:
        await proxy.stop()
    assert upstream.received[-1].access_key_id == "ASIASSOROLEKEY000001" and upstream.received[-1].signature_ok
    assert b"fresh-token" not in proxy.stderr and b"yesterday-token" not in proxy.stderr


# ---------------------------------------------------------------- pods: container endpoint, web identity


async def test_the_container_credentials_endpoint_with_its_authorization_token_file(
    upstream: SigV4Upstream, start_proxy: StartProxy, serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str | None] = []

    async def credentials(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "pod-identity-token":
            return web.json_response({"message": "unauthorized"}, status=401)
        expiration = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        key = "ASIACONTAINERKEY0001"
        return web.json_response(
            {
                "AccessKeyId": key,
                "SecretAccessKey": KEYS[key],
                "Token": "pod-session",
                "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )

    app = web.Application()
    app.router.add_get("/v1/credentials", credentials)
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text("pod-identity-token")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", await serve(app) + "/v1/credentials")
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token_file))
    proxy = await start_proxy({"routes": [route(upstream)]})
    status, body = await get(f"{proxy.url}/orders")
    assert status == 200, body
    assert seen == ["pod-identity-token"]
    received = upstream.received[-1]
    assert received.access_key_id == "ASIACONTAINERKEY0001" and received.signature_ok
    assert received.header_values("X-Amz-Security-Token") == ["pod-session"]


async def test_irsa_web_identity_against_sts(
    moto: Moto, start_proxy: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YXBwIn0.c2lnbmF0dXJl")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("AWS_ROLE_ARN", f"arn:aws:iam::{ACCOUNT}:role/app-pod")
    monkeypatch.setenv("AWS_REGION", REGION)
    async with SigV4Upstream(moto.strict.secret_for, region=REGION) as upstream:
        proxy = await start_proxy({"routes": [route(upstream)]})
        status, body = await get(f"{proxy.url}/orders")
    assert status == 200, body
    received = upstream.received[-1]
    assert received.signature_ok and received.access_key_id is not None and received.access_key_id.startswith("ASIA")
    assert proxy.providers["default"].status()["identity"] == "default (assume-role-with-web-identity)"


async def test_a_credential_process_profile(
    upstream: SigV4Upstream, start_proxy: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "vault-credentials.py"
    key = "AKIDPROCESSKEY000001"
    script.write_text(
        f"import json\nprint(json.dumps({{'Version': 1, 'AccessKeyId': {key!r}, 'SecretAccessKey': {KEYS[key]!r}}}))\n"
    )
    config = tmp_path / "aws-config"
    config.write_text(f"[profile vault]\ncredential_process = {sys.executable} {script}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    proxy = await start_proxy(
        {"credentials": {"vault": {"type": "profile", "profile": "vault"}}, "routes": [route(upstream, "vault")]}
    )
    assert (await get(f"{proxy.url}/orders"))[0] == 200
    assert upstream.received[-1].access_key_id == key and upstream.received[-1].signature_ok


async def test_credential_calls_follow_the_environment_proxy(
    moto: Moto, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore (here STS AssumeRole) goes through HTTP_PROXY like the upstream does; we add nothing."""
    async with ConnectProxy() as egress, SigV4Upstream(moto.strict.secret_for, region=REGION) as upstream:
        monkeypatch.setenv("HTTP_PROXY", egress.url)
        monkeypatch.setenv("NO_PROXY", upstream.url.removeprefix("http://"))  # only the credential call goes through
        credentials = {
            "base": {"type": "static", "access_key_id": "AKIDBASE000000000001", "secret_access_key": "base-secret"},
            "role": {"type": "assume_role", "role_arn": f"arn:aws:iam::{ACCOUNT}:role/api", "source": "base"},
        }
        proxy = await start_proxy({"credentials": credentials, "routes": [route(upstream, "role")]})
        assert (await get(f"{proxy.url}/orders"))[0] == 200
    assert [url for url in egress.forwarded if url.startswith(moto.url)], egress.forwarded
    assert upstream.received[-1].signature_ok
