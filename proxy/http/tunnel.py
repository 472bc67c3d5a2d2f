"""CONNECT tunnels: what the front's ``connect`` hook may decide, and the blind byte relay.

The front knows nothing of which hosts are allowed; its owner's hook looks at a
``CONNECT host:port`` request and answers with a ``Refusal``, a ``Terminate``
(answer 200, then TLS with this context, then HTTP requests inside, each one
for ``https://authority``) or a ``Tunnel`` (answer 200, then relay bytes both
ways, untouched, to host:port).

A blind tunnel is two protocols joined back to back. Each side stops reading
while the other cannot take more (``pause_writing``), so memory stays bounded
whatever the rates; an end of stream is passed on as a half-close, and the
tunnel closes when both sides have finished or either breaks.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Terminate:
    """Terminate TLS with ``context`` and serve the requests inside as requests for ``authority``."""

    context: ssl.SSLContext
    authority: str  # host:port


@dataclass(frozen=True, slots=True)
class Tunnel:
    """Relay bytes to and from host:port unchanged."""

    host: str
    port: int


class _Pipe(asyncio.Protocol):
    """One side of a blind tunnel: what it receives is written to the other side."""

    __slots__ = ("eof", "peer", "pipes", "transport")

    def __init__(self, pipes: set[_Pipe]) -> None:
        self.pipes = pipes
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pipes.add(self)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.eof or not peer.transport.can_write_eof():
            return False  # both directions ended (or cannot half-close): close
        peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipes.discard(self)
        self.transport = None
        peer, self.peer = self.peer, None
        if peer is not None and peer.transport is not None:
            peer.transport.close()  # after what is still buffered for it is sent

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_blind(client: asyncio.Transport, tunnel: Tunnel, timeout: float, pipes: set[_Pipe]) -> None:
    """Connect to the tunnel's host:port within ``timeout``, then join it to ``client``.

    Raises OSError or TimeoutError when the host cannot be reached.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, upstream = await loop.create_connection(lambda: _Pipe(pipes), tunnel.host, tunnel.port)
    near = _Pipe(pipes)
    client.set_protocol(near)
    near.connection_made(client)
    near.peer, upstream.peer = upstream, near
