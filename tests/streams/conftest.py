"""Fixtures for the WebSocket and long-lived stream tests: an awscrt-checking WebSocket upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ..conftest import TEST_KEY_ID, TEST_REGION, TEST_SECRET
from .ws_upstream import WsUpstream


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    """A WebSocket upstream that knows the test key, checks every upgrade with awscrt and echoes."""
    upstream = WsUpstream({TEST_KEY_ID: TEST_SECRET}, region=TEST_REGION)
    await upstream.start()
    yield upstream
    await upstream.close()
