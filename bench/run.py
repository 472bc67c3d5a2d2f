"""signing-proxy benchmark: the proxy against the same upstream reached directly, in the same run.

Starts an upstream (nginx when installed, for small GETs and 1 MiB POSTs; the built-in
upstream in bench/upstream.py otherwise, and always for the 1 GiB stream and the SSE
streams), starts the proxy as ``python -m proxy run --config FILE`` (static credentials,
every request signed), drives it with wrk when installed (the built-in generator in
bench/load.py otherwise), and prints for each scenario the proxy's figures, the same
figures straight to the upstream, and their ratio:

1. get      small GET: req/s, p50/p99 latency, unloaded time to first byte, CPU per request,
            memory; again with the access log on (log_level info, to /dev/null);
2. post     1 MiB POST: the same;
3. stream   1 GiB download: time to first byte added, throughput, CPU per GiB, memory growth;
            nginx as a reverse proxy on the same path too, as a reference relay (when installed);
4. sse      200 concurrent server-sent-event streams, an event every 100 ms each for 5 s:
            delivery latency p50/p99, CPU per event, memory with the streams open;
5. startup  spawn to the first 200 through the proxy, idle resident memory per process.

CPU is utime+stime from /proc/PID/stat of the proxy and all its descendants; memory is
VmRSS before and VmHWM (reset per phase) during, summed over the proxy's processes. The
issue's targets are printed at the end, each marked PASS or FAIL.

    python bench/run.py                         # everything, about 75 s on 2 cores
    python bench/run.py --scenarios get,post --duration 4 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH,
    ENV,
    NGINX_RELAY_CONF,
    Upstream,
    Usage,
    cpu_seconds,
    download,
    first_ok,
    free_port,
    nginx_version,
    parse_size,
    process_tree,
    proxy_supports_workers,
    proxy_version,
    run_async,
    start_nginx,
    start_proxy,
    start_upstreams,
    stop_process,
    tree_memory_kib,
    tree_pss_kib,
)
from load import (
    LoadResult,
    percentile,
    run_load,
    sequential_latency,
    sse_streams,
    wrk_available,
)

SCENARIOS = ("get", "post", "stream", "sse", "startup")
MIB = 1024 * 1024
POST_SIZE = MIB

# The comparison targets (the Go aws-sigv4-proxy on this machine kind).
GET_RPS = 11_500
GET_P50_MS = 2.6
LOGGED_SHARE = 0.95
POST_RPS = 4 * 240
STREAM_TTFB_ADDED_MS = 5.0
STREAM_THROUGHPUT_SHARE = 0.80
STREAM_GROWTH_MB = 16.0
STARTUP_S = 1.0
IDLE_RSS_MB = 60.0


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def mib(kib: int) -> float:
    return kib / 1024


# ---------------------------------------------------------------- request-rate scenarios


def measure_interleaved(
    targets: dict[str, tuple[str, int]], args: argparse.Namespace, workdir: Path, body: bytes = b""
) -> dict[str, dict[str, Any]]:
    """Load each ``name: (url, pid)`` in interleaved slices, then time unloaded requests to each.

    The slices run in the order A B C C B A (``--slices`` rounds of ``--duration / --slices`` seconds
    per target, every other round reversed), so a drift in what else the machine runs weighs on every
    target alike. Requests/s is over all slices; p50/p99 are the request-weighted mean of the
    slices' percentiles; CPU per request is the pid's tree CPU over all slices / requests.
    """
    threads, connections = args.threads, args.connections
    for url, _ in targets.values():
        run_load(url, 1, connections, use_wrk=args.wrk, body=body, workdir=workdir, threads=threads)  # warm-up
    slices: dict[str, list[tuple[LoadResult, Usage]]] = {name: [] for name in targets}
    names = list(targets)
    seconds = args.duration / args.slices
    if args.wrk:
        seconds = max(1, round(seconds))
    for round_number in range(args.slices):
        for name in names if round_number % 2 == 0 else reversed(names):
            url, pid = targets[name]
            usage = Usage(pid).start()
            load = run_load(url, seconds, connections, use_wrk=args.wrk, body=body, workdir=workdir, threads=threads)
            slices[name].append((load, usage.stop()))
    results = {}
    for name, runs in slices.items():
        url, pid = targets[name]
        requests = sum(load.requests for load, _ in runs)
        cpu = sum(usage.cpu for _, usage in runs)

        def weighted(key: str, runs: list[tuple[LoadResult, Usage]] = runs, requests: int = requests) -> float:
            if not requests:
                return float("nan")
            return sum(getattr(load, key) * load.requests for load, _ in runs) / requests

        ttfb = sequential_latency(url, 50 if body else 200, body)
        results[name] = {
            "tool": runs[0][0].tool,
            "requests": requests,
            "seconds": sum(load.seconds for load, _ in runs),
            "rps": requests / sum(load.seconds for load, _ in runs),
            "rps_slices": [load.rps for load, _ in runs],
            "p50_ms": weighted("p50_ms"),
            "p99_ms": weighted("p99_ms"),
            "non_2xx": sum(load.non_2xx for load, _ in runs),
            "errors": sum(load.errors for load, _ in runs),
            "ttfb_p50_ms": percentile(ttfb, 0.5) * 1000,
            "cpu_s": cpu,
            "cpu_us_per_request": cpu / requests * 1e6 if requests else None,
            "rss_before_mib": mib(runs[0][1].rss_before_kib),
            "peak_rss_mib": mib(max(usage.peak_kib for _, usage in runs)),
            "peak_reset": all(usage.peak_reset for _, usage in runs),
            "processes": len(process_tree(pid)),
        }
    return results


def ratios(proxied: dict[str, Any], direct: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float | None]:
    return {key: ratio(proxied.get(key), direct.get(key)) for key in keys}


LOAD_KEYS = ("rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "cpu_us_per_request", "rss_before_mib", "peak_rss_mib")


def scenario_get(upstream: Upstream, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    progress("small GET: starting the proxy twice (log_level warning, and info with the access log)")
    plain, _ = start_proxy(workdir, upstream.fast_url, "warning", args.proxy_workers)
    try:
        logged, _ = start_proxy(workdir, upstream.fast_url, "info", args.proxy_workers)
        try:
            progress(f"small GET: {upstream.fast_kind} directly, the proxy, the proxy with access log, interleaved")
            measured = measure_interleaved(
                {
                    "direct": (f"{upstream.fast_url}/get", upstream.fast_pid),
                    "proxy": (f"{plain.url}/get", plain.pid),
                    "proxy_logged": (f"{logged.url}/get", logged.pid),
                },
                args,
                workdir,
            )
        finally:
            logged.stop()
    finally:
        plain.stop()
    result: dict[str, Any] = {"upstream": upstream.fast_kind, **measured}
    for name in ("proxy", "proxy_logged"):
        result[f"{name}_ratio"] = ratios(result[name], result["direct"], LOAD_KEYS)
    result["logged_over_unlogged_rps"] = ratio(result["proxy_logged"]["rps"], result["proxy"]["rps"])
    result["logged_over_unlogged_cpu"] = ratio(
        result["proxy_logged"]["cpu_us_per_request"], result["proxy"]["cpu_us_per_request"]
    )
    return result


def scenario_post(upstream: Upstream, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    body = b"x" * POST_SIZE
    proxy, _ = start_proxy(workdir, upstream.post_url, "warning", args.proxy_workers)
    try:
        progress(f"1 MiB POST: {upstream.post_kind} directly and the proxy, interleaved")
        measured = measure_interleaved(
            {"direct": (f"{upstream.post_url}/post", upstream.post_pid), "proxy": (f"{proxy.url}/post", proxy.pid)},
            args,
            workdir,
            body,
        )
    finally:
        proxy.stop()
    return {
        "upstream": upstream.post_kind,
        **measured,
        "ratio": ratios(measured["proxy"], measured["direct"], LOAD_KEYS),
    }


# ---------------------------------------------------------------- 1 GiB stream


def timed_download(url: str, size: int, pid: int) -> tuple[float, float, float]:
    """(ttfb s, total s, CPU s of ``pid``'s tree) for one download, checked to be complete."""
    before = cpu_seconds(pid)
    ttfb, total, received = asyncio.run(asyncio.wait_for(download(url), 30 + size / (20 * MIB)))
    if received != size:
        raise RuntimeError(f"{url}: {received} bytes received, {size} expected")
    return ttfb, total, cpu_seconds(pid) - before


def scenario_stream(upstream: Upstream, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    size = args.size_bytes
    proxy, _ = start_proxy(workdir, upstream.app_url, "warning", args.proxy_workers)
    relay = None
    if args.nginx and nginx_version():  # a C reverse proxy on the same path, for reference
        app_port = int(upstream.app_url.rsplit(":", 1)[1])
        relay = start_nginx(workdir, NGINX_RELAY_CONF, "nginx-relay", upstream_port=app_port)
    direct_runs, proxied_runs, relay_runs = [], [], []
    probe = 1 << 20
    probes: dict[str, list[float]] = {"direct": [], "proxy": []}
    try:
        for _ in range(4):  # each worker gets a pooled upstream connection, most likely
            timed_download(f"{proxy.url}/big?size={probe}", probe, proxy.pid)
        usage = Usage(proxy.pid).start()
        upstream_usage = Usage(upstream.app_pid).start()
        for round_number in range(args.stream_rounds):
            order = "direct, proxy" + (", nginx reverse proxy" if relay else "")
            progress(f"{size / MIB:.0f} MiB stream, round {round_number + 1}/{args.stream_rounds}: {order}")
            direct_runs.append(timed_download(f"{upstream.app_url}/big?size={size}", size, upstream.app_pid))
            proxied_runs.append(timed_download(f"{proxy.url}/big?size={size}", size, proxy.pid))
            if relay:
                relay_runs.append(timed_download(f"http://127.0.0.1:{relay[1]}/big?size={size}", size, relay[0].pid))
        usage.stop()
        upstream_usage.stop()
        progress(f"time to first byte: {args.ttfb_probes} streamed downloads of 1 MiB each way")
        for _ in range(args.ttfb_probes):
            probes["direct"].append(timed_download(f"{upstream.app_url}/big?size={probe}", probe, upstream.app_pid)[0])
            probes["proxy"].append(timed_download(f"{proxy.url}/big?size={probe}", probe, proxy.pid)[0])
    finally:
        proxy.stop()
        if relay:
            stop_process(relay[0])

    def summary(
        runs: list[tuple[float, float, float]], ttfbs: list[float], rss_before: int, peak: int
    ) -> dict[str, Any]:
        return {
            "ttfb_ms": statistics.median(ttfbs) * 1000,
            "ttfb_ms_large": statistics.median(run[0] for run in runs) * 1000,
            "throughput_mib_s": statistics.median(size / MIB / run[1] for run in runs),
            "cpu_s_per_gib": statistics.median(run[2] / (size / 2**30) for run in runs),
            "rss_before_mib": mib(rss_before),
            "peak_rss_mib": mib(peak),
            "growth_mib": mib(peak - rss_before),
            "rounds": len(runs),
        }

    proxied = summary(proxied_runs, probes["proxy"], usage.rss_before_kib, usage.peak_kib)
    direct = summary(direct_runs, probes["direct"], upstream_usage.rss_before_kib, upstream_usage.peak_kib)
    return {
        "size": size,
        "upstream": "built-in (aiohttp)",
        "direct": direct,
        "proxy": proxied,
        "ratio": ratios(proxied, direct, ("ttfb_ms", "throughput_mib_s", "cpu_s_per_gib", "peak_rss_mib")),
        "ttfb_probes": len(probes["proxy"]),
        "ttfb_added_ms": proxied["ttfb_ms"] - direct["ttfb_ms"],
        "nginx_relay_mib_s": statistics.median(size / MIB / run[1] for run in relay_runs) if relay_runs else None,
        "peak_reset": usage.peak_reset,
    }


# ---------------------------------------------------------------- SSE


async def sse_with_memory(port: int, pid: int, args: argparse.Namespace) -> tuple[Any, int]:
    """Run the streams while sampling ``pid``'s tree RSS; returns the result and the largest RSS seen (KiB)."""
    largest = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal largest
        while not done.is_set():
            largest = max(largest, tree_memory_kib(pid)[0])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.25)

    sampler = asyncio.create_task(sample())
    events = max(1, round(args.sse_seconds / args.sse_interval))
    try:
        result = await sse_streams(port, args.sse_streams, events, args.sse_interval)
    finally:
        done.set()
        await sampler
    return result, largest


def sse_summary(result: Any, usage: Usage, largest_kib: int) -> dict[str, Any]:
    return {
        "streams": result.streams,
        "expected": result.expected,
        "delivered": result.delivered,
        "failed_streams": result.failed_streams,
        "p50_ms": percentile(result.latencies_ms, 0.50),
        "p99_ms": percentile(result.latencies_ms, 0.99),
        "max_ms": max(result.latencies_ms, default=float("nan")),
        "cpu_s": usage.cpu,
        "cpu_us_per_event": usage.cpu / result.delivered * 1e6 if result.delivered else None,
        "rss_before_mib": mib(usage.rss_before_kib),
        "rss_open_mib": mib(largest_kib),
        "peak_rss_mib": mib(usage.peak_kib),
    }


def scenario_sse(upstream: Upstream, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = int(upstream.app_url.rsplit(":", 1)[1])
    progress(f"{args.sse_streams} SSE streams, direct")
    usage = Usage(upstream.app_pid).start()
    result, largest = run_async(sse_with_memory(port, upstream.app_pid, args))
    direct = sse_summary(result, usage.stop(), largest)
    progress(f"{args.sse_streams} SSE streams, through the proxy")
    proxy, _ = start_proxy(workdir, upstream.app_url, "warning", args.proxy_workers)
    try:
        usage = Usage(proxy.pid).start()
        result, largest = run_async(sse_with_memory(proxy.port, proxy.pid, args))
        proxied = sse_summary(result, usage.stop(), largest)
    finally:
        proxy.stop()
    keys = ("p50_ms", "p99_ms", "cpu_us_per_event", "rss_open_mib", "peak_rss_mib")
    return {
        "upstream": "built-in (aiohttp)",
        "interval_s": args.sse_interval,
        "direct": direct,
        "proxy": proxied,
        "ratio": ratios(proxied, direct, keys),
    }


# ---------------------------------------------------------------- start-up


def idle_memory(pid: int, settle: float) -> tuple[list[float], float | None]:
    """(VmRSS of each process, PSS of all) in MiB, after ``settle`` seconds idle."""
    time.sleep(settle)
    pss = tree_pss_kib(pid)
    return [mib(kib) for kib in tree_memory_kib(pid)[2]], mib(pss) if pss is not None else None


def reference_server(settle: float) -> tuple[float, tuple[list[float], float | None]]:
    """A bare aiohttp server (the built-in upstream, plain asyncio): spawn to first 200, idle RSS."""
    port = free_port()
    spawned = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "upstream.py"), "--app-port", str(port), "--no-uvloop"],
        env=ENV,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        ready = asyncio.run(first_ok(port, "/get", spawned + 20))
        return ready - spawned, idle_memory(process.pid, settle)
    finally:
        stop_process(process)


