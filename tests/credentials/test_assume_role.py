"""assume_role: STS AssumeRole signed with another entry's credentials."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from moto.sts.models import sts_backends

from proxy.config import AssumeRoleSource, parse_config
from proxy.credentials import (
    AwsCredentials,
    CredentialSource,
    CredentialsUnavailable,
    Provider,
    Refreshing,
    build_providers,
)
from proxy.credentials.sts import AssumeRole
from tests.credentials.conftest import Moto, ShiftedClock
from tests.credentials.moto_harness import ACCOUNT
from tests.credentials.test_user_pool import closed_port

pytestmark = pytest.mark.usefixtures("moto")

ROLE = f"arn:aws:iam::{ACCOUNT}:role/proxy-caller"
BASE = AwsCredentials("AKIDBASEKEY000000001", "base/secret/value", None, None, "static")


class Counting(CredentialSource):
    """A source of fixed base credentials that counts how often it is asked."""

    kind = "static"

    def __init__(self, credentials: AwsCredentials | None = BASE) -> None:
        self.credentials = credentials
        self.calls = 0

    async def fetch(self) -> AwsCredentials:
        self.calls += 1
        if self.credentials is None:
            raise CredentialsUnavailable("no base credentials", "no_credentials")
        return self.credentials


def role_source(**extra: Any) -> AssumeRoleSource:
    return AssumeRoleSource.model_validate({"type": "assume_role", "role_arn": ROLE, "source": "base", **extra})


def base_provider(source: Counting | None = None) -> Provider:
    source = source or Counting()
    return Provider("base", "static", Refreshing(source.fetch, name="base"))


def assumed(access_key_id: str) -> Any:
    return sts_backends[ACCOUNT]["aws"].get_assumed_role_from_access_key(access_key_id)


@pytest.mark.parametrize("external_id", [None, "partner-7f3a"])
async def test_assume_role_returns_the_role_credentials(moto: Moto, external_id: str | None) -> None:
    extra = {"external_id": external_id} if external_id else {}
    source = role_source(session_name="nightly-job", duration_seconds=1800, **extra)
    credentials = await AssumeRole(source, base_provider()).fetch()

    role = assumed(credentials.access_key_id)
    assert role is not None and role.role_arn == ROLE
    assert role.external_id == external_id
    assert role.session_name == "nightly-job"
    assert credentials.secret_access_key == role.secret_access_key
    assert credentials.session_token == role.session_token
    assert credentials.identity == f"arn:aws:sts::{ACCOUNT}:assumed-role/proxy-caller/nightly-job"
    assert credentials.expires_at == pytest.approx(role.expiration.timestamp(), abs=1)
    assert 1790 <= credentials.expires_at - time.time() <= 1800
    assert moto.strict.secret_for(credentials.access_key_id) == credentials.secret_access_key
    assert AssumeRole.kind == "assume_role"


async def test_the_external_id_never_shows(moto: Moto) -> None:
    source = role_source(external_id="very-secret-external-id")
    assert "very-secret-external-id" not in repr(source)
    credentials = await AssumeRole(source, base_provider()).fetch()
    assert "very-secret-external-id" not in repr(credentials)


async def test_a_failing_source_fails_the_role_without_calling_sts(moto: Moto) -> None:
    before = len(sts_backends[ACCOUNT]["aws"].assumed_roles)
    with pytest.raises(CredentialsUnavailable) as raised:
        await AssumeRole(role_source(), base_provider(Counting(None))).fetch()
    assert raised.value.reason == "no_credentials"
    assert len(sts_backends[ACCOUNT]["aws"].assumed_roles) == before


async def test_sts_refusals_carry_the_aws_code_and_no_secret(moto: Moto) -> None:
    source = role_source(session_name="x" * 65, external_id="hidden-external-id")  # STS allows 64 characters
    with pytest.raises(CredentialsUnavailable) as raised:
        await AssumeRole(source, base_provider()).fetch()
    assert raised.value.reason == "ValidationError"
    assert "AssumeRole" in str(raised.value) and "ValidationError: " in str(raised.value)
    assert "roleSessionName" in str(raised.value)
    assert "base/secret/value" not in str(raised.value) and "hidden-external-id" not in str(raised.value)


async def test_renewal_through_refreshing_and_a_shared_refresh(moto: Moto, clock: ShiftedClock) -> None:
    base = Counting()
    provider = Provider(
        "role",
        "assume_role",
        Refreshing(AssumeRole(role_source(), base_provider(base)).fetch, name="role", clock=clock),
    )
    firsts = await asyncio.gather(*(provider.aws_credentials() for _ in range(10)))
    assert len({c.access_key_id for c in firsts}) == 1
    assert firsts[0].expires_at is not None
    clock.jump_to(firsts[0].expires_at - 60)
    second = await provider.aws_credentials()
    assert second.access_key_id != firsts[0].access_key_id
    assert base.calls == 1  # the base credentials do not expire: fetched once


@pytest.mark.usefixtures("no_botocore_retry")
async def test_endpoint_url_and_an_unreachable_sts(moto: Moto) -> None:
    port = closed_port()
    with pytest.raises(CredentialsUnavailable) as raised:
        await AssumeRole(role_source(endpoint_url=f"http://127.0.0.1:{port}"), base_provider()).fetch()
    assert raised.value.reason == "endpoint_unreachable" and "AssumeRole" in str(raised.value)
    credentials = await AssumeRole(role_source(endpoint_url=moto.url), base_provider()).fetch()
    assert assumed(credentials.access_key_id) is not None


async def test_built_from_a_config_with_a_chain(moto: Moto) -> None:
    config = parse_config(
        {
            "credentials": {
                "base": {"type": "static", "access_key_id": "AKIDBASEKEY000000001", "secret_access_key": "s"},
                "first": {"type": "assume_role", "role_arn": ROLE, "source": "base", "region": "eu-west-1"},
                "second": {"type": "assume_role", "role_arn": f"arn:aws:iam::{ACCOUNT}:role/second", "source": "first"},
            },
            "routes": [{"upstream": "https://abc.execute-api.eu-west-1.amazonaws.com", "credentials": "second"}],
        }
    )
    providers = build_providers(config)
    assert providers["second"].kind == "assume_role"
    credentials = await providers["second"].aws_credentials()
    assert credentials.identity.endswith(":assumed-role/second/signing-proxy")
    assert providers["first"].status()["ready"]  # the chain fetched the first role to sign for the second


async def test_an_endpoint_that_never_answers_is_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.credentials import aws

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # read the request, answer nothing, until the client gives up

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(aws, "_READ_TIMEOUT", 0.2)
    monkeypatch.setattr(aws, "_RETRIES", {"mode": "standard", "total_max_attempts": 1})
    try:
        with pytest.raises(CredentialsUnavailable) as raised:
            await AssumeRole(role_source(endpoint_url=f"http://127.0.0.1:{port}"), base_provider()).fetch()
    finally:
        server.close()
    assert raised.value.reason == "endpoint_timeout"
    assert f"127.0.0.1:{port}" in str(raised.value) and "did not answer within 0.2 s" in str(raised.value)
