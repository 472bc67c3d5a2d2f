"""Soak test: N minutes of mixed traffic through the proxy, with per-minute memory, fds, requests, errors.

Three processes, all on 127.0.0.1:

* an upstream (this file, ``_upstream``): moto's STS, patched so every assumed
  role lives ``--role-lifetime`` seconds (80 by default, so the proxy refreshes
  it about once a minute), and an API that verifies every SigV4 signature with
  awscrt, looking the assumed role's secret up in moto;
* the proxy (``python -m proxy run --config``, one worker) with an
  ``assume_role`` route to that API;
* this driver: small GETs, uploads, streamed downloads and WebSocket echo
  sessions at ``--rate`` operations a second over ``--concurrency`` workers.

At every minute the driver pauses traffic, lets the proxy settle, and records
the proxy's resident memory, open file descriptors, operations and errors in
that minute, and the credential refreshes Prometheus counted. At the end it
prints the table and checks that memory and descriptors stayed flat and that
nothing failed (exit status 1 otherwise).

    python bench/soak.py                 # 10 minutes
    python bench/soak.py --minutes 1     # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ENV, ROOT, free_port, memory_kib, open_fds, stop_process

ACCOUNT = "123456789012"  # moto's default account
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/soak"
REGION = "eu-west-1"
KINDS = ("get", "upload", "stream", "websocket")
MIX = {"get": 0.6, "upload": 0.15, "stream": 0.15, "websocket": 0.10}
STREAM_CHUNKS, STREAM_CHUNK = 20, 16 * 1024
WS_MESSAGES = 20
SETTLE = 1.0  # seconds of quiet before each measurement
ENV = {key: value for key, value in ENV.items() if not key.startswith("AWS_")}
ENV |= {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


# ---------------------------------------------------------------- the upstream process


def upstream_main(sts_port: int, role_lifetime: int) -> None:
    """moto STS (short-lived roles) and an awscrt-verifying API with /small, /upload, /stream, /ws."""
    import logging

    from aiohttp import WSMsgType, web
    from moto.server import ThreadedMotoServer
    from moto.sts.models import STSBackend, sts_backends

    sys.path.insert(0, str(ROOT))
    from tests.support.sigv4_upstream import Received, SigV4Upstream

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    assume_role = STSBackend.assume_role

    def short_lived(self: Any, **kwargs: Any) -> Any:
        kwargs["duration"] = role_lifetime
        return assume_role(self, **kwargs)

    STSBackend.assume_role = short_lived  # type: ignore[method-assign]
    sts = ThreadedMotoServer(ip_address="127.0.0.1", port=sts_port, verbose=False)
    sts.start()

    def secret(access_key_id: str) -> str | None:
        role = sts_backends[ACCOUNT]["aws"].get_assumed_role_from_access_key(access_key_id)
        if role is None or role.expiration.timestamp() < time.time():
            return None  # unknown or expired: refused like AWS would
        return str(role.secret_access_key)

    async def respond(request: web.Request, received: Received) -> web.StreamResponse:
        api.received.clear()  # bounded memory: nothing is kept between requests
        if not received.signature_ok:
            return web.json_response({"message": received.signature_error}, status=403)
        if request.path == "/small":
            return web.json_response({"ok": True, "key": received.access_key_id})
        if request.path == "/upload":
            return web.Response(text=hashlib.sha256(received.body).hexdigest())
        if request.path == "/stream":
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = STREAM_CHUNKS * STREAM_CHUNK
            await response.prepare(request)
            for n in range(STREAM_CHUNKS):
                await response.write(bytes([n]) * STREAM_CHUNK)
                await asyncio.sleep(0.005)
            await response.write_eof()
            return response
        if request.path == "/ws":
            socket_ = web.WebSocketResponse()
            await socket_.prepare(request)
            async for message in socket_:
                if message.type == WSMsgType.TEXT:
                    await socket_.send_str(message.data)
                elif message.type == WSMsgType.BINARY:
                    await socket_.send_bytes(message.data)
            return socket_
        return web.json_response({"message": "no such path"}, status=404)

    api = SigV4Upstream(secret, region=REGION)
    api.responder = respond

    async def serve() -> None:
        await api.start()
        api_port = int(api.url.rsplit(":", 1)[1])
        # SigV4Upstream binds a free port; announce it (the driver reads this line)
        print(f"upstream ready {api_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await api.close()

    try:
        asyncio.run(serve())
    finally:
        sts.stop()


# ---------------------------------------------------------------- processes


@dataclass
class Child:
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> int:
        stop_process(self.process, grace=15.0)
        return int(self.process.returncode)


def spawn(args: list[str], log: Path) -> Child:
    with log.open("wb") as sink:
        process = subprocess.Popen(
            args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=sink, start_new_session=True
        )  # fmt: skip
    return Child(process, log)


def wait_line(child: Child, pattern: str, timeout: float = 30.0) -> re.Match[str]:
    """The first stdout line of ``child`` matching ``pattern`` (blocking, bounded)."""
    assert child.process.stdout is not None
    deadline = time.monotonic() + timeout
    os.set_blocking(child.process.stdout.fileno(), False)
    buffer = ""
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.process.args!r} exited: {child.log.read_text()[-3000:]}")
        chunk = child.process.stdout.read()
        if chunk:
            buffer += chunk.decode()
            if match := re.search(pattern, buffer):
                return match
        time.sleep(0.05)
    raise RuntimeError(f"no {pattern!r} from {child.process.args!r} within {timeout}s: {buffer}")


def proxy_config(path: Path, listen: int, admin: int, upstream_port: int, sts_port: int) -> None:
    config = {
        "listen": f"127.0.0.1:{listen}",
        "admin_listen": f"127.0.0.1:{admin}",
        "log_level": "warning",
        "credentials": {
            "base": {"type": "static", "access_key_id": "AKIDSOAKBASE00000001", "secret_access_key": "soak/base"},
            "role": {
                "type": "assume_role",
                "role_arn": ROLE_ARN,
                "source": "base",
                "region": "us-east-1",
                "endpoint_url": f"http://127.0.0.1:{sts_port}",
            },
        },
        "routes": [
            {"upstream": f"http://127.0.0.1:{upstream_port}", "region": REGION, "credentials": "role", "timeout": "10s"}
        ],
    }
    config["workers"] = 1  # one process: /proc/<pid> is the proxy
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML


# ---------------------------------------------------------------- measuring


async def scrape(session: Any, admin_url: str) -> dict[str, float]:
    """The counters the soak reports, from the proxy's /metrics."""
    async with session.get(admin_url + "/metrics") as response:
        text = await response.text()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("signing_proxy_credential_refreshes_total{") and 'source="role"' in line:
            result = re.search(r'result="(\w+)"', line)
            if result:
                found[f"refresh_{result.group(1)}"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("signing_proxy_open_connections"):
            found["open_connections"] = float(line.rsplit(" ", 1)[1])
    return found


@dataclass
class Minute:
    index: int
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    rss_kib: int = 0
    fds: int = 0
    refreshes: float = 0.0
    refresh_failures: float = 0.0


# ---------------------------------------------------------------- traffic


class Driver:
    def __init__(self, proxy_url: str, seed: int) -> None:
        self.proxy_url = proxy_url
        self.rng = random.Random(seed)
        self.current = Minute(1)
        self.samples: list[str] = []

    async def one(self, session: Any, kind: str) -> None:
        """One operation; any unexpected answer or exception is an error of that kind."""
        import aiohttp

        try:
            if kind == "get":
                async with session.get(self.proxy_url + f"/small?n={self.rng.randrange(1000)}") as r:
                    body = await r.json(content_type=None)
                    ok = r.status == 200 and body.get("ok") is True
            elif kind == "upload":
                payload = self.rng.randbytes(self.rng.choice([1024, 65536, 512 * 1024]))
                async with session.post(self.proxy_url + "/upload", data=payload) as r:
                    ok = r.status == 200 and await r.text() == hashlib.sha256(payload).hexdigest()
            elif kind == "stream":
                async with session.get(self.proxy_url + "/stream") as r:
                    received = 0
                    async for chunk in r.content.iter_any():
                        received += len(chunk)
                    ok = r.status == 200 and received == STREAM_CHUNKS * STREAM_CHUNK
            else:
                async with session.ws_connect(self.proxy_url.replace("http", "ws", 1) + "/ws") as ws:
                    ok = True
                    for n in range(WS_MESSAGES):
                        text = f"message {n} {self.rng.random()}"
                        await ws.send_str(text)
                        reply = await ws.receive(timeout=10)
                        ok = ok and reply.type == aiohttp.WSMsgType.TEXT and reply.data == text
                    await ws.close()
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            ok = False
            if len(self.samples) < 20:
                self.samples.append(f"{kind}: {type(error).__name__}: {error}")
        self.current.ops[kind] += 1
        if not ok:
            self.current.errors[kind] += 1

    async def run_minute(self, session: Any, seconds: float, rate: float, concurrency: int, kinds: list[str]) -> None:
        """Operations at ``rate`` a second for ``seconds``, at most ``concurrency`` at once; returns drained."""
        gate = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task[None]] = set()
        weights = [MIX[k] for k in kinds]
        started = time.monotonic()
        n = 0
        while (elapsed := time.monotonic() - started) < seconds:
            due = started + n / rate
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            await gate.acquire()
            kind = self.rng.choices(kinds, weights)[0]
            task = asyncio.create_task(self.one(session, kind))
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), gate.release()))
            n += 1
        del elapsed
        if tasks:
            await asyncio.wait(tasks, timeout=60)


