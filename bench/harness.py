"""Benchmark plumbing: child processes (nginx, the built-in upstream, proxies of one or two checkouts,
awslabs' Go proxy) and /proc.

Every process started here runs in its own session and is stopped by its own pid (SIGTERM, then
SIGKILL to its process group after a grace period): a benchmark never leaves anything behind and
never touches a process it did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ENV = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "PYTHONUNBUFFERED": "1"}


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with status {process.returncode} before listening")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.01)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard one, for this process and every child (wrk -c1000, the proxy)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run_async(coroutine):  # type: ignore[no-untyped-def]
    """Run a client coroutine on uvloop when installed: a faster client disturbs the measurement less."""
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
    """``pid`` and its live descendants (the proxy's workers are child processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue.extend(children.get(current, ()))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid``'s tree, reaped children included."""
    ticks = 0
    for index, member in enumerate(process_tree(pid)):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
        if index == 0:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def memory_kib(pid: int) -> list[tuple[int, int]]:
    """(VmRSS, VmHWM) in KiB of each process of ``pid``'s tree."""
    readings = []
    for member in process_tree(pid):
        fields = {"VmRSS": 0, "VmHWM": 0}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in fields:
                    fields[name] = int(value.split()[0])
        readings.append((fields["VmRSS"], fields["VmHWM"]))
    return readings


def open_fds(pid: int) -> int:
    """File descriptors open in ``pid``'s tree."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{member}/fd"))
    return total


@dataclass
class Usage:
    """CPU of a process tree over one measured phase, and its largest process's peak resident memory.

    The peak is VmHWM after resetting it at the start (``clear_refs`` 5), so it belongs to this phase.
    """

    pid: int
    cpu: float = 0.0
    peak_mib: float = 0.0

    def start(self) -> Usage:
        for member in process_tree(self.pid):
            with contextlib.suppress(OSError):
                Path(f"/proc/{member}/clear_refs").write_text("5")
        self._cpu_start = cpu_seconds(self.pid)
        return self

    def stop(self) -> Usage:
        self.cpu = cpu_seconds(self.pid) - self._cpu_start
        self.peak_mib = max((max(rss, hwm) for rss, hwm in memory_kib(self.pid)), default=0) / 1024
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


def spawn(command: list[str], port: int, **options: object) -> subprocess.Popen:
    """Start ``command`` in its own session and wait until it listens on ``port``."""
    process = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL, **options)  # type: ignore[call-overload]
    try:
        wait_port(port, process)
    except RuntimeError:
        stop_process(process)
        raise
    return process


def start_app_upstream() -> tuple[subprocess.Popen, str]:
    """bench/upstream.py: server-sent events and a WebSocket echo."""
    port = free_port()
    process = spawn([sys.executable, str(BENCH / "upstream.py"), str(port)], port, env=ENV)
    return process, f"http://127.0.0.1:{port}"


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, made by openssl; the certificate is its own trust anchor."""
    cert, key = directory / "upstream-cert.pem", directory / "upstream-key.pem"
    command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=127.0.0.1"
    arguments = ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run([*command.split(), *arguments], check=True, capture_output=True, timeout=30)
    return cert, key


NGINX_COMMON = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
worker_rlimit_nofile 20000;
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    {servers}
}}
"""

# The upstream: the same locations over plain HTTP and TLS. /post answers only after reading the
# whole body (`return` would answer before reading it; mirror reads it in the precontent phase, then
# the static handler refuses POST on the file and error_page turns that into a 200 with its JSON).
NGINX_UPSTREAM = """
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        listen 127.0.0.1:{tls_port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        sendfile on;
        root {dir};
        location = /get {{ default_type application/json; return 200 '{{"ok":true}}'; }}
        location = /post {{
            client_max_body_size 2m; client_body_buffer_size 2m;
            mirror /sink; mirror_request_body on; error_page 405 =200 /received.json;
        }}
        location = /sink {{ internal; return 204; }}
        location = /received.json {{ internal; default_type application/json; }}
        location /files/ {{ default_type application/octet-stream; }}
    }}
"""

# nginx as a reverse proxy: a relay written in C on the stream's path, for reference (buffering on,
# in memory only: its fastest setting here).
NGINX_RELAY = """
    upstream app {{ server 127.0.0.1:{upstream_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_buffering on; proxy_max_temp_file_size 0;
        }}
    }}
