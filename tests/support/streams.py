"""Fixtures for the WebSocket and long-lived stream tests: an awscrt-checking WebSocket upstream, a full backlog."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.conftest import TEST_KEY_ID, TEST_REGION, TEST_SECRET
from tests.support.ws_upstream import WsUpstream


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    """A WebSocket upstream that knows the test key, checks every upgrade with awscrt and echoes."""
    upstream = WsUpstream({TEST_KEY_ID: TEST_SECRET}, region=TEST_REGION)
    await upstream.start()
    yield upstream
    await upstream.close()


@pytest.fixture
def full_backlog_port() -> Iterator[int]:
    """A port whose listener's backlog is full: the kernel drops new SYNs, so only a connect timeout ends a wait."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(full.getsockname())
    try:
        yield full.getsockname()[1]
    finally:
        for sock in (full, *fillers):
            sock.close()
