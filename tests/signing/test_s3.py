"""S3 through the proxy: keys signed as S3 signs them, host styles, and the three payload modes.

Every request is re-verified by the awscrt upstream configured as S3 verifies
(single encoding, no normalisation, every x-amz-* header signed), and aws-chunked
bodies chunk by chunk with a key derived in the test itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import threading

import aiohttp
import pytest

from proxy.config import parse_config
from proxy.signing.services import s3_scope
from tests.conftest import TEST_KEY_ID, TEST_REGION, TEST_SECRET, static_route
from tests.support.rawhttp import raw_request
from tests.support.sigv4_upstream import SigV4Upstream
from tests.support.tls import Pki


@pytest.fixture
async def s3_upstream():
    upstream = SigV4Upstream({TEST_KEY_ID: TEST_SECRET}, region=TEST_REGION, service="s3")
    await upstream.start()
    yield upstream
    await upstream.close()


def s3_route(url: str, **route):
    return static_route(url, service="s3", **route)


HEAD = "Host: x\r\nConnection: close\r\n"
CHUNKED = (HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode()
KEY_1024 = "/" + "k" * 1023
KEYS = [
    # (path the client sends, path S3 must receive)
    ("/bucket/logs//2026/a+b%20c.txt", "/bucket/logs//2026/a%2Bb%20c.txt"),
    ("/bucket/x/../y", "/bucket/x/../y"),
    ("/bucket/./a/./b", "/bucket/./a/./b"),
    ("/bucket/100%25%20done", "/bucket/100%25%20done"),
    ("/bucket/caf%c3%a9/%E2%82%AC", "/bucket/caf%C3%A9/%E2%82%AC"),
    ("/bucket/caf\u00e9", "/bucket/caf%C3%A9"),
    ("/bucket/a:b@c=d", "/bucket/a%3Ab%40c%3Dd"),
    ("/bucket/enc%2Fslash", "/bucket/enc%2Fslash"),
    ("/bucket/trailing/", "/bucket/trailing/"),
    ("/bucket//", "/bucket//"),
    (KEY_1024, KEY_1024),
]


@pytest.mark.parametrize(("sent", "wire"), KEYS, ids=[k[:30] for k, _ in KEYS])
async def test_s3_keys_go_on_the_wire_as_meant_and_verify_as_s3(sent, wire, s3_upstream, start_proxy) -> None:
    proxy = await start_proxy(s3_route(s3_upstream.url))
    response = await raw_request(
        proxy.url,
        f"PUT {sent}?x-id=PutObject HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc".encode(),
    )
    got = s3_upstream.received[-1]
    assert response.status == 200, got.signature_error
    assert got.signature_ok and got.raw_path == wire + "?x-id=PutObject"
    assert got.body == b"abc"


async def test_s3_signs_every_x_amz_header(s3_upstream, start_proxy) -> None:
    proxy = await start_proxy(s3_route(s3_upstream.url))
    headers = {"x-amz-meta-owner": "ops", "x-amz-storage-class": "STANDARD_IA", "x-amz-tagging": "a=b"}
    async with aiohttp.ClientSession() as client, client.put(proxy.url + "/b/k", data=b"x", headers=headers) as r:
        assert r.status == 200
    got = s3_upstream.received[-1]
    assert got.signature_ok, got.signature_error
    assert {"x-amz-meta-owner", "x-amz-storage-class", "x-amz-tagging"} <= set(got.signed_headers)


async def test_a_dot_segment_cannot_leave_an_s3_route(s3_upstream, start_proxy) -> None:
    proxy = await start_proxy(s3_route(s3_upstream.url, path_prefix="/s3"))
    response = await raw_request(proxy.url, b"GET /s3/../other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 404  # routed on the normalised path: /other has no route
    response = await raw_request(proxy.url, b"GET /x/../s3/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 400 and s3_upstream.received == []
    response = await raw_request(proxy.url, b"GET /s3/a/../b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 200 and s3_upstream.received[-1].raw_path == "/a/../b"


HOSTS = [
    ("bucket.s3.eu-west-1.amazonaws.com", ("s3", "eu-west-1")),
    ("s3.eu-west-1.amazonaws.com", ("s3", "eu-west-1")),
    ("bucket.s3.dualstack.ap-southeast-2.amazonaws.com", ("s3", "ap-southeast-2")),
    ("s3.dualstack.us-west-2.amazonaws.com", ("s3", "us-west-2")),
    ("reports-123456789012.s3-accesspoint.eu-central-1.amazonaws.com", ("s3", "eu-central-1")),
    ("reports-123456789012.s3-accesspoint.dualstack.eu-central-1.amazonaws.com", ("s3", "eu-central-1")),
    ("olap-123456789012.s3-object-lambda.us-east-2.amazonaws.com", ("s3-object-lambda", "us-east-2")),
    ("ap-123456789012.op-0123456789abcdef0.s3-outposts.us-west-2.amazonaws.com", ("s3-outposts", "us-west-2")),
    ("bucket.s3-eu-west-1.amazonaws.com", ("s3", "eu-west-1")),
    ("s3.amazonaws.com", ("s3", "us-east-1")),
    ("my.bucket.s3.amazonaws.com", ("s3", "us-east-1")),
    ("s3.us-gov-west-1.amazonaws.com", ("s3", "us-gov-west-1")),
    ("bucket.s3-fips.dualstack.us-east-2.amazonaws.com", ("s3", "us-east-2")),
    ("bucket.s3.cn-north-1.amazonaws.com.cn", ("s3", "cn-north-1")),
    ("abc.execute-api.eu-west-1.amazonaws.com", None),
    ("s3bucket.example.com", None),
]


@pytest.mark.parametrize(("host", "scope"), HOSTS, ids=[h for h, _ in HOSTS])
def test_s3_host_names_give_service_and_region(host, scope) -> None:
    assert s3_scope(host) == scope
    if scope is not None:
        route = parse_config({"routes": [{"upstream": f"https://{host}"}]}).routes[0]
        assert (route.service, route.resolved_region) == scope
        assert route.rules.s3_paths and route.payload_mode == "unsigned"  # S3 over https: unsigned by default


def test_payload_defaults_and_refusals() -> None:
    http = parse_config({"routes": [{"upstream": "http://127.0.0.1:9", "service": "s3", "region": "eu-west-1"}]})
    assert http.routes[0].payload_mode == "signed"  # plain http: signed unless set
    api = parse_config({"routes": [{"upstream": "https://abc.execute-api.eu-west-1.amazonaws.com"}]})
    assert api.routes[0].payload_mode == "signed" and not api.routes[0].rules.s3_paths
    with pytest.raises(Exception, match="payload: streaming is not accepted by service 'execute-api'"):
        parse_config(
            {"routes": [{"upstream": "https://abc.execute-api.eu-west-1.amazonaws.com", "payload": "streaming"}]}
        )


# ---------------------------------------------------------------- payload modes


@pytest.mark.parametrize("mode", ["unsigned", "streaming"])
@pytest.mark.parametrize("size", [0, 1, 65536, 65537, 3 * 1024 * 1024 + 5])
async def test_streamed_payloads_verify(mode, size, s3_upstream, start_proxy) -> None:
    proxy = await start_proxy(s3_route(s3_upstream.url, payload=mode))
    body = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
    body = body[:size]
    async with aiohttp.ClientSession() as client, client.put(proxy.url + "/b/big", data=body) as r:
        assert r.status == 200, await r.text()
    got = s3_upstream.received[-1]
    assert got.signature_ok, got.signature_error
    assert got.body == body
    expected = "UNSIGNED-PAYLOAD" if mode == "unsigned" else "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
    if size == 0:
        expected = hashlib.sha256(b"").hexdigest()  # no body: nothing to stream, the empty hash is signed
    assert got.header_values("x-amz-content-sha256") == [expected]
    if mode == "streaming" and size:
        assert sum(got.chunk_sizes) == size and got.chunk_sizes[-1] == 0 and len(got.chunk_sizes) > size // 65536


async def test_streamed_payloads_are_not_bounded_by_default_max_body(s3_upstream, start_proxy) -> None:
    proxy = await start_proxy({**s3_route(s3_upstream.url, payload="unsigned")})
    config_limit = proxy.config.max_body
    body = b"m" * (config_limit + 1)
    async with aiohttp.ClientSession() as client, client.put(proxy.url + "/b/k", data=body) as r:
        assert r.status == 200
    assert s3_upstream.received[-1].body == body
    limited = await start_proxy({**s3_route(s3_upstream.url, payload="unsigned"), "max_body": "1KiB"})
    async with aiohttp.ClientSession() as client, client.put(limited.url + "/b/k", data=b"x" * 2048) as r:
        assert r.status == 413
    assert len(s3_upstream.received) == 1


async def test_unsigned_chunked_upload_goes_upstream_chunked(s3_upstream, start_proxy) -> None:
    proxy = await start_proxy(s3_route(s3_upstream.url, payload="unsigned"))
    response = await raw_request(
        proxy.url,
        b"PUT /b/k HTTP/1.1\r\n" + CHUNKED + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    assert response.status == 200
    got = s3_upstream.received[-1]
    assert got.signature_ok and got.body == b"abcde" and got.header_values("transfer-encoding") == ["chunked"]


async def test_streaming_needs_a_length(s3_upstream, start_proxy) -> None:
    proxy = await start_proxy(s3_route(s3_upstream.url, payload="streaming"))
    response = await raw_request(
        proxy.url,
        b"PUT /b/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    assert response.status == 411 and s3_upstream.received == []


def client_aws_chunked(data: bytes, size: int, trailer: bool) -> bytes:
    """An SDK's aws-chunked body: signed chunks (signatures the proxy cannot keep), or unsigned with a trailer."""
    out = b""
    signature = b"" if trailer else b";chunk-signature=" + b"0" * 64
    for at in range(0, len(data), size):
        piece = data[at : at + size]
        out += b"%x%s\r\n%s\r\n" % (len(piece), signature, piece)
    return out + b"0" + signature + b"\r\n" + (b"x-amz-checksum-crc32:AAAAAA==\r\n" if trailer else b"") + b"\r\n"


