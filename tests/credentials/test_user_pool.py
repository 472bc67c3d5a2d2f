"""cognito credentials, user pool side: login (SRP, password), secrets, refresh, challenges, errors."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket

import pytest
from moto.server import ThreadedMotoServer

from proxy.credentials import CredentialsUnavailable
from proxy.credentials import user_pool as cognito
from proxy.credentials.cognito import cognito_provider
from proxy.credentials.user_pool import UserPoolTokens, jwt_claims
from tests.credentials.conftest import PASSWORD, Moto, PoolClient, ShiftedClock, cognito_source

pytestmark = pytest.mark.usefixtures("moto")


@pytest.mark.parametrize("flow", ["USER_SRP_AUTH", "USER_PASSWORD_AUTH"])
@pytest.mark.parametrize("secret", [False, True], ids=["public-client", "client-with-secret"])
async def test_login_gives_user_pool_tokens(moto: Moto, flow: str, secret: bool) -> None:
    pool = moto.user_pool(secret=secret)
    moto.add_user(pool, "alice")
    provider = cognito_provider("alice", cognito_source(pool, "alice", auth_flow=flow))

    tokens = await provider.user_pool_tokens()

    assert isinstance(tokens, UserPoolTokens)
    claims = jwt_claims(tokens.id_token)
    assert claims["token_use"] == "id" and claims["aud"] == pool.client_id
    assert jwt_claims(tokens.access_token)["token_use"] == "access"
    assert tokens.username == "alice" and tokens.sub == claims["sub"]
    assert tokens.expires_at == min(claims["exp"], jwt_claims(tokens.access_token)["exp"])
    assert tokens.refresh_token
    expected = ["USER_SRP_AUTH", "PASSWORD_VERIFIER"] if flow == "USER_SRP_AUTH" else ["USER_PASSWORD_AUTH"]
    assert moto.log.flows(pool.client_id) == expected
    assert provider.credentials is None  # no identity pool: tokens only
    with pytest.raises(CredentialsUnavailable) as raised:
        await provider.aws_credentials()
    assert raised.value.reason == "no_identity_pool"


async def test_srp_sends_secret_hash_with_every_call(moto: Moto) -> None:
    pool = moto.user_pool(secret=True)
    moto.add_user(pool, "alice")
    await cognito_provider("alice", cognito_source(pool, "alice")).user_pool_tokens()
    calls = moto.log.calls(pool.client_id)
    assert [c.detail for c in calls] == ["USER_SRP_AUTH", "PASSWORD_VERIFIER"]
    assert all("SECRET_HASH" in c.params for c in calls)


async def test_a_missing_client_secret_is_reported_with_the_aws_code(moto: Moto) -> None:
    pool = moto.user_pool(secret=True)
    moto.add_user(pool, "alice")
    source = cognito_source(pool, "alice").model_copy(update={"client_secret": None})
    with pytest.raises(CredentialsUnavailable) as raised:
        await cognito_provider("alice", source).user_pool_tokens()
    assert raised.value.reason == "NotAuthorizedException"
    assert "Unable to verify secret hash" in str(raised.value)


@pytest.mark.parametrize("flow", ["USER_SRP_AUTH", "USER_PASSWORD_AUTH"])
async def test_a_wrong_password_names_the_aws_error_and_hides_the_password(
    moto: Moto, flow: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    wrong = "Wr0ng-Password!"
    provider = cognito_provider("alice", cognito_source(pool, "alice", wrong, auth_flow=flow))
    with caplog.at_level(logging.DEBUG, logger="signing_proxy"), pytest.raises(CredentialsUnavailable) as raised:
        await provider.user_pool_tokens()
    error = raised.value
    assert error.reason == "NotAuthorizedException"
    assert "NotAuthorizedException: Incorrect username or password." in str(error)
    assert wrong not in str(error) and wrong not in caplog.text
    assert provider.status()["ready"] is False and "NotAuthorizedException" in provider.status()["error"]


@pytest.mark.parametrize("flow", ["USER_SRP_AUTH", "USER_PASSWORD_AUTH"])
async def test_an_unknown_user_names_the_aws_error(moto: Moto, flow: str) -> None:
    pool = moto.user_pool()
    with pytest.raises(CredentialsUnavailable) as raised:
        await cognito_provider("ghost", cognito_source(pool, "ghost", auth_flow=flow)).user_pool_tokens()
    assert raised.value.reason == "UserNotFoundException"
    assert "UserNotFoundException" in str(raised.value)


async def test_a_flow_the_client_does_not_allow_is_reported(moto: Moto) -> None:
    pool = moto.user_pool(flows=["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"])
    moto.add_user(pool, "alice")
    with pytest.raises(CredentialsUnavailable) as raised:
        await cognito_provider("alice", cognito_source(pool, "alice")).user_pool_tokens()
    assert raised.value.reason == "InvalidParameterException"
    assert "USER_SRP_AUTH flow not enabled for this client" in str(raised.value)
    # The flow the client does allow works.
    source = cognito_source(pool, "alice", auth_flow="USER_PASSWORD_AUTH")
    assert (await cognito_provider("alice", source).user_pool_tokens()).username == "alice"


@pytest.mark.parametrize("secret", [False, True], ids=["public-client", "client-with-secret"])
async def test_tokens_are_renewed_with_the_refresh_token_before_they_expire(
    moto: Moto, clock: ShiftedClock, secret: bool
) -> None:
    pool = moto.user_pool(secret=secret)
    moto.add_user(pool, "alice")
    provider = cognito_provider("alice", cognito_source(pool, "alice"), clock=clock)
    first = await provider.user_pool_tokens()

    clock.jump_to(first.expires_at - 20 * 60)  # still fresh: no call
    assert await provider.user_pool_tokens() is first
    clock.jump_to(first.expires_at - 60)  # inside the mandatory window
    second = await provider.user_pool_tokens()

    assert second.access_token != first.access_token and second.id_token != first.id_token
    assert second.refresh_token == first.refresh_token  # kept: a refresh answer carries none
    assert moto.log.flows(pool.client_id) == ["USER_SRP_AUTH", "PASSWORD_VERIFIER", "REFRESH_TOKEN_AUTH"]
    refresh = moto.log.calls(pool.client_id)[-1]
    assert ("SECRET_HASH" in refresh.params) is secret


async def test_refresh_for_a_secret_client_uses_the_internal_username(moto: Moto, clock: ShiftedClock) -> None:
    """Signed in by e-mail alias, the SECRET_HASH on refresh must use cognito:username, not the alias."""
    idp = moto.admin("cognito-idp")
    pool_id = idp.create_user_pool(PoolName="by-email", UsernameAttributes=["email"])["UserPool"]["Id"]
    client = idp.create_user_pool_client(UserPoolId=pool_id, ClientName="c", GenerateSecret=True)["UserPoolClient"]
    idp.admin_create_user(UserPoolId=pool_id, Username="carol@example.com", TemporaryPassword=PASSWORD)
    idp.admin_set_user_password(UserPoolId=pool_id, Username="carol@example.com", Password=PASSWORD, Permanent=True)
    pool = PoolClient(pool_id, client["ClientId"], client["ClientSecret"])
    source = cognito_source(pool, "carol@example.com", auth_flow="USER_PASSWORD_AUTH")
    provider = cognito_provider("carol", source, clock=clock)
    first = await provider.user_pool_tokens()
    assert first.username != "carol@example.com"  # the internal name moto gives alias users (their sub)
    clock.jump_to(first.expires_at - 30)
    second = await provider.user_pool_tokens()
    assert second.id_token != first.id_token
    assert moto.log.flows(client["ClientId"]) == ["USER_PASSWORD_AUTH", "REFRESH_TOKEN_AUTH"]


async def test_a_refused_refresh_token_leads_to_a_full_login(
    moto: Moto, clock: ShiftedClock, caplog: pytest.LogCaptureFixture
) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    provider = cognito_provider("alice", cognito_source(pool, "alice"), clock=clock)
    first = await provider.user_pool_tokens()
    moto.admin("cognito-idp").admin_user_global_sign_out(UserPoolId=pool.pool_id, Username="alice")

    clock.jump_to(first.expires_at - 60)
    with caplog.at_level(logging.DEBUG, logger="signing_proxy"):
        second = await provider.user_pool_tokens()

    assert second.refresh_token and second.refresh_token != first.refresh_token
    assert moto.log.flows(pool.client_id) == [
        "USER_SRP_AUTH", "PASSWORD_VERIFIER", "REFRESH_TOKEN_AUTH", "USER_SRP_AUTH", "PASSWORD_VERIFIER",
    ]  # fmt: skip
    assert "refused" in caplog.text
    assert first.refresh_token not in caplog.text


async def test_concurrent_callers_share_one_login_and_one_refresh(moto: Moto, clock: ShiftedClock) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    provider = cognito_provider("alice", cognito_source(pool, "alice"), clock=clock)
    firsts = await asyncio.gather(*(provider.user_pool_tokens() for _ in range(20)))
    assert len({id(t) for t in firsts}) == 1
    clock.jump_to(firsts[0].expires_at - 60)
    seconds = await asyncio.gather(*(provider.user_pool_tokens() for _ in range(20)))
    assert len({id(t) for t in seconds}) == 1
    assert moto.log.flows(pool.client_id) == ["USER_SRP_AUTH", "PASSWORD_VERIFIER", "REFRESH_TOKEN_AUTH"]


@pytest.mark.parametrize("flow", ["USER_SRP_AUTH", "USER_PASSWORD_AUTH"])
async def test_new_password_required_cannot_be_answered_headless(moto: Moto, flow: str) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "newbie", "Temp-Passw0rd!", temporary=True)
    provider = cognito_provider("newbie", cognito_source(pool, "newbie", "Temp-Passw0rd!", auth_flow=flow))
    with pytest.raises(CredentialsUnavailable) as raised:
        await provider.user_pool_tokens()
    error = raised.value
    assert error.reason == "challenge_required"
    assert "NEW_PASSWORD_REQUIRED" in str(error)
    assert "signing-proxy login --config FILE --credentials newbie" in str(error)
    assert "Temp-Passw0rd!" not in str(error)


async def test_sms_mfa_cannot_be_answered_headless(moto: Moto) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "mfa-user")
    moto.admin("cognito-idp").admin_set_user_mfa_preference(
        UserPoolId=pool.pool_id, Username="mfa-user", SMSMfaSettings={"Enabled": True, "PreferredMfa": True}
    )
    with pytest.raises(CredentialsUnavailable) as raised:
        await cognito_provider("mfa", cognito_source(pool, "mfa-user")).user_pool_tokens()
    assert raised.value.reason == "challenge_required"
    assert "SMS_MFA" in str(raised.value)


async def test_no_password_and_no_cache_says_to_log_in(moto: Moto) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    with pytest.raises(CredentialsUnavailable) as raised:
        await cognito_provider("alice", cognito_source(pool, "alice", None)).user_pool_tokens()
    assert raised.value.reason == "login_required"
    assert "signing-proxy login" in str(raised.value)
    assert moto.log.flows(pool.client_id) == []


async def test_endpoint_url_in_the_config_overrides_the_environment(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    monkeypatch.setenv("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", f"http://127.0.0.1:{closed_port()}")
    tokens = await cognito_provider("alice", cognito_source(pool, "alice", endpoint_url=moto.url)).user_pool_tokens()
    assert tokens.username == "alice"


@pytest.mark.usefixtures("no_botocore_retry")
async def test_an_unreachable_endpoint_then_recovery(moto: Moto, clock: ShiftedClock) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    port = closed_port()
    provider = cognito_provider(
        "alice", cognito_source(pool, "alice", endpoint_url=f"http://127.0.0.1:{port}"), clock=clock
    )
    with pytest.raises(CredentialsUnavailable) as raised:
        await provider.user_pool_tokens()
    assert raised.value.reason == "endpoint_unreachable"
    assert f"127.0.0.1:{port}" in str(raised.value) and "InitiateAuth" in str(raised.value)
    with pytest.raises(CredentialsUnavailable):  # during the backoff: the same error, no new attempt
        await provider.user_pool_tokens()

    second_server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # same in-process state
    second_server.start()
    try:
        clock.offset += 60  # past the backoff
        tokens = await provider.user_pool_tokens()
    finally:
        second_server.stop()
    assert tokens.username == "alice"
    assert provider.status()["ready"] is True and provider.status()["error"] is None


async def test_repr_and_status_show_no_secret(moto: Moto) -> None:
    pool = moto.user_pool(secret=True)
    moto.add_user(pool, "alice")
    source = cognito_source(pool, "alice")
    provider = cognito_provider("alice", source)
    tokens = await provider.user_pool_tokens()
    shown = repr(tokens) + repr(source) + str(provider.status())
    for secret in (tokens.id_token, tokens.access_token, tokens.refresh_token, PASSWORD, pool.client_secret):
        assert secret and secret not in shown


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_mfa_setup_is_named_as_unsupported(moto: Moto) -> None:
    idp = moto.admin("cognito-idp")
    pool_id = idp.create_user_pool(PoolName="mfa-on", MfaConfiguration="ON")["UserPool"]["Id"]
    idp.set_user_pool_mfa_config(
        UserPoolId=pool_id, SoftwareTokenMfaConfiguration={"Enabled": True}, MfaConfiguration="ON"
    )
    client_id = idp.create_user_pool_client(UserPoolId=pool_id, ClientName="c")["UserPoolClient"]["ClientId"]
    pool = PoolClient(pool_id, client_id, None)
    moto.add_user(pool, "alice")
    with pytest.raises(CredentialsUnavailable) as raised:
        await cognito_provider("alice", cognito_source(pool, "alice")).user_pool_tokens()
    assert raised.value.reason == "unsupported_challenge"
    assert "MFA_SETUP" in str(raised.value)


async def test_a_disabled_user_names_the_aws_error(moto: Moto) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    moto.admin("cognito-idp").admin_disable_user(UserPoolId=pool.pool_id, Username="alice")
    with pytest.raises(CredentialsUnavailable) as raised:
        await cognito_provider("alice", cognito_source(pool, "alice")).user_pool_tokens()
    assert raised.value.reason == "NotAuthorizedException" and "User is disabled." in str(raised.value)


@pytest.mark.parametrize("challenge", ["DEVICE_SRP_AUTH", "DEVICE_PASSWORD_VERIFIER", "CUSTOM_CHALLENGE", "NEW_THING"])
def test_device_and_unknown_challenges_are_named_as_unsupported(
    monkeypatch: pytest.MonkeyPatch, challenge: str
) -> None:
    """moto never sends device challenges, so Cognito's answers are canned here."""
    verifier = {
        "ChallengeName": "PASSWORD_VERIFIER",
        "ChallengeParameters": {
            "USERNAME": "alice",
            "USER_ID_FOR_SRP": "alice",
            "SALT": "a1b2c3",
            "SRP_B": "ff" * 300,
            "SECRET_BLOCK": base64.b64encode(b"block").decode(),
        },
    }
    answers = iter([verifier, {"ChallengeName": challenge, "Session": "s", "ChallengeParameters": {}}])
    sent: list[str] = []

    def fake_call(client: object, operation: str, **params: object) -> object:
        sent.append(operation)
        return next(answers)

    monkeypatch.setattr(cognito, "aws_client", lambda *args: object())
    monkeypatch.setattr(cognito, "call_aws", fake_call)
    pool = PoolClient("eu-west-1_Fake", "client", None)
    with pytest.raises(CredentialsUnavailable) as raised:
        cognito.UserPool("alice", cognito_source(pool, "alice")).login(PASSWORD, cognito.refuse_challenges("alice"))
    assert raised.value.reason == "unsupported_challenge"
    assert challenge in str(raised.value)
    assert sent == ["InitiateAuth", "RespondToAuthChallenge"]


async def test_a_refused_password_is_not_retried_until_a_login_is_cached(moto: Moto, clock: ShiftedClock) -> None:
    """Retrying a wrong password every backoff period would keep the account locked out."""
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    wrong = cognito_source(pool, "alice", "Wr0ng-Password!", auth_flow="USER_PASSWORD_AUTH")
    provider = cognito_provider("alice", wrong, clock=clock)
    for _ in range(3):
        with pytest.raises(CredentialsUnavailable) as raised:
            await provider.user_pool_tokens()
        assert raised.value.reason == "NotAuthorizedException" and "not retried" in str(raised.value)
        clock.offset += 120  # well past any backoff
    assert moto.log.flows(pool.client_id) == ["USER_PASSWORD_AUTH"]

    # What `signing-proxy login` leaves behind (the cache path depends on pool, client and user only).
    right = cognito_source(pool, "alice")
    cognito.TokenCache(right).save(cognito.UserPool("alice", right).login(PASSWORD, cognito.refuse_challenges("a")))
    tokens = await provider.user_pool_tokens()
    assert tokens.username == "alice"
    assert moto.log.flows(pool.client_id)[-1] == "REFRESH_TOKEN_AUTH"
