"""Sources that read what is already on this machine: the default chain, one profile, static keys.

botocore finds them exactly as the AWS CLI would (environment, shared files, SSO,
container and instance roles); its calls block, so they run through ``run_blocking``.
"""

from __future__ import annotations

from typing import Any

from .aws import botocore_session
from .base import AwsCredentials, CredentialSource, CredentialsUnavailable, run_blocking


def _frozen(credentials: Any, identity: str) -> AwsCredentials:
    """Our credentials from a botocore Credentials object (blocking: may refresh)."""
    frozen = credentials.get_frozen_credentials()
    expiry = getattr(credentials, "_expiry_time", None)
    return AwsCredentials(
        frozen.access_key,
        frozen.secret_key,
        frozen.token,
        expiry.timestamp() if expiry is not None else None,
        identity,
    )


class BotocoreChain(CredentialSource):
    """The AWS default chain (env, profiles, SSO, container and instance roles) or one profile."""

    kind = "default"

    def __init__(self, profile: str | None = None) -> None:
        self.profile = profile
        self._botocore_credentials: Any = None
        if profile:
            self.kind = "profile"

    def _load(self) -> AwsCredentials:
        import botocore.exceptions

        try:
            if self._botocore_credentials is None:
                self._botocore_credentials = botocore_session(self.profile).get_credentials()
            if self._botocore_credentials is None:
                raise CredentialsUnavailable(
                    "no AWS credentials found in the default chain (environment, shared config and "
                    "credentials files, SSO, container or instance role); set AWS_PROFILE or configure one",
                    "no_credentials",
                )
            method = getattr(self._botocore_credentials, "method", "") or ""
            return _frozen(self._botocore_credentials, f"{self.kind} ({method})" if method else self.kind)
        except botocore.exceptions.ProfileNotFound:
            raise CredentialsUnavailable(f"AWS profile {self.profile!r} not found", "profile_not_found") from None
        except botocore.exceptions.BotoCoreError as error:
            # botocore's messages name files and profiles, never secret values.
            raise CredentialsUnavailable(f"{type(error).__name__}: {error}", "botocore_error") from None

    async def fetch(self) -> AwsCredentials:
        return await run_blocking(self._load)


class Static(CredentialSource):
    kind = "static"

    def __init__(self, access_key_id: str, secret_access_key: str, session_token: str | None = None) -> None:
        self._credentials = AwsCredentials(access_key_id, secret_access_key, session_token, None, "static")

    async def fetch(self) -> AwsCredentials:
        return self._credentials
