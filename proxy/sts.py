"""``assume_role`` credentials, and the botocore plumbing every AWS exchange here shares.

``AssumeRole`` signs one STS ``AssumeRole`` call with another entry's
credentials and hands back the role's temporary credentials; ``Refreshing``
renews them before they expire. ``aws_client`` and ``call_aws`` are also used
by the Cognito sources: they build clients that honour ``AWS_ENDPOINT_URL_*``
(or the entry's ``endpoint_url``) and turn every botocore failure into a
``CredentialsUnavailable`` whose message carries the AWS error code and text
and never a secret.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .config import AssumeRoleSource
from .credentials import (
    AwsCredentials,
    CredentialSource,
    CredentialsUnavailable,
    Provider,
    botocore_session,
    run_blocking,
)

log = logging.getLogger("signing_proxy.credentials")

# botocore retries once on its own (throttling, a dropped connection); beyond that
# Refreshing's backoff takes over, so a dead endpoint fails a request in seconds, not minutes.
_RETRIES = {"mode": "standard", "total_max_attempts": 2}
_CONNECT_TIMEOUT = 5.0
_READ_TIMEOUT = 15.0
_MAX_MESSAGE = 300
_CONNECTION_ERRORS = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
)


def aws_client(
    service: str,
    region: str,
    endpoint_url: str | None = None,
    credentials: AwsCredentials | None = None,
) -> Any:
    """A botocore client: unsigned when ``credentials`` is None (Cognito's public APIs need no AWS keys).

    Blocking (loads the service model); call it from ``run_blocking``. Without
    ``endpoint_url`` botocore applies ``AWS_ENDPOINT_URL_<SERVICE>`` and
    ``AWS_ENDPOINT_URL`` itself.
    """
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(
        retries=_RETRIES,  # type: ignore[arg-type]
        connect_timeout=_CONNECT_TIMEOUT,
        read_timeout=_READ_TIMEOUT,
        signature_version=UNSIGNED if credentials is None else None,
    )
    keys: dict[str, Any] = {}
    if credentials is not None:
        keys = {
            "aws_access_key_id": credentials.access_key_id,
            "aws_secret_access_key": credentials.secret_access_key,
            "aws_session_token": credentials.session_token,
        }
    return botocore_session().create_client(
        service, region_name=region, endpoint_url=endpoint_url, config=config, **keys
    )


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret value replaced by ``***`` and cut to a readable length.

    AWS messages do not quote secrets, but emulators do (moto puts a refused
    refresh token or secret hash in the message), and the text ends up in 503
    bodies and logs.
    """
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def call_aws(client: Any, operation: str, *, secrets: Iterable[str | None] = (), what: str = "", **params: Any) -> Any:
    """Call ``operation`` (``"InitiateAuth"``) with ``params``; blocking.

    Raises ``CredentialsUnavailable`` with the AWS error code as ``reason`` for
    refusals and ``endpoint_unreachable`` when nothing answers; ``secrets`` (the
    secret parameter values) are scrubbed out of the message.
    """
    import botocore.exceptions

    service = client.meta.service_model.service_id
    label = f"{service} {operation}{f' ({what})' if what else ''}"
    hidden = list(secrets)
    method = getattr(client, _snake(client, operation))
    try:
        return method(**params)
    except botocore.exceptions.ClientError as error:
        details = error.response.get("Error", {})
        code = str(details.get("Code") or "UnknownError")
        message = str(details.get("Message") or "no message")
        raise CredentialsUnavailable(scrub(f"{label} refused: {code}: {message}", hidden), code) from None
    except botocore.exceptions.BotoCoreError as error:
        kind = type(error).__name__
        url = getattr(error, "kwargs", {}).get("endpoint_url") or client.meta.endpoint_url
        if kind in _CONNECTION_ERRORS:
            text = f"{label}: cannot reach {url} ({kind})"
            raise CredentialsUnavailable(scrub(text, hidden), "endpoint_unreachable") from None
        if kind == "ReadTimeoutError":
            text = f"{label}: {url} did not answer within {_READ_TIMEOUT:g} s"
            raise CredentialsUnavailable(scrub(text, hidden), "endpoint_timeout") from None
        raise CredentialsUnavailable(scrub(f"{label}: {kind}: {error}", hidden), "botocore_error") from None


def _snake(client: Any, operation: str) -> str:
    """The client method for an API operation name (``AssumeRole`` → ``assume_role``)."""
    for method, api_name in client.meta.method_to_api_mapping.items():
        if api_name == operation:
            return str(method)
    raise AttributeError(operation)


def default_region() -> str:
    """The region botocore would pick (env, profile), else us-east-1 (STS is global)."""
    return str(botocore_session().get_config_variable("region") or "us-east-1")


class AssumeRole(CredentialSource):
    """STS ``AssumeRole``, signed with the credentials of the entry named in ``source``.

    The identity shown is the assumed-role ARN STS returns
    (``arn:aws:sts::123456789012:assumed-role/Role/session``).
    """

    kind = "assume_role"

    def __init__(self, source: AssumeRoleSource, source_provider: Provider) -> None:
        self.source = source
        self.source_provider = source_provider

    async def fetch(self) -> AwsCredentials:
        signing = await self.source_provider.aws_credentials()
        return await run_blocking(self._assume, signing)

    def _assume(self, signing: AwsCredentials) -> AwsCredentials:
        source = self.source
        params: dict[str, Any] = {
            "RoleArn": source.role_arn,
            "RoleSessionName": source.session_name,
            "DurationSeconds": source.duration_seconds,
        }
        if source.external_id:
            params["ExternalId"] = source.external_id
        client = aws_client("sts", source.region or default_region(), source.endpoint_url, signing)
        # Parameters (role ARN, session name) are not secret, so the message may name them.
        secrets = [source.external_id, signing.secret_access_key, signing.session_token]
        response = call_aws(client, "AssumeRole", secrets=secrets, what=source.role_arn, **params)
        issued = response["Credentials"]
        arn = response.get("AssumedRoleUser", {}).get("Arn") or source.role_arn
        log.info("assumed %s (source %s)", arn, self.source_provider.name)
        return AwsCredentials(
            issued["AccessKeyId"],
            issued["SecretAccessKey"],
            issued.get("SessionToken"),
            issued["Expiration"].timestamp(),
            arn,
        )
