"""Lingering close: how a connection ends after an answer sent before the request body was read.

When the proxy answers early (413 over ``max_body``, 400, 407, 503, 408) the
client is often still writing its body. Closing the socket then, with the
client's bytes unread in the kernel, makes the kernel send a reset, and a reset
can overtake the answer: the client sees ``ECONNRESET`` instead of the 413 (Node
``fetch`` with a 20 MiB body, every other try). Well-behaved servers (Apache's
``lingering_close``, nginx's ``lingering_close``) instead stop writing, read and
discard what still comes for a while, and close once the client is quiet.

Here the connection's protocol is replaced by ``LingeringClose``, which sends a
FIN after the answer (so the client knows nothing more comes), discards whatever
arrives and closes when the client closes, falls quiet for ``LINGER_IDLE``, has
sent ``LINGER_BYTES`` more, or ``LINGER_TIME`` has passed: enough for a client
still pushing a 20 MiB upload over a slow link, and never an unbounded cost.
"""

from __future__ import annotations

import asyncio

LINGER_IDLE = 2.0  # seconds without a byte from the client: it has stopped writing
LINGER_TIME = 30.0  # seconds at most, however slowly the client keeps writing
LINGER_BYTES = 64 << 20  # bytes discarded at most (at loopback speed, well under a second of CPU)


class LingeringClose(asyncio.Protocol):
    """Take over ``transport`` after its last answer was written; see the module docstring.

    ``registry`` holds the lingering connections so that a stopping server can
    close them at once (``close``); each removes itself when its connection ends.
    """

    def __init__(self, transport: asyncio.Transport, registry: set[LingeringClose]) -> None:
        loop = asyncio.get_running_loop()
        self.transport = transport
        self.registry = registry
        self.discarded = 0
        self.last_data = loop.time()
        self.give_up = self.last_data + LINGER_TIME
        self.timer = loop.call_later(LINGER_IDLE, self._check)
        registry.add(self)
        transport.set_protocol(self)
        if transport.can_write_eof():
            transport.write_eof()  # after the answer, still buffered if the client is slow to read it
        if not transport.is_reading():
            transport.resume_reading()  # the old protocol may have paused it (a pipelined request held back)

    def data_received(self, data: bytes) -> None:
        self.discarded += len(data)
        if self.discarded > LINGER_BYTES:
            self.close()
            return
        self.last_data = asyncio.get_running_loop().time()

    def eof_received(self) -> bool:
        return False  # the client is done writing: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.registry.discard(self)

    def _check(self) -> None:
        """Close once the client has been quiet for ``LINGER_IDLE`` or ``LINGER_TIME`` is over; else wait on."""
        now = asyncio.get_running_loop().time()
        quiet_from = self.last_data + LINGER_IDLE
        if now >= quiet_from or now >= self.give_up:
            self.close()
            return
        self.timer = asyncio.get_running_loop().call_at(min(quiet_from, self.give_up), self._check)

    def close(self) -> None:
        self.timer.cancel()
        self.registry.discard(self)
        self.transport.close()
