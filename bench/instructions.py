"""Instructions per small signed GET, counted by callgrind: a figure a busy machine cannot move.

    apt-get install -y valgrind wrk nginx-light openssl
    python bench/instructions.py                              # this checkout
    python bench/instructions.py --baseline /tmp/base-775     # and another checkout, same requests

Rates measured on a shared 2-core machine move by 10-25 % between runs of identical code; user-space
instructions counted by ``valgrind --tool=callgrind`` repeat to well under 1 % whatever else runs.
One proxy (``workers: 1``) runs under callgrind in front of nginx; a client opens ``--connections``
keep-alive connections and sends ``--warmup`` small GETs on them (caches, credentials, the signing
key), callgrind's counters are zeroed, then ``--requests`` GETs on the same connections are counted
and dumped. The figure is the
proxy process's instructions over those requests, the event loop and every library included; the
kernel's work (the socket system calls) is not in it, so it complements ``run.py``'s CPU per request
rather than replacing it. ``--forward`` sends the same GETs through ``CONNECT`` and the proxy's TLS
termination (forward mode, keep-alive inside the tunnel; the tunnels and handshakes are made before
the counters are zeroed), to a forward rule whose ``connect_to`` dials the same nginx: the difference
to the plain count is what terminating the client's TLS costs, a figure the ``forward`` shape of
``run.py`` cannot give steadily (its one Python client pays TLS too, and its ratio moves by 0.1 between
runs). ``--keep DIR`` keeps the callgrind dumps. Where the instructions go
within the interpreter is not told apart (callgrind sees one recursive cycle of Python calls):
``bench/flame.py`` shows that by Python function.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    FORWARD_HOST,
    ROOT,
    Checkout,
    first_ok,
    forward_config,
    free_port,
    progress,
    proxy_config,
    require_tools,
    start_upstream,
)
from load import read_answer, tunnel_through


async def _gets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, count: int) -> int:
    """``count`` keep-alive GETs one after another on one connection; the number answered 200."""
    ok = 0
    for _ in range(count):
        writer.write(request)
        ok += (await read_answer(reader)).startswith(b"HTTP/1.1 200")
    return ok


def drive(port: int, path: str, args: argparse.Namespace, pid: int, context: ssl.SSLContext | None) -> int:
    """Warm-up GETs, callgrind's counters zeroed, the counted GETs, the counters dumped: on the same
    keep-alive connections (tunnels when ``context`` is given), opened before. Returns the GETs counted."""

    async def run() -> int:
        connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        host = FORWARD_HOST if context else f"127.0.0.1:{port}"
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        try:
            for _ in range(args.connections):
                connections.append(await asyncio.open_connection("127.0.0.1", port))
                if context is not None:
                    await tunnel_through(*connections[-1], FORWARD_HOST, context)
            for phase, total in (("warm-up", args.warmup), ("counted", args.requests)):
                if phase == "counted":
                    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
                each = total // len(connections)
                answered = sum(await asyncio.gather(*(_gets(r, w, request, each) for r, w in connections)))
                if answered != each * len(connections):
                    raise RuntimeError(f"{phase}: {answered} of {each * len(connections)} requests answered 200")
            subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
            return each * len(connections)
        finally:
            for _, writer in connections:
                writer.close()

    return asyncio.run(run())


def count(checkout: Checkout, upstream_url: str, cert: Path, workdir: Path, args: argparse.Namespace) -> float:
    """Instructions per request of ``checkout``'s proxy."""
    port = free_port()
    config = workdir / f"{checkout.label}.yaml"
    ca_dir = workdir / f"{checkout.label}-ca"
    extra = forward_config(ca_dir, upstream_url) if args.forward else ""
    config.write_text(proxy_config(port, upstream_url, "warning", 1, extra, route=args.route_options))
    dump = workdir / f"{checkout.label}.callgrind"
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", "--dump-instr=no"]
    command += [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    process = subprocess.Popen(
        command,
        cwd=checkout.root,
        env=checkout.env(cert),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        asyncio.run(first_ok(port, "/get", time.monotonic() + 180))
        context = ssl.create_default_context(cafile=str(ca_dir / "ca.pem")) if args.forward else None
        requests = drive(port, "/get", args, process.pid, context)
    finally:
        process.terminate()
        process.wait(60)
    # callgrind_control --dump writes FILE.1 (the counted requests); the exit writes FILE itself.
    counted = dump.with_name(dump.name + ".1")
    totals = re.search(r"^(?:summary|totals): (\d+)", counted.read_text(), re.MULTILINE)
    if totals is None:
        raise RuntimeError(f"no totals in {counted}")
    return int(totals.group(1)) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="GETs counted (default 2000)")
    parser.add_argument("--warmup", type=int, default=400, help="GETs before counting (default 400)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections (default 8)")
    parser.add_argument("--tls", action="store_true", help="the upstream is nginx over TLS (default: plain HTTP)")
    parser.add_argument(
        "--forward", action="store_true", help="the GETs go through CONNECT and the proxy's TLS (forward mode)"
    )
    parser.add_argument("--baseline", type=Path, help="another checkout to count the same way")
    parser.add_argument(
        "--route-options", default="", help="YAML added to the route's flow mapping, e.g. ', auth: none'"
    )
    parser.add_argument(
        "--keep", type=Path, help="write the callgrind dumps here (kept) instead of a temporary directory"
    )
    args = parser.parse_args(argv)
    if min(args.requests, args.warmup) < args.connections:
        parser.error("--requests and --warmup must be at least --connections (each connection sends its share)")
    require_tools()
    if not shutil.which("valgrind"):
        sys.exit("bench/instructions.py needs valgrind: apt-get install -y valgrind")
    checkouts = [Checkout("proxy", ROOT)]
    if args.baseline:
        checkouts.append(Checkout("baseline", args.baseline.resolve()))
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as temporary:
        workdir = args.keep or Path(temporary)
        upstream = start_upstream(workdir)
        try:
            figures = {}
            for checkout in checkouts:
                mode = " through CONNECT (forward mode)" if args.forward else ""
                progress(f"{checkout.label} ({checkout.version()}): {args.requests} GETs{mode} under callgrind")
                url = upstream.tls_url if args.tls else upstream.url
                figures[checkout.label] = count(checkout, url, upstream.cert, workdir, args)
        finally:
            upstream.stop()
    print("\n| checkout | instructions per small GET | ratio to proxy |\n| --- | ---: | ---: |")
    for label, figure in figures.items():
        print(f"| {label} | {figure:,.0f} | {figure / figures['proxy']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