async def drive(args: argparse.Namespace, proxy: Child, proxy_url: str, admin_url: str) -> list[Minute]:
    import aiohttp

    kinds = list(KINDS)
    driver = Driver(proxy_url, args.seed)
    minutes: list[Minute] = []
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        for index in range(1, args.minutes + 1):
            driver.current = Minute(index)
            await driver.run_minute(session, 60.0 - SETTLE, args.rate, args.concurrency, kinds)
            await asyncio.sleep(SETTLE)  # traffic drained: measure a quiet proxy
            metrics = await scrape(session, admin_url)
            minute = driver.current
            minute.rss_kib, minute.fds = memory_kib(proxy.process.pid)[0][0], open_fds(proxy.process.pid)
            minute.refreshes = metrics.get("refresh_success", 0.0)
            minute.refresh_failures = metrics.get("refresh_failure", 0.0)
            minutes.append(minute)
            print(row(minute, minutes), flush=True)
            if proxy.process.poll() is not None:
                print("the proxy exited", flush=True)
                break
    if driver.samples:
        print("error samples:\n  " + "\n  ".join(driver.samples))
    return minutes


HEADER = (
    f"{'min':>3} {'rss MiB':>8} {'fds':>5} {'ops':>6} "
    + " ".join(f"{k:>9}" for k in KINDS)
    + f" {'errors':>6} {'refresh':>7} {'ref.err':>7}"
)


