"""The running proxy with Cognito and STS credentials, against upstreams that verify what they get.

SigV4 routes go to ``SigV4Upstream`` (awscrt recomputes each signature) whose
secret lookup asks moto for the keys it issued. Token routes go to a small API
that checks the JWT signature against the user pool's JWKS, as API Gateway's
Cognito authorizer does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from proxy.ops.logs import NOISY_LOGGERS
from tests.conftest import StartProxy
from tests.credentials.conftest import PASSWORD, Moto, PoolClient, cognito_entry
from tests.credentials.moto_harness import ACCOUNT, REGION
from tests.support.sigv4_upstream import SigV4Upstream

pytestmark = pytest.mark.usefixtures("moto")


@pytest.fixture
async def aws_upstream(moto: Moto) -> AsyncIterator[SigV4Upstream]:
    upstream = SigV4Upstream(moto.strict.secret_for, region=REGION)
    await upstream.start()
    yield upstream
    await upstream.close()


class TokenApi:
    """An API that accepts a request only with a valid token of the expected kind from one user pool."""

    def __init__(self, moto_url: str, pool: PoolClient) -> None:
        self.jwks_url = f"{moto_url}/{pool.pool_id}/.well-known/jwks.json"
        self.issuer = f"https://cognito-idp.{REGION}.amazonaws.com/{pool.pool_id}"
        self.client_id = pool.client_id
        self.url = ""
        self.requests = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{kind}/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            claims = await self.verify(token, request.match_info["kind"])
        except jwt.PyJWTError as error:
            return web.json_response({"error": f"{type(error).__name__}: {error}"}, status=401)
        return web.json_response({"sub": claims["sub"], "token_use": claims["token_use"]})

    async def verify(self, token: str, kind: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(self.jwks_url) as answer:
            keys = jwt.PyJWKSet.from_dict(await answer.json(content_type=None))
        key = keys[jwt.get_unverified_header(token)["kid"]].key
        if kind == "id":
            claims = jwt.decode(token, key, algorithms=["RS256"], issuer=self.issuer, audience=self.client_id)
        else:
            claims = jwt.decode(token, key, algorithms=["RS256"], issuer=self.issuer, options={"verify_aud": False})
            if claims.get("client_id") != self.client_id:
                raise jwt.InvalidAudienceError("access token for another app client")
        if claims.get("token_use") != kind:
            raise jwt.InvalidTokenError(f"expected an {kind} token, got {claims.get('token_use')}")
        return claims


def sigv4_route(prefix: str, upstream: SigV4Upstream, credentials: str) -> dict[str, Any]:
    return {"path_prefix": prefix, "upstream": upstream.url, "region": REGION, "credentials": credentials}


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json(content_type=None)


async def test_a_cognito_user_signs_with_identity_pool_credentials(
    moto: Moto, aws_upstream: SigV4Upstream, start_proxy: StartProxy
) -> None:
    pool = moto.user_pool(secret=True)
    moto.add_user(pool, "alice")
    entry = cognito_entry(pool, "alice", identity_pool_id=moto.identity_pool(pool))
    proxy = await start_proxy({"credentials": {"alice": entry}, "routes": [sigv4_route("/", aws_upstream, "alice")]})

    status, _ = await get(f"{proxy.url}/orders/42?expand=items")

    assert status == 200
    received = aws_upstream.received[-1]
    assert received.signature_ok, received.signature_error
    assert received.access_key_id in moto.strict.issued
    assert received.header_values("x-amz-security-token")


async def test_a_guest_signs_with_unauthenticated_credentials(
    moto: Moto, aws_upstream: SigV4Upstream, start_proxy: StartProxy
) -> None:
    guest = {"type": "cognito_guest", "identity_pool_id": moto.identity_pool()}
    proxy = await start_proxy({"credentials": {"guest": guest}, "routes": [sigv4_route("/", aws_upstream, "guest")]})
    status, _ = await get(f"{proxy.url}/public")
    assert status == 200
    received = aws_upstream.received[-1]
    assert received.signature_ok, received.signature_error
    assert received.access_key_id in moto.strict.issued


@pytest.mark.parametrize("external_id", [None, "partner-7f3a"])
async def test_an_assumed_role_signs(
    moto: Moto, aws_upstream: SigV4Upstream, start_proxy: StartProxy, external_id: str | None
) -> None:
    role: dict[str, Any] = {"type": "assume_role", "role_arn": f"arn:aws:iam::{ACCOUNT}:role/api", "source": "base"}
    if external_id:
        role["external_id"] = external_id
    credentials = {
        "base": {"type": "static", "access_key_id": "AKIDBASE000000000001", "secret_access_key": "base-secret"},
        "role": role,
    }
    proxy = await start_proxy({"credentials": credentials, "routes": [sigv4_route("/", aws_upstream, "role")]})
    status, _ = await get(f"{proxy.url}/reports")
    assert status == 200
    received = aws_upstream.received[-1]
    assert received.signature_ok, received.signature_error
    assert received.access_key_id is not None and received.access_key_id.startswith("ASIA")
    assert received.access_key_id != "AKIDBASE000000000001"


async def test_token_routes_send_tokens_the_api_can_verify(moto: Moto, start_proxy: StartProxy) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    api = TokenApi(moto.url, pool)
    await api.start()
    try:
        routes = [
            {"path_prefix": "/id", "upstream": f"{api.url}/id", "auth": "cognito_id_token", "credentials": "alice"},
            {
                "path_prefix": "/access",
                "upstream": f"{api.url}/access",
                "auth": "cognito_access_token",
                "credentials": "alice",
            },
        ]
        proxy = await start_proxy({"credentials": {"alice": cognito_entry(pool, "alice")}, "routes": routes})
        id_status, id_body = await get(f"{proxy.url}/id/me")
        access_status, access_body = await get(f"{proxy.url}/access/me")
    finally:
        await api.close()
    assert (id_status, id_body["token_use"]) == (200, "id"), id_body
    assert (access_status, access_body["token_use"]) == (200, "access"), access_body
    assert id_body["sub"] == access_body["sub"]
    # One login served both routes.
    assert moto.log.flows(pool.client_id) == ["USER_SRP_AUTH", "PASSWORD_VERIFIER"]


async def test_a_failing_entry_answers_503_and_other_routes_still_work(
    moto: Moto, aws_upstream: SigV4Upstream, start_proxy: StartProxy
) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    moto.add_user(pool, "newbie", "Temp-Passw0rd!", temporary=True)
    api = TokenApi(moto.url, pool)
    await api.start()
    credentials = {
        "wrong": cognito_entry(pool, "alice", "Wr0ng-Passw0rd!"),
        "newbie": cognito_entry(pool, "newbie", "Temp-Passw0rd!"),
        "guest": {"type": "cognito_guest", "identity_pool_id": moto.identity_pool()},
    }
    routes = [
        {"path_prefix": "/wrong", "upstream": f"{api.url}/id", "auth": "cognito_id_token", "credentials": "wrong"},
        {"path_prefix": "/newbie", "upstream": f"{api.url}/id", "auth": "cognito_id_token", "credentials": "newbie"},
        sigv4_route("/good", aws_upstream, "guest"),
    ]
    try:
        proxy = await start_proxy({"credentials": credentials, "routes": routes})
        wrong = await get(f"{proxy.url}/wrong/x")
        newbie = await get(f"{proxy.url}/newbie/x")
        good_status, _ = await get(f"{proxy.url}/good/x")
    finally:
        await api.close()

    assert wrong[0] == 503
    assert wrong[1]["reason"] == "NotAuthorizedException"
    assert "NotAuthorizedException: Incorrect username or password." in wrong[1]["message"]
    assert "Wr0ng-Passw0rd!" not in str(wrong[1])
    assert newbie[0] == 503 and newbie[1]["reason"] == "challenge_required"
    assert "NEW_PASSWORD_REQUIRED" in newbie[1]["message"] and "signing-proxy login" in newbie[1]["message"]
    assert "Temp-Passw0rd!" not in str(newbie[1])
    assert good_status == 200 and aws_upstream.received[-1].signature_ok
    assert api.requests == 0  # the failing routes never reached the API


async def test_no_secret_reaches_any_log_line_or_error_body(
    moto: Moto, aws_upstream: SigV4Upstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A session carrying passwords, a client secret, tokens, refresh tokens and keys, logged at debug."""
    pool = moto.user_pool(secret=True)
    moto.add_user(pool, "alice")
    # Every logger at debug, as `log_level: debug` sets them (botocore stays at warning: its debug
    # output is request bodies, passwords included; proxy.ops.logs.setup_logging pins it there).
    for name in NOISY_LOGGERS:
        caplog.set_level("WARNING", logger=name)
    caplog.set_level("DEBUG")  # last: it also sets the capturing handler's level
    role = {"type": "assume_role", "role_arn": f"arn:aws:iam::{ACCOUNT}:role/api", "source": "alice",
            "external_id": "external-id-secret-9f2c"}  # fmt: skip
    credentials = {
        "alice": cognito_entry(pool, "alice", identity_pool_id=moto.identity_pool(pool)),
        "wrong": cognito_entry(pool, "alice", "Wr0ng-Passw0rd-Secret!"),
        "role": role,
    }
    api = TokenApi(moto.url, pool)
    await api.start()
    routes = [
        sigv4_route("/signed", aws_upstream, "alice"),
        sigv4_route("/role", aws_upstream, "role"),
        {
            "path_prefix": "/id",
            "upstream": f"{api.url}/id",
            "auth": "cognito_id_token",
            "credentials": "alice",
            "api_key": "api-key-secret-value",
        },
        {"path_prefix": "/wrong", "upstream": f"{api.url}/id", "auth": "cognito_id_token", "credentials": "wrong"},
    ]
    bodies = []
    try:
        proxy = await start_proxy({"credentials": credentials, "routes": routes, "log_level": "debug"})
        for path in ("/signed/a?token=query-value", "/role/b", "/id/me", "/wrong/x"):
            bodies.append(str(await get(proxy.url + path)))
    finally:
        await api.close()
    assert [body.startswith("(200") for body in bodies] == [True, True, True, False]
    tokens = proxy.providers["alice"].tokens.value
    keys = [proxy.providers[name].credentials.value for name in ("alice", "role")]
    secrets = {
        "password": PASSWORD,
        "wrong password": "Wr0ng-Passw0rd-Secret!",
        "client secret": pool.client_secret,
        "id token": tokens.id_token,
        "access token": tokens.access_token,
        "refresh token": tokens.refresh_token,
        "external id": "external-id-secret-9f2c",
        "api key": "api-key-secret-value",
        **{f"secret key {i}": k.secret_access_key for i, k in enumerate(keys)},
        **{f"session token {i}": k.session_token for i, k in enumerate(keys)},
    }
    # The upstreams echo what they received (secrets included); the proxy's own answers are the errors.
    seen = caplog.text + "\n".join(body for body in bodies if not body.startswith("(200"))
    assert "canonical request" in caplog.text  # debug logging was really on
    for what, value in secrets.items():
        assert value and value not in seen, f"the {what} leaked"
    assert "Signature=" not in caplog.text and "Bearer" not in caplog.text
