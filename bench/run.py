"""signing-proxy benchmark: each shape through the proxy and straight to the upstream, in the same run.

    python bench/run.py                                  # every shape, about 3 minutes on 2 cores
    python bench/run.py --shapes get,post --duration 4   # some of them
    python bench/run.py --baseline /tmp/baseline         # and another checkout's proxy, interleaved
    python bench/run.py --json                           # the Markdown, then every figure as JSON
    python bench/run.py --go-proxy ~/go/bin/aws-sigv4-proxy   # and awslabs' Go proxy, for reference

The upstream is nginx (small GET and 1 MiB POST over plain HTTP and TLS, static files for the
stream) and bench/upstream.py (server-sent events, WebSocket echo); the load is wrk; the proxy runs
as ``python -m proxy run --config FILE`` with static credentials, every request signed. With
``--baseline PATH`` a second proxy runs from that checkout (its own proxy/ on the same Python), and
every measured slice of it sits between slices of this one, so both see the same machine. When
awslabs' Go ``aws-sigv4-proxy`` is found (``--go-proxy PATH``, else on PATH) the get, tls, post and
stream shapes measure it too, interleaved the same way, and give the proxy's ratio to it. Each
shape prints one Markdown table (a row per target: direct, proxy, baseline, references) with the
ratio of its main figure to direct; the run ends with a summary table, one line per shape.

CPU is user+system time of a target's processes over its slices; peak memory is the largest
process's VmHWM, reset at the start of each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    FORWARD_HOST,
    GO_PROXY_HOWTO,
    ROOT,
    Checkout,
    Proxy,
    Upstream,
    Usage,
    find_go_proxy,
    forward_config,
    go_proxy_version,
    memory_kib,
    nginx_version,
    open_fds,
    progress,
    raise_fd_limit,
    require_tools,
    run_async,
    start_go_proxy,
    start_proxy,
    start_relay,
    start_upstream,
    stop_process,
)
from load import download, hold_idle, keepalive_gets, paced_script, percentile, post_script, sse_streams, upload, wrk

MIB = 1 << 20
GO = "Go aws-sigv4-proxy"  # its row in the shapes that measure it


@dataclass
class Shape:
    """One shape's figures: a row of metrics per target, the ratio of ``main`` to the direct row."""

    title: str
    main: str  # the key of the headline figure in every row
    unit: str  # what ``main`` counts, for the summary
    columns: list[tuple[str, str, str]]  # (key, heading, format)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # target -> figures
    notes: list[str] = field(default_factory=list)
    summary: str = ""  # the proxy's other figures, in a few words, for the summary table
    cpu: str = ""  # the key of its CPU cost per unit of work, if it has one (steadier than rates on a busy machine)

    def ratio(self, target: str, to: str = "direct", key: str = "") -> float | None:
        """``target``'s figure over ``to``'s: the main figure unless ``key`` names another."""
        key = key or self.main
        value, reference = self.rows.get(target, {}).get(key), self.rows.get(to, {}).get(key)
        if value is None or not reference or math.isnan(value) or math.isnan(reference):
            return None
        return value / reference


@dataclass
class Bench:
    """What every shape needs: the options, a scratch directory, the upstream, the checkouts to compare.

    ``go_proxy`` is the binary of awslabs' Go proxy when one was found; the shapes that measure it
    start it with ``proxies(url, go=True)``.
    """

    args: argparse.Namespace
    workdir: Path
    upstream: Upstream
    checkouts: list[Checkout]
    go_proxy: Path | None = None

    @contextmanager
    def proxies(self, upstream_url: str, *, go: bool = False, **options: Any) -> Iterator[dict[str, Proxy]]:
        """One proxy per checkout (``proxy``, ``baseline``), and the Go proxy (``GO``) if ``go`` and found.

        ``options`` go to ``start_proxy`` (only ``ready_path`` to the Go proxy); all are stopped on the way out.
        """
        with ExitStack() as stack:
            started = {}
            for checkout in self.checkouts:
                proxy = start_proxy(
                    self.workdir, checkout, self.upstream, upstream_url, workers=self.args.workers, **options
                )
                stack.callback(proxy.stop)
                started[checkout.label] = proxy
            if go and self.go_proxy is not None:
                ready_path = options.get("ready_path", "/get")
                proxy = start_go_proxy(self.workdir, self.go_proxy, self.upstream, upstream_url, ready_path=ready_path)
                stack.callback(proxy.stop)
                started[GO] = proxy
            yield started


