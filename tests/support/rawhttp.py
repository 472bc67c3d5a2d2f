"""A tiny HTTP/1.1 client over a raw socket, for requests no library would send as-is.

It sends exactly the bytes it is given and reads until the server closes, so
tests control every header (no invented User-Agent, Accept, ...).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool  # the body ended as its framing said (length reached or final chunk seen)

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return bytes(body), False
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return bytes(body), True
        if len(rest) < size + 2:
            body += rest[:size]
            return bytes(body), False
        body += rest[:size]
        data = rest[size + 2 :]


def parse_response(data: bytes, method: str = "GET") -> RawResponse:
    while data.startswith(b"HTTP/1.1 1"):  # skip 1xx interim answers
        data = data.partition(b"\r\n\r\n")[2]
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    names = {k.lower(): v for k, v in headers}
    if method == "HEAD" or status in (204, 304):
        return RawResponse(status, headers, b"", True)
    if names.get("transfer-encoding", "").lower() == "chunked":
        body, complete = _dechunk(rest)
        return RawResponse(status, headers, body, complete)
    if "content-length" in names:
        length = int(names["content-length"])
        return RawResponse(status, headers, rest[:length], len(rest) >= length)
    return RawResponse(status, headers, rest, True)


async def raw_request(url: str, request: bytes, *, timeout: float = 10.0) -> RawResponse:
    """Send ``request`` (a whole HTTP message) to ``url``'s host and port; read until close."""
    hostport = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            chunks = []
            try:
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
            except ConnectionResetError:
                pass  # an aborted response: what arrived is parsed and judged incomplete
    finally:
        writer.close()
    return parse_response(b"".join(chunks), request.split(b" ", 1)[0].decode())
