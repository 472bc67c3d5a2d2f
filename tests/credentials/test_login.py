"""``signing-proxy login``: interactive challenges, the 0600 refresh-token cache, and `run` starting from it."""

from __future__ import annotations

import io
import json
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.credentials import CredentialsUnavailable
from proxy.credentials.cognito import cognito_provider
from proxy.credentials.login import login_main
from proxy.credentials.user_pool import TokenCache
from tests.credentials.conftest import PASSWORD, Moto, PoolClient, ShiftedClock, cognito_entry, cognito_source

pytestmark = pytest.mark.usefixtures("moto")

TEMPORARY = "Temp-Passw0rd!"
CHOSEN = "Chosen-Passw0rd!"


def scripted(answers: Iterable[str]) -> tuple[Callable[[str], str], list[str]]:
    """A prompt function answering from a list, and the prompts it was shown."""
    pending, prompts = list(answers), []

    def prompt(text: str) -> str:
        prompts.append(text)
        if not pending:
            raise EOFError
        return pending.pop(0)

    return prompt, prompts


def write_config(tmp_path: Path, entry: dict[str, Any], name: str = "me") -> str:
    config = {
        "credentials": {name: entry},
        "routes": [{"upstream": "http://127.0.0.1:9", "auth": "cognito_id_token", "credentials": name}],
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run_login(
    config: str, name: str = "me", *, typed: Iterable[str] = (), hidden: Iterable[str] = ()
) -> tuple[int, str, list[str]]:
    input_fn, shown = scripted(typed)
    getpass_fn, hidden_prompts = scripted(hidden)
    out = io.StringIO()
    code = login_main(config, name, input_fn=input_fn, getpass_fn=getpass_fn, out=out)
    return code, out.getvalue(), shown + hidden_prompts


@pytest.mark.parametrize("flow", ["USER_SRP_AUTH", "USER_PASSWORD_AUTH"])
async def test_new_password_required_then_run_starts_from_the_cache(
    moto: Moto, tmp_path: Path, private_cache_home: Path, clock: ShiftedClock, flow: str
) -> None:
    pool = moto.user_pool(secret=True)
    moto.add_user(pool, "newbie", TEMPORARY, temporary=True)
    config = write_config(tmp_path, cognito_entry(pool, "newbie", None, auth_flow=flow))

    code, output, prompts = run_login(config, hidden=[TEMPORARY, CHOSEN, CHOSEN])

    assert code == 0, output
    assert prompts == ["Password for newbie: ", "New password: ", "New password again: "]
    cache_dir = private_cache_home / "signing-proxy"
    (cache_file,) = cache_dir.iterdir()
    assert stat.S_IMODE(cache_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert str(cache_file) in output
    record = json.loads(cache_file.read_text())
    assert record["refresh_token"] and record["username"] == "newbie" and record["device_key"] is None
    for secret in (TEMPORARY, CHOSEN, pool.client_secret, record["refresh_token"]):
        assert secret not in output
    assert TEMPORARY not in cache_file.read_text() and CHOSEN not in cache_file.read_text()
    challenge_flows = moto.log.flows(pool.client_id)
    assert challenge_flows[-1] == "NEW_PASSWORD_REQUIRED"

    # `run`, with no password in the config, starts from the cached refresh token.
    before = len(challenge_flows)
    provider = cognito_provider("me", cognito_source(pool, "newbie", None, auth_flow=flow), clock=clock)
    tokens = await provider.user_pool_tokens()
    assert tokens.username == "newbie"
    assert moto.log.flows(pool.client_id)[before:] == ["REFRESH_TOKEN_AUTH"]
    # ... and keeps renewing with it.
    clock.jump_to(tokens.expires_at - 60)
    assert (await provider.user_pool_tokens()).id_token != tokens.id_token
    assert moto.log.flows(pool.client_id)[before:] == ["REFRESH_TOKEN_AUTH", "REFRESH_TOKEN_AUTH"]


async def test_a_running_proxy_picks_up_a_login_made_while_it_runs(
    moto: Moto, tmp_path: Path, clock: ShiftedClock
) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "newbie", TEMPORARY, temporary=True)
    provider = cognito_provider("me", cognito_source(pool, "newbie", TEMPORARY), clock=clock)
    with pytest.raises(CredentialsUnavailable) as raised:
        await provider.user_pool_tokens()
    assert raised.value.reason == "challenge_required"

    code, output, _ = run_login(write_config(tmp_path, cognito_entry(pool, "newbie", TEMPORARY)), hidden=[CHOSEN] * 2)
    assert code == 0, output
    clock.offset += 60  # past the backoff

    assert (await provider.user_pool_tokens()).username == "newbie"
    assert moto.log.flows(pool.client_id)[-1] == "REFRESH_TOKEN_AUTH"


async def test_the_cache_goes_where_token_cache_says(moto: Moto, tmp_path: Path) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    target = tmp_path / "private" / "alice.json"
    config = write_config(tmp_path, cognito_entry(pool, "alice", token_cache=str(target)))

    code, output, prompts = run_login(config)

    assert code == 0, output
    assert prompts == []  # the config has the password and no challenge came
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    source = cognito_source(pool, "alice", None, token_cache=str(target))
    assert TokenCache(source).load() is not None
    assert (await cognito_provider("alice", source).user_pool_tokens()).username == "alice"


async def test_a_refused_cached_token_falls_back_to_the_password(moto: Moto, tmp_path: Path) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    assert run_login(write_config(tmp_path, cognito_entry(pool, "alice")))[0] == 0
    moto.admin("cognito-idp").admin_user_global_sign_out(UserPoolId=pool.pool_id, Username="alice")
    cache = TokenCache(cognito_source(pool, "alice"))
    refused = cache.load()
    before = len(moto.log.flows(pool.client_id))

    tokens = await cognito_provider("alice", cognito_source(pool, "alice")).user_pool_tokens()

    assert tokens.username == "alice"
    assert moto.log.flows(pool.client_id)[before:] == ["REFRESH_TOKEN_AUTH", "USER_SRP_AUTH", "PASSWORD_VERIFIER"]
    renewed = cache.load()
    assert refused is not None and renewed is not None
    assert renewed.refresh_token == tokens.refresh_token != refused.refresh_token
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o600


async def test_a_rotated_refresh_token_is_written_back_to_the_cache(
    moto: Moto, tmp_path: Path, clock: ShiftedClock
) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    assert run_login(write_config(tmp_path, cognito_entry(pool, "alice")))[0] == 0
    moto.strict.rotating_clients.add(pool.client_id)
    source = cognito_source(pool, "alice", None)
    provider = cognito_provider("alice", source, clock=clock)

    first = await provider.user_pool_tokens()
    assert TokenCache(source).load().refresh_token == first.refresh_token  # type: ignore[union-attr]
    clock.jump_to(first.expires_at - 60)
    second = await provider.user_pool_tokens()

    assert second.refresh_token != first.refresh_token
    assert TokenCache(source).load().refresh_token == second.refresh_token  # type: ignore[union-attr]
    # A fresh start (a restart of `run`) works from the file.
    assert (await cognito_provider("alice", source).user_pool_tokens()).username == "alice"


async def test_a_refused_cached_token_without_a_password_says_to_log_in_again(moto: Moto, tmp_path: Path) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    assert run_login(write_config(tmp_path, cognito_entry(pool, "alice")))[0] == 0
    moto.admin("cognito-idp").admin_user_global_sign_out(UserPoolId=pool.pool_id, Username="alice")
    with pytest.raises(CredentialsUnavailable) as raised:
        await cognito_provider("alice", cognito_source(pool, "alice", None)).user_pool_tokens()
    assert raised.value.reason == "login_required" and "signing-proxy login" in str(raised.value)


def test_sms_mfa_is_prompted_for(moto: Moto, tmp_path: Path) -> None:
    pool = moto.user_pool(secret=True)
    moto.add_user(pool, "mfa-user")
    moto.admin("cognito-idp").admin_set_user_mfa_preference(
        UserPoolId=pool.pool_id, Username="mfa-user", SMSMfaSettings={"Enabled": True, "PreferredMfa": True}
    )
    code, output, prompts = run_login(write_config(tmp_path, cognito_entry(pool, "mfa-user")), typed=["123456"])
    assert code == 0, output
    assert prompts == ["Enter a code sent by SMS: "]
    assert moto.log.flows(pool.client_id)[-1] == "SMS_MFA"
    assert moto.log.calls(pool.client_id)[-1].params["SMS_MFA_CODE"] == "123456"


def test_software_token_mfa_is_prompted_for(moto: Moto, tmp_path: Path) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "totp-user")
    enable_software_token_mfa(moto, pool, "totp-user")
    config = write_config(tmp_path, cognito_entry(pool, "totp-user"))
    code, output, prompts = run_login(config, typed=["654321"])
    assert code == 0, output
    assert prompts == ["Enter a code from an authenticator app: "]
    assert moto.log.calls(pool.client_id)[-1].params["SOFTWARE_TOKEN_MFA_CODE"] == "654321"