def interleaved(names: list[str], rounds: int) -> Iterator[str]:
    """A B C, C B A, A B C...: a drift in what else the machine runs weighs on every target alike."""
    for round_number in range(rounds):
        yield from names if round_number % 2 == 0 else reversed(names)


def steady_fds(pid: int, timeout: float = 10) -> int:
    """Open descriptors of ``pid``'s tree once the count held still for a second (or ``timeout`` ran out)."""
    deadline = time.monotonic() + timeout
    readings = [open_fds(pid)]
    while (len(readings) < 5 or len(set(readings[-5:])) > 1) and time.monotonic() < deadline:
        time.sleep(0.2)
        readings.append(open_fds(pid))
    return readings[-1]


def fds_back(pids: dict[str, int], idle: dict[str, int], timeout: float) -> dict[str, str]:
    """Wait until each ``name: pid`` holds no more descriptors than ``idle[name]``; say when, or what is left."""
    started = time.monotonic()
    left, back = dict(pids), {}
    while left:
        for name, pid in list(left.items()):
            if (count := open_fds(pid)) <= idle[name]:
                back[name] = f"{idle[name]} → {count} after {time.monotonic() - started:.0f} s"
                del left[name]
        if time.monotonic() - started > timeout:
            back |= {name: f"{idle[name]} → {open_fds(pid)}, not back in {timeout:.0f} s" for name, pid in left.items()}
            break
        time.sleep(0.5)
    return back


def measure_rates(
    bench: Bench, targets: dict[str, tuple[str, int]], connections: int, body_size: int = 0, per_second: float = 0
) -> dict:
    """wrk at each ``name: (url, pid)`` in interleaved slices; req/s, latency, CPU, memory, errors.

    p50/p99 are the request-weighted means of the slices' percentiles. With more than a hundred
    connections, each proxy's descriptors are counted after a light load (8 connections: files opened
    on first use are open, at most a few upstream connections pooled) and again after the last slice,
    until back to that count: pooled upstream connections close within ``IDLE_KEEP`` (30 s) unused.
    (The upstream's count would include the proxies' pooled connections to it: it is not shown.)
    """
    many = connections > 100
    idle_fds = {}
    for name, (url, pid) in targets.items():
        if many and name != "direct":
            wrk(url, 1, 8, 2)
            idle_fds[name] = steady_fds(pid)
    args = bench.args
    script = post_script(bench.workdir, body_size) if body_size else None
    if per_second:  # open loop: each connection paced, so a slice must hold several requests of each
        script = paced_script(bench.workdir, per_second)
    seconds = max(3 if per_second else 1, round(args.duration / args.slices))
    for url, _ in targets.values():
        wrk(url, 1, connections, args.threads, script)  # warm-up: pools filled, code paths loaded
    slices: dict[str, list] = {name: [] for name in targets}
    for name in interleaved(list(targets), args.slices):
        url, pid = targets[name]
        usage = Usage(pid).start()
        slices[name].append((wrk(url, seconds, connections, args.threads, script), usage.stop()))
    fds = fds_back({name: targets[name][1] for name in idle_fds}, idle_fds, 45) if many else {}
    rows = {}
    for name, runs in slices.items():
        requests = sum(load.requests for load, _ in runs)
        cpu = sum(usage.cpu for _, usage in runs)
        weighted = {
            key: sum(getattr(load, key) * load.requests for load, _ in runs) / requests if requests else math.nan
            for key in ("p50_ms", "p99_ms")
        }
        rows[name] = {
            "rps": requests / sum(load.seconds for load, _ in runs),
            **weighted,
            "cpu_us": cpu / requests * 1e6 if requests else math.nan,
            "peak_mib": max(usage.peak_mib for _, usage in runs),
            "errors": sum(load.errors for load, _ in runs),
        }
        if name in fds:
            rows[name]["fds"] = fds[name]
    return rows


