"""Shared fixtures: a running proxy and an awscrt-verifying upstream, on real sockets."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

# Never let botocore reach for the instance metadata service (a non-loopback address),
# and never pick up a developer's own AWS configuration.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("AWS_CONFIG_FILE", os.devnull)
os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
# Nor a region, CA bundle or forward proxy from the shell that runs the tests (loopback upstreams go
# through HTTP_PROXY too, as with curl, unless NO_PROXY lists them).
for _name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
              "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE", "SSL_CERT_FILE"):  # fmt: skip
    os.environ.pop(_name, None)
for _name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.upper(), None)

from proxy.config import parse_config  # noqa: E402
from proxy.server import ProxyServer  # noqa: E402
from tests.support.sigv4_upstream import SigV4Upstream  # noqa: E402

TEST_KEY_ID = "AKIDTESTSIGNINGPROXY"
TEST_SECRET = "test/secret+key/0123456789abcdefghijklmno"
TEST_SESSION_TOKEN = "test-session-token/with+odd=chars"
TEST_REGION = "eu-west-1"


@pytest.fixture
async def sigv4_upstream() -> AsyncIterator[SigV4Upstream]:
    """An upstream that knows the test key and checks every signature with awscrt."""
    upstream = SigV4Upstream({TEST_KEY_ID: TEST_SECRET})
    await upstream.start()
    yield upstream
    await upstream.close()


StartProxy = Callable[[dict[str, Any]], Awaitable[ProxyServer]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """``await start_proxy(config_dict)`` runs a proxy on a free loopback port."""
    servers: list[ProxyServer] = []

    async def start(config: dict[str, Any]) -> ProxyServer:
        server = ProxyServer(parse_config({"listen": "127.0.0.1:0", **config}))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def static_route(upstream_url: str, **route: Any) -> dict[str, Any]:
    """A config with one route to ``upstream_url`` signed by the test's static key."""
    return {
        "credentials": {
            "test": {
                "type": "static",
                "access_key_id": TEST_KEY_ID,
                "secret_access_key": TEST_SECRET,
                "session_token": TEST_SESSION_TOKEN,
            }
        },
        "routes": [{"upstream": upstream_url, "region": TEST_REGION, "credentials": "test", **route}],
    }


# Fixtures shared by several test packages, defined beside the plumbing they use.
from tests.support.faults import scripted, tolerant_upstream  # noqa: E402, F401
from tests.support.streams import full_backlog_port, ws_upstream  # noqa: E402, F401
