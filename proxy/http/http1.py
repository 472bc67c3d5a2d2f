"""HTTP/1.1 pieces both sides of the proxy share: header rules, chunked decoding, the Date value.

The front (clients) and the upstream client parse HTTP/1.1 themselves; what
a message may contain and how a chunked body is framed is the same for both.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable
from typing import Any

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # the digest of a request with no body
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # a method or header name (RFC 9110 5.6.2)
# Header lines, each ending in CRLF: a name, a colon, and a value of visible characters, spaces,
# tabs and obs-text (no other control character, no obs-fold). Checked for a whole block at once.
_FIELD_LINES = re.compile(rb"(?:" + TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
FORBIDDEN_IN_LINE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls but HTAB (RFC 9110 5.5)
_NAME = re.compile(TOKEN)
_FIELD = re.compile(r"([^:]+):[ \t]*(.*?)[ \t]*\r\n")

# RFC 9110 7.6.1 (plus Proxy-Authorization, which is addressed to us, never upstream).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)

_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
MAX_CHUNK_LINE = 4096


def parse_fields(block: bytes, errors: str = "strict") -> list[tuple[str, str]] | None:
    """The (name, value) pairs of a header block whose every line ends in CRLF; None if a line is malformed.

    Values are decoded as UTF-8 with ``errors`` (``surrogateescape`` keeps other
    bytes, to be written back unchanged); a strict decoding raises
    UnicodeDecodeError. Two passes in C for the whole block, instead of a few
    Python calls a line.
    """
    if _FIELD_LINES.fullmatch(block) is None:
        return None
    return _FIELD.findall(block.decode("utf-8", errors))


def malformed_name(block: bytes) -> bytes:
    """The name of the first line ``parse_fields`` refuses (see ``field_name``), for an error message.

    Never the value: a malformed ``Authorization`` line would otherwise be
    echoed into an error body and a log.
    """
    for line in block.split(b"\r\n")[:-1]:
        if _FIELD_LINES.fullmatch(line + b"\r\n") is None:
            return field_name(line)
    return b""


def field_name(line: bytes) -> bytes:
    """The name a header line starts with (its leading token), at most 40 bytes; nothing of the value."""
    name = _NAME.match(line)
    return name.group()[:40] if name else b""


def connection_tokens(connection_values: Iterable[str]) -> set[str]:
    """Header names listed in ``Connection`` (they are hop-by-hop too), lower-cased."""
    tokens: set[str] = set()
    for value in connection_values:
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def hop_by_hop(headers: Any) -> frozenset[str]:
    """The names to drop when forwarding a message: HOP_BY_HOP and whatever its ``Connection`` lists."""
    if "Connection" not in headers:
        return HOP_BY_HOP
    return HOP_BY_HOP | connection_tokens(headers.getall("Connection"))


def has_body(method: str, status: int) -> bool:
    """Whether a response to ``method`` with ``status`` carries a body (RFC 9110 6.4.1)."""
    return method != "HEAD" and status >= 200 and status not in (204, 304)


_date_second = 0
_date_value = ""


def http_date() -> str:
    """The current time as an HTTP Date value, formatted once a second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
    return _date_value


class ChunkDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoding; ``rest`` holds what follows the last chunk.

    Sizes are strict hex (no sign, prefix or underscore that ``int()`` would
    take): a lenient reading here is how request smuggling starts.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.remaining = 0  # bytes of chunk data still to come
        self.state = "size"  # size | data | data_crlf | trailers
        self.rest = b""

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """The data bytes in ``data`` and whether the body ended; raises ValueError on bad framing."""
        pieces: list[bytes] = []
        buffer = self.buffer + data if self.buffer else data
        self.buffer = b""
        position = 0
        while position < len(buffer):
            if self.state == "data":
                piece = buffer[position : position + self.remaining]
                pieces.append(piece)
                position += len(piece)
                self.remaining -= len(piece)
                if self.remaining == 0:
                    self.state = "data_crlf"
                continue
            end = buffer.find(b"\r\n", position)
            if end < 0:
                self.buffer = buffer[position:]
                if len(self.buffer) > MAX_CHUNK_LINE:
                    raise ValueError("a chunk-size or trailer line longer than 4 KiB")
                break
            line = buffer[position:end]
            position = end + 2
            if self.state == "data_crlf":
                if line:
                    raise ValueError("chunk data longer than its declared size")
                self.state = "size"
            elif FORBIDDEN_IN_LINE.search(line):
                raise ValueError("a control character (a bare CR or LF) in a chunk-size or trailer line")
            elif self.state == "size":
                size_text = line.split(b";", 1)[0].rstrip(b" \t")
                if not _CHUNK_SIZE.fullmatch(size_text):
                    raise ValueError(f"invalid chunk size {size_text[:20]!r}")
                size = int(size_text, 16)
                if size == 0:
                    self.state = "trailers"
                else:
                    self.remaining, self.state = size, "data"
            elif self.state == "trailers":
                if not line:
                    self.rest = buffer[position:]
                    return pieces, True
                if _FIELD_LINES.fullmatch(line + b"\r\n") is None:
                    raise ValueError(f"malformed trailer line (name {field_name(line)!r})")
        return pieces, False