RATE_COLUMNS = [
    ("rps", "req/s", ",.0f"),
    ("p50_ms", "p50 ms", ".2f"),
    ("p99_ms", "p99 ms", ".2f"),
    ("cpu_us", "CPU µs/req", ".0f"),
    ("peak_mib", "peak MiB", ".1f"),
    ("errors", "errors", "d"),
]


def rate_shape(
    bench: Bench,
    title: str,
    upstream_url: str,
    path: str,
    *,
    connections: int | None = None,
    body_size: int = 0,
    access_log: bool = False,
    per_second: float = 0,
    go: bool = False,
) -> Shape:
    """Direct, then each checkout's proxy, interleaved; also this one's with its access log on if
    ``access_log``, and the Go proxy if ``go`` and found."""
    connections = connections or bench.args.connections
    shape = Shape(title, "rps", "req/s", RATE_COLUMNS, cpu="cpu_us")
    direct_pid = bench.upstream.nginx.pid
    with ExitStack() as stack:
        proxies = stack.enter_context(bench.proxies(upstream_url, go=go))
        targets = {"direct": (upstream_url + path, direct_pid)}
        targets |= {label: (proxy.url + path, proxy.pid) for label, proxy in proxies.items()}
        if access_log:
            logged = start_proxy(
                bench.workdir,
                bench.checkouts[0],
                bench.upstream,
                upstream_url,
                log_level="info",
                workers=bench.args.workers,
            )
            stack.callback(logged.stop)
            targets["proxy, access log on"] = (logged.url + path, logged.pid)
        progress(f"{title}: {', '.join(targets)}, {bench.args.slices} interleaved slices each")
        shape.rows = measure_rates(bench, targets, connections, body_size, per_second)
    if connections > 100:
        shape.columns = [*RATE_COLUMNS, ("fds", "descriptors: idle → after", "")]
    proxy = shape.rows["proxy"]
    shape.summary = f"p99 {proxy['p99_ms']:.1f} ms, {proxy['cpu_us']:.0f} µs CPU/req, {proxy['errors']} errors"
    if connections > 100:
        shape.summary += f", descriptors {proxy['fds']}"
    if access_log:
        shape.notes.append(f"access log on / off: {cell(shape.ratio('proxy, access log on', 'proxy'), '.2f')} of req/s")
    compare_go(shape)
    return shape


def compare_go(shape: Shape) -> None:
    """If the Go proxy ran: the proxy's main figure, CPU and peak memory over its in the notes, and the
    main figure's ratio in the summary ("1.62x Go")."""
    if GO not in shape.rows:
        return
    ratio = cell(shape.ratio("proxy", GO), ".2f")
    note = f"proxy / {GO}: {ratio} ({shape.unit})"
    if shape.cpu:
        note += f", CPU {cell(shape.ratio('proxy', GO, shape.cpu), '.2f')}"
    if any(key == "peak_mib" for key, _, _ in shape.columns):
        note += f", peak memory {cell(shape.ratio('proxy', GO, 'peak_mib'), '.2f')}"
    shape.notes.append(note)
    shape.summary += f", {ratio}x Go"


# ---------------------------------------------------------------- the shapes


def shape_get(bench: Bench) -> Shape:
    """Small signed GETs to a plain-HTTP upstream; also with the access log on."""
    return rate_shape(bench, "small GET, plain HTTP upstream", bench.upstream.url, "/get", access_log=True, go=True)


def shape_tls(bench: Bench) -> Shape:
    """Small signed GETs to a TLS upstream (what API Gateway always is); direct is wrk speaking TLS itself."""
    return rate_shape(bench, "small GET, TLS upstream", bench.upstream.tls_url, "/get", go=True)


def shape_post(bench: Bench) -> Shape:
    """1 MiB signed POSTs; nginx answers only after reading the whole body."""
    return rate_shape(bench, "1 MiB POST", bench.upstream.url, "/post", body_size=MIB, go=True)