"""


def nginx_version() -> str:
    result = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10)
    return (result.stderr or result.stdout).strip().rpartition("/")[2] or "?"


def start_nginx(directory: Path, servers: str, port: int, **fields: object) -> subprocess.Popen:
    """nginx in the foreground, its pid, logs and temp paths under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in (directory, *directory.parents[:1]):
        os.chmod(path, 0o755)  # workers run as an unprivileged user when started by root
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_COMMON.format(dir=directory, servers=servers.format(dir=directory, port=port, **fields)))
    command = ["nginx", "-e", str(directory / "error.log"), "-p", str(directory), "-c", str(conf)]
    try:
        return spawn([*command, "-g", "daemon off;"], port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except RuntimeError:
        log = directory / "error.log"
        raise RuntimeError(log.read_text()[-500:] if log.exists() else "nginx did not start") from None


@dataclass
class Upstream:
    """nginx (small GET and 1 MiB POST over HTTP and TLS, static files to stream) and the built-in app."""

    nginx: subprocess.Popen
    url: str
    tls_url: str
    cert: Path
    app: subprocess.Popen
    app_url: str
    files: Path

    def file(self, size: int) -> str:
        """The path of a static file of ``size`` bytes, made on first use."""
        path = self.files / f"{size}.bin"
        if not path.exists():
            block = b"\xab" * (1 << 20)
            with path.open("wb") as out:
                for offset in range(0, size, len(block)):
                    out.write(block[: size - offset])
            os.chmod(path, 0o644)
        return f"/files/{path.name}"

    def stop(self) -> None:
        stop_process(self.nginx)
        stop_process(self.app)


def start_upstream(workdir: Path) -> Upstream:
    directory = workdir / "nginx"
    (directory / "files").mkdir(parents=True)
    (directory / "received.json").write_text('{"received":true}')
    for name in ("post", "received.json"):
        (directory / name).touch()
        os.chmod(directory / name, 0o644)
    os.chmod(directory / "files", 0o755)
    cert, key = self_signed_cert(workdir)
    port, tls_port = free_port(), free_port()
    nginx = start_nginx(directory, NGINX_UPSTREAM, port, tls_port=tls_port, cert=cert, key=key)
    app, app_url = start_app_upstream()
    return Upstream(
        nginx, f"http://127.0.0.1:{port}", f"https://127.0.0.1:{tls_port}", cert, app, app_url, directory / "files"
    )


def start_relay(workdir: Path, upstream_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    upstream_port = int(upstream_url.rsplit(":", 1)[1])
    process = start_nginx(workdir / f"relay-{port}", NGINX_RELAY, port, upstream_port=upstream_port)
    return process, f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------- proxies


@dataclass(frozen=True)
class Checkout:
    """A source tree of the proxy: this one, or the one ``--baseline`` names."""

    label: str  # "proxy" or "baseline"
    root: Path

    def version(self) -> str:
        """Its commit, and whether its proxy/ differs from it; fails unless its proxy/ is what runs."""
        imported = subprocess.run(
            [sys.executable, "-c", "import proxy; print(proxy.__file__)"],
            cwd=self.root,
            env=self.env(None),
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        if Path(imported).parent != self.root / "proxy":
            raise RuntimeError(f"python -m proxy in {self.root} imports {imported or 'nothing'}, not {self.root}/proxy")
        git = ["git", "-C", str(self.root)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--", "proxy"], capture_output=True, text=True).stdout
        return (commit or "unknown") + (" + uncommitted changes" if changed.strip() else "")

    def env(self, cert: Path | None) -> dict[str, str]:
        # `python -m proxy` with this cwd imports this tree's proxy/ (cwd comes first on sys.path);
        # PYTHONPATH says the same to anything it spawns. The TLS upstream's certificate is trusted
        # through OpenSSL's default verify paths, which SSL_CERT_FILE replaces, and AWS_CA_BUNDLE, which
        # the proxy prefers to them (as the AWS CLI does) when the shell that runs the bench exports it.
        env = {**ENV, "PYTHONPATH": str(self.root)}
        if cert is not None:
            env["SSL_CERT_FILE"] = env["AWS_CA_BUNDLE"] = str(cert)
        return env


def proxy_config(
    port: int, upstream_url: str, log_level: str, workers: int | None, extra: str = "", route: str = ""
) -> str:
    text = (
        f"listen: 127.0.0.1:{port}\nlog_level: {log_level}\nshutdown_grace: 2s\n"
        "credentials:\n  bench: {type: static, access_key_id: AKIDBENCHMARK0000000, secret_access_key: bench-secret}\n"
        f"routes:\n  - {{path_prefix: /, upstream: '{upstream_url}', region: us-east-1, credentials: bench{route}}}\n"
    )
    return text + (f"workers: {workers}\n" if workers else "") + extra


FORWARD_HOST = "abc123.execute-api.us-east-1.amazonaws.com"  # a host the forward rule below signs for


def forward_config(ca_dir: Path, upstream_url: str) -> str:
    """Config (``extra`` of ``proxy_config``) with a forward rule for FORWARD_HOST's kind of name whose
    ``connect_to`` dials ``upstream_url``, the local CA in ``ca_dir``."""
    return (
        f"forward:\n  ca: {ca_dir}\n  hosts:\n"
        f"    - {{host: '*.execute-api.*.amazonaws.com', credentials: bench, connect_to: '{upstream_url}'}}\n"
    )


@dataclass
class Proxy:
    process: subprocess.Popen
    port: int
    stderr_path: Path | None
    started_s: float = 0.0  # spawn to the first 200 through it

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)


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
            await reader.read()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            status_line = b""
        finally:
            writer.close()
        if status_line.split()[1:2] == [b"200"]:
            return time.monotonic()
        await asyncio.sleep(0.005)
    raise RuntimeError(f"no 200 from 127.0.0.1:{port}{path} in time")


def start_proxy(
    workdir: Path,
    checkout: Checkout,
    upstream: Upstream,
    upstream_url: str,
    *,
    log_level: str = "warning",
    workers: int | None = None,
    ready_path: str = "/get",
    extra_config: str = "",
    route_options: str = "",
) -> Proxy:
    """``python -m proxy run --config FILE`` from ``checkout``, once it answered ``ready_path`` with 200.

    ``extra_config`` is YAML appended to its config (top-level keys), ``route_options`` to its route's
    flow mapping (", payload: unsigned"). With ``log_level: info`` its
    stderr (the access log) goes to /dev/null, else to a file shown on failure.
    """
    port = free_port()
    config = workdir / f"{checkout.label}-{port}.yaml"
    config.write_text(proxy_config(port, upstream_url, log_level, workers, extra_config, route_options))
    stderr_path = None if log_level in ("info", "debug") else config.with_suffix(".stderr")
    stderr = stderr_path.open("wb") if stderr_path else subprocess.DEVNULL
    spawned = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        cwd=checkout.root,
        env=checkout.env(upstream.cert),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    if stderr_path:
        stderr.close()
    return answering(Proxy(process, port, stderr_path), spawned, ready_path, f"the {checkout.label} proxy")


def answering(proxy: Proxy, spawned: float, ready_path: str, name: str) -> Proxy:
    """``proxy`` once ``GET ready_path`` through it answered 200 (stopped, with its stderr's tail, if not in 30 s)."""
    try:
        proxy.started_s = asyncio.run(first_ok(proxy.port, ready_path, spawned + 30)) - spawned
    except RuntimeError:
        proxy.stop()
        tail = proxy.stderr_path.read_text(errors="replace")[-2000:] if proxy.stderr_path else ""
        raise RuntimeError(f"{name} did not answer 200 within 30 s\n{tail}") from None
    return proxy


# ---------------------------------------------------------------- awslabs' Go proxy, for reference

GO_PROXY_COMMAND = "aws-sigv4-proxy"
GO_PROXY_HOWTO = (
    "build github.com/awslabs/aws-sigv4-proxy with `go build ./cmd/aws-sigv4-proxy` "
    "and pass the binary with --go-proxy PATH (or put it on PATH)"
)


def find_go_proxy(path: Path | None) -> Path | None:
    """The Go proxy's binary: ``path`` if given, else ``aws-sigv4-proxy`` on PATH, else None."""
    if path is not None:
        return path.resolve()
    found = shutil.which(GO_PROXY_COMMAND)
    return Path(found).resolve() if found else None


def go_proxy_version(binary: Path) -> str:
    """Its path and the Go release that built it (``go version FILE``, when go is installed)."""
    try:
        result = subprocess.run(["go", "version", str(binary)], capture_output=True, text=True, timeout=30)
    except OSError:
        return str(binary)
    built_with = result.stdout.rpartition(": ")[2].strip() if result.returncode == 0 else ""
    return f"{binary}" + (f", {built_with}" if built_with else "")


def start_go_proxy(
    workdir: Path, binary: Path, upstream: Upstream, upstream_url: str, *, ready_path: str = "/get"
) -> Proxy:
    """awslabs' ``aws-sigv4-proxy`` in front of ``upstream_url``, once it answered ``ready_path`` with 200.

    It signs every request for ``execute-api`` in us-east-1 with static keys from its environment, as
    the proxy signs with the static keys of its config; a TLS upstream's certificate is trusted through
    ``SSL_CERT_FILE`` (Go's crypto/x509 reads it on Linux). It runs as one process, Go's runtime
    using every CPU, where the proxy has worker processes.
    """
    port = free_port()
    scheme, _, host = upstream_url.partition("://")
    command = [str(binary), "--port", f"127.0.0.1:{port}", "--host", host, "--name", "execute-api"]
    command += ["--region", "us-east-1"] + (["--upstream-url-scheme", "http"] if scheme == "http" else [])
    env = {
        **ENV,
        "AWS_ACCESS_KEY_ID": "AKIDBENCHMARK0000000",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_REGION": "us-east-1",
        "SSL_CERT_FILE": str(upstream.cert),
    }
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        env.pop(name, None)  # the static keys above, whatever the shell that runs the bench exports
    stderr_path = workdir / f"go-proxy-{port}.stderr"
    spawned = time.monotonic()
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, env=env, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
    return answering(Proxy(process, port, stderr_path), spawned, ready_path, f"{GO_PROXY_COMMAND} ({binary})")


def require_tools() -> None:
    missing = [tool for tool in ("wrk", "nginx", "openssl") if not shutil.which(tool)]
    if missing:
        sys.exit(f"bench needs {', '.join(missing)}: apt-get install -y wrk nginx-light openssl")