@pytest.mark.parametrize("trailer", [False, True], ids=["signed-chunks", "unsigned-with-trailer"])
@pytest.mark.parametrize("mode", ["streaming", "unsigned"])
async def test_client_aws_chunked_is_re_signed_not_wrapped_twice(mode, trailer, s3_upstream, start_proxy) -> None:
    proxy = await start_proxy(s3_route(s3_upstream.url, payload=mode))
    data = bytes(range(256)) * 7000  # over 1 MiB: streamed, not gathered
    encoded = client_aws_chunked(data, 65536, trailer)
    headers = {
        "Content-Encoding": "aws-chunked",
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
        if trailer
        else "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
        "x-amz-decoded-content-length": str(len(data)),
    }
    if trailer:
        headers["x-amz-trailer"] = "x-amz-checksum-crc32"
    async with aiohttp.ClientSession() as client, client.put(proxy.url + "/b/k", data=encoded, headers=headers) as r:
        assert r.status == 200, await r.text()
    got = s3_upstream.received[-1]
    assert got.signature_ok, got.signature_error
    assert got.body == data and got.header_values("x-amz-trailer") == []  # the trailer is not forwarded
    if mode == "unsigned":
        assert got.header_values("content-encoding") == [] and got.header_values("content-length") == [str(len(data))]
    else:
        assert got.header_values("content-encoding") == ["aws-chunked"]


