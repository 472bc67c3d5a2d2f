"""A transport that records what the code under test writes, for driving a protocol's real code in-process.

It stands in for the socket only: what parses and frames is the real code,
called as asyncio calls it (``data_received``), thousands of times a second.
"""

from __future__ import annotations

from typing import Any


class RecordingTransport:
    """Where the code under test writes; it stands in for the socket (what it parses is the real code)."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.reading = True
        self.protocol: Any = None  # what reads from it now (the front hands a refused connection to a lingerer)

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, data: Any) -> None:
        for part in data:
            self.written += part

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closed = True  # nothing more is written, and nothing more is parsed as requests

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 8080) if name == "sockname" else default