def scenario_startup(upstream: Upstream, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    settle = 0.5
    times, memory = [], []
    for run in range(args.startup_runs):
        progress(f"start-up {run + 1}/{args.startup_runs}")
        proxy, seconds = start_proxy(workdir, upstream.fast_url, "warning", args.proxy_workers)
        try:
            times.append(seconds)
            memory.append(idle_memory(proxy.pid, settle))
        finally:
            proxy.stop()
    reference = [reference_server(settle) for _ in range(args.startup_runs)]

    def summary(ready: list[float], readings: list[tuple[list[float], float | None]]) -> dict[str, Any]:
        pss = [p for _, p in readings if p is not None]
        return {
            "ready_s": statistics.median(ready),
            "ready_s_all": ready,
            "processes": len(readings[-1][0]),
            "idle_rss_mib_per_process": readings[-1][0],
            "idle_rss_mib_max": max(max(rss) for rss, _ in readings),
            "idle_rss_mib_total": statistics.median(sum(rss) for rss, _ in readings),
            "idle_pss_mib_total": statistics.median(pss) if pss else None,
        }

    proxied = summary(times, memory)
    direct = summary([t for t, _ in reference], [m for _, m in reference])
    keys = ("ready_s", "idle_rss_mib_max", "idle_rss_mib_total", "idle_pss_mib_total")
    return {
        "reference": "bare aiohttp server (bench/upstream.py, plain asyncio)",
        "proxy": proxied,
        "direct": direct,
        "ratio": ratios(proxied, direct, keys),
    }


# ---------------------------------------------------------------- report


def cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def table(title: str, columns: list[str], rows: list[tuple[str, str, list[Any]]]) -> str:
    width = max(len(label) for label, _, _ in rows) + 2
    widths = [max(12, len(name) + 3) for name in columns]
    lines = [title, " " * width + "".join(f"{name:>{w}}" for name, w in zip(columns, widths, strict=True))]
    for label, spec, values in rows:
        lines.append(
            f"{label:<{width}}" + "".join(f"{cell(v, spec):>{w}}" for v, w in zip(values, widths, strict=True))
        )
    return "\n".join("  " + line if i else line for i, line in enumerate(lines))


def with_ratio_column(rows: list[tuple[str, str, list[Any]]]) -> list[tuple[str, str, list[Any]]]:
    """Rows of proxy / direct / ratio: the first two columns in the row's format, the ratio as .2f."""
    return [
        (label, spec, [cell(v, ".2f" if i == 2 else spec) for i, v in enumerate(values)])
        for label, spec, values in rows
    ]


def load_rows(result: dict[str, Any], columns: list[tuple[str, str]]) -> list[tuple[str, str, list[Any]]]:
    specs = [
        ("requests/s", ",.0f", "rps"),
        ("latency p50 (ms)", ".2f", "p50_ms"),
        ("latency p99 (ms)", ".2f", "p99_ms"),
        ("TTFB, no load, p50 (ms)", ".3f", "ttfb_p50_ms"),
        ("CPU per request (µs)", ".0f", "cpu_us_per_request"),
        ("RSS before (MiB)", ".1f", "rss_before_mib"),
        ("peak RSS (MiB)", ".1f", "peak_rss_mib"),
    ]
    rows = []
    for label, spec, key in specs:
        values = []
        for group, kind in columns:
            values.append(cell(result[group].get(key), ".2f" if kind == "ratio" else spec))
        rows.append((label, spec, values))
    rows.append(
        (
            "errors (non-2xx, socket)",
            "",
            [f"{result[g]['non_2xx']}, {result[g]['errors']}" if k != "ratio" else "" for g, k in columns],
        )
    )
    return rows


def report(results: dict[str, Any], env: dict[str, Any]) -> str:
    out = [
        f"signing-proxy benchmark, {env['date']}: {env['cpus']} CPUs, load average {env['load_before']} before, "
        f"{env['load_after']} after; Python {env['python']}",
        f"proxy: {env['proxy_version']}; {env['proxy_processes']}",
        f"load generator: {env['load_tool']}",
        "every ratio is proxy / direct-to-upstream, measured in the same run (CPU: the proxy's processes per request "
        "vs the upstream's; memory: the proxy's vs the upstream's)",
    ]
    out += [f"note: {note}" for note in env["notes"]]
    if "get" in results:
        r = results["get"]
        columns = [
            ("proxy", ""),
            ("proxy_logged", ""),
            ("direct", ""),
            ("proxy_ratio", "ratio"),
            ("proxy_logged_ratio", "ratio"),
        ]
        out += [
            "",
            table(
                f"1. small GET, signed (upstream {r['upstream']}; {env['load_tool_short']})",
                ["proxy", "proxy+access log", "direct", "proxy/direct", "logged/direct"],
                load_rows(r, columns),
            ),
        ]
        out.append(
            f"  access log on / off: requests/s {cell(r['logged_over_unlogged_rps'], '.2f')}, "
            f"CPU per request {cell(r['logged_over_unlogged_cpu'], '.2f')}"
        )
        cpu = r["proxy"]["cpu_us_per_request"]
        if cpu:
            out.append(
                f"  CPU bound: {env['cpus']} cores / {cpu:.0f} µs per request = {env['cpus'] * 1e6 / cpu:,.0f} req/s "
                "if the proxy had every core to itself (no load generator, no upstream)"
            )
    if "post" in results:
        r = results["post"]
        columns = [("proxy", ""), ("direct", ""), ("ratio", "ratio")]
        out += [
            "",
            table(
                f"2. 1 MiB POST, signed (upstream {r['upstream']}, answers after reading the whole body; "
                f"{env['load_tool_short']})",
                ["proxy", "direct", "proxy/direct"],
                load_rows(r, columns),
            ),
        ]
    if "stream" in results:
        r = results["stream"]
        p, d, q = r["proxy"], r["direct"], r["ratio"]
        rows = [
            ("time to first byte (ms)", ".2f", [p["ttfb_ms"], d["ttfb_ms"], q["ttfb_ms"]]),
            ("  same, in the large downloads", ".2f", [p["ttfb_ms_large"], d["ttfb_ms_large"], None]),
            ("throughput (MiB/s)", ",.0f", [p["throughput_mib_s"], d["throughput_mib_s"], q["throughput_mib_s"]]),
            ("CPU per GiB (s)", ".2f", [p["cpu_s_per_gib"], d["cpu_s_per_gib"], q["cpu_s_per_gib"]]),
            ("RSS before (MiB)", ".1f", [p["rss_before_mib"], d["rss_before_mib"], None]),
            ("peak RSS (MiB)", ".1f", [p["peak_rss_mib"], d["peak_rss_mib"], q["peak_rss_mib"]]),
            ("growth (MiB)", ".1f", [p["growth_mib"], d["growth_mib"], None]),
        ]
        rows = with_ratio_column(rows)
        out += [
            "",
            table(
                f"3. {r['size'] / 2**30:g} GiB streamed download "
                f"(upstream {r['upstream']}; median of {p['rounds']} rounds)",
                ["proxy", "direct", "proxy/direct"],
                rows,
            ),
        ]
        out.append(
            f"  time to first byte added by the proxy: {r['ttfb_added_ms']:.2f} ms "
            f"(median of {r['ttfb_probes']} streamed downloads each way; first body byte, connect included)"
        )
        if r.get("nginx_relay_mib_s"):
            out.append(
                f"  reference: nginx as a reverse proxy on the same path, {r['nginx_relay_mib_s']:,.0f} MiB/s "
                f"({r['nginx_relay_mib_s'] / d['throughput_mib_s']:.2f} of direct; the proxy is "
                f"{p['throughput_mib_s'] / r['nginx_relay_mib_s']:.2f} times as fast)"
            )
    if "sse" in results:
        r = results["sse"]
        p, d, q = r["proxy"], r["direct"], r["ratio"]
        rows = [
            ("events delivered", "", [f"{p['delivered']}/{p['expected']}", f"{d['delivered']}/{d['expected']}", ""]),
            ("delivery latency p50 (ms)", ".2f", [p["p50_ms"], d["p50_ms"], q["p50_ms"]]),
            ("delivery latency p99 (ms)", ".2f", [p["p99_ms"], d["p99_ms"], q["p99_ms"]]),
            ("delivery latency max (ms)", ".2f", [p["max_ms"], d["max_ms"], None]),
            ("CPU per event (µs)", ".0f", [p["cpu_us_per_event"], d["cpu_us_per_event"], q["cpu_us_per_event"]]),
            ("RSS before (MiB)", ".1f", [p["rss_before_mib"], d["rss_before_mib"], None]),
            (
                f"RSS, {p['streams']} streams open (MiB)",
                ".1f",
                [p["rss_open_mib"], d["rss_open_mib"], q["rss_open_mib"]],
            ),
            ("peak RSS (MiB)", ".1f", [p["peak_rss_mib"], d["peak_rss_mib"], q["peak_rss_mib"]]),
            ("failed streams", "d", [p["failed_streams"], d["failed_streams"], None]),
        ]
        rows = with_ratio_column(rows)
        out += [
            "",
            table(
                f"4. {p['streams']} concurrent SSE streams, an event every {r['interval_s'] * 1000:g} ms each "
                f"(upstream {r['upstream']})",
                ["proxy", "direct", "proxy/direct"],
                rows,
            ),
        ]
    if "startup" in results:
        r = results["startup"]
        p, d, q = r["proxy"], r["direct"], r["ratio"]
        per_process = ", ".join(f"{v:.1f}" for v in p["idle_rss_mib_per_process"])
        rows = [
            ("spawn to first 200 (ms)", ".0f", [p["ready_s"] * 1000, d["ready_s"] * 1000, q["ready_s"]]),
            (
                "idle RSS, largest process (MiB)",
                ".1f",
                [p["idle_rss_mib_max"], d["idle_rss_mib_max"], q["idle_rss_mib_max"]],
            ),
            (
                "idle RSS, all processes (MiB)",
                ".1f",
                [p["idle_rss_mib_total"], d["idle_rss_mib_total"], q["idle_rss_mib_total"]],
            ),
            (
                "idle PSS, all processes (MiB)",
                ".1f",
                [p["idle_pss_mib_total"], d["idle_pss_mib_total"], q["idle_pss_mib_total"]],
            ),
            ("processes", "d", [p["processes"], d["processes"], None]),
        ]
        rows = with_ratio_column(rows)
        out += [
            "",
            table(
                f"5. start-up and idle memory (median of {len(p['ready_s_all'])} starts; direct = {r['reference']})",
                ["proxy", "reference", "proxy/reference"],
                rows,
            ),
        ]
        out.append(
            f"  proxy start-ups (ms): {', '.join(f'{t * 1000:.0f}' for t in p['ready_s_all'])}; "
            f"idle RSS per process (MiB): {per_process}"
        )
    return "\n".join(out)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[tuple[str, float | None, str, float, str]] = []
    if "get" in results:
        r = results["get"]
        checks += [
            (f"small GET >= {GET_RPS:,} req/s", r["proxy"]["rps"], ">=", GET_RPS, ",.0f"),
            (f"small GET p50 <= {GET_P50_MS} ms", r["proxy"]["p50_ms"], "<=", GET_P50_MS, ".2f"),
            (
                f"small GET with access log >= 95 % of {GET_RPS:,} req/s",
                r["proxy_logged"]["rps"],
                ">=",
                LOGGED_SHARE * GET_RPS,
                ",.0f",
            ),
            (
                "access log costs <= 5 % (req/s on/off >= 0.95)",
                r["logged_over_unlogged_rps"],
                ">=",
                LOGGED_SHARE,
                ".2f",
            ),
            (
                "access log costs <= 5 % (CPU/request on/off <= 1.05)",
                r["logged_over_unlogged_cpu"],
                "<=",
                1 / LOGGED_SHARE,
                ".2f",
            ),
        ]
    if "post" in results:
        checks.append(
            (f"1 MiB POST >= 4 x 240 = {POST_RPS} req/s", results["post"]["proxy"]["rps"], ">=", POST_RPS, ",.0f")
        )
    if "stream" in results:
        r = results["stream"]
        checks += [
            (f"stream: TTFB added < {STREAM_TTFB_ADDED_MS:g} ms", r["ttfb_added_ms"], "<", STREAM_TTFB_ADDED_MS, ".2f"),
            (
                f"stream: throughput >= {STREAM_THROUGHPUT_SHARE:.0%} of direct",
                r["ratio"]["throughput_mib_s"],
                ">=",
                STREAM_THROUGHPUT_SHARE,
                ".2f",
            ),
            (
                f"stream: memory growth < {STREAM_GROWTH_MB:g} MB",
                r["proxy"]["growth_mib"] * MIB / 1e6,
                "<",
                STREAM_GROWTH_MB,
                ".1f",
            ),
        ]
    if "startup" in results:
        r = results["startup"]["proxy"]
        checks += [
            (f"start-up to first 200 < {STARTUP_S:g} s", r["ready_s"], "<", STARTUP_S, ".3f"),
            (f"idle RSS < {IDLE_RSS_MB:g} MB per process", r["idle_rss_mib_max"] * MIB / 1e6, "<", IDLE_RSS_MB, ".1f"),
        ]
    verdicts = []
    for label, value, op, limit, spec in checks:
        ok = value is not None and not math.isnan(value)
        if ok:
            ok = {"<": value < limit, "<=": value <= limit, ">=": value >= limit}[op]
        verdicts.append({"target": label, "measured": value, "limit": limit, "op": op, "pass": ok, "spec": spec})
    return verdicts


def targets_report(verdicts: list[dict[str, Any]]) -> str:
    lines = ["", "targets (issue 6)"]
    width = max((len(v["target"]) for v in verdicts), default=10) + 2
    for v in verdicts:
        lines.append(
            f"  {v['target']:<{width}}{cell(v['measured'], v['spec']):>12}   {'PASS' if v['pass'] else 'FAIL'}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def markdown(results: dict[str, Any], verdicts: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """The key figures as Markdown tables (for docs/performance.md)."""
    rows: list[tuple[str, Any, Any, Any, str]] = []

    def add(label: str, group: dict[str, Any], key: str, spec: str, ratio_group: dict[str, Any] | None = None) -> None:
        ratio_value = (ratio_group or {}).get(key) if ratio_group is not None else None
        rows.append((label, group["proxy"].get(key), group["direct"].get(key), ratio_value, spec))

    if "get" in results:
        r = results["get"]
        for label, key, spec in (
            ("small GET: requests/s", "rps", ",.0f"),
            ("small GET: latency p50 (ms)", "p50_ms", ".2f"),
            ("small GET: latency p99 (ms)", "p99_ms", ".2f"),
            ("small GET: TTFB, no load, p50 (ms)", "ttfb_p50_ms", ".3f"),
            ("small GET: CPU per request (µs)", "cpu_us_per_request", ".0f"),
            ("small GET: peak RSS (MiB)", "peak_rss_mib", ".1f"),
        ):
            add(label, r, key, spec, r["proxy_ratio"])
        logged = {"proxy": r["proxy_logged"], "direct": r["direct"]}
        for label, key, spec in (
            ("small GET, access log on: requests/s", "rps", ",.0f"),
            ("small GET, access log on: latency p50 (ms)", "p50_ms", ".2f"),
            ("small GET, access log on: CPU per request (µs)", "cpu_us_per_request", ".0f"),
        ):
            add(label, logged, key, spec, r["proxy_logged_ratio"])
    if "post" in results:
        r = results["post"]
        for label, key, spec in (
            ("1 MiB POST: requests/s", "rps", ",.0f"),
            ("1 MiB POST: latency p50 (ms)", "p50_ms", ".1f"),
            ("1 MiB POST: latency p99 (ms)", "p99_ms", ".1f"),
            ("1 MiB POST: TTFB, no load, p50 (ms)", "ttfb_p50_ms", ".2f"),
            ("1 MiB POST: CPU per request (µs)", "cpu_us_per_request", ".0f"),
            ("1 MiB POST: peak RSS (MiB)", "peak_rss_mib", ".1f"),
        ):
            add(label, r, key, spec, r["ratio"])
    if "stream" in results:
        r = results["stream"]
        size = f"{r['size'] / 2**30:g} GiB"
        for label, key, spec in (
            (f"{size} stream: time to first byte (ms)", "ttfb_ms", ".2f"),
            (f"{size} stream: throughput (MiB/s)", "throughput_mib_s", ",.0f"),
            (f"{size} stream: CPU per GiB (s)", "cpu_s_per_gib", ".2f"),
            (f"{size} stream: RSS growth (MiB)", "growth_mib", ".1f"),
        ):
            add(label, r, key, spec, r["ratio"])
    if "sse" in results:
        r = results["sse"]
        n = r["proxy"]["streams"]
        for label, key, spec in (
            (f"{n} SSE streams: delivery p50 (ms)", "p50_ms", ".2f"),
            (f"{n} SSE streams: delivery p99 (ms)", "p99_ms", ".2f"),
            (f"{n} SSE streams: CPU per event (µs)", "cpu_us_per_event", ".0f"),
            (f"{n} SSE streams: RSS with the streams open (MiB)", "rss_open_mib", ".1f"),
        ):
            add(label, r, key, spec, r["ratio"])
    if "startup" in results:
        r = results["startup"]
        rows.append(("start-up: spawn to first 200 (ms)", r["proxy"]["ready_s"] * 1000, r["direct"]["ready_s"] * 1000,
                     r["ratio"]["ready_s"], ".0f"))  # fmt: skip
        for label, key, spec in (
            ("idle RSS, largest process (MiB)", "idle_rss_mib_max", ".1f"),
            ("idle RSS, all processes (MiB)", "idle_rss_mib_total", ".1f"),
            ("idle PSS, all processes (MiB)", "idle_pss_mib_total", ".1f"),
        ):
            add(label, r, key, spec, r["ratio"])
    lines = [
        f"Run of {env['date']}, load average {env['load_before']} before; {env['load_tool']}; "
        f"proxy {env['proxy_version']}, {env['proxy_processes']}.",
        "",
        "| figure | proxy | direct | proxy / direct |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, proxied, direct, ratio_value, spec in rows:
        lines.append(f"| {label} | {cell(proxied, spec)} | {cell(direct, spec)} | {cell(ratio_value, '.2f')} |")
    lines += ["", "| target | measured | result |", "| --- | ---: | --- |"]
    for v in verdicts:
        lines.append(
            f"| {v['target'].strip()} | {cell(v['measured'], v['spec'])} | {'PASS' if v['pass'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def without_nan(value: Any) -> Any:
    """NaN (no sample) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(item) for item in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8, help="seconds per measured load run (default 8)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument(
        "--slices", type=int, default=2, help="interleaved rounds the duration is split into (default 2: A B, B A)"
    )
    parser.add_argument("--threads", type=int, default=2, help="load generator threads/processes (default 2)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {','.join(SCENARIOS)}")
    parser.add_argument("--size", default="1GiB", help="size of the streamed download (default 1GiB)")
    parser.add_argument("--stream-rounds", type=int, default=3, help="downloads each way (default 3)")
    parser.add_argument("--ttfb-probes", type=int, default=20, help="extra short downloads timing the first byte")
    parser.add_argument("--sse-streams", type=int, default=200)
    parser.add_argument("--sse-seconds", type=float, default=5.0)
    parser.add_argument("--sse-interval", type=float, default=0.1, help="seconds between events per stream")
    parser.add_argument("--startup-runs", type=int, default=3)
    parser.add_argument("--workers", type=int, help="proxy worker processes (passed on when the proxy knows workers)")
    parser.add_argument("--no-wrk", dest="wrk", action="store_false", help="use the built-in load generator")
    parser.add_argument("--no-nginx", dest="nginx", action="store_false", help="use the built-in upstream only")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="also print the key figures as Markdown tables")
    args = parser.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenario_list) - set(SCENARIOS)
    if unknown or not args.scenario_list:
        parser.error(f"--scenarios: unknown {sorted(unknown)}; expected some of {','.join(SCENARIOS)}")
    try:
        args.size_bytes = parse_size(args.size)
    except ValueError as error:
        parser.error(f"--size: {error}")
    if args.duration <= 0 or args.connections < 1 or args.threads < 1 or args.slices < 1:
        parser.error("--duration, --connections, --threads and --slices must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.wrk = args.wrk and wrk_available()
    notes = []
    args.proxy_workers = None
    supports_workers = proxy_supports_workers()
    if args.workers is not None:
        if supports_workers:
            args.proxy_workers = args.workers
        else:
            notes.append(f"--workers {args.workers} ignored: this proxy has no workers setting yet")
    workers_setting = (
        f"workers: {args.proxy_workers}"
        if args.proxy_workers
        else "workers: default"
        if supports_workers
        else "single process"
    )
    slice_seconds = max(1, round(args.duration / args.slices)) if args.wrk else args.duration / args.slices
    load_tool = (
        f"wrk -t{args.threads} -c{args.connections} -d{slice_seconds:g}s --latency"
        if args.wrk
        else f"built-in (bench/load.py), {args.threads} processes, {args.connections} keep-alive connections"
    )
    load_tool += f"; {args.slices} interleaved slices of {slice_seconds:g}s per target"
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "load_tool": load_tool,
        "load_tool_short": load_tool.replace(" --latency", "").replace(" (bench/load.py)", ""),
        "proxy_processes": workers_setting,
        "proxy_version": proxy_version(),
        "notes": notes,
    }
    load_now = os.getloadavg()[0]
    if load_now > (os.cpu_count() or 1) * 0.5:
        notes.append(
            f"load average {load_now:.1f} on {os.cpu_count()} CPUs before the start: other work shares the machine, "
            "absolute figures are depressed; the ratios, measured under the same conditions, hold better"
        )
    workdir = Path(tempfile.mkdtemp(prefix="signing-proxy-bench-"))
    results: dict[str, Any] = {}
    started = time.monotonic()
    upstream = None
    try:
        progress("starting the upstreams")
        upstream = start_upstreams(workdir, use_nginx=args.nginx)
        notes += upstream.notes
        runners = {
            "get": scenario_get,
            "post": scenario_post,
            "stream": scenario_stream,
            "sse": scenario_sse,
            "startup": scenario_startup,
        }
        for name in SCENARIOS:
            if name in args.scenario_list:
                results[name] = runners[name](upstream, args, workdir)
    finally:
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    env["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    counted = [r["proxy"]["processes"] for r in results.values() if "processes" in r.get("proxy", {})]
    if counted:
        env["proxy_processes"] += (
            f" ({counted[0]} processes: supervisor and workers)" if counted[0] > 1 else " (1 process)"
        )
    env["seconds"] = round(time.monotonic() - started, 1)
    verdicts = targets(results)
    print(report(results, env))
    print(targets_report(verdicts))
    print(f"\n(benchmark took {env['seconds']:.0f} s)")
    if args.markdown:
        print("\n" + markdown(results, verdicts, env))
    if args.json:
        document = {"environment": env, "results": results, "targets": verdicts}
        print(json.dumps(without_nan(document), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
