"""``assume_role`` credentials.

``AssumeRole`` signs one STS ``AssumeRole`` call with another entry's
credentials and hands back the role's temporary credentials; ``Refreshing``
renews them before they expire.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import AssumeRoleSource
from .aws import aws_client, call_aws, default_region
from .base import AwsCredentials, CredentialSource, Provider, run_blocking

log = logging.getLogger("signing_proxy.credentials")


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
