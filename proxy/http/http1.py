"""HTTP/1.1 pieces both sides of the proxy share: header rules, chunked decoding, the Date value.

The front (clients) and the upstream client parse HTTP/1.1 themselves; what
a message may contain and how a chunked body is framed is the same for both.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # the digest of a request with no body
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # a method or header name (RFC 9110 5.6.2)
# Header lines, each ending in CRLF: a name, a colon, and a value of visible characters, spaces,
# tabs and obs-text (no other control character, no obs-fold). Checked for a whole block at once.
# Neither pattern can backtrack (the classes on either side of each repetition are disjoint, or the
# repetition is possessive): parsing costs time linear in the head's size, whatever its content.
CONTROLS = rb"\x00-\x08\x0a-\x1f\x7f"  # a class's ranges: controls but HTAB, in no field value (RFC 9110 5.5)
_FIELD_LINES = re.compile(rb"(?:" + TOKEN + rb":[^" + CONTROLS + rb"]*+\r\n)*+")
_NAME = re.compile(TOKEN)
# One header line of a decoded block, matched only where a line starts: its name, then its value
# (the characters _FIELD_LINES allows, decoded) without the whitespace before it. Whitespace after
# a value is rare and taken off afterwards: a pattern that leaves it out costs a step per word.
_FIELD = re.compile(r"(?m)^(" + TOKEN.decode() + r"):[ \t]*+([^" + CONTROLS.decode() + r"]*+)\r\n")
_TOKEN = re.compile(TOKEN.decode())
MAX_LENGTH_DIGITS = 18  # a Content-Length of 19 digits or more is no real body (and would overflow C readers)

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

# A chunk-size line: hex digits, then extensions (RFC 9112 7.1.1), each `;name` or `;name=value` with
# a token or quoted-string value. Optional whitespace is allowed before a semicolon only: llhttp
# refuses it elsewhere, and a stricter reading than the peer's is never a smuggling gap.
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]++|\\[\t\x20-\x7e\x80-\xff])*+"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,15})(?:[ \t]*+;" + TOKEN + rb"(?:=(?:" + TOKEN + rb"|" + _QUOTED + rb"))?+)*+"
)
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions, or a trailer line


def parse_fields(block: bytes, errors: str = "strict") -> list[tuple[str, str]] | None:
    """The (name, value) pairs of a header block whose every line ends in CRLF; None if a line is malformed.

    Values are decoded as UTF-8 with ``errors`` (``surrogateescape`` keeps other
    bytes, to be written back unchanged); a strict decoding raises
    UnicodeDecodeError. One pass in C for the whole block, linear in its size:
    a match starts only where a line does and takes all of it, so the block is
    well-formed exactly when every line matched (one match per LF) and it ends
    with one.
    """
    try:
        text = block.decode("utf-8", errors)
    except UnicodeDecodeError:
        if parse_fields(block, "surrogateescape") is None:
            return None  # malformed first: a block that is both is refused as malformed
        raise
    fields = _FIELD.findall(text)
    if len(fields) != text.count("\n") or (text and text[-1] != "\n"):
        return None
    if " \r\n" in text or "\t\r\n" in text:
        return [(name, value.rstrip(" \t")) for name, value in fields]
    return fields


def malformed_line(block: bytes, first_line: int = 2) -> str:
    """Which line of ``block`` ``parse_fields`` refuses, and why, for an error message.

    Lines are numbered in the message (the request or status line is 1), and
    never quoted: a malformed ``Authorization`` line would otherwise be echoed
    into an error body and a log.
    """
    for number, line in enumerate(block.split(b"\r\n")[:-1], first_line):
        if _FIELD_LINES.fullmatch(line + b"\r\n") is None:
            if line[:1] in (b" ", b"\t"):
                return f"obsolete line folding (a line starting with whitespace) at header line {number}"
            name = _NAME.match(line)
            if name is None or line[name.end() : name.end() + 1] != b":":
                return f"header line {number} has no valid name (a token followed by a colon)"
            return f"header line {number} has a control character in its value"
    return "malformed header block"


def connection_tokens(connection_values: Iterable[str]) -> frozenset[str]:
    """Header names listed in ``Connection`` (they are hop-by-hop too), lower-cased."""
    tokens: frozenset[str] = frozenset()
    for value in connection_values:
        found = _cached_tokens(value) if len(value) <= CACHED_VALUE else _tokens(value)
        tokens = tokens | found if tokens else found  # one value (the usual): its cached set, no new one
    return tokens


CACHED_VALUE = 64  # longer Connection values are not cached: a client could fill the caches with large ones


def _tokens(value: str) -> frozenset[str]:
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


# Peers send the same few Connection values ("keep-alive", "close") again and again.
_cached_tokens = lru_cache(maxsize=256)(_tokens)


def hop_by_hop(headers: Any) -> frozenset[str]:
    """The names to drop when forwarding a message: HOP_BY_HOP and whatever its ``Connection`` lists."""
    if "Connection" not in headers:
        return HOP_BY_HOP
    tokens = connection_tokens(headers.getall("Connection"))
    return HOP_BY_HOP if tokens <= HOP_BY_HOP else HOP_BY_HOP | tokens  # "keep-alive": no new set


def has_body(method: str, status: int) -> bool:
    """Whether a response to ``method`` with ``status`` carries a body (RFC 9110 6.4.1)."""
    return method != "HEAD" and status >= 200 and status not in (204, 304)


# ---------------------------------------------------------------- framing: how long a body is


class FramingError(ValueError):
    """A message whose body cannot be delimited with certainty: refused, and its connection closed."""


@dataclass(slots=True)  # not frozen: most messages make one, and a frozen one costs three times as much
class Framing:
    """How a message's body is delimited (RFC 9112 6.3), decided once per message from its head.

    ``kind`` is "none", "length" (``length`` bytes), "chunked", or "close"
    (the body runs until the connection closes). ``reusable`` is False when
    the connection must close after this message even if it is read whole:
    "when in doubt, close".
    """

    kind: str
    length: int | None = None
    reusable: bool = True
    codings: tuple[str, ...] = ()  # transfer codings other than a final chunked, as sent (responses only)


NO_BODY = Framing("none")


def transfer_codings(values: Iterable[str]) -> list[str]:
    """The transfer codings of Transfer-Encoding values, lower-cased; raises FramingError on anything but tokens.

    Compared as ASCII tokens: ``str.strip`` and ``str.lower`` would also strip
    Unicode spaces (``chunked\\x85``) and fold look-alikes (the Kelvin sign),
    turning a value the next hop reads differently into "chunked".
    """
    codings = []
    for value in values:
        for element in value.split(","):
            coding = element.strip(" \t")
            if not coding:
                continue
            if not coding.isascii() or _TOKEN.fullmatch(coding.partition(";")[0].rstrip(" \t")) is None:
                raise FramingError("Transfer-Encoding must be a list of transfer codings (tokens)")
            codings.append(coding.lower())
    if not codings:
        raise FramingError("Transfer-Encoding is empty")
    return codings


def content_length(values: list[str]) -> int | None:
    """The one Content-Length of a message (None when absent); raises FramingError when repeated or invalid."""
    if not values:
        return None
    if len(values) > 1:
        raise FramingError("Content-Length is repeated")
    value = values[0]
    if not (len(value) <= MAX_LENGTH_DIGITS and value.isascii() and value.isdigit()):  # ASCII digits: [0-9]+
        raise FramingError(f"Content-Length must be a decimal number of at most {MAX_LENGTH_DIGITS} digits")
    return int(value)


def request_framing(headers: Any, http11: bool) -> Framing:
    """The framing of a request's body (RFC 9112 6.1-6.3), strictly: anything a peer might read otherwise is refused.

    Chunked must be the only transfer coding, in HTTP/1.1, without Content-Length.
    """
    lengths = headers.getall("Content-Length", ())
    if "Transfer-Encoding" in headers:
        codings = transfer_codings(headers.getall("Transfer-Encoding"))
        if codings != ["chunked"] or lengths or not http11:
            raise FramingError("Transfer-Encoding must be chunked alone, without Content-Length, in HTTP/1.1")
        return Framing("chunked")
    length = content_length(lengths)
    return NO_BODY if not length else Framing("length", length)


def response_framing(method: str, status: int, headers: Any, http11: bool) -> Framing:
    """The framing of a response's body by RFC 9112 6.3, in its order; raises FramingError.

    No body for HEAD, 1xx, 204 and 304. A Transfer-Encoding whose final coding
    is chunked wins over a Content-Length (then dropped, and the connection
    closed after the answer, as a smuggling attempt is likely); any other final
    coding means the body runs until the connection closes. Content-Length is
    used only when there is no Transfer-Encoding, and must be one number.
    Only an HTTP/1.1 answer without ``Connection: close`` leaves its
    connection reusable.
    """
    lengths = headers.getall("Content-Length", ())
    sent_codings = headers.getall("Transfer-Encoding", ())
    connection = headers.getall("Connection", ())
    # Both framings at once is likely an attempt at smuggling: whatever is read, the connection then closes.
    closes = bool(connection) and "close" in connection_tokens(connection)
    reusable = http11 and not (lengths and sent_codings) and not closes
    bodyless = method == "HEAD" or status < 200 or status in (204, 304)
    if not sent_codings:
        length = content_length(lengths)  # validated for a bodyless answer too: a HEAD answer's length is relayed
        if bodyless:
            return Framing("none", reusable=reusable)
        return Framing("close", reusable=False) if length is None else Framing("length", length, reusable)
    # Validated even where they do not apply: a malformed framing header is a sign the next hop may
    # read this answer differently.
    codings = transfer_codings(sent_codings)
    if "chunked" in codings[:-1]:
        raise FramingError("chunked is not the final transfer coding, or is applied twice")
    if bodyless:
        return Framing("none", reusable=reusable)
    if codings[-1] == "chunked":
        return Framing("chunked", reusable=reusable, codings=tuple(codings[:-1]))
    return Framing("close", reusable=False, codings=tuple(codings))


# ---------------------------------------------------------------- readers, one per framing mode


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
    take): a lenient reading here is how request smuggling starts. Every line
    (size and extensions, or trailer) is capped at MAX_CHUNK_LINE however the
    reads split it, and ``framing`` counts the bytes that are not data, so
    that a caller can bound what a body of tiny chunks costs.
    """

    __slots__ = ("buffer", "framing", "remaining", "rest", "state")

    def __init__(self) -> None:
        self.buffer = b""
        self.remaining = 0  # bytes of chunk data still to come
        self.state = "size"  # size | data | data_crlf | trailers
        self.rest = b""
        self.framing = 0  # bytes of size lines, extensions, CRLFs and trailers so far

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """The data bytes in ``data`` (in one piece) and whether the body ended; raises FramingError."""
        pieces: list[bytes] = []
        buffer = self.buffer + data if self.buffer else data
        self.buffer = b""
        position = 0
        size = len(buffer)
        while position < size:
            if self.state == "data":
                piece = buffer[position : position + self.remaining]
                pieces.append(piece)
                position += len(piece)
                self.remaining -= len(piece)
                if self.remaining == 0:
                    self.state = "data_crlf"
                continue
            end = buffer.find(b"\r\n", position, position + MAX_CHUNK_LINE + 2)
            if end < 0:
                if size - position > MAX_CHUNK_LINE + 1:
                    raise FramingError(f"a chunk-size or trailer line longer than {MAX_CHUNK_LINE} bytes")
                self.buffer = buffer[position:]
                break
            line = buffer[position:end]
            self.framing += end + 2 - position
            position = end + 2
            if self.state == "data_crlf":
                if line:
                    raise FramingError("chunk data longer than its declared size")
                self.state = "size"
            elif self.state == "size":
                match = _CHUNK_LINE.fullmatch(line)
                if match is None:
                    raise FramingError("invalid chunk-size line (a hex size, then ;extensions)")
                chunk_size = int(match.group(1), 16)
                if chunk_size == 0:
                    self.state = "trailers"
                else:
                    self.remaining, self.state = chunk_size, "data"
            else:  # trailers
                if not line:
                    self.rest = buffer[position:]
                    return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), True
                if _FIELD_LINES.fullmatch(line + b"\r\n") is None:
                    raise FramingError("malformed trailer line")
        return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), False
