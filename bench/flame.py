"""Where a small GET's CPU goes: a flame graph (SVG) and the top costs per request, from py-spy.

    pip install py-spy                  # optional, only this script needs it
    python bench/flame.py               # writes bench/flame-small-get.svg, prints the top costs
    python bench/flame.py --seconds 20 --top 10 --output /tmp/flame.svg

One proxy worker (``workers: 1``: the process that serves is the one sampled) in front of nginx,
under ``wrk -t2 -c32`` small signed GETs for the whole recording. py-spy samples it twice in a row:
once into collapsed stacks (``--format raw``, by function) for the table, once into the SVG. The
table gives each function's self time as a share of the samples, and that share of the worker's
CPU per request (its user+system time over wrk's requests, measured while sampled: py-spy pauses the
process per sample, so the absolute figure is a little high). Time in uvloop's C code (the system
calls that read and write sockets, the event loop) shows as the self time of the Python frame that
runs the loop (``run_until_complete`` / ``run``), as py-spy sees no Python frame inside it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH, ROOT, Checkout, cpu_seconds, progress, require_tools, start_proxy, start_upstream
from load import parse_wrk, wrk


def self_time(collapsed: str) -> tuple[Counter[str], int]:
    """Samples per innermost function, and all samples, from py-spy's raw (collapsed stack) output."""
    leaves: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            leaf = stack.rsplit(";", 1)[-1]
            leaves[re.sub(r":\d+\)$", ")", leaf)] += int(count)  # the function, not the line
    return leaves, sum(leaves.values())


def record(pid: int, seconds: int, rate: int, form: str, output: Path) -> None:
    subprocess.run(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            str(rate),
            "--format",
            form,
            "--function",
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
        timeout=seconds + 60,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="seconds per recording (two of them; default 10)")
    parser.add_argument("--rate", type=int, default=250, help="samples per second (default 250)")
    parser.add_argument("--top", type=int, default=5, help="functions in the table (default 5)")
    parser.add_argument("--output", type=Path, default=BENCH / "flame-small-get.svg")
    args = parser.parse_args(argv)
    require_tools()
    if not shutil.which("py-spy"):
        sys.exit("bench/flame.py needs py-spy: pip install py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="signing-proxy-flame-"))
    try:
        upstream = start_upstream(workdir)
        try:
            proxy = start_proxy(workdir, Checkout("proxy", ROOT), upstream, upstream.url, workers=1)
            try:
                url = proxy.url + "/get"
                wrk(url, 2, 32, 2)  # warm-up
                load_seconds = 2 * args.seconds + 4
                progress(f"wrk for {load_seconds} s, py-spy on pid {proxy.pid}: raw, then the SVG")
                cpu_before = cpu_seconds(proxy.pid)
                load = subprocess.Popen(
                    ["wrk", "-t2", "-c32", f"-d{load_seconds}s", "--latency", url], stdout=subprocess.PIPE, text=True
                )
                try:
                    record(proxy.pid, args.seconds, args.rate, "raw", workdir / "raw.txt")
                    record(proxy.pid, args.seconds, args.rate, "flamegraph", args.output)
                    result = parse_wrk(load.communicate(timeout=load_seconds + 60)[0])
                finally:
                    if load.poll() is None:
                        load.kill()
                cpu_us = (cpu_seconds(proxy.pid) - cpu_before) / result.requests * 1e6
            finally:
                proxy.stop()
        finally:
            upstream.stop()
        leaves, total = self_time((workdir / "raw.txt").read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{result.requests / result.seconds:,.0f} req/s while sampled, {cpu_us:.0f} µs of CPU per request; "
        f"{total} samples; flame graph: {args.output}\n"
    )
    print("| function (self time) | share | µs per request |\n| --- | ---: | ---: |")
    for function, samples in leaves.most_common(args.top):
        print(f"| `{function}` | {samples / total:.1%} | {samples / total * cpu_us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
