"""WebSockets through the proxy: signed upgrades, faithful relay both ways, closes, refusals, limits.

Every test runs real sockets: a client (aiohttp's or the ``websockets``
library's) talks to the proxy, which talks to ``WsUpstream``, which accepts an
upgrade only when awscrt reproduces its signature. No test sleeps to wait for
something: each waits on what it expects (a message, a close, a recorded
event), under a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import socket
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp import WSMsgType, web
from awscrt.auth import AwsCredentialsProvider, AwsSignatureType, AwsSigningConfig, aws_sign_request
from awscrt.http import HttpHeaders, HttpRequest
from websockets.asyncio.client import connect

from proxy import signing
from proxy.signing.presigned import presign_query
from proxy.websocket.relay import MAX_MESSAGE, UPSTREAM_FRAME_SIZE
from tests.conftest import TEST_KEY_ID, TEST_REGION, TEST_SECRET, TEST_SESSION_TOKEN, static_route
from tests.support.rawhttp import raw_request
from tests.support.ws_upstream import Connection, WsUpstream, pattern, text_pattern

DEADLINE = 10.0  # no single wait in these tests should come near this
API_GATEWAY_FRAME_LIMIT = 32 * 1024


def ws_url(proxy: Any, path: str = "/chat") -> str:
    return proxy.url.replace("http://", "ws://", 1) + path


async def next_connection(upstream: WsUpstream) -> Connection:
    async with asyncio.timeout(DEADLINE):
        return await upstream.connected.get()


async def closed_with(connection: Connection) -> tuple[int, str] | None:
    async with asyncio.timeout(DEADLINE):
        return await connection.closed


# ---------------------------------------------------------------- signing and handshake


async def test_aiohttp_client_echo_through_a_header_signed_upgrade(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(proxy, "/chat?room=a%20b")) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=DEADLINE)).data == "hello"
        await ws.send_bytes(b"\x00\x01binary")
        message = await ws.receive(timeout=DEADLINE)
        assert (message.type, message.data) == (WSMsgType.BINARY, b"\x00\x01binary")
    handshake = (await next_connection(ws_upstream)).handshake
    assert handshake.signature_ok, handshake.error
    assert handshake.mode == "headers"
    assert handshake.raw_path == "/chat?room=a%20b"
    assert handshake.header_values("x-amz-security-token") == [TEST_SESSION_TOKEN]
    assert handshake.header_values("authorization")[0].startswith(f"AWS4-HMAC-SHA256 Credential={TEST_KEY_ID}/")


async def test_handshake_headers_are_not_copied_and_subprotocols_pass(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    async with connect(
        ws_url(proxy),
        subprotocols=["chat.v1", "chat.v9"],  # the upstream speaks chat.v2 and chat.v1
        additional_headers={"X-Trace": "t-1", "Origin": "https://app.example"},
        compression="deflate",
    ) as ws:
        client_key = ws.request.headers["Sec-WebSocket-Key"]
        assert ws.subprotocol == "chat.v1"
        assert "Sec-WebSocket-Extensions" not in ws.response.headers  # no compression was negotiated
        await ws.send("ping?")
        assert await ws.recv() == "ping?"
    connection = await next_connection(ws_upstream)
    handshake = connection.handshake
    assert handshake.signature_ok, handshake.error
    assert connection.subprotocol == "chat.v1"
    assert handshake.header_values("sec-websocket-protocol") == ["chat.v1, chat.v9"]
    keys = handshake.header_values("sec-websocket-key")
    assert len(keys) == 1 and keys != [client_key]  # the upstream leg has its own handshake
    assert handshake.header_values("sec-websocket-extensions") == []
    assert handshake.header_values("sec-websocket-version") == ["13"]
    assert handshake.header_values("host") == [ws_upstream.url.split("//")[1]]
    assert handshake.header_values("x-trace") == ["t-1"]
    assert handshake.header_values("origin") == ["https://app.example"]
    assert len(handshake.header_values("user-agent")) == 1  # the client's, and nothing of our own


async def test_api_key_is_injected_on_the_upgrade(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url, api_key="key-from-config"))
    async with connect(ws_url(proxy), additional_headers={"x-api-key": "client-guess"}) as ws:
        await ws.send("x")
        await ws.recv()
    handshake = (await next_connection(ws_upstream)).handshake
    assert handshake.signature_ok, handshake.error
    assert handshake.header_values("x-api-key") == ["key-from-config"]


async def test_query_signing_mode_is_verified_by_awscrt(ws_upstream, start_proxy) -> None:
    route = static_route(ws_upstream.url, websocket_signing="query", api_key="key-from-config")
    proxy = await start_proxy(route)
    # A stale presigned parameter from the client is replaced, never sent twice.
    async with connect(ws_url(proxy, "/prod/chat?room=1&X-Amz-Signature=stale")) as ws:
        await ws.send("signed in the query")
        assert await ws.recv() == "signed in the query"
    handshake = (await next_connection(ws_upstream)).handshake
    assert handshake.mode == "query"
    assert handshake.signature_ok, handshake.error
    assert handshake.raw_path.startswith("/prod/chat?room=1&X-Amz-Algorithm=AWS4-HMAC-SHA256&")
    assert handshake.raw_path.count("X-Amz-Signature=") == 1
    assert "X-Amz-Security-Token=" in handshake.raw_path
    assert handshake.header_values("authorization") == []
    assert handshake.header_values("x-amz-date") == []
    assert handshake.header_values("x-api-key") == ["key-from-config"]


async def test_query_signing_with_a_wrong_secret_is_refused_by_awscrt(ws_upstream, start_proxy) -> None:
    config = static_route(ws_upstream.url, websocket_signing="query")
    config["credentials"]["test"]["secret_access_key"] = "not-the-secret"
    proxy = await start_proxy(config)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(ws_url(proxy))
    assert refused.value.response.status_code == 403
    assert b"signature we calculated does not match" in refused.value.response.body
    assert not ws_upstream.handshakes[-1].signature_ok


@pytest.mark.parametrize("token", [TEST_SESSION_TOKEN, None])
@pytest.mark.parametrize("raw_query", ["", "b=2&a=x%20y&flag&X-Amz-Date=19990101T000000Z"])
async def test_presign_query_equals_awscrt_presigning(token: str | None, raw_query: str) -> None:
    """The pure presign function against awscrt's own presign of the same request at the same instant."""
    host, path, amz_date = "abc123.execute-api.eu-west-1.amazonaws.com", "/prod/chat%20room", "20240506T070809Z"
    query = signing.normalize_query(raw_query)
    ours = presign_query(
        "GET",
        path,
        query,
        host,
        access_key_id=TEST_KEY_ID,
        secret_access_key=TEST_SECRET,
        session_token=token,
        amz_date=amz_date,
        region=TEST_REGION,
        service="execute-api",
        expires=300,
    )
    client_query = "&".join(p for p in query.wire.split("&") if p and not p.startswith("X-Amz-"))
    request = HttpRequest("GET", path + (f"?{client_query}" if client_query else ""), HttpHeaders([("host", host)]))
    config = AwsSigningConfig(
        signature_type=AwsSignatureType.HTTP_REQUEST_QUERY_PARAMS,
        credentials_provider=AwsCredentialsProvider.new_static(TEST_KEY_ID, TEST_SECRET, token),
        region=TEST_REGION,
        service="execute-api",
        date=datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
        expiration_in_seconds=300,
    )
    presigned = await asyncio.wrap_future(aws_sign_request(request, config))

    def params(wire: str) -> dict[str, str]:
        pairs = [p.partition("=") for p in wire.split("&") if p]
        return {k: v for k, _, v in pairs if k.startswith("X-Amz-")}

    assert params(ours.wire) == params(presigned.path.partition("?")[2])
    assert ours.wire.endswith("&X-Amz-Signature=" + params(ours.wire)["X-Amz-Signature"])