async def test_an_unsigned_upload_is_read_no_faster_than_the_upstream_takes_it(start_proxy) -> None:
    """Flat memory: with an upstream that reads nothing, the client can push only a few buffers' worth."""
    accepted: list[socket.socket] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("socket"))
        await asyncio.Event().wait()  # never reads: the proxy's writes to it block

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # The client gives up after 3 s without progress; the proxy's 504 for the stalled upstream comes later.
    proxy = await start_proxy(s3_route(f"http://127.0.0.1:{port}", payload="unsigned", first_byte_timeout="6s"))
    total = 512 * 1024 * 1024
    sent = [0]

    def upload() -> None:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(
                f"PUT /b/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {total}\r\n\r\n".encode()
            )
            sock.settimeout(3)  # a send that waits this long: the proxy stopped reading
            block = b"z" * (1 << 20)
            try:
                while sent[0] < total:
                    sent[0] += sock.send(block)
            except TimeoutError:
                pass

    thread = threading.Thread(target=upload)
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, thread.join)
    server.close()
    # Kernel buffers on both sides plus the proxy's high-water mark: tens of MiB at most, never the body.
    assert sent[0] < 64 * 1024 * 1024, sent[0]


async def test_an_early_answer_stops_a_streamed_upload_and_is_relayed(scripted, start_proxy) -> None:
    """S3 refuses (403, 400) before the body when asked to (Expect: 100-continue); the refusal is relayed."""
    refusal = b"<Error><Code>AccessDenied</Code></Error>"

    async def refuse_at_once(seen, reader, writer) -> bool:
        assert seen.header("expect") == "100-continue"  # so it can refuse before the body comes
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                     % (len(refusal), refusal))  # fmt: skip
        await writer.drain()
        return False

    upstream = await scripted(refuse_at_once)
    proxy = await start_proxy(s3_route(upstream.url, payload="unsigned"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"PUT /b/k HTTP/1.1\r\n{HEAD}Content-Length: {64 << 20}\r\nExpect: 100-continue\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    body = await asyncio.wait_for(reader.readexactly(len(refusal)), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 403 ") and body == refusal  # no 100 Continue: the body was never asked for
    assert upstream.seen[0].header("x-amz-content-sha256") == "UNSIGNED-PAYLOAD"

    # A client that sends its body at once gets the refusal too: the proxy reads and drops the rest.
    total, answer = 32 << 20, []

    def upload() -> None:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.settimeout(20)
            sock.sendall(f"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n".encode())
            sock.sendall(b"z" * total)
            while chunk := sock.recv(65536):
                answer.append(chunk)

    await asyncio.get_running_loop().run_in_executor(None, upload)
    assert b"".join(answer).startswith(b"HTTP/1.1 403 ") and b"".join(answer).endswith(refusal)


def test_quick_start_reads_s3_from_the_host() -> None:
    from proxy.cli import parser, quick_config

    args = parser().parse_args(["run", "--upstream", "https://my-bucket.s3.eu-west-1.amazonaws.com"])
    route = parse_config(quick_config(args)).routes[0]
    assert (route.service, route.resolved_region, route.payload_mode) == ("s3", "eu-west-1", "unsigned")
    args = parser().parse_args(["run", "--upstream", "https://abc.execute-api.eu-west-1.amazonaws.com/prod"])
    assert parse_config(quick_config(args)).routes[0].service == "execute-api"


async def test_a_chunked_upload_over_an_explicit_max_body_is_413(s3_upstream, start_proxy) -> None:
    proxy = await start_proxy({**s3_route(s3_upstream.url, payload="unsigned"), "max_body": "1KiB"})
    response = await raw_request(
        proxy.url, b"PUT /b/k HTTP/1.1\r\n" + CHUNKED + b"400\r\n" + b"z" * 1024 + b"\r\n1\r\nz\r\n0\r\n\r\n"
    )
    assert response.status == 413


async def test_s3_over_https_streams_unsigned_by_default(tmp_path, start_proxy) -> None:
    """The default S3 mode over TLS: UNSIGNED-PAYLOAD, the body streamed through the TLS transport."""
    pki = Pki.make(tmp_path)
    async with SigV4Upstream({TEST_KEY_ID: TEST_SECRET}, region=TEST_REGION, service="s3",
                             tls=pki.server()) as upstream:  # fmt: skip
        proxy = await start_proxy(s3_route(upstream.url, ca_bundle=str(pki.ca_file)))
        assert proxy.config.routes[0].payload_mode == "unsigned"
        body = bytes(range(256)) * (12 * 4096 + 3)  # 12 MiB and a bit: streamed, over the default max_body
        async with aiohttp.ClientSession() as client, client.put(proxy.url + "/b/k//x", data=body) as answer:
            assert answer.status == 200, await answer.text()
        got = upstream.received[-1]
        assert got.signature_ok, got.signature_error
        assert got.body == body and got.header_values("x-amz-content-sha256") == ["UNSIGNED-PAYLOAD"]


async def test_an_upstream_that_stops_reading_the_body_is_a_504(start_proxy) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()  # reads nothing, answers nothing

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await start_proxy(s3_route(f"http://127.0.0.1:{port}", payload="unsigned", first_byte_timeout="1s"))
    total, answer = 48 << 20, []

    def upload() -> None:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.settimeout(20)
            sock.sendall(f"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n".encode())
            sock.sendall(b"z" * total)  # the proxy reads the rest and drops it once it has answered
            while chunk := sock.recv(65536):
                answer.append(chunk)

    try:
        await asyncio.get_running_loop().run_in_executor(None, upload)
    finally:
        server.close()
    assert b"".join(answer).startswith(b"HTTP/1.1 504 ")
    assert b"read none of the request body for 1s" in b"".join(answer)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("payload", [None, "streaming"])
async def test_s3_through_the_forward_proxy_keeps_keys_and_streams(payload, s3_upstream, start_proxy, tmp_path) -> None:
    """curl with HTTPS_PROXY and the bucket's real URL: S3 rules and payload modes hold for forward rules too."""
    bucket = "my-bucket.s3.eu-west-1.amazonaws.com"
    config = static_route(s3_upstream.url)
    del config["routes"]
    rule = {"host": "*.s3.eu-west-1.amazonaws.com", "credentials": "test", "connect_to": s3_upstream.url}
    config["forward"] = {"hosts": [{**rule, **({"payload": payload} if payload else {})}], "ca": str(tmp_path / "ca")}
    proxy = await start_proxy(config)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(bytes(range(256)) * (3 * 4096 + 1))  # 3 MiB and a bit: streamed
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()} | {"HTTPS_PROXY": proxy.url}
    assert proxy.ca is not None
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", "--cacert", str(proxy.ca.cert_path), "--path-as-is",
        "-T", str(upload), f"https://{bucket}/logs//2026/../a+b%20c.bin", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode == 0, err
    got = s3_upstream.received[-1]
    assert got.signature_ok, got.signature_error
    assert got.raw_path == "/logs//2026/../a%2Bb%20c.bin" and got.header_values("host") == [bucket]
    signed_as = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD" if payload else "UNSIGNED-PAYLOAD"  # default over https: unsigned
    assert got.header_values("x-amz-content-sha256") == [signed_as] and got.body == upload.read_bytes()