def shape_conns(bench: Bench) -> Shape:
    """Many concurrent keep-alive clients doing small GETs at a fixed offered rate: errors, p99, descriptors.

    Open loop (each connection paced by wrk's ``delay()``), well below capacity: in a closed loop
    (every connection sending again as soon as answered) p99 is only connections over throughput.
    """
    count, per_second = bench.args.many, bench.args.many_rate / bench.args.many
    shape = rate_shape(
        bench,
        f"{count:,} keep-alive connections, {bench.args.many_rate:,} small GETs/s offered",
        bench.upstream.url,
        "/get",
        connections=count,
        per_second=per_second,
    )
    shape.main, shape.unit = "p99_ms", "p99 ms"
    shape.summary = shape.summary.replace(
        f"p99 {shape.rows['proxy']['p99_ms']:.1f} ms", f"{shape.rows['proxy']['rps']:,.0f} req/s"
    )
    return shape


def shape_stream(bench: Bench) -> Shape:
    """A large download (nginx sendfile upstream): throughput, CPU, peak memory, time to first byte added.

    nginx as a reverse proxy on the same path is measured too: a relay written in C, for reference;
    and the Go proxy when found (it reads the whole answer before it sends the first byte).
    """
    args, upstream = bench.args, bench.upstream
    size = args.size_bytes
    path, probe_path = upstream.file(size), upstream.file(MIB)
    shape = Shape(
        f"{size / MIB:g} MiB streamed download",
        "mb_s",
        "MB/s",
        [
            ("mb_s", "MB/s", ",.0f"),
            ("cpu_s_gib", "CPU s/GiB", ".2f"),
            ("peak_mib", "peak MiB", ".1f"),
            ("ttfb_ms", "first byte ms (1 MiB)", ".2f"),
        ],
        cpu="cpu_s_gib",
    )
    with bench.proxies(upstream.url, go=True) as proxies:
        relay, relay_url = start_relay(bench.workdir, upstream.url)
        try:
            targets = {"direct": (upstream.url, upstream.nginx.pid)}
            targets |= {label: (proxy.url, proxy.pid) for label, proxy in proxies.items()}
            targets["nginx as a relay"] = (relay_url, relay.pid)
            for url, _ in targets.values():
                for _ in range(4):  # every worker has a pooled upstream connection, most likely
                    download(url + probe_path, MIB)
            runs: dict[str, list] = {name: [] for name in targets}
            progress(f"{shape.title}: {', '.join(targets)}, {args.stream_rounds} rounds")
            for name in interleaved(list(targets), args.stream_rounds):
                url, pid = targets[name]
                usage = Usage(pid).start()
                seconds = download(url + path, size)[1]
                runs[name].append((seconds, usage.stop()))
            probes: dict[str, list[float]] = {name: [] for name in targets}
            for name in interleaved(list(targets), 10):
                probes[name].append(download(targets[name][0] + probe_path, MIB)[0])
        finally:
            stop_process(relay)
    for name, measured in runs.items():
        shape.rows[name] = {
            "mb_s": statistics.median(size / 1e6 / seconds for seconds, _ in measured),
            "cpu_s_gib": statistics.median(usage.cpu / (size / 2**30) for _, usage in measured),
            "peak_mib": max(usage.peak_mib for _, usage in measured),
            "ttfb_ms": statistics.median(probes[name]) * 1000,
        }
    proxy = shape.rows["proxy"]
    added = proxy["ttfb_ms"] - shape.rows["direct"]["ttfb_ms"]
    over_relay = cell(shape.ratio("proxy", "nginx as a relay"), ".2f")
    shape.summary = f"peak {proxy['peak_mib']:.0f} MiB, first byte +{added:.2f} ms, {over_relay}x nginx's relay"
    compare_go(shape)
    return shape


def shape_sse(bench: Bench) -> Shape:
    """Concurrent server-sent-event streams, an event every 100 ms each: delivery latency, CPU per event."""
    args, app_url = bench.args, bench.upstream.app_url
    interval = 0.1
    events = max(1, round(args.sse_seconds / interval))
    shape = Shape(
        f"{args.sse_streams} SSE streams, an event every 100 ms each",
        "p99_ms",
        "delivery p99 ms",
        [
            ("delivered", "events delivered", ""),
            ("p50_ms", "delivery p50 ms", ".2f"),
            ("p99_ms", "delivery p99 ms", ".2f"),
            ("cpu_us", "CPU µs/event", ".0f"),
            ("peak_mib", "peak MiB", ".1f"),
        ],
        cpu="cpu_us",
    )
    with bench.proxies(app_url) as proxies:
        targets = {"direct": (app_url, bench.upstream.app.pid)}
        targets |= {label: (proxy.url, proxy.pid) for label, proxy in proxies.items()}
        for name, (url, pid) in targets.items():
            progress(f"{shape.title}: {name}")
            usage = Usage(pid).start()
            result = run_async(sse_streams(url, args.sse_streams, events, interval))
            usage.stop()
            shape.rows[name] = {
                "delivered": f"{result.delivered}/{result.expected}",
                "p50_ms": percentile(result.latencies_ms, 0.5),
                "p99_ms": percentile(result.latencies_ms, 0.99),
                "cpu_us": usage.cpu / result.delivered * 1e6 if result.delivered else math.nan,
                "peak_mib": usage.peak_mib,
            }
    shape.summary = f"p50 {shape.rows['proxy']['p50_ms']:.2f} ms, {shape.rows['proxy']['delivered']} delivered"
    return shape