# ---------------------------------------------------------------- relaying messages


async def test_100kb_messages_both_ways_go_upstream_in_small_frames(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    binary, text = pattern(100 * 1024), text_pattern(100 * 1024)
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(proxy)) as ws:
        await ws.send_bytes(binary)
        message = await ws.receive(timeout=DEADLINE)
        assert message.type == WSMsgType.BINARY and message.data == binary
        await ws.send_bytes(pattern(128 * 1024))  # API Gateway's message quota, from the client
        assert (await ws.receive(timeout=DEADLINE)).data == pattern(128 * 1024)
        await ws.send_str(text)
        message = await ws.receive(timeout=DEADLINE)
        assert message.type == WSMsgType.TEXT and message.data == text
        # API Gateway's 128 KB message quota, sent by the upstream in one frame.
        await ws.send_str("!binary 131072")
        message = await ws.receive(timeout=DEADLINE)
        assert message.data == pattern(131072)
    connection = await next_connection(ws_upstream)
    assert connection.messages[::2][:2] == [binary, text]  # whole messages, nothing split or merged
    assert max(size for kind, size in connection.frames if kind == "binary") == UPSTREAM_FRAME_SIZE
    assert max(size for _, size in connection.frames) <= API_GATEWAY_FRAME_LIMIT
    assert sum(1 for kind, _ in connection.frames if kind == "binary") > 100 * 1024 // API_GATEWAY_FRAME_LIMIT


