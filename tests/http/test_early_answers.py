"""Answers sent before the request body was read reach the client (lingering close, proxy/http/linger.py).

Each client writes a 20 MiB body as fast as it can to a proxy that refuses it at
once (``max_body`` 1 MiB, a missing inbound token). Closing with the body unread
makes the kernel reset the connection, and the reset often overtakes the answer;
every try must read the answer. Nothing may go upstream.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from pathlib import Path

import pytest

from proxy.http import linger
from proxy.http.front import Front
from proxy.server import ProxyServer
from tests.conftest import StartProxy, static_route
from tests.support.faults import start_proxy_process
from tests.support.rawhttp import parse_response
from tests.support.sigv4_upstream import SigV4Upstream

BODY_SIZE = 20 << 20
TRIES = 50
DEADLINE = 60.0


async def refusing_proxy(start_proxy: StartProxy, upstream: SigV4Upstream, **config: object) -> ProxyServer:
    return await start_proxy({**static_route(upstream.url), "max_body": "1MiB", **config})


NODE_FETCH = """
const [url, tries, size] = process.argv.slice(1).map((v, i) => i ? Number(v) : v);
const body = Buffer.alloc(size, 120);
const seen = {};
for (let i = 0; i < tries; i++) {
  let outcome;
  try {
    const response = await fetch(url, {method: "POST", body});
    outcome = `${response.status} ${(await response.json()).reason}`;
  } catch (error) {
    outcome = String(error.cause?.code ?? error.message);
  }
  seen[outcome] = (seen[outcome] ?? 0) + 1;
}
console.log(JSON.stringify(seen));
"""


# Node's fetch turns a 407 into a network error (the Fetch standard does), so it is tried with curl.
EARLY_ANSWERS = {
    "413-too-large": ({}, "413 body_too_large"),
    "407-no-inbound-token": ({"inbound_token": "letmein-0123456789"}, "407 proxy_authentication_required"),
}


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (.ci/run installs it)")
async def test_node_fetch_with_a_20_mib_body_reads_the_413_every_time(
    sigv4_upstream: SigV4Upstream, start_proxy: StartProxy
) -> None:
    """Node's fetch (undici) saw ECONNRESET in about half of the tries before lingering close."""
    proxy = await refusing_proxy(start_proxy, sigv4_upstream)
    assert await node_outcomes(proxy.url + "/upload") == {"413 body_too_large": TRIES}
    assert sigv4_upstream.received == []


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (.ci/run installs it)")
async def test_the_same_against_the_proxy_as_a_process(sigv4_upstream: SigV4Upstream, tmp_path: Path) -> None:
    """``signing-proxy run`` as users start it: on uvloop when installed, whose transports differ from asyncio's."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = await start_proxy_process({**static_route(sigv4_upstream.url), "max_body": "1MiB"}, tmp_path, port)
    try:
        assert await node_outcomes(proxy.url + "/upload") == {"413 body_too_large": TRIES}
    finally:
        await proxy.stop()
    assert sigv4_upstream.received == []


async def node_outcomes(url: str) -> dict[str, int]:
    """How many of ``TRIES`` fetches with a 20 MiB body ended how (status and reason, or the error's code)."""
    argv = ["node", "--input-type=module", "-e", NODE_FETCH, url, str(TRIES), str(BODY_SIZE)]
    node = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(node.communicate(), DEADLINE)
    return json.loads(out)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)")
@pytest.mark.parametrize("case", EARLY_ANSWERS)
async def test_curl_without_expect_reads_the_answer_every_time(
    sigv4_upstream: SigV4Upstream, start_proxy: StartProxy, tmp_path: Path, case: str
) -> None:
    """curl sends the body at once when told not to wait for 100 Continue (``-H Expect:``)."""
    config, answer = EARLY_ANSWERS[case]
    proxy = await refusing_proxy(start_proxy, sigv4_upstream, **config)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(BODY_SIZE))
    transfers = [arg for _ in range(TRIES) for arg in ("-o", "/dev/null", proxy.url + "/upload")]
    argv = ["curl", "-sS", "--noproxy", "*", "-H", "Expect:", "--data-binary", f"@{payload}", "-w", "%{http_code}\n"]
    curl = await asyncio.create_subprocess_exec(
        *argv, *transfers, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(curl.communicate(), DEADLINE)
    assert out.decode().split() == [answer.split()[0]] * TRIES, err.decode()
    assert sigv4_upstream.received == []


async def wait_until_closed(front: Front, timeout: float = DEADLINE) -> None:
    """Until the proxy holds no lingering connection (a state of the proxy, polled)."""
    async with asyncio.timeout(timeout):
        while front.lingering:
            await asyncio.sleep(0.05)


async def test_lingering_is_bounded_in_bytes(sigv4_upstream: SigV4Upstream, start_proxy: StartProxy) -> None:
    """A client that never stops writing is cut off once ``LINGER_BYTES`` were discarded."""
    proxy = await refusing_proxy(start_proxy, sigv4_upstream)

    def write_forever() -> int:
        written = 0
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) as client:
            client.sendall(b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n")
            block = bytes(1 << 20)
            try:
                while True:
                    written += client.send(block)
            except OSError:
                return written

    written = await asyncio.to_thread(write_forever)
    # What the proxy discarded, plus what the two kernel socket buffers held when it closed.
    assert linger.LINGER_BYTES <= written < linger.LINGER_BYTES + (32 << 20)
    await wait_until_closed(proxy.front)


async def test_lingering_is_bounded_in_time(
    sigv4_upstream: SigV4Upstream, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that goes quiet without closing, and one that keeps dribbling, are both closed in the end."""
    monkeypatch.setattr(linger, "LINGER_IDLE", 1.0)
    monkeypatch.setattr(linger, "LINGER_TIME", 2.0)
    proxy = await refusing_proxy(start_proxy, sigv4_upstream)
    head = b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"

    quiet_reader, quiet = await asyncio.open_connection("127.0.0.1", proxy.port)
    quiet.write(head + b"x" * 1000)
    answer = await asyncio.wait_for(quiet_reader.read(), DEADLINE)  # the answer, then the proxy's FIN
    assert parse_response(answer).status == 413
    await wait_until_closed(proxy.front)
    quiet.close()

    _, dribbler = await asyncio.open_connection("127.0.0.1", proxy.port)
    dribbler.write(head)

    async def dribble() -> None:
        while True:  # a byte every 0.1 s keeps it under LINGER_IDLE: only LINGER_TIME ends it
            dribbler.write(b"x")
            await dribbler.drain()
            await asyncio.sleep(0.1)

    with pytest.raises(ConnectionError):  # the proxy closed; a timeout here would fail the test
        await asyncio.wait_for(dribble(), DEADLINE)
    assert not proxy.front.lingering
    dribbler.close()