def test_a_wrong_password_fails_with_the_aws_error(moto: Moto, tmp_path: Path, private_cache_home: Path) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    config = write_config(tmp_path, cognito_entry(pool, "alice", None, auth_flow="USER_PASSWORD_AUTH"))
    code, output, _ = run_login(config, hidden=["Not-The-Passw0rd"])
    assert code == 1
    assert "NotAuthorizedException" in output and "Not-The-Passw0rd" not in output
    assert not (private_cache_home / "signing-proxy").exists()


def test_mismatched_new_passwords_are_asked_again(moto: Moto, tmp_path: Path) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "newbie", TEMPORARY, temporary=True)
    config = write_config(tmp_path, cognito_entry(pool, "newbie", TEMPORARY))
    code, output, prompts = run_login(config, hidden=[CHOSEN, "typo", CHOSEN, CHOSEN])
    assert code == 0, output
    assert prompts.count("New password: ") == 2
    assert "out of date" in output  # the config's password is the old one


def test_closed_input_cancels(moto: Moto, tmp_path: Path) -> None:
    pool = moto.user_pool()
    moto.add_user(pool, "alice")
    code, output, _ = run_login(write_config(tmp_path, cognito_entry(pool, "alice", None)), hidden=[])
    assert code == 1 and "cancelled" in output


