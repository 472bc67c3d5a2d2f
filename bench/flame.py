"""Where a small GET's CPU goes: a flame graph (SVG) and the top costs per request, from py-spy.

    pip install py-spy                  # optional, only this script needs it
    python bench/flame.py               # writes bench/flame-small-get.svg, prints the top costs
    python bench/flame.py --seconds 20 --top 10 --output /tmp/flame.svg

One proxy worker (``workers: 1``: the process that serves is the one sampled) in front of nginx,
under ``wrk -t2 -c32`` small signed GETs for the whole recording. py-spy samples it twice in a row:
once into collapsed stacks (``--format raw``, by function) for the table, once into the SVG. The
table lists the functions with the most self time: their share of the samples, that share of the
worker's CPU per request (its user+system time over wrk's requests while sampled; py-spy pauses the
process per sample, so it is a little high), and their share with callees. Time in uvloop's C code
(the system calls that read and write sockets, the event loop) shows as the self time of the Python
frame that called into it (``Runner.run`` for the loop itself): py-spy sees no Python frame inside.
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


def costs(collapsed: str) -> tuple[Counter[str], Counter[str], int]:
    """(self samples, total samples) per function, and all samples, from py-spy's raw collapsed stacks.

    Self: the function was the innermost frame; total: it was anywhere on the stack (counted once).
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            functions = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]  # the function, not the line
            own[functions[-1]] += int(count)
            total.update(dict.fromkeys(functions, int(count)))
    return own, total, sum(own.values())


# The venv's own py-spy (the ``bench`` extra) when the venv is not on PATH, as with .venv/bin/python.
PY_SPY = str(Path(sys.executable).parent / "py-spy") if (Path(sys.executable).parent / "py-spy").exists() else "py-spy"


def record(pid: int, seconds: int, rate: int, form: str, output: Path) -> None:
    subprocess.run(
        [
            PY_SPY,
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
    if not shutil.which(PY_SPY):
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
        own, total, samples = costs((workdir / "raw.txt").read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{result.requests / result.seconds:,.0f} req/s while sampled, {cpu_us:.0f} µs of CPU per request; "
        f"{samples} samples; flame graph: {args.output}\n"
    )
    print("| function | self | µs per request | with callees |\n| --- | ---: | ---: | ---: |")
    for function, count in own.most_common(args.top):
        share = count / samples
        print(f"| `{function}` | {share:.1%} | {share * cpu_us:.1f} | {total[function] / samples:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
