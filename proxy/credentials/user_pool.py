"""The Cognito user pool: logging a user in and keeping its tokens fresh.

A ``cognito`` entry is a user of a Cognito *user pool*: it logs in (SRP by
default, or ``USER_PASSWORD_AUTH``), keeps the ID / access / refresh tokens and
renews them with ``REFRESH_TOKEN_AUTH`` before they expire, logging in again
only when the refresh token is refused. Trading the ID token for AWS
credentials is ``cognito.py``'s job.

Challenges a person must answer (a new password, an MFA code) cannot be met
while the proxy runs: ``signing-proxy login`` (``login.py``) answers them at a
terminal and stores the refresh token in a 0600 file, which the running proxy
then starts from.

Secrets (password, client secret, tokens) never appear in a message, a log
line or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CognitoSource
from ..files import replace_file
from . import srp
from .aws import aws_client, call_aws
from .base import CredentialsUnavailable, run_blocking

log = logging.getLogger("signing_proxy.credentials")

Clock = Callable[[], float]
ChallengeAnswerer = Callable[[str, dict[str, str]], dict[str, str]]
"""Answers one challenge: ``(ChallengeName, ChallengeParameters) -> ChallengeResponses``.

USERNAME and SECRET_HASH are added by the caller. Raise ``CredentialsUnavailable``
to give up.
"""

# Challenges a person can answer at a terminal (``signing-proxy login``), and what each asks for.
INTERACTIVE_CHALLENGES = {
    "NEW_PASSWORD_REQUIRED": "a new password",
    "SOFTWARE_TOKEN_MFA": "a code from an authenticator app",
    "SMS_MFA": "a code sent by SMS",
    "EMAIL_OTP": "a code sent by email",
    "SELECT_MFA_TYPE": "a choice of MFA method",
}
# Challenges neither `run` nor `login` can answer, and what to do instead.
UNSUPPORTED_CHALLENGES = {
    "DEVICE_SRP_AUTH": "device authentication (remembered devices) is not supported; "
    "turn off device tracking for this user pool, or do not remember this device",
    "DEVICE_PASSWORD_VERIFIER": "device authentication (remembered devices) is not supported; "
    "turn off device tracking for this user pool, or do not remember this device",
    "MFA_SETUP": "MFA must be set up first: set it up with another client (the hosted UI), then log in again",
    "CUSTOM_CHALLENGE": "custom authentication challenges (Lambda triggers) are not supported",
}
# Password-login failures that retrying cannot fix (and, for a wrong password, would make worse).
_FINAL_LOGIN_FAILURES = frozenset(
    {
        "NotAuthorizedException",
        "UserNotFoundException",
        "UserNotConfirmedException",
        "PasswordResetRequiredException",
        "challenge_required",
        "unsupported_challenge",
    }
)
_MAX_CHALLENGES = 8  # a login that keeps asking is a loop, not a login
_UNSHOWN_PARAMETERS = frozenset({"USERNAME", "SRP_A", "TIMESTAMP", "DEVICE_KEY"})


def login_hint(name: str) -> str:
    return f"run `signing-proxy login --config FILE --credentials {name}`"


# ---------------------------------------------------------------- tokens


@dataclass(frozen=True)
class UserPoolTokens:
    """What a user pool login gives; the tokens never show in a ``repr``.

    ``username`` is the pool's internal user name (``cognito:username``: the
    sign-in name, or the sub when users sign in by e-mail), the one
    ``REFRESH_TOKEN_AUTH`` needs for ``SECRET_HASH``.
    """

    id_token: str = field(repr=False)
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: float
    username: str
    sub: str


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, *not* verified.

    Only used to read ``exp``, ``sub`` and the user name from tokens Cognito
    has just sent us over TLS; the API that receives them does the verifying.
    """
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def tokens_from_result(
    result: dict[str, Any], *, refresh_token: str | None, fallback_username: str, now: float
) -> UserPoolTokens:
    """``UserPoolTokens`` from an ``AuthenticationResult``.

    ``expires_at`` is the earlier ``exp`` of the two tokens (``ExpiresIn`` if
    they carry none); a refresh answer has no refresh token, so the one used is kept.
    """
    id_token, access_token = result["IdToken"], result["AccessToken"]
    id_claims, access_claims = jwt_claims(id_token), jwt_claims(access_token)
    expiries = [float(c["exp"]) for c in (id_claims, access_claims) if isinstance(c.get("exp"), int | float)]
    expires_at = min(expiries) if expiries else now + float(result.get("ExpiresIn") or 3600)
    username = id_claims.get("cognito:username") or access_claims.get("username") or fallback_username
    return UserPoolTokens(
        id_token=id_token,
        access_token=access_token,
        refresh_token=result.get("RefreshToken") or refresh_token,
        expires_at=expires_at,
        username=str(username),
        sub=str(id_claims.get("sub") or access_claims.get("sub") or ""),
    )


