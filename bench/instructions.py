"""Instructions per small signed GET, counted by callgrind: a figure a busy machine cannot move.

    apt-get install -y valgrind wrk nginx-light openssl
    python bench/instructions.py                              # this checkout
    python bench/instructions.py --baseline /tmp/base-775     # and another checkout, same requests

Rates measured on a shared 2-core machine move by 10-25 % between runs of identical code; user-space
instructions counted by ``valgrind --tool=callgrind`` repeat to well under 1 % whatever else runs.
One proxy (``workers: 1``) runs under callgrind in front of nginx; a keep-alive client sends
``--warmup`` small GETs (caches, credentials, the signing key), callgrind's counters are zeroed, then
``--requests`` GETs on ``--connections`` connections are counted and dumped. The figure is the
proxy process's instructions over those requests, the event loop and every library included; the
kernel's work (the socket system calls) is not in it, so it complements ``run.py``'s CPU per request
rather than replacing it. ``--keep DIR`` keeps the callgrind dumps. Where the instructions go
within the interpreter is not told apart (callgrind sees one recursive cycle of Python calls):
``bench/flame.py`` shows that by Python function.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, Checkout, first_ok, free_port, progress, proxy_config, require_tools, start_upstream


async def _client(port: int, path: str, count: int) -> int:
    """``count`` keep-alive GETs one after another; the number answered 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    ok = 0
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            ok += head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    return ok


def drive(port: int, path: str, requests: int, connections: int) -> None:
    per_connection = requests // connections

    async def all_clients() -> list[int]:
        return await asyncio.gather(*(_client(port, path, per_connection) for _ in range(connections)))

    answered = sum(asyncio.run(all_clients()))
    if answered != per_connection * connections:
        raise RuntimeError(f"{answered} of {per_connection * connections} requests answered 200")


def count(checkout: Checkout, upstream_url: str, cert: Path, workdir: Path, args: argparse.Namespace) -> float:
    """Instructions per request of ``checkout``'s proxy."""
    port = free_port()
    config = workdir / f"{checkout.label}.yaml"
    config.write_text(proxy_config(port, upstream_url, "warning", 1, route=args.route_options))
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
        drive(port, "/get", args.warmup, args.connections)
        subprocess.run(["callgrind_control", "--zero", str(process.pid)], check=True, capture_output=True)
        drive(port, "/get", args.requests, args.connections)
        subprocess.run(["callgrind_control", "--dump", str(process.pid)], check=True, capture_output=True)
    finally:
        process.terminate()
        process.wait(60)
    # callgrind_control --dump writes FILE.1 (the counted requests); the exit writes FILE itself.
    counted = dump.with_name(dump.name + ".1")
    totals = re.search(r"^(?:summary|totals): (\d+)", counted.read_text(), re.MULTILINE)
    if totals is None:
        raise RuntimeError(f"no totals in {counted}")
    return int(totals.group(1)) / args.requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="GETs counted (default 2000)")
    parser.add_argument("--warmup", type=int, default=400, help="GETs before counting (default 400)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections (default 8)")
    parser.add_argument("--tls", action="store_true", help="the upstream is nginx over TLS (default: plain HTTP)")
    parser.add_argument("--baseline", type=Path, help="another checkout to count the same way")
    parser.add_argument(
        "--route-options", default="", help="YAML added to the route's flow mapping, e.g. ', auth: none'"
    )
    parser.add_argument(
        "--keep", type=Path, help="write the callgrind dumps here (kept) instead of a temporary directory"
    )
    args = parser.parse_args(argv)
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
                progress(f"{checkout.label} ({checkout.version()}): {args.requests} GETs under callgrind")
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