def test_an_entry_that_is_not_cognito_is_a_usage_error(tmp_path: Path) -> None:
    entry = {"type": "static", "access_key_id": "AKID", "secret_access_key": "s"}
    config = {"credentials": {"keys": entry}, "routes": [{"upstream": "http://127.0.0.1:9", "region": "eu-west-1"}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    code, output, _ = run_login(str(path), "keys")
    assert code == 2 and "not a cognito entry" in output
    code, output, _ = run_login(str(tmp_path / "missing.yaml"), "keys")
    assert code == 2 and "configuration error" in output


def enable_software_token_mfa(moto: Moto, pool: PoolClient, username: str) -> None:
    idp = moto.admin("cognito-idp")
    login = idp.admin_initiate_auth(
        UserPoolId=pool.pool_id,
        ClientId=pool.client_id,
        AuthFlow="ADMIN_USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": username, "PASSWORD": PASSWORD},
    )
    access_token = login["AuthenticationResult"]["AccessToken"]
    idp.associate_software_token(AccessToken=access_token)
    idp.verify_software_token(AccessToken=access_token, UserCode="123456")
    idp.admin_set_user_mfa_preference(
        UserPoolId=pool.pool_id,
        Username=username,
        SoftwareTokenMfaSettings={"Enabled": True, "PreferredMfa": True},
    )
