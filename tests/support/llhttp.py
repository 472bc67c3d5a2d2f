"""llhttp (through httptools) as the referee: messages as an independent HTTP/1.1 parser reads them.

Our own parsers are checked against it (tests/http/test_differential.py), and
tests that look at what the proxy sent a client read it with it, so that a
framing mistake of ours is never read back by a parser that shares it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httptools


@dataclass
class Message:
    """One message as llhttp delimited it."""

    method: bytes = b""
    target: bytes = b""
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)  # fields after a chunked body
    headers_done: bool = False
    body: bytes = b""
    complete: bool = False
    keep_alive: bool = False

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Collector:
    """httptools callbacks, collecting each message."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser | None = None

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self.messages[-1]
        (message.trailers if message.headers_done else message.headers).append((name, value))

    def on_headers_complete(self) -> None:
        message = self.messages[-1]
        message.headers_done = True
        assert self.parser is not None
        if isinstance(self.parser, httptools.HttpRequestParser):
            message.method = self.parser.get_method()
        else:
            message.status = self.parser.get_status_code()
        message.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True


def parse(data: bytes, *, response: bool, eof: bool = False) -> tuple[list[Message], str | None]:
    """The messages llhttp finds in ``data``, and its error (None when it took every byte).

    ``eof`` ends a body delimited by the connection's end (httptools does not expose llhttp_finish, so
    a last message without Content-Length or Transfer-Encoding is taken as complete there).
    """
    collector = _Collector()
    parser_class = httptools.HttpResponseParser if response else httptools.HttpRequestParser
    parser = parser_class(collector)
    collector.parser = parser
    error = None
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as exc:
        error = str(exc) or type(exc).__name__
    last = collector.messages[-1] if collector.messages else None
    if eof and error is None and last is not None and not last.complete and last.headers_done and last.status:
        codings = b",".join(last.header(b"transfer-encoding")).split(b",")
        chunked = codings[-1].strip(b" \t").lower() == b"chunked"
        last.complete = not chunked and not (last.header(b"content-length") and codings == [b""])
    return collector.messages, error


async def answers(port: int, message: bytes, count: int, timeout: float = 5.0) -> tuple[list[Message], bytes]:
    """Send ``message`` and read until llhttp has ``count`` complete answers, or the proxy closes.

    Returns the answers and the raw bytes read.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b""
    try:
        writer.write(message)
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                data += chunk
                messages, error = parse(data, response=True, eof=not chunk)
                assert error is None, (error, data[:500])
                if not chunk or sum(m.complete for m in messages) >= count:
                    return messages, data
    finally:
        writer.close()
