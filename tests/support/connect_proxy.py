"""A small forward proxy on 127.0.0.1, like a corporate egress proxy: CONNECT tunnels and absolute-form HTTP.

It counts what went through (tunnels opened, requests forwarded, the
Proxy-Authorization each carried), can require basic auth (407 otherwise) and
can refuse every CONNECT with a given status. Absolute-form requests are sent
on with ``Connection: close`` (one request per connection: enough to check
what arrives, no framing to get wrong here).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class ConnectProxy:
    username: str | None = None
    password: str | None = None
    refuse_with: int | None = None  # answer every CONNECT with this status
    tunnels: list[str] = field(default_factory=list)  # host:port of each tunnel opened
    forwarded: list[str] = field(default_factory=list)  # absolute-form targets sent on
    authorizations: list[str | None] = field(default_factory=list)  # Proxy-Authorization of every request
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        """The URL to put in HTTPS_PROXY, with the credentials when there are some."""
        userinfo = f"{self.username}:{self.password}@" if self.username is not None else ""
        return f"http://{userinfo}127.0.0.1:{self.port}"

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _authorized(self, value: str | None) -> bool:
        if self.username is None:
            return True
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return value == f"Basic {expected}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ")
            headers = [line.split(":", 1) for line in lines if line]
            authorization = next((v.strip() for k, v in headers if k.lower() == "proxy-authorization"), None)
            self.authorizations.append(authorization)
            if not self._authorized(authorization):
                writer.write(
                    b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="corp"\r\n'
                    b"Content-Length: 0\r\n\r\n"
                )
                return
            if method == "CONNECT":
                await self._tunnel(target, reader, writer)
            else:
                await self._forward(method, target, headers, reader, writer)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.close()
            self._tasks.discard(task)

    async def _tunnel(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse_with is not None:
            writer.write(f"HTTP/1.1 {self.refuse_with} Blocked By Policy\r\nContent-Length: 0\r\n\r\n".encode())
            return
        host, _, port = target.rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        self.tunnels.append(target)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await _pipe_both(reader, writer, upstream_reader, upstream_writer)

    async def _forward(
        self,
        method: str,
        target: str,
        headers: list[list[str]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        parts = urlsplit(target)
        self.forwarded.append(target)
        upstream_reader, upstream_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        kept = [f"{k}:{v}" for k, v in headers if k.lower() not in ("proxy-authorization", "connection")]
        origin = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = "\r\n".join([f"{method} {origin} HTTP/1.1", *kept, "Connection: close", "", ""])
        upstream_writer.write(head.encode("latin-1"))
        await _pipe_both(reader, writer, upstream_reader, upstream_writer)


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
) -> None:
    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.close()

    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