def shape_startup(bench: Bench) -> Shape:
    """Spawn to the first 200 through the proxy, and its idle resident memory (no direct target here)."""
    runs: dict[str, list[tuple[float, float, float]]] = {checkout.label: [] for checkout in bench.checkouts}
    for _ in range(bench.args.startup_runs):
        for checkout in bench.checkouts:
            progress(f"start-up: {checkout.label}")
            proxy = start_proxy(bench.workdir, checkout, bench.upstream, bench.upstream.url, workers=bench.args.workers)
            try:
                time.sleep(0.5)  # idle
                rss = [rss / 1024 for rss, _ in memory_kib(proxy.pid)]
                runs[checkout.label].append((proxy.started_s * 1000, max(rss), sum(rss)))
            finally:
                proxy.stop()
    shape = Shape(
        "start-up and idle memory",
        "ready_ms",
        "ms to the first 200",
        [
            ("ready_ms", "spawn to first 200 ms", ".0f"),
            ("largest_mib", "idle RSS, largest process MiB", ".1f"),
            ("total_mib", "idle RSS, all processes MiB", ".1f"),
        ],
    )
    for label, measured in runs.items():
        shape.rows[label] = {
            key: statistics.median(run[index] for run in measured)
            for index, key in enumerate(("ready_ms", "largest_mib", "total_mib"))
        }
    shape.summary = f"idle RSS {shape.rows['proxy']['largest_mib']:.1f} MiB largest process"
    return shape


def shape_idle(bench: Bench) -> Shape:
    """Resident memory per idle WebSocket and per idle SSE stream, one worker, a fresh proxy per kind.

    A fresh proxy per kind: memory freed by closing one kind's connections would hide the next one's cost.
    """
    count = bench.args.idle_connections
    shape = Shape(
        f"{count:,} idle connections, one worker",
        "ws_kib",
        "KiB per WebSocket",
        [("ws_kib", "KiB per idle WebSocket", ".1f"), ("sse_kib", "KiB per idle SSE stream", ".1f")],
    )
    for kind in ("ws", "sse"):
        for checkout in bench.checkouts:
            progress(f"{count} idle {kind} connections: {checkout.label}")
            app_url = bench.upstream.app_url
            proxy = start_proxy(bench.workdir, checkout, bench.upstream, app_url, workers=1)
            try:

                async def settled_rss(pid: int = proxy.pid) -> int:
                    await asyncio.sleep(1)  # handshakes done, the allocator settled
                    return memory_kib(pid)[0][0]

                run_async(hold_idle(proxy.url, kind, 20, lambda: asyncio.sleep(0)))  # warm-up: first-use allocations
                before_kib = run_async(settled_rss())
                after_kib = run_async(hold_idle(proxy.url, kind, count, settled_rss))
            finally:
                proxy.stop()
            shape.rows.setdefault(checkout.label, {})[f"{kind}_kib"] = (after_kib - before_kib) / count
    shape.summary = f"{shape.rows['proxy']['sse_kib']:.1f} KiB per idle SSE stream"
    return shape