async def test_a_client_message_over_the_proxy_limit_is_1009_and_ends_the_upstream(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(proxy)) as ws:
        with contextlib.suppress(ConnectionError):  # the proxy may close before the client has sent it all
            await ws.send_bytes(b"x" * (MAX_MESSAGE + 1))
        message = await ws.receive(timeout=DEADLINE)
        assert (message.type, message.data) == (WSMsgType.CLOSE, 1009)
    assert await closed_with(await next_connection(ws_upstream)) == (1001, "client connection failed")


async def test_a_fragmented_client_message_arrives_as_one_message(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    async with connect(ws_url(proxy)) as ws:
        await ws.send(["frag", "mented ", "text"])
        assert await ws.recv() == "fragmented text"
        await ws.send([b"\x01" * 10, b"\x02" * 20])
        assert await ws.recv() == b"\x01" * 10 + b"\x02" * 20
    connection = await next_connection(ws_upstream)
    assert connection.messages == ["fragmented text", b"\x01" * 10 + b"\x02" * 20]


async def test_pings_are_answered_and_passed_upstream(start_proxy) -> None:
    """An aiohttp upstream (autoping off) shows the ping the client sent reached it."""
    pinged: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.PING and not pinged.done():
                pinged.set_result(message.data)
                await ws.pong(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        proxy = await start_proxy({"routes": [{"upstream": f"http://127.0.0.1:{port}", "auth": "none"}]})
        async with connect(ws_url(proxy)) as ws:
            async with asyncio.timeout(DEADLINE):
                pong = await ws.ping(b"are you there")
                await pong  # answered by the proxy
                await pinged  # and passed on
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- closing


async def test_client_close_code_and_reason_reach_the_upstream_and_come_back(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_url(proxy))
        await ws.close(code=4001, message=b"client says bye")
        assert ws.close_code == 4001
    assert await closed_with(await next_connection(ws_upstream)) == (4001, "client says bye")

    async with connect(ws_url(proxy)) as ws2:
        await ws2.close(1000, "done")
        assert (ws2.close_code, ws2.close_reason) == (1000, "done")
    assert await closed_with(await next_connection(ws_upstream)) == (1000, "done")


async def test_a_closed_connection_is_logged_as_101_with_its_duration(ws_upstream, start_proxy, caplog) -> None:
    """Closing the client's WebSocket ends its TCP connection, which cancels the handler: still a 101."""
    caplog.set_level(logging.INFO, logger="signing_proxy.access")
    proxy = await start_proxy(static_route(ws_upstream.url))
    for path in ("/by-client", "/by-upstream"):
        async with connect(ws_url(proxy, path)) as ws:
            if path == "/by-upstream":
                await ws.send("!close 4002 bye")
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
    await proxy.close()  # waits for the handlers, and so for their access log lines
    lines = [r.getMessage() for r in caplog.records if r.name == "signing_proxy.access"]
    assert len(lines) == 2 and all(" 101 " in line for line in lines), lines


@pytest.mark.parametrize("client", ["aiohttp", "websockets"])
async def test_upstream_close_code_and_reason_reach_the_client(client: str, ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    if client == "aiohttp":
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(proxy)) as ws:
            await ws.send_str("!close 4002 server says bye")
            message = await ws.receive(timeout=DEADLINE)
            assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 4002, "server says bye")
    else:
        async with connect(ws_url(proxy)) as ws2:
            await ws2.send("!close 4002 server says bye")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                async with asyncio.timeout(DEADLINE):
                    await ws2.recv()
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4002, "server says bye")
    assert await closed_with(await next_connection(ws_upstream)) == (4002, "server says bye")


@pytest.mark.parametrize(
    ("code", "explained"), [(1001, "idle for 10 minutes or open for 2 hours"), (1009, "messages up to 128 KB")]
)
async def test_upstream_closing_for_a_quota_is_logged(
    code: int, explained: str, ws_upstream, start_proxy, caplog
) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    caplog.set_level(logging.INFO, logger="signing_proxy.websocket")
    async with connect(ws_url(proxy)) as ws:
        await ws.send(f"!close {code} quota")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(DEADLINE):
                await ws.recv()
    assert closed.value.rcvd.code == code
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(code) in line and explained in line for line in warnings), warnings


