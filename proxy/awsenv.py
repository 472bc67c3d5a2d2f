"""Settings the AWS CLI reads from the environment and the shared config file: region, CA bundle.

A route that names neither (no ``region:``, no region in its host name; no
``ca_bundle:``) gets what ``aws`` would use with the same profile, so nothing
new has to be learned: ``AWS_REGION``, then ``AWS_DEFAULT_REGION``, then the
profile's ``region``; ``AWS_CA_BUNDLE``, then the profile's ``ca_bundle``.
Each answer says where it came from, for ``signing-proxy check``.

The shared file is read with botocore (``AWS_CONFIG_FILE``, ``[profile NAME]``
sections, ``AWS_PROFILE``), only when a route needs it.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple


class Setting(NamedTuple):
    value: str
    source: str  # "AWS_REGION", "profile dev in the shared config file", ...


def region(profile: str | None = None) -> Setting | None:
    """The region the AWS CLI would use with ``profile`` (None: ``AWS_PROFILE`` or ``default``)."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            return Setting(os.environ[name], name)
    return _from_profile("region", profile)


def ca_bundle(profile: str | None = None) -> Setting | None:
    """The CA bundle the AWS CLI would trust with ``profile``; None: the system's (or ``SSL_CERT_FILE``)."""
    if os.environ.get("AWS_CA_BUNDLE"):
        return Setting(os.environ["AWS_CA_BUNDLE"], "AWS_CA_BUNDLE")
    return _from_profile("ca_bundle", profile)


def _from_profile(key: str, profile: str | None) -> Setting | None:
    import botocore.exceptions
    import botocore.session

    session: Any = botocore.session.Session(profile=profile)
    name = profile or session.profile or "default"
    try:
        value = session.get_scoped_config().get(key)
    except botocore.exceptions.ProfileNotFound:
        return None
    return Setting(str(value), f"profile {name} in {session.get_config_variable('config_file')}") if value else None