def shape_forward(bench: Bench) -> Shape:
    """Forward mode: small GETs through ``CONNECT`` with the proxy's TLS termination, keep-alive inside
    the tunnel, beside reverse mode (plain HTTP to the proxy) and direct, all from the same client.

    wrk has no CONNECT, so the client is ``load.keepalive_gets`` (Python, uvloop when installed): it
    costs a core of its own, so its rates are lower than wrk's; the ratio forward / reverse is the
    figure (target 0.8). One proxy serves both modes: a route for reverse, a forward rule whose
    ``connect_to`` dials nginx. Baselines older than forward mode are not started here.
    """
    args, upstream = bench.args, bench.upstream
    ca_dir = bench.workdir / "forward-ca"
    extra = forward_config(ca_dir, upstream.url)
    proxy = start_proxy(
        bench.workdir, bench.checkouts[0], upstream, upstream.url, workers=args.workers, extra_config=extra
    )
    try:
        context = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
        nginx_port = int(upstream.url.rsplit(":", 1)[1])
        targets = {
            "direct": (nginx_port, None, upstream.nginx.pid),
            "proxy": (proxy.port, (FORWARD_HOST, context), proxy.pid),
            "reverse mode, same proxy": (proxy.port, None, proxy.pid),
        }
        loop = uvloop_runner()
        seconds = max(1, round(args.duration / args.slices))
        for port, tunnel, _ in targets.values():  # warm-up: pools filled, certificates minted
            loop(keepalive_gets(port, "/get", args.connections, 0.5, tunnel))
        progress(f"forward mode: {', '.join(targets)}, {args.slices} interleaved slices each")
        runs: dict[str, list] = {name: [] for name in targets}
        for name in interleaved(list(targets), args.slices):
            port, tunnel, pid = targets[name]
            usage = Usage(pid).start()
            runs[name].append((*loop(keepalive_gets(port, "/get", args.connections, seconds, tunnel)), usage.stop()))
    finally:
        proxy.stop()
    shape = Shape(
        "small GET through CONNECT + TLS (forward mode), one Python client",
        "rps",
        "req/s",
        [col for col in RATE_COLUMNS if col[0] != "peak_mib"],
        cpu="cpu_us",
    )
    for name, measured in runs.items():
        requests = sum(result.requests for result, _, _ in measured)
        latencies = [ms for result, _, _ in measured for ms in result.latencies_ms]
        shape.rows[name] = {
            "rps": requests / sum(elapsed for _, elapsed, _ in measured),
            "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99),
            "cpu_us": sum(usage.cpu for _, _, usage in measured) / requests * 1e6 if requests else math.nan,
            "errors": sum(result.errors for result, _, _ in measured),
        }
    forward_share = shape.ratio("proxy", "reverse mode, same proxy")
    shape.notes.append(f"forward / reverse: {cell(forward_share, '.2f')} of req/s (target 0.80)")
    shape.summary = f"{cell(forward_share, '.2f')}x reverse mode's req/s, {shape.rows['proxy']['errors']} errors"
    return shape