# ---------------------------------------------------------------- the refresh-token cache


@dataclass(frozen=True)
class CachedLogin:
    refresh_token: str = field(repr=False)
    username: str  # internal user name, for SECRET_HASH on refresh
    device_key: str | None = None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "signing-proxy"


def cache_file_name(source: CognitoSource) -> str:
    """One file per pool, app client and user; the user name is hashed (it may be an e-mail address)."""
    user = hashlib.sha256(source.username.encode()).hexdigest()[:16]
    return f"cognito-{source.user_pool_id}-{source.client_id}-{user}.json"


class TokenCache:
    """The refresh token ``signing-proxy login`` leaves for ``run``: a JSON file, mode 0600, in a 0700 dir."""

    def __init__(self, source: CognitoSource) -> None:
        self.source = source
        if source.token_cache:
            configured = Path(source.token_cache).expanduser()
            self.path = configured / cache_file_name(source) if configured.is_dir() else configured
        else:
            self.path = default_cache_dir() / cache_file_name(source)

    def load(self) -> CachedLogin | None:
        """The cached login, or None when there is none (or it is unreadable, or for another user)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("ignoring token cache %s: %s", self.path, getattr(error, "strerror", None) or "not JSON")
            return None
        source = self.source
        expected = (source.user_pool_id, source.client_id, source.username)
        if (
            not isinstance(data, dict)
            or (data.get("user_pool_id"), data.get("client_id"), data.get("login")) != expected
        ):
            log.warning("ignoring token cache %s: it is for another user pool, app client or user", self.path)
            return None
        if not data.get("refresh_token"):
            return None
        return CachedLogin(
            str(data["refresh_token"]), str(data.get("username") or source.username), data.get("device_key")
        )

    def save(self, tokens: UserPoolTokens) -> Path:
        """Write the refresh token (never the other tokens) for ``run`` to start from."""
        if not tokens.refresh_token:
            raise CredentialsUnavailable("Cognito returned no refresh token to cache", "no_refresh_token")
        record = {
            "version": 1,
            "user_pool_id": self.source.user_pool_id,
            "client_id": self.source.client_id,
            "login": self.source.username,
            "username": tokens.username,
            "refresh_token": tokens.refresh_token,
            "device_key": None,
            "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        write_private(self.path, json.dumps(record))
        return self.path


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a 0600 file; create a missing directory with mode 0700.

    The file is complete or absent (temporary file + rename), and never
    readable by others, even for an instant, whatever the umask.
    """
    directory = path.parent
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    replace_file(path, text.encode("utf-8"), 0o600)


# ---------------------------------------------------------------- the user pool


def refuse_challenges(name: str) -> ChallengeAnswerer:
    """The answerer for a running proxy: nobody is at a keyboard, so point at ``signing-proxy login``."""

    def refuse(challenge: str, parameters: dict[str, str]) -> dict[str, str]:
        wants = INTERACTIVE_CHALLENGES.get(challenge, "an answer")
        raise CredentialsUnavailable(
            f"Cognito asks for {challenge} ({wants}), which needs a person: {login_hint(name)}; "
            "the running proxy picks the login up",
            "challenge_required",
        )

    return refuse


class RefreshRefused(CredentialsUnavailable):
    """The refresh token was refused (expired, revoked): a full login is needed."""