def row(minute: Minute, minutes: list[Minute]) -> str:
    previous = minutes[-2] if len(minutes) > 1 else None
    refreshed = minute.refreshes - (previous.refreshes if previous else 0)
    failed = minute.refresh_failures - (previous.refresh_failures if previous else 0)
    return (
        f"{minute.index:>3} {minute.rss_kib / 1024:>8.1f} {minute.fds:>5} "
        f"{sum(minute.ops.values()):>6} "
        + " ".join(f"{minute.ops[k]:>9}" for k in KINDS)
        + f" {sum(minute.errors.values()):>6} {refreshed:>7.0f} {failed:>7.0f}"
    )


def verdict(minutes: list[Minute], rss_slack_mib: float, fd_slack: int) -> list[str]:
    """What is wrong, if anything: errors, a proxy that grew, refreshes that did not happen."""
    problems = []
    errors = sum(sum(m.errors.values()) for m in minutes)
    if errors:
        problems.append(f"{errors} failed operations")
    if len(minutes) >= 2:
        # minute 1 includes warm-up (imports, pools, first credentials); flat means: no growth after it
        base = minutes[0]
        rss_growth = (max(m.rss_kib for m in minutes[1:]) - base.rss_kib) / 1024
        fd_growth = max(m.fds for m in minutes[1:]) - base.fds
        if rss_growth > rss_slack_mib:
            problems.append(f"resident memory grew by {rss_growth:.1f} MiB after minute 1 (allowed {rss_slack_mib})")
        if fd_growth > fd_slack:
            problems.append(f"open file descriptors grew by {fd_growth} after minute 1 (allowed {fd_slack})")
    refreshes = minutes[-1].refreshes if minutes else 0
    if len(minutes) >= 2 and refreshes < len(minutes) - 1:
        problems.append(f"only {refreshes:.0f} credential refreshes in {len(minutes)} minutes")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=10, help="how long to run (default 10)")
    parser.add_argument("--rate", type=float, default=100.0, help="operations started per second (default 100)")
    parser.add_argument("--concurrency", type=int, default=16, help="operations in flight at most (default 16)")
    parser.add_argument("--role-lifetime", type=int, default=80, help="seconds an assumed role lives (default 80)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-slack", type=float, default=16.0, help="MiB of growth after minute 1 allowed")
    parser.add_argument("--fd-slack", type=int, default=8, help="descriptors of growth after minute 1 allowed")
    parser.add_argument("--json", help="also write the per-minute figures to this file")
    sub = parser.add_subparsers(dest="role")
    child = sub.add_parser("_upstream", help=argparse.SUPPRESS)
    child.add_argument("--sts-port", type=int, required=True)
    child.add_argument("--lifetime", type=int, required=True)
    args = parser.parse_args(argv)
    if args.role == "_upstream":
        upstream_main(args.sts_port, args.lifetime)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="signing-proxy-soak-"))
    sts_port, listen, admin = free_port(), free_port(), free_port()
    upstream = spawn(
        [sys.executable, __file__, "_upstream", "--sts-port", str(sts_port), "--lifetime", str(args.role_lifetime)],
        workdir / "upstream.log",
    )  # fmt: skip
    proxy: Child | None = None
    try:
        upstream_port = int(wait_line(upstream, r"upstream ready (\d+)").group(1))
        proxy_config(workdir / "proxy.yaml", listen, admin, upstream_port, sts_port)
        proxy = spawn(
            [sys.executable, "-m", "proxy", "run", "--config", str(workdir / "proxy.yaml")], workdir / "proxy.log"
        )
        wait_line(proxy, r"listening on")
        print(
            f"soak: {args.minutes} min, {args.rate:g} ops/s, {args.concurrency} at once, roles live "
            f"{args.role_lifetime}s; proxy pid {proxy.process.pid}; logs in {workdir}",
            flush=True,
        )
        print(HEADER, flush=True)
        minutes = asyncio.run(drive(args, proxy, f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}"))
    finally:
        code = proxy.stop() if proxy is not None else None
        upstream.stop()
    if args.json:
        Path(args.json).write_text(json.dumps([m.__dict__ for m in minutes], default=dict, indent=1))
    problems = verdict(minutes, args.rss_slack, args.fd_slack)
    if code not in (0, None):
        problems.append(f"the proxy exited with status {code}")
    log = (workdir / "proxy.log").read_text(errors="replace")
    if "Traceback" in log:
        problems.append(f"the proxy logged a traceback (see {workdir / 'proxy.log'})")
    print("verdict: " + ("flat, no errors" if not problems else "; ".join(problems)), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
