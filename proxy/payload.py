"""The request body on its way upstream, in the route's payload mode (``signed``, ``unsigned``, ``streaming``).

* ``signed``: the body is read whole and hashed, then sent; ``max_body`` bounds it.
* ``unsigned``: ``UNSIGNED-PAYLOAD`` is signed and the body streams through as it
  arrives, so an upload of any size passes in flat memory.
* ``streaming``: S3's aws-chunked encoding, each chunk signed and chained to the
  request's signature (``signing.chunked``), streamed the same way. A client
  that sends aws-chunked itself (an SDK behind the proxy) has its framing
  taken off and its data re-signed, never wrapped twice.

A streamed body needs its length (Content-Length, or the client's
``x-amz-decoded-content-length``) for ``streaming``; for ``unsigned`` a body
of unknown length goes upstream chunked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from . import signing
from .http.front import BodyTooLarge, Refusal, Request
from .signing.chunked import CHUNK_SIZE, AwsChunkedDecoder, ChunkSigner, encoded_length
from .signing.services import STREAMING_PAYLOAD, UNSIGNED_PAYLOAD


def too_large(max_body: int) -> Refusal:
    """413; the connection closes after it, since the rest of the body is never read."""
    return Refusal(
        f"request body is larger than max_body ({max_body} bytes); raise max_body to send it", 413, "body_too_large"
    )


@dataclass
class Payload:
    """What goes upstream as the body, and what its signature says of it."""

    sha256: str  # the x-amz-content-sha256 value signed
    size: int | None  # the upstream Content-Length; None: sent chunked
    body: list[bytes] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None
    headers: list[tuple[str, str | None]] = field(default_factory=list)  # set upstream (None: removed), signed
    chunk_signer: ChunkSigner | None = None  # ``streaming``: set once the seed signature exists
    signature: signing.Signature | None = None  # what was signed, to explain a refusal


def no_body() -> Payload:
    """The payload of a request without a body (what ``read_payload`` gives for one, without a wait)."""
    return Payload(signing.EMPTY_SHA256, 0)


async def read_payload(request: Request, mode: str, max_body: int, streamed_limit: int | None) -> Payload:
    """The body of ``request`` as ``mode`` sends it; raises a 413 or 411 ``Refusal`` before anything is sent."""
    if mode == "signed" or not request.body_exists:
        try:
            body, size, sha256 = await request.read_body(max_body)
        except BodyTooLarge:
            raise too_large(max_body) from None
        return Payload(sha256, size, body)
    headers = request.headers
    client_chunked = "aws-chunked" in headers.get("Content-Encoding", "").lower() or headers.get(
        "x-amz-content-sha256", ""
    ).startswith("STREAMING-")
    declared = headers.get("x-amz-decoded-content-length") if client_chunked else headers.get("Content-Length")
    decoded_length = int(declared) if declared and declared.isdigit() else None
    if streamed_limit is not None and decoded_length is not None and decoded_length > streamed_limit:
        raise too_large(streamed_limit)
    pieces = _limited(request.stream_body(), streamed_limit)
    other_codings = _without_aws_chunked(headers.getall("Content-Encoding", ()))
    replaced: list[tuple[str, str | None]] = []
    if client_chunked:
        pieces = _decoded(pieces)
        replaced = [("Content-Encoding", other_codings or None), ("x-amz-decoded-content-length", None),
                    ("x-amz-trailer", None)]  # fmt: skip
    if mode == "unsigned":
        return Payload(UNSIGNED_PAYLOAD, decoded_length, stream=pieces, headers=replaced)
    if decoded_length is None:
        raise Refusal(
            "payload: streaming needs the body's length: send Content-Length (or x-amz-decoded-content-length)",
            411,
            "length_required",
        )
    payload = Payload(STREAMING_PAYLOAD, encoded_length(decoded_length))
    payload.headers = [
        *replaced,
        ("Content-Encoding", ",".join(["aws-chunked", *([other_codings] if other_codings else [])])),
        ("x-amz-decoded-content-length", str(decoded_length)),
    ]
    payload.stream = _signed_chunks(payload, pieces)
    return payload


SMALL_BODY = 1 << 20  # a streamed body this small is gathered once signed: pooled connection, retry allowed


async def gather_small(payload: Payload) -> None:
    """Collect a small streamed body (known length, at most ``SMALL_BODY``; call once signed).

    A streamed body goes on a fresh connection because it cannot be sent
    twice; most S3 requests are small, and gathered they use the pool (and
    the retry on a connection the upstream had closed) like a signed body.
    """
    if payload.stream is not None and payload.size is not None and payload.size <= SMALL_BODY:
        payload.body = [piece async for piece in payload.stream]
        payload.stream = None


def _without_aws_chunked(values: list[str]) -> str:
    """The client's content codings other than aws-chunked (``gzip`` of ``aws-chunked,gzip``)."""
    codings = [c.strip() for value in values for c in value.split(",")]
    return ",".join(c for c in codings if c and c.lower() != "aws-chunked")


async def _decoded(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A client's aws-chunked body without its framing (a 400 ``Refusal`` when it is not aws-chunked)."""
    decoder = AwsChunkedDecoder()
    async for piece in pieces:
        try:
            data = decoder.feed(piece)
        except ValueError as error:
            raise Refusal(f"malformed aws-chunked body: {error}", reason="bad_aws_chunked") from None
        for part in data:
            yield part
    if not decoder.done:
        raise Refusal("the aws-chunked body ended before its final chunk", reason="bad_aws_chunked")


async def _limited(pieces: AsyncIterator[bytes], limit: int | None) -> AsyncIterator[bytes]:
    """``pieces``, raising a 413 ``Refusal`` past ``limit`` bytes (a body of unknown length)."""
    sent = 0
    try:
        async for piece in pieces:
            sent += len(piece)
            if limit is not None and sent > limit:
                raise BodyTooLarge
            yield piece
    except BodyTooLarge:
        raise too_large(limit or 0) from None


async def _signed_chunks(payload: Payload, pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The body in ``CHUNK_SIZE`` chunks, each framed and signed, then the final empty chunk."""
    signer = payload.chunk_signer
    assert signer is not None, "the request must be signed before its chunks"
    pending = bytearray()
    async for piece in pieces:
        pending += piece
        while len(pending) >= CHUNK_SIZE:
            yield signer.frame(bytes(pending[:CHUNK_SIZE]))
            del pending[:CHUNK_SIZE]
    if pending:
        yield signer.frame(bytes(pending))
    yield signer.frame(b"")


def chain(payload: Payload, secret_access_key: str, amz_date: str, region: str, service: str) -> None:
    """Start ``payload``'s chunk signatures from the request's own, ``payload.signature`` (``streaming`` only)."""
    if payload.sha256 == STREAMING_PAYLOAD:
        assert payload.signature is not None, "the request must be signed before its chunks are chained to it"
        seed = payload.signature.authorization.rpartition("=")[2]
        key = signing.signing_key(secret_access_key, amz_date[:8], region, service)
        payload.chunk_signer = ChunkSigner(key, amz_date, signing.credential_scope(amz_date[:8], region, service), seed)
