"""Benchmark plumbing: ports, child processes (upstreams, nginx, the proxy), and /proc readings.

Every process started here is started in its own session and stopped by its own
pid (SIGTERM, then SIGKILL to its process group after a grace period), so a
benchmark never leaves anything behind and never touches a process it did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ENV = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "PYTHONUNBUFFERED": "1"}
SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """``1GiB``, ``512MiB``, ``100MB`` or a number of bytes."""
    number = text.strip().rstrip("bBiIkKmMgG")
    unit = text.strip()[len(number) :].lower()
    try:
        return int(float(number) * SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(f"expected a size such as 1GiB or 512MiB, got {text!r}") from None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_port(port: int, timeout: float = 15, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with status {process.returncode} before listening")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.01)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


def run_async(coroutine):  # type: ignore[no-untyped-def]
    """Run a coroutine on uvloop when installed (a faster client disturbs the measurement less)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


# ---------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from `state` on; comm may hold spaces


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (workers may be child processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue.extend(children.get(current, ()))
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and its descendants, reaped children included."""
    ticks = 0
    for index, member in enumerate(process_tree(pid)):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        if index == 0:
            ticks += int(fields[13]) + int(fields[14])  # cutime, cstime: children that exited and were reaped
    return ticks / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of one process, in KiB (zeros if it is gone)."""
    fields = {"VmRSS": 0, "VmHWM": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            fields[name] = int(value.split()[0])
    return fields


def tree_memory_kib(pid: int) -> tuple[int, int, list[int]]:
    """(summed VmRSS, summed VmHWM, VmRSS of each process) over ``pid``'s tree."""
    readings = [memory_kib(member) for member in process_tree(pid)]
    return sum(r["VmRSS"] for r in readings), sum(r["VmHWM"] for r in readings), [r["VmRSS"] for r in readings]


def tree_pss_kib(pid: int) -> int | None:
    """Proportional set size summed over ``pid``'s tree: pages shared after fork counted once (None if unreadable)."""
    total = 0
    for member in process_tree(pid):
        try:
            text = Path(f"/proc/{member}/smaps_rollup").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current VmRSS for the tree (``clear_refs`` 5, Linux 4.0+); False if refused."""
    done = True
    for member in process_tree(pid):
        try:
            Path(f"/proc/{member}/clear_refs").write_text("5")
        except OSError:
            done = False
    return done


@dataclass
class Usage:
    """CPU and memory of a process tree over one measured phase."""

    pid: int
    cpu_start: float = 0.0
    cpu: float = 0.0
    rss_before_kib: int = 0
    peak_kib: int = 0
    peak_reset: bool = False

    def start(self) -> Usage:
        self.peak_reset = reset_peak(self.pid)
        self.rss_before_kib = tree_memory_kib(self.pid)[0]
        self.cpu_start = cpu_seconds(self.pid)
        return self

    def stop(self) -> Usage:
        self.cpu = cpu_seconds(self.pid) - self.cpu_start
        self.peak_kib = max(tree_memory_kib(self.pid)[1], self.rss_before_kib)
        return self


# ---------------------------------------------------------------- children


def stop_process(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL to the process group it leads (it was started in its own session)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(grace)
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # leftovers of a group whose leader exited


@dataclass
class Upstream:
    """Where each kind of request goes, and the processes serving them."""

    fast_url: str  # small GET and 1 MiB POST
    app_url: str  # 1 GiB stream, SSE
    fast_kind: str  # "nginx 1.22.1" or "built-in"
    post_url: str = ""  # where POSTs go (nginx only when it was verified to read bodies)
    post_kind: str = ""
    fast_pid: int = 0
    post_pid: int = 0
    app_pid: int = 0
    processes: list[subprocess.Popen] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process)


def start_builtin(fast: bool, app: bool) -> tuple[subprocess.Popen, int | None, int | None]:
    fast_port, app_port = (free_port() if fast else None), (free_port() if app else None)
    command = [sys.executable, str(BENCH / "upstream.py")]
    if fast_port:
        command += ["--fast-port", str(fast_port)]
    if app_port:
        command += ["--app-port", str(app_port)]
    process = subprocess.Popen(command, env=ENV, start_new_session=True, stdin=subprocess.DEVNULL)
    for port in (fast_port, app_port):
        if port:
            wait_port(port, process=process)
    return process, fast_port, app_port


NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    log_format bench '$request_length';
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location = /get {{ default_type application/json; return 200 '{{"ok":true}}'; }}
        # `return` answers before reading a body; mirror reads the whole body first (precontent
        # phase), then the static handler refuses POST on the file and error_page turns that into
        # a 200 with the file's JSON. So the answer comes only after the whole body was read.
        location = /post {{
            client_max_body_size 2m; client_body_buffer_size 2m;
            root {dir}; mirror /sink; mirror_request_body on; error_page 405 =200 /received.json;
        }}
        location = /post-check {{
            client_max_body_size 2m; client_body_buffer_size 2m;
            root {dir}; mirror /sink; mirror_request_body on; error_page 405 =200 /checked.json;
        }}
        location = /sink {{ internal; return 204; }}
        location = /received.json {{ internal; root {dir}; default_type application/json; }}
        # the log line is written in the location that answers: the request length includes the body read
        location = /checked.json {{
            internal; root {dir}; default_type application/json; access_log {dir}/check.log bench;
        }}
    }}
}}
"""


def nginx_version() -> str | None:
    if not shutil.which("nginx"):
        return None
    result = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10)
    return (result.stderr or result.stdout).strip().rpartition("/")[2] or "?"


# nginx as a reverse proxy in front of the built-in upstream: a reference relay written in C for
# the stream scenario (buffering on, in memory only: nginx's fastest setting on this path).
NGINX_RELAY_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    proxy_temp_path {dir}/proxy;
    client_body_temp_path {dir}/body;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream app {{ server 127.0.0.1:{upstream_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_buffering on; proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


def start_nginx(
    workdir: Path, template: str = NGINX_CONF, name: str = "nginx", **fields: int
) -> tuple[subprocess.Popen, int]:
    """nginx in the foreground, everything (pid, logs, temp paths) under ``workdir / name``."""
    directory = workdir / name
    directory.mkdir()
    os.chmod(workdir, 0o755)  # workers run as an unprivileged user when started by root
    os.chmod(directory, 0o755)
    for name in ("post", "post-check", "received.json", "checked.json"):
        (directory / name).write_text('{"received":true}')
        os.chmod(directory / name, 0o644)
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(template.format(dir=directory, port=port, **fields))
    process = subprocess.Popen(
        ["nginx", "-e", str(directory / "error.log"), "-p", str(directory), "-c", str(conf), "-g", "daemon off;"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, process=process)
    except RuntimeError:
        stop_process(process)
        log = directory / "error.log"
        raise RuntimeError(log.read_text()[-500:] if log.exists() else "nginx did not start") from None
    return process, port


async def _post_and_read(port: int, path: str, body: bytes) -> tuple[int, float, float]:
    """(status, seconds until the last body byte was written, seconds until the answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode()
    )
    writer.write(body)
    await writer.drain()
    sent = time.perf_counter() - started
    head = await reader.readuntil(b"\r\n\r\n")
    answered = time.perf_counter() - started
    writer.close()
    return int(head.split()[1]), sent, answered


def nginx_reads_post_bodies(workdir: Path, port: int, size: int = 1 << 20) -> bool:
    """True when nginx logged the whole body as read for a POST to the twin of /post."""
    status, _, _ = asyncio.run(asyncio.wait_for(_post_and_read(port, "/post-check", b"x" * size), 10))
    log = workdir / "nginx" / "check.log"
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        lines = log.read_text().split() if log.exists() else []
        if lines:
            return status == 200 and int(lines[-1]) >= size
        time.sleep(0.02)
    return False


def start_upstreams(workdir: Path, use_nginx: bool = True) -> Upstream:
    """nginx (when installed and allowed) for GET and POST, the built-in upstream for the rest."""
    version = nginx_version() if use_nginx else None
    nginx_port = None
    upstream_processes = []
    notes = []
    if version:
        try:
            process, nginx_port = start_nginx(workdir)
            upstream_processes.append(process)
        except (RuntimeError, OSError) as error:
            notes.append(f"nginx did not start ({error}); using the built-in upstream")
            version = None
    post_via_nginx = bool(nginx_port) and nginx_reads_post_bodies(workdir, nginx_port)
    if nginx_port and not post_via_nginx:
        notes.append("nginx did not show reading whole POST bodies; POSTs go to the built-in upstream")
    builtin, fast_port, app_port = start_builtin(fast=not (nginx_port and post_via_nginx), app=True)
    upstream_processes.append(builtin)
    nginx_url = f"http://127.0.0.1:{nginx_port}" if nginx_port else ""
    fast_url = f"http://127.0.0.1:{fast_port}" if fast_port else ""
    return Upstream(
        fast_url=nginx_url or fast_url,
        app_url=f"http://127.0.0.1:{app_port}",
        fast_kind=f"nginx {version}" if nginx_port else "built-in (asyncio protocol)",
        post_url=nginx_url if post_via_nginx else fast_url,
        post_kind=f"nginx {version}" if post_via_nginx else "built-in (asyncio protocol)",
        fast_pid=upstream_processes[0].pid if nginx_port else builtin.pid,
        post_pid=upstream_processes[0].pid if post_via_nginx else builtin.pid,
        app_pid=builtin.pid,
        processes=upstream_processes,
        notes=notes,
    )


# ---------------------------------------------------------------- the proxy


def proxy_version() -> str:
    """The commit the proxy's code comes from, and whether proxy/ differs from it (read-only git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "proxy"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if not commit:
        return "unknown"
    return f"commit {commit}" + (", with uncommitted changes in proxy/" if changed else "")


def proxy_supports_workers() -> bool:
    """Whether this proxy knows a ``workers`` setting (its run --help or its config module mention it)."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "run", "--help"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if "workers" in result.stdout:
            return True
    except (OSError, subprocess.TimeoutExpired):
        pass
    config = ROOT / "proxy" / "config.py"
    return config.exists() and "workers" in config.read_text()


def proxy_config(port: int, upstream_url: str, log_level: str = "warning", workers: int | None = None) -> str:
    text = (
        f"listen: 127.0.0.1:{port}\nlog_level: {log_level}\nshutdown_grace: 2s\n"
        "credentials:\n  bench: {type: static, access_key_id: AKIDBENCHMARK0000000, secret_access_key: bench-secret}\n"
        f"routes:\n  - {{path_prefix: /, upstream: '{upstream_url}', region: us-east-1, credentials: bench}}\n"
    )
    if workers is not None:
        text += f"workers: {workers}\n"
    return text


@dataclass
class Proxy:
    process: subprocess.Popen
    port: int
    config: Path
    stderr_path: Path | None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr_tail(self) -> str:
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        stop_process(self.process)


def spawn_proxy(
    workdir: Path, upstream_url: str, log_level: str = "warning", workers: int | None = None
) -> tuple[Proxy, float]:
    """Start ``python -m proxy run --config FILE``; returns it and the monotonic time of the spawn.

    With ``log_level: info`` its stderr (the access log) goes to /dev/null, else to a file shown on failure.
    """
    port = free_port()
    config = Path(tempfile.mkstemp(prefix="proxy-", suffix=".yaml", dir=workdir)[1])
    config.write_text(proxy_config(port, upstream_url, log_level, workers))
    stderr_path = None if log_level in ("info", "debug") else config.with_suffix(".stderr")
    stderr = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
    spawned = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        cwd=ROOT,
        env=ENV,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    if stderr_path:
        stderr.close()
    return Proxy(process, port, config, stderr_path), spawned


async def first_ok(port: int, path: str, deadline: float) -> float:
    """Poll until ``GET path`` answers 200; returns the monotonic time it did."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.005)
            continue
        try:
            writer.write(request)
            status_line = await asyncio.wait_for(reader.readline(), max(0.1, deadline - time.monotonic()))
            await reader.read()  # to the end: the answer is complete
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            status_line = b""
        finally:
            writer.close()
        if status_line.split()[1:2] == [b"200"]:
            return time.monotonic()
        await asyncio.sleep(0.005)
    raise RuntimeError(f"no 200 from 127.0.0.1:{port}{path} in time")


def start_proxy(
    workdir: Path, upstream_url: str, log_level: str = "warning", workers: int | None = None, timeout: float = 20
) -> tuple[Proxy, float]:
    """Start the proxy and wait for its first 200; returns it and seconds from spawn to that 200."""
    proxy, spawned = spawn_proxy(workdir, upstream_url, log_level, workers)
    try:
        ready = asyncio.run(first_ok(proxy.port, "/get", spawned + timeout))
    except RuntimeError:
        tail = proxy.stderr_tail()
        proxy.stop()
        raise RuntimeError(f"the proxy did not answer 200 within {timeout:g}s\n{tail}") from None
    return proxy, ready - spawned


DOWNLOAD_CHUNK = 256 * 1024


async def download(url: str) -> tuple[float, float, int]:
    """(time to first byte, total seconds, bytes) for one GET, reading with a raw socket."""
    host, _, rest = url.split("://", 1)[1].partition("/")
    hostname, _, port = host.partition(":")
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(hostname, int(port))
    writer.write(f"GET /{rest} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
    first = await reader.read(DOWNLOAD_CHUNK)
    ttfb = time.perf_counter() - started
    received = len(first)
    while received < length:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    total = time.perf_counter() - started
    writer.close()
    return ttfb, total, received