class UserPool:
    """One user of one app client: log in, answer challenges, refresh. Blocking; run it off the loop.

    ``fetch`` is what ``Refreshing`` calls: refresh with the token held (or the
    cached one from ``signing-proxy login``), and log in with the configured
    password only when there is no refresh token or it is refused.
    """

    def __init__(self, name: str, source: CognitoSource, *, clock: Clock = time.time) -> None:
        self.name = name
        self.source = source
        self.cache = TokenCache(source)
        self._clock = clock
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._held: UserPoolTokens | None = None
        self._persist = False  # the held refresh token came from the cache: keep the file current
        self._refused: set[str] = set()  # hashes of refresh tokens Cognito refused
        self._final_failure: tuple[str, str] | None = None  # (message, reason) of a refused password login

    # ------------------------------------------------------------ calls

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = aws_client("cognito-idp", self.source.pool_region, self.source.endpoint_url)
            return self._client

    def _secret_hash(self, username: str) -> dict[str, str]:
        secret = self.source.client_secret
        return {"SECRET_HASH": srp.secret_hash(secret, username, self.source.client_id)} if secret else {}

    def _call(self, operation: str, what: str, parameters: dict[str, str], **params: Any) -> dict[str, Any]:
        secrets = [v for k, v in parameters.items() if k not in _UNSHOWN_PARAMETERS]
        secrets += [self.source.password, self.source.client_secret, params.get("Session")]
        result: dict[str, Any] = call_aws(
            self.client, operation, secrets=secrets, what=what, ClientId=self.source.client_id, **params
        )
        return result

    # ------------------------------------------------------------ login

    def login(self, password: str, answer: ChallengeAnswerer) -> UserPoolTokens:
        """A full login with ``password``, answering every challenge through ``answer``."""
        flow = self.source.auth_flow
        username = self.source.username
        a = srp.generate_private_value() if flow == "USER_SRP_AUTH" else 0
        parameters = {"USERNAME": username}
        if flow == "USER_SRP_AUTH":
            parameters["SRP_A"] = format(srp.public_value(a), "x")
        else:
            parameters["PASSWORD"] = password
        parameters |= self._secret_hash(username)
        response = self._call("InitiateAuth", flow, parameters, AuthFlow=flow, AuthParameters=parameters)
        for _ in range(_MAX_CHALLENGES):
            if "AuthenticationResult" in response:
                tokens = self._tokens(response["AuthenticationResult"], None, username)
                log.info(
                    "credentials %s: logged in to user pool %s as %s",
                    self.name,
                    self.source.user_pool_id,
                    username,
                )
                return tokens
            response, username = self._respond(response, username, password, a, answer)
        raise CredentialsUnavailable(f"Cognito kept asking for challenges after {_MAX_CHALLENGES}", "challenge_loop")

    def _respond(
        self, response: dict[str, Any], username: str, password: str, a: int, answer: ChallengeAnswerer
    ) -> tuple[dict[str, Any], str]:
        """Answer the challenge in ``response``; return Cognito's next answer and the user name to use."""
        challenge = str(response.get("ChallengeName") or "")
        parameters = {str(k): str(v) for k, v in (response.get("ChallengeParameters") or {}).items()}
        username = parameters.get("USERNAME") or username  # Cognito may switch to the internal name
        responses = self._answer(challenge, parameters, password, a, answer)
        responses |= {"USERNAME": username, **self._secret_hash(username)}
        extra = {"Session": response["Session"]} if response.get("Session") else {}
        reply = self._call(
            "RespondToAuthChallenge",
            challenge,
            responses,
            ChallengeName=challenge,
            ChallengeResponses=responses,
            **extra,
        )
        return reply, username

    def _answer(
        self, challenge: str, parameters: dict[str, str], password: str, a: int, answer: ChallengeAnswerer
    ) -> dict[str, str]:
        if challenge == "PASSWORD_VERIFIER":
            return self._password_verifier(parameters, password, a)
        if challenge in INTERACTIVE_CHALLENGES:
            return answer(challenge, parameters)
        why = UNSUPPORTED_CHALLENGES.get(challenge, "this challenge is not supported")
        raise CredentialsUnavailable(
            f"Cognito asks for {challenge or 'an unnamed challenge'}: {why}", "unsupported_challenge"
        )

    def _password_verifier(self, parameters: dict[str, str], password: str, a: int) -> dict[str, str]:
        """The SRP proof of the password for a ``PASSWORD_VERIFIER`` challenge."""
        try:
            claim = srp.password_claim(
                a=a,
                user_pool_id=self.source.user_pool_id,
                user_id=parameters["USER_ID_FOR_SRP"],
                password=password,
                salt_hex=parameters["SALT"],
                srp_b_hex=parameters["SRP_B"],
                secret_block=parameters["SECRET_BLOCK"],
                moment=datetime.datetime.now(datetime.UTC),
            )
        except KeyError as missing:
            raise CredentialsUnavailable(
                f"Cognito's PASSWORD_VERIFIER challenge lacks {missing}", "srp_error"
            ) from None
        except srp.SrpError as error:
            raise CredentialsUnavailable(
                f"Cognito's PASSWORD_VERIFIER challenge is unusable: {error}", "srp_error"
            ) from None
        return claim.as_challenge_responses()

    # ------------------------------------------------------------ refresh

    def refresh(self, refresh_token: str, username: str) -> UserPoolTokens:
        """``REFRESH_TOKEN_AUTH``; ``username`` is the internal one (it keys ``SECRET_HASH``).

        Raises ``RefreshRefused`` when Cognito says ``NotAuthorizedException``.
        """
        parameters = {"REFRESH_TOKEN": refresh_token, **self._secret_hash(username)}
        try:
            response = self._call(
                "InitiateAuth",
                "REFRESH_TOKEN_AUTH",
                parameters,
                AuthFlow="REFRESH_TOKEN_AUTH",
                AuthParameters=parameters,
            )
        except CredentialsUnavailable as error:
            if error.reason == "NotAuthorizedException":
                raise RefreshRefused(str(error), error.reason) from None
            raise
        if "AuthenticationResult" not in response:
            raise CredentialsUnavailable(
                "Cognito answered REFRESH_TOKEN_AUTH with a challenge", "unsupported_challenge"
            )
        return self._tokens(response["AuthenticationResult"], refresh_token, username)

    def _tokens(self, result: dict[str, Any], refresh_token: str | None, username: str) -> UserPoolTokens:
        return tokens_from_result(result, refresh_token=refresh_token, fallback_username=username, now=self._clock())

    # ------------------------------------------------------------ what Refreshing runs

    async def fetch(self) -> UserPoolTokens:
        return await run_blocking(self.obtain)

    def obtain(self) -> UserPoolTokens:
        """Fresh tokens by the cheapest way that works: held refresh token, cached one, password."""
        held = self._held
        if held is not None and held.refresh_token:
            tokens = self._try_refresh(held.refresh_token, held.username, "held")
            if tokens is not None:
                return self._keep(tokens, used=held.refresh_token, persist=self._persist)
        cached = self.cache.load()
        if cached is not None and _digest(cached.refresh_token) not in self._refused:
            tokens = self._try_refresh(cached.refresh_token, cached.username, f"cached in {self.cache.path}")
            if tokens is not None:
                return self._keep(tokens, used=cached.refresh_token, persist=True)
        if not self.source.password:
            raise CredentialsUnavailable(
                f"no password in the config and no usable refresh token in {self.cache.path}: {login_hint(self.name)}",
                "login_required",
            )
        tokens = self._password_login(self.source.password)
        # A user who ran `signing-proxy login` keeps a cache: replace the refused token in it.
        return self._keep(tokens, used=None, persist=cached is not None)

    def _password_login(self, password: str) -> UserPoolTokens:
        """A headless login, not repeated once Cognito has refused the password or asked for a person.

        Retrying a wrong password every backoff period would keep the user locked
        out (Cognito locks after a few failures); a challenge will not go away by
        itself. A restart, or a login cached by ``signing-proxy login``, clears this.
        """
        if self._final_failure is not None:
            raise CredentialsUnavailable(*self._final_failure)
        try:
            return self.login(password, refuse_challenges(self.name))
        except CredentialsUnavailable as error:
            if error.reason not in _FINAL_LOGIN_FAILURES:
                raise
            message = f"{error} (not retried until the proxy restarts or `signing-proxy login` caches a login)"
            self._final_failure = (message, error.reason)
            raise CredentialsUnavailable(message, error.reason) from None

    def _try_refresh(self, refresh_token: str, username: str, origin: str) -> UserPoolTokens | None:
        try:
            return self.refresh(refresh_token, username)
        except RefreshRefused as error:
            self._refused.add(_digest(refresh_token))
            log.warning("credentials %s: refresh token (%s) refused: %s", self.name, origin, error)
            return None

    def _keep(self, tokens: UserPoolTokens, *, used: str | None, persist: bool) -> UserPoolTokens:
        """Hold the new tokens; if a cached refresh token rotated, rewrite the file for the next start."""
        self._held, self._persist = tokens, persist
        if persist and tokens.refresh_token != used:
            try:
                self.cache.save(tokens)
            except (OSError, CredentialsUnavailable) as error:
                log.warning("credentials %s: cannot update %s: %s", self.name, self.cache.path, error)
        return tokens


def _digest(secret: str) -> str:
    """What we remember about a refused refresh token: not the token itself."""
    return hashlib.sha256(secret.encode()).hexdigest()