@pytest.mark.parametrize("client", ["aiohttp", "websockets"])
async def test_upstream_dying_mid_connection_closes_the_client(client: str, ws_upstream, start_proxy, caplog) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    if client == "aiohttp":
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(proxy)) as ws:
            await ws.send_str("!die")
            message = await ws.receive(timeout=DEADLINE)
            assert (message.type, message.data) == (WSMsgType.CLOSE, 1014)
    else:
        async with connect(ws_url(proxy)) as ws2:
            await ws2.send("!die")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                async with asyncio.timeout(DEADLINE):
                    await ws2.recv()
            assert closed.value.rcvd.code == 1014
    assert "upstream connection lost" in caplog.text


async def test_client_vanishing_closes_the_upstream_with_1001(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    ws = await connect(ws_url(proxy))
    await ws.send("hello")
    await ws.recv()
    ws.transport.abort()  # no close frame: the TCP connection just ends
    assert await closed_with(await next_connection(ws_upstream)) == (1001, "client went away")


async def test_stopping_proxy_closes_websockets_with_1001_both_ways(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    async with connect(ws_url(proxy)) as ws:
        await ws.send("hello")
        await ws.recv()
        await proxy.close()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(DEADLINE):
                await ws.recv()
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "proxy shutting down")
    assert await closed_with(await next_connection(ws_upstream)) == (1001, "proxy shutting down")


# ---------------------------------------------------------------- refusals and failures


async def upgrade_status(proxy: Any, extra_header: bytes) -> tuple[bytes, bytes]:
    """Send an upgrade with one more raw header line; the status line and (for a refusal) the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + extra_header + b"\r\n\r\n"
        )
        async with asyncio.timeout(DEADLINE):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line[15:]) for line in head.split(b"\r\n") if line.startswith(b"Content-Length:")), 0)
            return head.split(b"\r\n")[0], await reader.readexactly(length)
    finally:
        writer.close()


async def test_header_values_beyond_latin1_are_400_and_latin1_ones_pass(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    status, _ = await upgrade_status(proxy, "X-Name: café".encode())
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert ws_upstream.handshakes[-1].signature_ok
    for value in ("€".encode(), b"\xff\xfe"):
        status, body = await upgrade_status(proxy, b"X-Name: " + value)
        assert status == b"HTTP/1.1 400 Bad Request" and b'"bad_header"' in body
    assert len(ws_upstream.handshakes) == 1


@pytest.mark.parametrize("status", [403, 429])
async def test_refused_upgrade_reaches_the_client_as_plain_http(status: int, ws_upstream, start_proxy) -> None:
    body = b'{"message":"Forbidden"}' if status == 403 else b'{"message":"Too Many Requests"}'
    ws_upstream.refusal = (status, body, [("Content-Type", "application/json"), ("Retry-After", "3")])
    proxy = await start_proxy(static_route(ws_upstream.url))

    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(ws_url(proxy))
    response = refused.value.response
    assert (response.status_code, bytes(response.body)) == (status, body)
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Retry-After"] == "3"

    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as handshake_error:
            await session.ws_connect(ws_url(proxy))
        assert handshake_error.value.status == status
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
        upgrade["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ=="
        async with session.get(proxy.url + "/chat", headers=upgrade) as plain:
            assert (plain.status, await plain.read()) == (status, body)


async def test_a_bad_signature_refusal_shows_the_upstream_message(ws_upstream, start_proxy) -> None:
    config = static_route(ws_upstream.url)
    config["credentials"]["test"]["secret_access_key"] = "not-the-secret"
    proxy = await start_proxy(config)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(ws_url(proxy))
    assert refused.value.response.status_code == 403
    assert b"signature we calculated does not match" in refused.value.response.body


async def test_an_invalid_upgrade_request_is_400(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    raw = await raw_request(
        proxy.url,
        b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nConnection: close\r\n\r\n",
    )
    assert raw.status == 400 and b"bad_websocket_upgrade" in raw.body
    assert ws_upstream.handshakes == []


async def test_each_handshake_phase_has_its_own_timeout_and_status(start_proxy, full_backlog_port: int) -> None:
    """Connect (a listener whose backlog is full drops the SYN), upgrade answer, refused port."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    gone = socket.socket()
    gone.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
    try:
        routes = [
            ("/full", full_backlog_port, {"connect_timeout": "200ms", "first_byte_timeout": "1m"}),
            ("/silent", silent.sockets[0].getsockname()[1], {"first_byte_timeout": "200ms"}),
            ("/gone", gone.getsockname()[1], {}),
        ]
        proxy = await start_proxy(
            {
                "routes": [
                    {"path_prefix": prefix, "upstream": f"http://127.0.0.1:{port}", "auth": "none", **timeouts}
                    for prefix, port, timeouts in routes
                ]
            }
        )
        expected = {"/full": (504, "connect_timeout"), "/silent": (504, "first_byte_timeout"), "/gone": (502, "")}
        for path, (status, phase) in expected.items():
            with pytest.raises(websockets.InvalidStatus) as refused:
                await connect(ws_url(proxy, path), open_timeout=DEADLINE)
            response = refused.value.response
            assert response.status_code == status
            assert phase.encode() in response.body
    finally:
        silent.close()
        await silent.wait_closed()
        gone.close()


# ---------------------------------------------------------------- scale and backpressure


async def test_200_concurrent_connections(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = await asyncio.gather(*(session.ws_connect(ws_url(proxy, f"/chat?n={n}")) for n in range(200)))
        try:
            await asyncio.gather(*(ws.send_str(f"message {n}") for n, ws in enumerate(sockets)))
            async with asyncio.timeout(DEADLINE * 2):
                replies = await asyncio.gather(*(ws.receive() for ws in sockets))
            assert [r.data for r in replies] == [f"message {n}" for n in range(200)]
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
    assert len(ws_upstream.connections) == 200
    assert all(c.handshake.signature_ok for c in ws_upstream.connections)
    async with asyncio.timeout(DEADLINE):
        assert {await c.closed for c in ws_upstream.connections} == {(1000, "")}


async def stalled(progress: asyncio.Event, quiet: float = 0.5) -> None:
    """Return once ``progress`` has not been set for ``quiet`` seconds (detects a stall, bounded by DEADLINE)."""
    async with asyncio.timeout(DEADLINE * 2):
        while True:
            progress.clear()
            try:
                await asyncio.wait_for(progress.wait(), quiet)
            except TimeoutError:
                return


async def test_a_client_that_stops_reading_stops_the_upstream(ws_upstream, start_proxy) -> None:
    """The upstream floods forever; if the proxy buffered without bound, it would never have to stop."""
    proxy = await start_proxy(static_route(ws_upstream.url))
    async with connect(ws_url(proxy), max_queue=1) as ws:  # reads nothing more once one frame is queued
        await ws.send("!flood")
        connection = await next_connection(ws_upstream)
        await stalled(connection.progress)
        held = connection.sent
        # Socket buffers on both hops, plus at most a few messages in the proxy.
        assert held < 64 * 1024 * 1024, held
        first = await ws.recv()  # and everything held is intact
        assert first == pattern(64 * 1024)
        ws.transport.abort()


async def test_an_upstream_that_stops_reading_stops_the_client(ws_upstream, start_proxy) -> None:
    proxy = await start_proxy(static_route(ws_upstream.url))
    sent = 0
    progress = asyncio.Event()
    chunk = pattern(64 * 1024)
    async with connect(ws_url(proxy)) as ws:
        await ws.send("!sink")
        connection = await next_connection(ws_upstream)

        async def flood() -> None:
            nonlocal sent
            while True:
                await ws.send(chunk)
                sent += len(chunk)
                progress.set()

        task = asyncio.create_task(flood())
        try:
            await stalled(progress)
            assert sent < 64 * 1024 * 1024, sent
        finally:
            task.cancel()
            connection.release.set()
            ws.transport.abort()


@pytest.mark.parametrize("signing_mode", ["headers", "query"])
async def test_the_access_line_of_a_session_has_its_bytes_duration_and_credentials(
    signing_mode: str, ws_upstream, start_proxy, caplog
) -> None:
    """It said ``in=0 out=0 creds=-``: now the message bytes relayed each way and who signed the upgrade."""
    caplog.set_level(logging.INFO, logger="signing_proxy.access")
    proxy = await start_proxy(static_route(ws_upstream.url, websocket_signing=signing_mode))
    async with connect(ws_url(proxy)) as ws:
        await ws.send("héllo")  # 6 bytes in UTF-8
        assert await asyncio.wait_for(ws.recv(), DEADLINE) == "héllo"
        await ws.send(bytes(1000))
        assert await asyncio.wait_for(ws.recv(), DEADLINE) == bytes(1000)
    await proxy.close()  # waits for the handler, and so for its access line
    [access] = [r.access for r in caplog.records if r.name == "signing_proxy.access"]  # type: ignore[attr-defined]
    assert (access["status"], access["bytes_in"], access["bytes_out"]) == (101, 1006, 1006)
    assert access["credentials"] == f"test {TEST_KEY_ID[:8]}…"
    assert access["duration_ms"] >= access["upstream_ttfb_ms"] > 0
