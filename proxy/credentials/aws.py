"""botocore plumbing shared by every AWS exchange (STS, Cognito user and identity pools).

``aws_client`` builds clients that honour ``AWS_ENDPOINT_URL_*`` (or an
entry's ``endpoint_url``); ``call_aws`` turns every botocore failure into a
``CredentialsUnavailable`` whose message carries the AWS error code and text
and never a secret. Both block: call them through ``run_blocking``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from .base import AwsCredentials, CredentialsUnavailable

# botocore retries once on its own (throttling, a dropped connection); beyond that
# Refreshing's backoff takes over, so a dead endpoint fails a request in seconds, not minutes.
_RETRIES = {"mode": "standard", "total_max_attempts": 2}
_CONNECT_TIMEOUT = 5.0
_READ_TIMEOUT = 15.0
_MAX_MESSAGE = 300
_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def botocore_session(profile: str | None = None) -> Any:
    """A botocore session, so AWS_PROFILE, AWS_CONFIG_FILE, AWS_ENDPOINT_URL_* work as usual."""
    import botocore.session

    session = botocore.session.Session(profile=profile)
    session.user_agent_extra = "signing-proxy"
    return session


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
    with _SESSION_LOCK:  # botocore sessions are not thread-safe; clients are
        return _shared_session().create_client(
            service, region_name=region, endpoint_url=endpoint_url, config=config, **keys
        )


def _shared_session() -> Any:
    """One botocore session for every Cognito and STS client (call under ``_SESSION_LOCK``).

    A client from a fresh session reloads the endpoint rules and service model
    (0.1-0.3 s of CPU); from a warm one it takes milliseconds. Environment
    settings (``AWS_ENDPOINT_URL_*``, ``AWS_REGION``) are still read at each
    ``create_client``.
    """
    global _SESSION
    if _SESSION is None:
        _SESSION = botocore_session()
    return _SESSION


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
    from botocore import xform_name

    service = client.meta.service_model.service_id
    label = f"{service} {operation}{f' ({what})' if what else ''}"
    hidden = list(secrets)
    method = getattr(client, xform_name(operation))  # InitiateAuth -> initiate_auth
    try:
        return method(**params)
    except botocore.exceptions.ClientError as error:
        details = error.response.get("Error", {})
        code = str(details.get("Code") or "UnknownError")
        message = str(details.get("Message") or "no message")
        raise CredentialsUnavailable(scrub(f"{label} refused: {code}: {message}", hidden), code) from None
    except botocore.exceptions.BotoCoreError as error:
        raise _unreachable_or_failed(error, label, client.meta.endpoint_url, hidden) from None


def _unreachable_or_failed(
    error: Exception, label: str, endpoint: str, hidden: list[str | None]
) -> CredentialsUnavailable:
    """A ``CredentialsUnavailable`` for a botocore failure that is not an AWS answer."""
    from botocore import exceptions

    url = getattr(error, "kwargs", {}).get("endpoint_url") or endpoint
    if isinstance(error, exceptions.ReadTimeoutError):
        return CredentialsUnavailable(
            scrub(f"{label}: {url} did not answer within {_READ_TIMEOUT:g} s", hidden), "endpoint_timeout"
        )
    connection_errors = (
        exceptions.EndpointConnectionError,
        exceptions.ConnectionClosedError,
        exceptions.ConnectTimeoutError,
        exceptions.ProxyConnectionError,
    )
    if isinstance(error, connection_errors):
        text = f"{label}: cannot reach {url} ({type(error).__name__})"
        return CredentialsUnavailable(scrub(text, hidden), "endpoint_unreachable")
    return CredentialsUnavailable(scrub(f"{label}: {type(error).__name__}: {error}", hidden), "botocore_error")


def default_region() -> str:
    """The region botocore would pick (env, profile), else us-east-1 (STS is global)."""
    with _SESSION_LOCK:
        return str(_shared_session().get_config_variable("region") or "us-east-1")
