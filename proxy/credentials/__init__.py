"""Credentials: where they come from, and keeping them fresh.

Each kind of source (``local``: default chain, profile, static; ``sts``:
assume role; ``cognito``: user and guest identities) does its own exchange and
nothing else. ``base.Refreshing`` adds caching, refresh windows and one shared
refresh to any of them; ``base.Provider`` is what a route sees. This module
builds the providers a config names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import config as cfg
from .aws import botocore_session
from .base import AwsCredentials, CredentialSource, CredentialsUnavailable, Provider, Refreshing, run_blocking
from .cognito import cognito_provider
from .local import BotocoreChain, Static
from .sts import AssumeRole

__all__ = [
    "AwsCredentials",
    "CredentialSource",
    "CredentialsUnavailable",
    "Provider",
    "Refreshing",
    "botocore_session",
    "build_providers",
    "make_provider",
    "run_blocking",
]

SourceFactory = Callable[[str, Any, dict[str, Provider]], Provider]


def build_providers(config: cfg.Config) -> dict[str, Provider]:
    """One provider per ``credentials:`` entry (and ``default``); nothing is fetched yet.

    Entries are built in dependency order, since an assumed role signs its
    STS call with its ``source``'s credentials.
    """
    providers: dict[str, Provider] = {}
    entries: dict[str, Any] = {"default": cfg.DefaultChainSource(type="default"), **config.credentials}

    def build(name: str) -> Provider:
        if name in providers:
            return providers[name]
        source = entries[name]
        if isinstance(source, cfg.AssumeRoleSource):
            build(source.source)
        providers[name] = make_provider(name, source, providers)
        return providers[name]

    for name in entries:
        build(name)
    return providers


def make_provider(name: str, source: Any, providers: dict[str, Provider]) -> Provider:
    if isinstance(source, cfg.DefaultChainSource):
        chain: CredentialSource = BotocoreChain()
    elif isinstance(source, cfg.ProfileSource):
        chain = BotocoreChain(source.profile)
    elif isinstance(source, cfg.StaticSource):
        chain = Static(source.access_key_id, source.secret_access_key, source.session_token)
    elif isinstance(source, cfg.AssumeRoleSource):
        chain = AssumeRole(source, providers[source.source])
    elif isinstance(source, cfg.CognitoSource | cfg.CognitoGuestSource):
        return cognito_provider(name, source)
    else:  # pragma: no cover - the config schema admits nothing else
        raise TypeError(f"unknown credentials type {type(source).__name__}")
    return Provider(name, chain.kind, Refreshing(chain.fetch, name=name, changed=chain.changed))
