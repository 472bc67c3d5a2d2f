"""Sources that read what is already on this machine: the default chain, one profile, static keys.

botocore finds them exactly as the AWS CLI would (environment, shared files, SSO,
container and instance roles); its calls block, so they run through ``run_blocking``.

Those files change under a running proxy: ``aws configure`` or a rotation job
rewrites ``~/.aws/credentials``, ``aws sso login`` writes a new token to
``~/.aws/sso/cache``. ``BotocoreChain.changed`` notices (a ``stat`` of each file,
at most once a second while all is well, on every request while it is failing)
and the next request loads them again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
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
        self._watched: list[str] = []
        self._seen: list[tuple[int, int, int] | None] = []
        if profile:
            self.kind = "profile"

    def changed(self) -> bool:
        """True (once) when a file the credentials came from was rewritten since they were loaded."""
        seen = [_stamp(path) for path in self._watched]
        if seen == self._seen:
            return False
        self._seen = seen
        self._botocore_credentials = None  # a fresh session reads the files again
        return True

    def _load(self) -> AwsCredentials:
        import botocore.exceptions

        name = self.profile or os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
        try:
            if self._botocore_credentials is None:
                session = botocore_session(self.profile)
                self._watched = [str(path) for path in watched_files(session)]
                self._seen = [_stamp(path) for path in self._watched]  # before reading: a later write is seen
                self._botocore_credentials = session.get_credentials()
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
        except (
            botocore.exceptions.UnauthorizedSSOTokenError,  # a legacy profile's token expired or was refused
            botocore.exceptions.SSOTokenLoadError,  # no token cached: never logged in
            botocore.exceptions.TokenRetrievalError,  # an sso-session's token expired and could not be renewed
        ):
            raise CredentialsUnavailable(
                f"the SSO session of profile {name} has expired or was never started: "
                f"run aws sso login --profile {name}",
                "sso_login_required",
            ) from None
        except botocore.exceptions.BotoCoreError as error:
            # botocore's messages name files and profiles, never secret values.
            raise CredentialsUnavailable(f"{type(error).__name__}: {error}", "botocore_error") from None

    async def fetch(self) -> AwsCredentials:
        return await run_blocking(self._load)


def watched_files(session: Any) -> list[Path]:
    """The shared config and credentials files, and the SSO token cache file of the session's profile."""
    from botocore.credentials import SSOProvider

    files = [
        Path(os.path.expanduser(session.get_config_variable(name))) for name in ("credentials_file", "config_file")
    ]
    try:
        profile = session.get_scoped_config()
    except Exception:  # an unknown profile: reported by the load that follows
        return files
    sso = session.full_config.get("sso_sessions", {}).get(profile.get("sso_session", ""), {})
    key = profile.get("sso_session") or profile.get("sso_start_url") or sso.get("sso_start_url")
    if key:
        # botocore's JSONFileCache names the token file after the SHA-1 of the session name or start URL.
        token_file = hashlib.sha1(key.encode("utf-8")).hexdigest() + ".json"
        files.append(Path(SSOProvider._SSO_TOKEN_CACHE_DIR) / token_file)
    return files


def _stamp(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten (in place or replaced); None while it does not exist."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


class Static(CredentialSource):
    kind = "static"

    def __init__(self, access_key_id: str, secret_access_key: str, session_token: str | None = None) -> None:
        self._credentials = AwsCredentials(access_key_id, secret_access_key, session_token, None, "static")

    async def fetch(self) -> AwsCredentials:
        return self._credentials
