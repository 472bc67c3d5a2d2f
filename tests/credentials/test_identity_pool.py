"""Identity pool exchanges: a user pool user's ID token for AWS credentials, and guests."""

from __future__ import annotations

import asyncio

import pytest

from proxy.credentials import CredentialsUnavailable
from proxy.credentials.cognito import cognito_provider, logins_key
from tests.credentials.conftest import Moto, ShiftedClock, cognito_source, guest_source
from tests.credentials.moto_harness import REGION
from tests.credentials.test_user_pool import closed_port

pytestmark = pytest.mark.usefixtures("moto")

ROLE = "arn:aws:iam::123456789012:role/api-callers"


async def test_user_credentials_come_from_the_id_token(moto: Moto) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    identity_pool_id = moto.identity_pool(pool)
    source = cognito_source(pool, "alice", identity_pool_id=identity_pool_id, custom_role_arn=ROLE)
    provider = cognito_provider("alice", source)

    credentials = await provider.aws_credentials()
    tokens = await provider.user_pool_tokens()

    assert moto.strict.secret_for(credentials.access_key_id) == credentials.secret_access_key
    assert credentials.session_token and credentials.expires_at
    get_id = moto.log.calls(identity_pool_id, "GetId")
    assert len(get_id) == 1
    exchange = moto.log.calls(credentials.identity, "GetCredentialsForIdentity")
    assert len(exchange) == 1
    expected_logins = {f"cognito-idp.{REGION}.amazonaws.com/{pool.pool_id}": tokens.id_token}
    assert get_id[0].params["Logins"] == expected_logins
    assert exchange[0].params == {"Logins": expected_logins, "CustomRoleArn": ROLE}
    status = provider.status()
    assert status["ready"] and status["identity"] == credentials.identity
    assert credentials.secret_access_key not in str(status) + repr(credentials)


async def test_credentials_are_renewed_with_the_same_identity(moto: Moto, clock: ShiftedClock) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    source = cognito_source(pool, "alice", identity_pool_id=moto.identity_pool(pool))
    provider = cognito_provider("alice", source, clock=clock)
    first = await provider.aws_credentials()
    tokens = await provider.user_pool_tokens()
    assert first.expires_at is not None

    clock.jump_to(first.expires_at - 60)  # both the credentials and the tokens are about to expire
    second = await provider.aws_credentials()

    assert second.access_key_id != first.access_key_id
    assert second.identity == first.identity
    assert len(moto.log.calls(operation="GetId", scope=source.identity_pool_id)) == 1
    assert len(moto.log.calls(first.identity, "GetCredentialsForIdentity")) == 2
    # The renewal presented a renewed ID token, obtained with the refresh token.
    renewed_logins = moto.log.calls(first.identity, "GetCredentialsForIdentity")[-1].params["Logins"]
    assert list(renewed_logins.values()) != [tokens.id_token]
    assert moto.log.flows(pool.client_id)[-1] == "REFRESH_TOKEN_AUTH"


async def test_a_bad_login_token_is_refused_with_the_aws_code(moto: Moto) -> None:
    """The ID token is presented under the provider name AWS derives from the pool: a wrong region fails."""
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    source = cognito_source(pool, "alice", identity_pool_id=moto.identity_pool(pool), region="us-west-2")
    with pytest.raises(CredentialsUnavailable) as raised:
        await cognito_provider("alice", source).aws_credentials()
    assert raised.value.reason == "NotAuthorizedException"
    assert "Invalid login token" in str(raised.value)


async def test_guest_credentials_keep_one_identity(moto: Moto, clock: ShiftedClock) -> None:
    identity_pool_id = moto.identity_pool()
    provider = cognito_provider("guest", guest_source(identity_pool_id), clock=clock)
    assert provider.kind == "cognito_guest" and provider.tokens is None

    first = await provider.aws_credentials()
    assert first.expires_at is not None
    clock.jump_to(first.expires_at - 30)
    second = await provider.aws_credentials()

    assert second.access_key_id != first.access_key_id and second.identity == first.identity
    assert len(moto.log.calls(identity_pool_id, "GetId")) == 1
    calls = moto.log.calls(first.identity, "GetCredentialsForIdentity")
    assert len(calls) == 2 and all(c.params["Logins"] == {} for c in calls)
    with pytest.raises(CredentialsUnavailable) as raised:
        await provider.user_pool_tokens()
    assert raised.value.reason == "no_tokens"


async def test_concurrent_callers_share_one_exchange(moto: Moto) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    identity_pool_id = moto.identity_pool(pool)
    provider = cognito_provider("alice", cognito_source(pool, "alice", identity_pool_id=identity_pool_id))
    results = await asyncio.gather(*(provider.aws_credentials() for _ in range(25)))
    assert len({r.access_key_id for r in results}) == 1
    assert moto.log.flows(pool.client_id) == ["USER_SRP_AUTH", "PASSWORD_VERIFIER"]
    assert len(moto.log.calls(identity_pool_id, "GetId")) == 1
    assert len(moto.log.calls(results[0].identity, "GetCredentialsForIdentity")) == 1


@pytest.mark.usefixtures("no_botocore_retry")
async def test_guest_endpoint_url_and_unreachable_then_recovery(moto: Moto, clock: ShiftedClock) -> None:
    from moto.server import ThreadedMotoServer

    identity_pool_id = moto.identity_pool()
    port = closed_port()
    provider = cognito_provider(
        "guest", guest_source(identity_pool_id, endpoint_url=f"http://127.0.0.1:{port}"), clock=clock
    )
    with pytest.raises(CredentialsUnavailable) as raised:
        await provider.aws_credentials()
    assert raised.value.reason == "endpoint_unreachable" and "GetId" in str(raised.value)

    second_server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    second_server.start()
    try:
        clock.offset += 60
        credentials = await provider.aws_credentials()
    finally:
        second_server.stop()
    assert moto.strict.secret_for(credentials.access_key_id) == credentials.secret_access_key


def test_logins_key_names_the_user_pool_provider() -> None:
    assert logins_key("eu-west-1", "eu-west-1_Abc") == "cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Abc"
    assert logins_key("cn-north-1", "cn-north-1_Abc") == "cognito-idp.cn-north-1.amazonaws.com.cn/cn-north-1_Abc"
