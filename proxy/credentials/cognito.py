"""``cognito`` and ``cognito_guest`` credentials: the identity pool exchange.

A ``cognito`` entry logs a user pool user in (``user_pool.py``: SRP or
password, challenges, refresh tokens) and, with an ``identity_pool_id``, trades
the ID token for temporary AWS credentials here (``GetId`` once, then
``GetCredentialsForIdentity`` at every renewal). A ``cognito_guest`` entry does
the identity pool part without a user.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..config import CognitoGuestSource, CognitoSource
from .aws import aws_client, call_aws
from .base import AwsCredentials, CredentialSource, CredentialsUnavailable, Provider, Refreshing, run_blocking
from .user_pool import Clock, UserPool, UserPoolTokens


def logins_key(region: str, user_pool_id: str) -> str:
    """The identity provider name of a user pool in an identity pool's ``Logins`` map."""
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"cognito-idp.{region}.{domain}/{user_pool_id}"


class IdentityPool:
    """``GetId`` once, then ``GetCredentialsForIdentity`` at every renewal. Blocking.

    The identity id is kept: asking ``GetId`` again would, for guests, create
    a new identity every hour.
    """

    def __init__(
        self, identity_pool_id: str, region: str, endpoint_url: str | None, custom_role_arn: str | None = None
    ) -> None:
        self.identity_pool_id = identity_pool_id
        self.region = region
        self.endpoint_url = endpoint_url
        self.custom_role_arn = custom_role_arn
        self.identity_id: str | None = None
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = aws_client("cognito-identity", self.region, self.endpoint_url)
            return self._client

    def credentials(self, logins: dict[str, str]) -> AwsCredentials:
        try:
            return self._exchange(logins)
        except CredentialsUnavailable as error:
            if error.reason != "ResourceNotFoundException" or self.identity_id is None:
                raise
            self.identity_id = None  # the identity was deleted: get a new one, once
            return self._exchange(logins)

    def _exchange(self, logins: dict[str, str]) -> AwsCredentials:
        secrets = list(logins.values())
        with_logins = {"Logins": logins} if logins else {}
        if self.identity_id is None:
            answer = call_aws(
                self.client, "GetId", secrets=secrets, IdentityPoolId=self.identity_pool_id, **with_logins
            )
            self.identity_id = str(answer["IdentityId"])
        extra = dict(with_logins)
        if self.custom_role_arn:
            extra["CustomRoleArn"] = self.custom_role_arn
        answer = call_aws(
            self.client, "GetCredentialsForIdentity", secrets=secrets, IdentityId=self.identity_id, **extra
        )
        issued = answer["Credentials"]
        return AwsCredentials(
            issued["AccessKeyId"],
            issued["SecretKey"],
            issued.get("SessionToken"),
            issued["Expiration"].timestamp() if issued.get("Expiration") else None,
            str(answer.get("IdentityId") or self.identity_id),
        )


class CognitoUserCredentials(CredentialSource):
    """AWS credentials for a logged-in user pool user, via the identity pool."""

    kind = "cognito"

    def __init__(self, source: CognitoSource, tokens: Refreshing[UserPoolTokens]) -> None:
        assert source.identity_pool_id is not None
        self._tokens = tokens
        self._logins_key = logins_key(source.pool_region, source.user_pool_id)
        pool_id = source.identity_pool_id
        region = pool_id.split(":", 1)[0] if ":" in pool_id else source.pool_region
        self.pool = IdentityPool(pool_id, region, source.endpoint_url, source.custom_role_arn)

    async def fetch(self) -> AwsCredentials:
        tokens = await self._tokens.get()
        return await run_blocking(self.pool.credentials, {self._logins_key: tokens.id_token})


class CognitoGuest(CredentialSource):
    """AWS credentials for an unauthenticated (guest) identity of an identity pool."""

    kind = "cognito_guest"

    def __init__(self, source: CognitoGuestSource) -> None:
        self.pool = IdentityPool(source.identity_pool_id, source.pool_region, source.endpoint_url)

    async def fetch(self) -> AwsCredentials:
        return await run_blocking(self.pool.credentials, {})


def cognito_provider(name: str, source: CognitoSource | CognitoGuestSource, *, clock: Clock = time.time) -> Provider:
    """The provider for a ``cognito`` or ``cognito_guest`` entry; nothing is fetched yet.

    ``clock`` is for tests that move time forward instead of waiting for tokens to age.
    """
    if isinstance(source, CognitoGuestSource):
        guest = CognitoGuest(source)
        return Provider(name, guest.kind, Refreshing(guest.fetch, name=name, clock=clock))
    user = UserPool(name, source, clock=clock)
    tokens: Refreshing[UserPoolTokens] = Refreshing(user.fetch, name=f"{name} (user pool tokens)", clock=clock)
    credentials = None
    if source.identity_pool_id:
        exchange = CognitoUserCredentials(source, tokens)
        credentials = Refreshing(exchange.fetch, name=name, clock=clock)
    return Provider(name, "cognito", credentials, tokens)
