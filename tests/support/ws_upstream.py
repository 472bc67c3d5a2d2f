"""A loopback stand-in for an IAM-protected API Gateway WebSocket API.

It refuses any upgrade whose SigV4 signature awscrt does not reproduce, in
either form the proxy can send: signed headers (checked by ``SigV4Upstream.verify``,
the same check the HTTP tests use) or a presigned URL (X-Amz-* query
parameters, re-signed here with awscrt's own query-parameter signing). Once
connected it echoes every message and records every frame it received, so
tests can see fragment sizes. A text message starting with ``!`` is a command
instead (see ``_command``), which lets a test make the upstream close, die,
flood or stop reading at a moment of its choosing, without sleeps.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import json
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

from awscrt.auth import AwsCredentialsProvider, AwsSignatureType, AwsSigningConfig, aws_sign_request
from awscrt.http import HttpHeaders, HttpRequest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from proxy.signing.presigned import PRESIGN_PARAMS
from tests.support.sigv4_upstream import AMZ_DATE_FORMAT, Received, SignatureError, SigV4Upstream

FLOOD_CHUNK = 64 * 1024


@dataclass
class Handshake:
    """One upgrade request as the upstream received it."""

    raw_path: str
    headers: list[tuple[str, str]]
    mode: str  # "headers" or "query": where the signature was
    signature_ok: bool = False
    error: str | None = None

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Connection:
    """One accepted connection: what came in, and how it ended."""

    handshake: Handshake
    subprotocol: str | None
    # (kind, payload bytes) of each data frame; a text frame's size is that of the characters decoded
    # from it, so it may be off by the up to 3 bytes of a character split across frames.
    frames: list[tuple[str, int]] = field(default_factory=list)
    messages: list[str | bytes] = field(default_factory=list)
    closed: asyncio.Future[tuple[int, str] | None] = field(default_factory=asyncio.Future)
    sent: int = 0  # bytes sent by !flood
    progress: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever !flood sends more
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends !sink


class WsUpstream:
    """A websockets server on 127.0.0.1 that checks SigV4 like API Gateway, via awscrt."""

    def __init__(self, secrets: dict[str, str], *, region: str | None = None, service: str = "execute-api") -> None:
        self._secrets = secrets
        self._verifier = SigV4Upstream(secrets, region=region, service=service)
        self.region = region
        self.service = service
        self.handshakes: list[Handshake] = []
        self.connections: list[Connection] = []
        self.connected: asyncio.Queue[Connection] = asyncio.Queue()
        self.subprotocols = ["chat.v2", "chat.v1"]
        # (status, body, headers) to refuse every upgrade with, after the signature check passed.
        self.refusal: tuple[int, bytes, list[tuple[str, str]]] | None = None
        self.url = ""
        self._server: Server | None = None
        self._accepted: dict[ServerConnection, Handshake] = {}

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            select_subprotocol=self._select_subprotocol,
            compression=None,
            ping_interval=None,
            max_size=1 << 20,
        )
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # ------------------------------------------------------------ handshake

    def _select_subprotocol(self, connection: ServerConnection, offered: list[str]) -> str | None:
        return next((p for p in self.subprotocols if p in offered), None)

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        headers = list(request.headers.raw_items())
        query = request.path.partition("?")[2]
        presigned = any(part.startswith("X-Amz-Signature=") for part in query.split("&"))
        handshake = Handshake(request.path, headers, "query" if presigned else "headers")
        self.handshakes.append(handshake)
        self._accepted[connection] = handshake
        try:
            if presigned:
                await self.verify_presigned(request.path, headers)
            else:
                received = Received("GET", request.path, headers, b"", False, None)
                await self._verifier.verify(received)
            handshake.signature_ok = True
        except SignatureError as error:
            handshake.error = str(error)
            return _respond(connection, 403, json.dumps({"message": str(error)}).encode(), [("x-amzn-ErrorType", "x")])
        if self.refusal is not None:
            return _respond(connection, *self.refusal)
        return None

    async def verify_presigned(self, raw_path: str, headers: list[tuple[str, str]]) -> None:
        """Re-sign the request with awscrt's query-parameter signing and compare every X-Amz-* value."""
        path, _, query = raw_path.partition("?")
        parts = [part.partition("=") for part in query.split("&") if part]
        got = {key: value for key, _, value in parts if key in PRESIGN_PARAMS}
        missing = [p for p in PRESIGN_PARAMS if p not in got and p != "X-Amz-Security-Token"]
        if missing:
            raise SignatureError(f"presigned URL lacks {', '.join(missing)}")
        if len([key for key, _, _ in parts if key in PRESIGN_PARAMS]) != len(got):
            raise SignatureError("presigned URL repeats an X-Amz-* parameter")
        key_id, datestamp, region, service, terminator = unquote(got["X-Amz-Credential"]).split("/")
        if terminator != "aws4_request" or datestamp != got["X-Amz-Date"][:8]:
            raise SignatureError(f"Credential scope {unquote(got['X-Amz-Credential'])!r} is malformed")
        if service != self.service or (self.region is not None and region != self.region):
            raise SignatureError(f"Credential scope {region}/{service} is not {self.region}/{self.service}")
        secret = self._secrets.get(key_id)
        if secret is None:
            raise SignatureError(f"unknown access key {key_id!r}")
        date = datetime.datetime.strptime(got["X-Amz-Date"], AMZ_DATE_FORMAT).replace(tzinfo=datetime.UTC)
        expires = int(got["X-Amz-Expires"])
        age = time.time() - date.timestamp()
        if not -300 <= age <= expires:
            raise SignatureError(f"presigned URL is {age:.0f}s old, valid for {expires}s")
        signed = unquote(got["X-Amz-SignedHeaders"]).split(";")
        token = unquote(got["X-Amz-Security-Token"]) if "X-Amz-Security-Token" in got else None
        rest = "&".join(key + sep + value for key, sep, value in parts if key not in PRESIGN_PARAMS)
        request = HttpRequest(
            "GET", path + (f"?{rest}" if rest else ""), HttpHeaders([(k, v) for k, v in headers if k.lower() in signed])
        )
        config = AwsSigningConfig(
            signature_type=AwsSignatureType.HTTP_REQUEST_QUERY_PARAMS,
            credentials_provider=AwsCredentialsProvider.new_static(key_id, secret, token),
            region=region,
            service=service,
            date=date,
            expiration_in_seconds=expires,
            should_sign_header=lambda name: name.lower() in signed,
        )
        resigned = await asyncio.wrap_future(aws_sign_request(request, config))
        expected = dict(
            (key, value) for key, _, value in (p.partition("=") for p in resigned.path.partition("?")[2].split("&"))
        )
        for name, value in got.items():
            if name != "X-Amz-Signature" and expected.get(name) != value:
                raise SignatureError(f"{name} is {value!r}, awscrt would send {expected.get(name)!r}")
        if not hmac.compare_digest(expected["X-Amz-Signature"], got["X-Amz-Signature"]):
            raise SignatureError("The request signature we calculated does not match the signature you provided")

    # ------------------------------------------------------------ connection

    async def _handle(self, ws: ServerConnection) -> None:
        record = Connection(self._accepted.pop(ws), ws.subprotocol)
        self.connections.append(record)
        self.connected.put_nowait(record)
        try:
            while True:
                fragments: list[str | bytes] = []
                async for fragment in ws.recv_streaming():
                    fragments.append(fragment)
                    kind = "text" if isinstance(fragment, str) else "binary"
                    size = len(fragment.encode()) if isinstance(fragment, str) else len(fragment)
                    record.frames.append((kind, size))
                message = "".join(fragments) if isinstance(fragments[0], str) else b"".join(fragments)  # type: ignore[arg-type]
                record.messages.append(message)
                if isinstance(message, str) and message.startswith("!"):
                    await self._command(ws, record, message[1:].split(" ", 2))
                else:
                    await ws.send(message)
        except ConnectionClosed as closed:
            received = closed.rcvd
            if not record.closed.done():
                record.closed.set_result((received.code, received.reason) if received is not None else None)
        finally:
            if not record.closed.done():
                record.closed.set_result(None)

    async def _command(self, ws: ServerConnection, record: Connection, words: list[str]) -> None:
        """``!close CODE [REASON]``, ``!die``, ``!binary N``, ``!text N``, ``!flood``, ``!sink``."""
        name = words[0]
        if name == "close":
            await ws.close(int(words[1]), words[2] if len(words) > 2 else "")
        elif name == "die":
            ws.transport.abort()
        elif name == "binary":
            await ws.send(pattern(int(words[1])))
        elif name == "text":
            await ws.send(text_pattern(int(words[1])))
        elif name == "flood":
            chunk = pattern(FLOOD_CHUNK)
            while True:
                await ws.send(chunk)
                record.sent += len(chunk)
                record.progress.set()
        elif name == "sink":
            await record.release.wait()  # nothing is read meanwhile: the proxy must stop sending
        else:
            await ws.send(f"unknown command {name}")


def pattern(size: int) -> bytes:
    """``size`` recognisable bytes (every value 0-250 in turn)."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def text_pattern(size: int) -> str:
    """``size`` characters of mixed-width UTF-8, so fragment boundaries fall inside characters."""
    return ("aé€😀" * (size // 4 + 1))[:size]


def _respond(connection: ServerConnection, status: int, body: bytes, headers: list[tuple[str, str]]) -> Response:
    response = connection.respond(status, "")
    response.body = body
    del response.headers["Content-Length"]
    response.headers["Content-Length"] = str(len(body))
    if any(k.lower() == "content-type" for k, _ in headers):
        del response.headers["Content-Type"]
    for name, value in headers:
        response.headers[name] = value
    return response
