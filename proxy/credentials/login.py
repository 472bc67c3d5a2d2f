"""``signing-proxy login``: log a Cognito user in at a terminal and cache the refresh token.

Some logins need a person: a first login with a temporary password
(``NEW_PASSWORD_REQUIRED``), an MFA code. The running proxy cannot ask, so this
command does the login once, answers the challenges by prompting, and stores the
refresh token (mode 0600) where ``run`` looks first. From then on the proxy
renews tokens with that refresh token and needs no password.

Prompts go through ``input_fn`` / ``getpass_fn`` so tests can script them;
nothing secret is ever printed.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Callable
from typing import TextIO

from ..config import CognitoSource, ConfigError, load_config
from .base import CredentialsUnavailable
from .user_pool import INTERACTIVE_CHALLENGES, UserPool

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_NEW_PASSWORD_TRIES = 3


class TerminalChallenges:
    """Answers Cognito challenges by asking the person at the terminal."""

    def __init__(self, input_fn: Callable[[str], str], getpass_fn: Callable[[str], str], out: TextIO) -> None:
        self.input_fn = input_fn
        self.getpass_fn = getpass_fn
        self.out = out
        self.new_password: str | None = None  # set when the user chose one, so we can say so

    def __call__(self, challenge: str, parameters: dict[str, str]) -> dict[str, str]:
        if challenge == "NEW_PASSWORD_REQUIRED":
            return self._new_password(parameters)
        if challenge == "SELECT_MFA_TYPE":
            return self._select_mfa(parameters)
        if challenge in ("SOFTWARE_TOKEN_MFA", "SMS_MFA", "EMAIL_OTP"):
            return self._code(challenge, parameters)
        raise CredentialsUnavailable(f"Cognito asks for {challenge}, which is not supported", "unsupported_challenge")

    def _new_password(self, parameters: dict[str, str]) -> dict[str, str]:
        print("Cognito requires a new password for this user (first login or reset).", file=self.out)
        answers = {"NEW_PASSWORD": self._choose_password()}
        for attribute in _required_attributes(parameters):
            label = attribute.removeprefix("userAttributes.")
            answers[attribute] = self.input_fn(f"Value for required attribute {label}: ").strip()
        return answers

    def _choose_password(self) -> str:
        for _ in range(_NEW_PASSWORD_TRIES):
            first = self.getpass_fn("New password: ")
            if first and first == self.getpass_fn("New password again: "):
                self.new_password = first
                return first
            print("The passwords are empty or differ; try again.", file=self.out)
        raise CredentialsUnavailable("no new password chosen", "challenge_required")

    def _select_mfa(self, parameters: dict[str, str]) -> dict[str, str]:
        choices = _json_list(parameters.get("MFAS_CAN_CHOOSE")) or ["SOFTWARE_TOKEN_MFA", "SMS_MFA"]
        answer = self.input_fn(f"MFA method ({', '.join(choices)}): ").strip()
        if answer not in choices:
            raise CredentialsUnavailable(f"unknown MFA method {answer!r}", "challenge_required")
        return {"ANSWER": answer}

    def _code(self, challenge: str, parameters: dict[str, str]) -> dict[str, str]:
        destination = parameters.get("CODE_DELIVERY_DESTINATION")
        where = f" (sent to {destination})" if destination else ""
        code = self.input_fn(f"Enter {INTERACTIVE_CHALLENGES[challenge]}{where}: ").strip()
        return {f"{challenge}_CODE": code}


def _json_list(text: str | None) -> list[str]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return [str(item) for item in value] if isinstance(value, list) else []


def _required_attributes(parameters: dict[str, str]) -> list[str]:
    """``requiredAttributes`` of NEW_PASSWORD_REQUIRED, as response keys (``userAttributes.email``)."""
    names = _json_list(parameters.get("requiredAttributes"))
    return [name if name.startswith("userAttributes.") else f"userAttributes.{name}" for name in names]


def _cognito_source(config_path: str, credentials_name: str, out: TextIO) -> CognitoSource | None:
    try:
        config = load_config(config_path)
    except ConfigError as error:
        print(f"signing-proxy login: configuration error:\n{error}", file=out)
        return None
    source = config.credentials.get(credentials_name)
    if not isinstance(source, CognitoSource):
        cognito = sorted(n for n, s in config.credentials.items() if isinstance(s, CognitoSource))
        print(
            f"signing-proxy login: {credentials_name!r} is not a cognito entry under credentials: "
            f"in {config_path} (cognito entries: {', '.join(cognito) or 'none'})",
            file=out,
        )
        return None
    return source


def login_main(
    config_path: str,
    credentials_name: str,
    *,
    input_fn: Callable[[str], str] = input,
    getpass_fn: Callable[[str], str] = getpass.getpass,
    out: TextIO = sys.stdout,
) -> int:
    """Log ``credentials_name`` in, answering challenges at the terminal; cache the refresh token.

    Returns 0 on success, 1 when the login fails, 2 for a bad config or name.
    """
    source = _cognito_source(config_path, credentials_name, out)
    if source is None:
        return EXIT_USAGE
    user = UserPool(credentials_name, source)
    challenges = TerminalChallenges(input_fn, getpass_fn, out)
    try:
        password = source.password or getpass_fn(f"Password for {source.username}: ")
        tokens = user.login(password, challenges)
        path = user.cache.save(tokens)
    except CredentialsUnavailable as error:
        print(f"signing-proxy login: login failed: {error} [{error.reason}]", file=out)
        return EXIT_FAILED
    except EOFError:
        print("signing-proxy login: cancelled (no input)", file=out)
        return EXIT_FAILED
    except OSError as error:
        print(f"signing-proxy login: cannot write the token cache {user.cache.path}: {error.strerror}", file=out)
        return EXIT_FAILED
    print(f"Logged in to {source.user_pool_id} as {tokens.username}.", file=out)
    print(f"Refresh token stored in {path} (mode 0600); `signing-proxy run` now starts from it.", file=out)
    if challenges.new_password and source.password:
        print("The password in the config is now out of date: update or remove it.", file=out)
    return EXIT_OK
