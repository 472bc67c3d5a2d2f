"""S3's signed streaming upload (aws-chunked, ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``), as pure functions.

The request's own signature (the *seed*) signs the headers with the payload
hash ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``; the body is then sent as chunks,
each ``hex(size);chunk-signature=SIG\\r\\n DATA \\r\\n``, where each chunk's
signature covers its data and the previous signature, so no chunk can be
dropped, reordered or changed. A zero-length chunk ends the body. The chunk
size is ours to choose (S3 asks for at least 8 KiB in all but the last), so
the encoded length is known from the decoded one before the first byte goes.
"""

from __future__ import annotations

import hashlib
import hmac

from . import EMPTY_SHA256

CHUNK_SIZE = 64 * 1024
_SIGNATURE_LENGTH = 64


def chunk_string_to_sign(amz_date: str, scope: str, previous_signature: str, data: bytes) -> str:
    """What a chunk's signature signs (the S3 documentation's ``AWS4-HMAC-SHA256-PAYLOAD`` form)."""
    return "\n".join(
        (
            "AWS4-HMAC-SHA256-PAYLOAD",
            amz_date,
            scope,
            previous_signature,
            EMPTY_SHA256,
            hashlib.sha256(data).hexdigest(),
        )
    )


def _frame_length(size: int) -> int:
    return len(f"{size:x}") + len(";chunk-signature=") + _SIGNATURE_LENGTH + 2 + size + 2


def encoded_length(decoded_length: int, chunk_size: int = CHUNK_SIZE) -> int:
    """The Content-Length of ``decoded_length`` body bytes once framed in ``chunk_size`` chunks."""
    full, rest = divmod(decoded_length, chunk_size)
    return full * _frame_length(chunk_size) + (_frame_length(rest) if rest else 0) + _frame_length(0)


class ChunkSigner:
    """Frames and signs one body's chunks in order, each chained to the one before."""

    __slots__ = ("amz_date", "key", "previous", "scope")

    def __init__(self, key: bytes, amz_date: str, scope: str, seed_signature: str) -> None:
        self.key = key
        self.amz_date = amz_date
        self.scope = scope
        self.previous = seed_signature

    def frame(self, data: bytes) -> bytes:
        """``data`` as one signed chunk (``b""`` gives the final, empty chunk)."""
        to_sign = chunk_string_to_sign(self.amz_date, self.scope, self.previous, data)
        self.previous = hmac.digest(self.key, to_sign.encode(), "sha256").hex()
        return b"".join((f"{len(data):x};chunk-signature={self.previous}\r\n".encode(), data, b"\r\n"))


class AwsChunkedDecoder:
    """Takes the aws-chunked framing off a client's body (``feed`` pieces in, data out).

    The client's chunk signatures were chained from its own request signature,
    which the proxy replaces: they are dropped here and the data signed anew.
    Trailers after the last chunk (``x-amz-checksum-*``) are read and dropped.
    """

    __slots__ = ("_buffer", "_left", "done")

    MAX_LINE = 4096

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._left = -1  # data bytes left in the current chunk; -1: a size line comes next; -2: trailers
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        """The data bytes in ``data``; raises ValueError on framing that is not aws-chunked."""
        self._buffer += data
        out: list[bytes] = []
        while not self.done:
            if self._left > 0:
                piece = bytes(self._buffer[: self._left])
                if not piece:
                    break
                del self._buffer[: len(piece)]
                self._left -= len(piece)
                out.append(piece)
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > self.MAX_LINE:
                    raise ValueError("an aws-chunked line is too long")
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            if self._left == 0:  # the CRLF after a chunk's data
                if line:
                    raise ValueError("an aws-chunked chunk is longer than its size")
                self._left = -1
            elif self._left == -1:
                size_text = line.partition(b";")[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ValueError(f"bad aws-chunked size {size_text[:20]!r}") from None
                self._left = size if size else -2
            elif not line:  # the empty line after the trailers
                self.done = True
        return out
