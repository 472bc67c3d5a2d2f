"""Fault-injection plumbing: a scripted raw upstream, fd and task counting, the proxy as a process.

Everything listens on 127.0.0.1 only. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config
from tests.conftest import TEST_KEY_ID, TEST_SECRET
from tests.support.rawhttp import RawResponse, parse_response
from tests.support.sigv4_upstream import Received, SignatureError, SigV4Upstream
from tests.test_cli import ROOT

# ---------------------------------------------------------------- a scripted raw upstream


@dataclass
class Seen:
    """One request head as the scripted upstream read it (the body only if the script read it)."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    connection: int  # which TCP connection (1, 2, ...) in accept order
    index: int  # 1 for the first request on its connection, 2 for the next (a reused pooled connection) ...
    raw: bytes = b""  # the head exactly as received
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def content_length(self) -> int:
        return int(self.header("content-length") or 0)


Script = Callable[[Seen, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class ScriptedUpstream:
    """An HTTP/1.1 upstream on a raw socket whose answer to each request is a coroutine.

    The script gets the parsed head, the reader (the body is still unread) and the
    writer, and returns True to keep the connection open for the next request.
    Every head is recorded in ``seen`` in arrival order.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.seen: list[Seen] = []
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def __aenter__(self) -> ScriptedUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def methods(self) -> list[str]:
        return [f"{s.method} {s.target}" for s in self.seen]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        connection, index = self.connections, 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                index += 1
                seen = parse_head(head, connection, index)
                self.seen.append(seen)
                if not await self.script(seen, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            if not writer.transport.is_closing():
                writer.close()


def parse_head(head: bytes, connection: int, index: int) -> Seen:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:] if line)]
    return Seen(method, target, headers, connection, index, head)


async def read_body(seen: Seen, reader: asyncio.StreamReader) -> bytes:
    """Read the body announced by Content-Length (the proxy always sends one when there is a body)."""
    seen.body = await reader.readexactly(seen.content_length)
    return seen.body


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def ok(body: bytes = b"ok", *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[ScriptedUpstream]]]:
    """``await scripted(script)`` starts a ScriptedUpstream, closed after the test."""
    started: list[ScriptedUpstream] = []

    async def start(script: Script) -> ScriptedUpstream:
        upstream = await ScriptedUpstream(script).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


async def exchange_bytes(port: int, message: bytes, timeout: float = 5.0) -> bytes:
    """Send ``message`` to 127.0.0.1:``port`` and return every byte answered until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(message)
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


async def first_response(port: int, message: bytes, timeout: float = 5.0) -> RawResponse:
    """Send ``message`` and read one response (head plus a Content-Length body), whether or not the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(message)
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            body = await reader.readexactly(length)
    finally:
        writer.close()
    return parse_response(head + body)


class TolerantUpstream(SigV4Upstream):
    """A SigV4Upstream that answers 403 (instead of failing with 500) when awscrt cannot take the request.

    awscrt only takes header values that encode as UTF-8, so a request carrying
    Latin-1 bytes (which the proxy forwards unchanged) cannot be re-verified here.
    """

    async def verify(self, received: Received) -> Any:
        try:
            return await super().verify(received)
        except TypeError as error:
            raise SignatureError(f"{UNVERIFIABLE}: {error}") from None


UNVERIFIABLE = "awscrt cannot verify this request"


@pytest.fixture
async def tolerant_upstream() -> AsyncIterator[TolerantUpstream]:
    upstream = TolerantUpstream({TEST_KEY_ID: TEST_SECRET})
    await upstream.start()
    yield upstream
    await upstream.close()


# ---------------------------------------------------------------- leak accounting


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settle(measure: Callable[[], int], limit: int, timeout: float = 5.0) -> int:
    """Poll ``measure()`` until it is at most ``limit`` (or ``timeout`` passes); return the last value."""
    deadline = time.monotonic() + timeout
    value = measure()
    while value > limit and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        value = measure()
    return value


def raise_fd_limit(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``wanted`` (bounded by the hard limit); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# ---------------------------------------------------------------- the proxy as a process


def single_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One process, so /proc/<pid> is the proxy itself (``workers`` exists only in newer configs)."""
    if "workers" in Config.model_fields:
        return {"workers": 1, **config}
    return config


@dataclass
class ProxyProcess:
    process: asyncio.subprocess.Process
    port: int
    stderr: bytearray = field(default_factory=bytearray)
    _drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._drain is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain, 5)
        assert self.process.returncode is not None
        return self.process.returncode


async def start_proxy_process(config: dict[str, Any], directory: Path, port: int) -> ProxyProcess:
    """``python -m proxy run --config`` on 127.0.0.1:``port``; stderr is drained into ``.stderr``."""
    path = directory / "proxy.yaml"
    path.write_text(json.dumps(single_worker({**config, "listen": f"127.0.0.1:{port}"})))  # JSON is YAML
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=os.environ.copy(),
    )  # fmt: skip
    running = ProxyProcess(process, port)
    assert process.stderr is not None and process.stdout is not None

    async def drain(stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            running.stderr.extend(chunk)

    running._drain = asyncio.create_task(drain(process.stderr))
    try:
        async with asyncio.timeout(20):
            while b"listening on" not in (line := await process.stdout.readline()):
                if not line:
                    raise AssertionError(f"the proxy exited before listening: {running.stderr.decode()[-2000:]}")
    except BaseException:
        await running.stop()
        raise
    return running