def uvloop_runner() -> Callable[[Any], Any]:
    """``asyncio.run`` on uvloop when it is installed (a faster client), else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def shape_unsigned(bench: Bench) -> Shape:
    """Large ``payload: unsigned`` uploads (PUT, streamed upstream unhashed): MB/s and peak memory.

    The upstream is bench/upstream.py's ``/sink`` (aiohttp, reads and drops the body); the client
    sends from one 1 MiB buffer. Baselines older than payload modes are not started here.
    """
    args, upstream = bench.args, bench.upstream
    size = args.upload_size
    shape = Shape(
        f"{size / MIB:g} MiB upload, payload: unsigned",
        "mb_s",
        "MB/s",
        [("mb_s", "MB/s", ",.0f"), ("cpu_s_gib", "CPU s/GiB", ".2f"), ("peak_mib", "peak MiB", ".1f")],
        cpu="cpu_s_gib",
    )
    proxy = start_proxy(
        bench.workdir, bench.checkouts[0], upstream, upstream.app_url, workers=args.workers,
        route_options=", payload: unsigned",
    )  # fmt: skip
    try:
        targets = {"direct": (upstream.app_url, upstream.app.pid), "proxy": (proxy.url, proxy.pid)}
        for url, _ in targets.values():
            upload(url + "/sink", MIB)  # warm-up
        progress(f"{shape.title}: {', '.join(targets)}, {args.stream_rounds} rounds")
        runs: dict[str, list] = {name: [] for name in targets}
        for name in interleaved(list(targets), args.stream_rounds):
            url, pid = targets[name]
            usage = Usage(pid).start()
            seconds = upload(url + "/sink", size)
            runs[name].append((seconds, usage.stop()))
    finally:
        proxy.stop()
    for name, measured in runs.items():
        shape.rows[name] = {
            "mb_s": statistics.median(size / 1e6 / seconds for seconds, _ in measured),
            "cpu_s_gib": statistics.median(usage.cpu / (size / 2**30) for _, usage in measured),
            "peak_mib": max(usage.peak_mib for _, usage in measured),
        }
    shape.summary = f"peak {shape.rows['proxy']['peak_mib']:.0f} MiB"
    return shape


SHAPES: dict[str, Callable[[Bench], Shape]] = {
    "get": shape_get,
    "tls": shape_tls,
    "post": shape_post,
    "conns": shape_conns,
    "stream": shape_stream,
    "sse": shape_sse,
    "startup": shape_startup,
    "idle": shape_idle,
    "forward": shape_forward,
    "unsigned": shape_unsigned,
}
DEFAULT_SHAPES = ("get", "tls", "post", "conns", "forward", "stream", "unsigned", "sse", "startup", "idle")


# ---------------------------------------------------------------- the report


def cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return value if isinstance(value, str) else format(value, spec)


def target_label(name: str, versions: dict[str, str]) -> str:
    return f"{name} ({versions[name]})" if name in versions else name


def shape_table(shape: Shape, versions: dict[str, str]) -> str:
    has_direct = "direct" in shape.rows
    headings = [heading for _, heading, _ in shape.columns] + (["vs direct"] if has_direct else [])
    lines = [
        f"### {shape.title}",
        "",
        "| target | " + " | ".join(headings) + " |",
        "| --- |" + " ---: |" * len(headings),
    ]
    for name, row in shape.rows.items():
        cells = [cell(row.get(key), spec) for key, _, spec in shape.columns]
        if has_direct:
            cells.append(cell(shape.ratio(name), ".2f"))
        lines.append(f"| {target_label(name, versions)} | " + " | ".join(cells) + " |")
    if "baseline" in shape.rows:
        lines += ["", f"proxy / baseline: {cell(shape.ratio('proxy', 'baseline'), '.2f')} ({shape.unit})"]
        if shape.cpu:
            lines[-1] += f", CPU {cell(shape.ratio('proxy', 'baseline', shape.cpu), '.2f')}"
    return "\n".join([*lines, "", *shape.notes])


def summary_table(shapes: list[Shape]) -> str:
    baseline = any("baseline" in shape.rows for shape in shapes)
    headings = ["shape", "figure", "direct", "proxy", "proxy / direct"]
    headings += ["baseline", "proxy / baseline", "CPU proxy / baseline"] if baseline else []
    lines = [
        "| " + " | ".join([*headings, "also"]) + " |",
        "| --- | --- |" + " ---: |" * (len(headings) - 2) + " --- |",
    ]
    for shape in shapes:
        spec = next(spec for key, _, spec in shape.columns if key == shape.main)
        cells = [
            shape.title,
            shape.unit,
            cell(shape.rows.get("direct", {}).get(shape.main), spec),
            cell(shape.rows["proxy"].get(shape.main), spec),
            cell(shape.ratio("proxy"), ".2f"),
        ]
        if baseline:
            cells += [
                cell(shape.rows.get("baseline", {}).get(shape.main), spec),
                cell(shape.ratio("proxy", "baseline"), ".2f"),
                cell(shape.ratio("proxy", "baseline", shape.cpu) if shape.cpu else None, ".2f"),
            ]
        lines.append("| " + " | ".join([*cells, shape.summary]) + " |")
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


# ---------------------------------------------------------------- main


def parse_size(text: str) -> int:
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "": 1}
    number = text.strip().rstrip("kKmMgGiIbB")
    try:
        return int(float(number) * units[text.strip()[len(number) :].lower()])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a size such as 256MiB or 1GiB, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated, of {','.join(SHAPES)}")
    parser.add_argument("--baseline", type=Path, help="another checkout whose proxy runs side by side with this one")
    parser.add_argument("--duration", type=float, default=8, help="seconds of load per target and shape (default 8)")
    parser.add_argument("--slices", type=int, default=4, help="interleaved slices the duration is cut into (4)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--many", type=int, default=1000, help="connections of the conns shape (default 1000)")
    parser.add_argument("--many-rate", type=int, default=1000, help="requests/s the conns shape offers (1000)")
    parser.add_argument("--size", dest="size_bytes", type=parse_size, default="256MiB", help="stream size")
    parser.add_argument("--upload-size", type=parse_size, default="256MiB", help="unsigned upload size")
    parser.add_argument("--stream-rounds", type=int, default=3, help="downloads per target (default 3)")
    parser.add_argument("--sse-streams", type=int, default=200)
    parser.add_argument("--sse-seconds", type=float, default=5.0)
    parser.add_argument("--startup-runs", type=int, default=3)
    parser.add_argument("--idle-connections", type=int, default=1000)
    parser.add_argument("--workers", type=int, help="proxy worker processes (default: the proxy's, auto)")
    parser.add_argument(
        "--go-proxy",
        type=Path,
        help="awslabs' aws-sigv4-proxy, measured in get, tls, post and stream (default: the one on PATH)",
    )
    parser.add_argument("--json", action="store_true", help="also print every figure as JSON")
    args = parser.parse_args(argv)
    args.shape_list = [name.strip() for name in args.shapes.split(",") if name.strip()]
    if not args.shape_list or set(args.shape_list) - set(SHAPES):
        parser.error(f"--shapes: expected some of {','.join(SHAPES)}")
    if args.baseline is not None and not (args.baseline / "proxy" / "__main__.py").exists():
        parser.error(f"--baseline: {args.baseline} holds no proxy/ checkout")
    if args.go_proxy is not None and not os.access(args.go_proxy, os.X_OK):
        parser.error(f"--go-proxy: {args.go_proxy} is not an executable file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_tools()
    checkouts = [Checkout("proxy", ROOT)]
    if args.baseline is not None:
        checkouts.append(Checkout("baseline", args.baseline.resolve()))
    versions = {checkout.label: checkout.version() for checkout in checkouts}
    go_proxy = find_go_proxy(args.go_proxy)
    if go_proxy is None and {"get", "tls", "post", "stream"} & set(args.shape_list):
        progress(f"aws-sigv4-proxy not found, its rows are left out: {GO_PROXY_HOWTO}")
    environment = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "nginx": nginx_version(),
        "fd_limit": raise_fd_limit(),
        "wrk": f"-t{args.threads} -c{args.connections}, {args.slices} interleaved slices of "
        f"{max(1, round(args.duration / args.slices))} s per target",
        "workers": args.workers or "auto",
        "versions": versions,
    }
    if go_proxy is not None:
        environment["go_proxy"] = go_proxy_version(go_proxy)
    workdir = Path(tempfile.mkdtemp(prefix="signing-proxy-bench-"))
    shapes: list[Shape] = []
    notes: list[str] = []
    started = time.monotonic()
    try:
        progress("starting nginx and the built-in upstream")
        upstream = start_upstream(workdir)
        try:
            bench = Bench(args, workdir, upstream, checkouts, go_proxy)
            for name in args.shape_list:
                try:
                    shapes.append(SHAPES[name](bench))
                except NotImplementedError as missing:
                    notes.append(f"{name}: skipped, {missing}")
        finally:
            upstream.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    environment["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    environment["seconds"] = round(time.monotonic() - started)
    print(
        f"Run of {environment['date']} on {environment['cpus']} CPUs (load average {environment['load_before']} "
        f"before, {environment['load_after']} after), {environment['seconds']} s; Python {environment['python']}, "
        f"nginx {environment['nginx']}, wrk {environment['wrk']}; proxy workers: {environment['workers']}; "
        + "; ".join(f"{label}: {version}" for label, version in versions.items())
        + (f"; {GO}: {environment['go_proxy']}" if go_proxy is not None else "")
        + ".\n"
    )
    for shape in shapes:
        print(shape_table(shape, versions) + "\n")
    print("### Summary\n\n" + summary_table(shapes))
    for note in notes:
        print(f"\n{note}")
    if args.json:
        print(json.dumps(without_nan({"environment": environment, "shapes": [asdict(s) for s in shapes]}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
