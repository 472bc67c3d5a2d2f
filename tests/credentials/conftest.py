"""Fixtures for the credential sources: one moto server per session, reached the way users reach AWS.

The sources under test build their botocore clients with no endpoint argument;
botocore finds moto through ``AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER``,
``AWS_ENDPOINT_URL_COGNITO_IDENTITY`` and ``AWS_ENDPOINT_URL_STS``, exactly as
it would find a VPC endpoint or LocalStack for a user.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

from proxy.config import CognitoGuestSource, CognitoSource
from proxy.credentials import botocore_session
from tests.credentials.moto_harness import ENDPOINT_VARIABLES, REGION, MotoLog, StricterMoto

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

PASSWORD = "Corr3ct-Horse!"


@dataclass(frozen=True)
class PoolClient:
    """A user pool and one app client of it."""

    pool_id: str
    client_id: str
    client_secret: str | None


class Moto:
    """The running server, its call log, and helpers to set up pools, users and identity pools."""

    def __init__(self, url: str, log: MotoLog, strict: StricterMoto) -> None:
        self.url = url
        self.log = log
        self.strict = strict
        self._clients: dict[str, Any] = {}

    def admin(self, service: str) -> Any:
        """A signed client for setting things up (moto takes any key)."""
        if service not in self._clients:
            self._clients[service] = botocore_session().create_client(
                service, region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
            )
        return self._clients[service]

    def user_pool(self, *, secret: bool = False, flows: list[str] | None = None) -> PoolClient:
        idp = self.admin("cognito-idp")
        pool_id = idp.create_user_pool(PoolName=f"pool-{uuid.uuid4().hex[:8]}")["UserPool"]["Id"]
        extra: dict[str, Any] = {"ExplicitAuthFlows": flows} if flows else {}
        client = idp.create_user_pool_client(UserPoolId=pool_id, ClientName="proxy", GenerateSecret=secret, **extra)
        details = client["UserPoolClient"]
        return PoolClient(pool_id, details["ClientId"], details.get("ClientSecret"))

    def add_user(self, pool: PoolClient, username: str, password: str = PASSWORD, *, temporary: bool = False) -> None:
        idp = self.admin("cognito-idp")
        attributes = [
            {"Name": "email", "Value": f"{username}@example.com"},
            {"Name": "phone_number", "Value": "+15550100"},
        ]
        idp.admin_create_user(
            UserPoolId=pool.pool_id,
            Username=username,
            TemporaryPassword=password,
            UserAttributes=attributes,
            MessageAction="SUPPRESS",
        )
        if not temporary:
            idp.admin_set_user_password(UserPoolId=pool.pool_id, Username=username, Password=password, Permanent=True)

    def identity_pool(self, pool: PoolClient | None = None) -> str:
        providers = []
        if pool is not None:
            providers = [
                {"ProviderName": f"cognito-idp.{REGION}.amazonaws.com/{pool.pool_id}", "ClientId": pool.client_id}
            ]
        answer = self.admin("cognito-identity").create_identity_pool(
            IdentityPoolName=f"ids_{uuid.uuid4().hex[:8]}",
            AllowUnauthenticatedIdentities=pool is None,
            CognitoIdentityProviders=providers,
        )
        return str(answer["IdentityPoolId"])


def cognito_entry(pool: PoolClient, username: str, password: str | None = PASSWORD, **extra: Any) -> dict[str, Any]:
    """A ``credentials:`` entry of type cognito, as a config dict."""
    entry: dict[str, Any] = {
        "type": "cognito",
        "user_pool_id": pool.pool_id,
        "client_id": pool.client_id,
        "username": username,
        **extra,
    }
    if password is not None:
        entry["password"] = password
    if pool.client_secret:
        entry["client_secret"] = pool.client_secret
    return entry


def cognito_source(pool: PoolClient, username: str, password: str | None = PASSWORD, **extra: Any) -> CognitoSource:
    return CognitoSource.model_validate(cognito_entry(pool, username, password, **extra))


def guest_source(identity_pool_id: str, **extra: Any) -> CognitoGuestSource:
    return CognitoGuestSource.model_validate({"type": "cognito_guest", "identity_pool_id": identity_pool_id, **extra})


class ShiftedClock:
    """Real time plus an offset tests move forward, so tokens "age" without anyone sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def jump_to(self, moment: float) -> None:
        """Make it ``moment`` (a real epoch time, e.g. 60 s before a token's expiry) now."""
        self.offset = moment - time.time()


@pytest.fixture(scope="package")
def moto() -> Iterator[Moto]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    patcher = pytest.MonkeyPatch()
    for variable in ENDPOINT_VARIABLES.values():
        patcher.setenv(variable, url)
    log = MotoLog()
    strict = StricterMoto(log)
    strict.install(patcher)
    try:
        yield Moto(url, log, strict)
    finally:
        patcher.undo()
        server.stop()


@pytest.fixture(autouse=True)
def private_cache_home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Token caches go to a temporary XDG_CACHE_HOME, never the developer's ~/.cache."""
    home = tmp_path / "cache-home"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


@pytest.fixture
def clock() -> ShiftedClock:
    return ShiftedClock()


@pytest.fixture
def no_botocore_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """One attempt per call: a refused connection fails at once instead of after botocore's jittered backoff."""
    from proxy.credentials import aws

    monkeypatch.setattr(aws, "_RETRIES", {"mode": "standard", "total_max_attempts": 1})
