"""Command line: ``signing-proxy run | demo | check | ca | login | presign``.

Turns arguments into a validated ``Config`` and hands it to the server. A bad
configuration is reported (every problem, one a line) and exits with status 2
before anything listens.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import socket
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from .config import Config, ConfigError, load_config, parse_config
from .ops.logs import setup_logging

EXIT_CONFIG = 2


def quick_config(args: argparse.Namespace) -> dict[str, Any]:
    """A config from ``run --upstream URL ...`` / ``--forward PATTERN`` flags."""
    data: dict[str, Any] = {}
    route: dict[str, Any] = {}
    if getattr(args, "upstream", None):
        route = {"path_prefix": "/", "upstream": args.upstream}
        data["routes"] = [route]
        if args.service:
            route["service"] = args.service
        if args.region:
            route["region"] = args.region
    if getattr(args, "profile", None):
        data["credentials"] = {"profile": {"type": "profile", "profile": args.profile}}
        route["credentials"] = "profile"
    if getattr(args, "forward", None):
        credentials = {"credentials": "profile"} if getattr(args, "profile", None) else {}
        data["forward"] = {"hosts": [{"host": pattern, **credentials} for pattern in args.forward]}
    return data


def load(args: argparse.Namespace) -> Config:
    if getattr(args, "config", None):
        config = load_config(args.config)
    elif getattr(args, "upstream", None) or getattr(args, "forward", None):
        return with_overrides(parse_config(quick_config(args)), args, {})
    else:
        raise ConfigError("give --config FILE, or --upstream URL / --forward PATTERN for a quick start")
    extra: dict[str, Any] = {}
    if getattr(args, "forward", None):  # added to the file's forward hosts
        forward = config.forward.model_dump(mode="json", exclude_unset=True)
        forward["hosts"] = [*forward.get("hosts", []), *({"host": pattern} for pattern in args.forward)]
        extra["forward"] = forward
    return with_overrides(config, args, extra)


def with_overrides(config: Config, args: argparse.Namespace, overrides: dict[str, Any]) -> Config:
    """``config`` with the command line's ``--listen`` / ``--log-level`` (and ``overrides``) applied."""
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "log_level", None):
        overrides["log_level"] = args.log_level
    if overrides:
        config = parse_config({**config.model_dump(mode="json", exclude_unset=True), **overrides})
    return config


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed (``signing-proxy[fast]``), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def cmd_run(args: argparse.Namespace) -> int:
    config = load(args)
    reload = (lambda: load(args)) if args.config else None
    count = config.worker_count
    # The process that serves batches its log writes; a supervisor (no event loop) does not.
    setup_logging(config.log_level, config.log_format, batched=count == 1)
    if count == 1:
        from .server import ProxyServer, serve_forever

        run_loop(serve_forever(ProxyServer(config), reload=reload))
        return 0

    auto_tls = config.listen_tls == "auto"
    if config.forward.hosts or auto_tls:  # made (or issued again) once, here, rather than by the workers in a race
        from .ca import CAError, CertificateAuthority

        try:
            CertificateAuthority.open(config.forward.ca, config.forward.suffixes, loopback=auto_tls)
        except CAError as error:
            raise ConfigError(f"forward.ca: {error}") from None

    from .ops.workers import bind_sockets, supervise, use_multiprocess_metrics

    try:
        use_multiprocess_metrics()  # before prometheus-client is first imported, by .server
    except OSError as error:  # a read-only file system with no writable temporary directory
        print(
            f"signing-proxy: workers need a writable temporary directory (TMPDIR) to share metrics: {error}",
            file=sys.stderr,
        )
        return 1
    host, port = config.listen
    try:
        sockets = bind_sockets(host, port, count)
    except OSError as error:
        print(f"signing-proxy: cannot listen on {host}:{port}: {error.strerror}", file=sys.stderr)
        return 1
    from .server import ProxyServer, serve_forever

    def serve(index: int, sock: socket.socket) -> int:
        setup_logging(config.log_level, config.log_format, batched=True)
        run_loop(serve_forever(ProxyServer(config, sock=sock, worker=index), reload=reload, announce=False))
        return 0

    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if config.listen_tls else "http"
    return supervise(
        sockets, serve, f"signing-proxy listening on {scheme}://{shown}:{sockets[0].getsockname()[1]} ({count} workers)"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .demo import banner, demo_config, emulator_app, free_port
    from .server import ProxyServer, serve_forever

    async def main() -> None:
        runner = web.AppRunner(emulator_app(), access_log=None)
        await runner.setup()
        emulator_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", emulator_port).start()
        emulator_url = f"http://127.0.0.1:{emulator_port}"
        server = ProxyServer(parse_config(demo_config(args.listen, emulator_url)))
        try:
            await serve_forever(server, on_ready=banner(server.url, emulator_url))
        finally:
            await runner.cleanup()

    setup_logging(args.log_level or "info")
    try:
        run_loop(main())
    except OSError as error:
        print(f"signing-proxy demo: cannot listen on {args.listen}: {error.strerror}", file=sys.stderr)
        return 1
    return 0


def _when(expires_at: float | None) -> str:
    if expires_at is None:
        return "does not expire"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
    return f"expires {stamp} (in {int(expires_at - time.time()) // 60} min)"


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the file and try every credentials entry a route uses; print no secret."""
    from .credentials import CredentialsUnavailable, build_providers

    config = load(args)
    setup_logging("critical")  # every failure is printed below, once
    providers = build_providers(config)
    print(f"config OK: listen {config.listen[0]}:{config.listen[1]}, {len(config.routes)} route(s)")
    for route in config.routes:
        print(
            f"  route {route.path_prefix} -> {route.upstream} [{route.auth}, {route.service}, "
            f"{route.resolved_region or '-'}] credentials: {route.credentials if route.auth != 'none' else '-'}"
        )
        if route.auth == "sigv4":
            print(f"    region {route.resolved_region} from {route.region_source}")
        via = route.egress.proxy_for(*route.upstream_address) if route.egress else None
        if via is not None:
            print(f"    connects through egress proxy {via}")
        if route.upstream_scheme == "https":
            print(f"    trusts {route.trusted_cas}")
    print("\n".join(forward_lines(config)))

    async def probe(name: str) -> str:
        provider = providers[name]
        try:
            if provider.tokens is not None:
                await asyncio.wait_for(provider.user_pool_tokens(), 30)
            if provider.credentials is not None:
                await asyncio.wait_for(provider.aws_credentials(), 30)
        except CredentialsUnavailable as error:
            return f"  {name} ({provider.kind}): UNAVAILABLE: {error} [{error.reason}]"
        except TimeoutError:
            return f"  {name} ({provider.kind}): UNAVAILABLE: no answer within 30 s [timeout]"
        status = provider.status()
        identity = ", ".join(
            part
            for part in (status.get("identity"), status.get("access_key") and f"key {status['access_key']}")
            if part
        )
        return f"  {name} ({provider.kind}): OK {identity}; {_when(status.get('expires_at'))}"

    async def probe_all() -> list[str]:
        used = sorted({r.credentials for r in config.routes if r.auth != "none"} | forward_credentials(config))
        return list(await asyncio.gather(*(probe(name) for name in used)))

    lines = asyncio.run(probe_all())
    print("credentials:")
    print("\n".join(lines) if lines else "  (no route needs credentials)")
    return 1 if any("UNAVAILABLE" in line for line in lines) else 0


def forward_credentials(config: Config) -> set[str]:
    keys = [rule.route_keys for rule in config.forward.hosts]
    return {k.get("credentials", "default") for k in keys if k.get("auth", "sigv4") != "none"}


def forward_lines(config: Config) -> list[str]:
    """What ``check`` says of forward mode: each rule with its credentials, the tunnels, the CA."""
    forward = config.forward
    lines = []
    for rule in forward.hosts:
        keys = rule.route_keys
        auth = keys.get("auth", "sigv4")
        region, service = keys.get("region", "from the host"), keys.get("service", "from the host")
        credentials = keys.get("credentials", "default") if auth != "none" else "-"
        via = f" via {keys['connect_to']}" if keys.get("connect_to") else ""
        lines.append(
            f"  forward {rule.pattern.text}:{rule.pattern.port} [{auth}, service {service}, region {region}]"
            f"{via} credentials: {credentials}"
        )
    lines += [f"  tunnel {p.text}:{p.port} (passed through unsigned)" for p in forward.tunnel_patterns]
    if forward.hosts:
        lines.append(f"  local CA: {forward.ca} for names under {', '.join(forward.suffixes)} (see `signing-proxy ca`)")
    return lines


def cmd_ca(args: argparse.Namespace) -> int:
    """Create (on first use) or renew the local CA of forward mode; print how clients trust it."""
    from .ca import CAError, CertificateAuthority
    from .config import Forward

    setup_logging("error")
    config = load(args) if args.config or args.forward else None
    forward = config.forward if config is not None else Forward()
    try:  # without forward hosts, an existing CA is kept as it is (a running proxy uses it)
        ca = CertificateAuthority.open(
            forward.ca,
            forward.suffixes if forward.hosts else None,
            loopback=config is not None and config.listen_tls == "auto",
            renew=args.renew,
        )
    except CAError as error:
        print(f"signing-proxy ca: {error}", file=sys.stderr)
        return 1
    cert, bundle = shlex.quote(str(ca.cert_path)), shlex.quote(str(ca.bundle_path))
    exports = {
        "CURL_CA_BUNDLE": bundle,
        "REQUESTS_CA_BUNDLE": bundle,
        "AWS_CA_BUNDLE": bundle,
        "SSL_CERT_FILE": bundle,
        "NODE_EXTRA_CA_CERTS": cert,
    }
    if args.env:
        print("\n".join(f"export {name}={value}" for name, value in exports.items()))
        return 0
    expires = ca.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
    host, port = config.listen if config is not None else ("127.0.0.1", 8080)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    listener = ""
    if config is not None and config.listen_tls == "auto":
        listener = f"\n  it signs the listener's certificate (listen_tls: auto): https://localhost:{port}/"
    print(
        f"""local CA certificate: {ca.cert_path}
  it signs names under {", ".join(ca.suffixes)} only (X.509 name constraints), until {expires}
  {ca.bundle_path}: the system's trusted CAs plus this one, for variables that replace the system list
  its key, {ca.key_path}, is readable by you only; the files above hold certificates only{listener}

Trust it in each client (`eval "$(signing-proxy ca --env)"` exports the variables):
  curl               --cacert {cert}  or  CURL_CA_BUNDLE={bundle}
  Python requests    REQUESTS_CA_BUNDLE={bundle}  (or verify= that path)
  AWS CLI and SDKs   AWS_CA_BUNDLE={bundle}
  Node.js            NODE_EXTRA_CA_CERTS={cert}
  OpenSSL, Python ssl, Ruby, Go  SSL_CERT_FILE={bundle}
  Postman            Settings > Certificates > CA certificates: {cert}
  Java               keytool -importcert -cacerts -alias signing-proxy -file {cert}
then point the client at the proxy: HTTPS_PROXY=http://{listen} (the proxy's listen address)."""
    )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the admin health URL answers 200: a HEALTHCHECK that needs no curl."""
    import urllib.request

    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:
        print(f"signing-proxy health: {args.url}: {error}", file=sys.stderr)
        return 1


def cmd_emulator(args: argparse.Namespace) -> int:
    """Only the demo's API Gateway emulator, e.g. as the upstream of the compose example."""
    from aiohttp import web

    from .config import parse_listen
    from .demo import emulator_app

    setup_logging(args.log_level or "info")
    host, port = parse_listen(args.listen)
    print(f"API Gateway emulator (checks SigV4 with the demo credentials) on http://{host}:{port}/prod", flush=True)
    web.run_app(emulator_app(), host=host, port=port, print=None, access_log=None)
    return 0


def cmd_presign(args: argparse.Namespace) -> int:
    """Print ``args.url`` presigned with the credentials of the route that covers it."""
    from .credentials import CredentialsUnavailable, build_providers
    from .presign import presign

    config = load_config(args.config)
    setup_logging("critical")
    try:
        print(asyncio.run(presign(config, build_providers(config), args.url, method=args.method, expires=args.expires)))
    except CredentialsUnavailable as error:
        print(f"signing-proxy presign: credentials unavailable: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from .credentials.login import login_main

    setup_logging("warning")
    return login_main(args.config, args.credentials)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="signing-proxy", description="A local SigV4 signing reverse proxy.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy from a config file or a quick-start upstream")
    run.add_argument("--config", help="YAML configuration file")
    run.add_argument("--upstream", help="quick start: the upstream URL (one route for every path)")
    run.add_argument("--listen", help="HOST:PORT or PORT (default 127.0.0.1:8080)")
    run.add_argument("--region", help="quick start: the signing region (default: read from the host)")
    run.add_argument(
        "--service", help="quick start: the signing service (default: s3 for S3 host names, else execute-api)"
    )
    run.add_argument("--profile", help="quick start: the AWS profile to sign with")
    run.add_argument(
        "--forward",
        action="append",
        metavar="PATTERN",
        help="forward mode: sign requests for hosts matching PATTERN (repeatable; * is one DNS label), "
        "e.g. '*.execute-api.*.amazonaws.com'",
    )
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.set_defaults(handler=cmd_run)

    demo = commands.add_parser("demo", help="the proxy in front of an embedded API Gateway emulator")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT or PORT (default 127.0.0.1:8080)")
    demo.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    demo.set_defaults(handler=cmd_demo)

    check = commands.add_parser("check", help="validate a config and try its credentials")
    check.add_argument("--config", required=True)
    check.set_defaults(handler=cmd_check)

    ca = commands.add_parser("ca", help="the local CA of forward mode: create it, show how to trust it")
    ca.add_argument("--config", help="YAML configuration file (gives forward.ca and the forward hosts)")
    ca.add_argument("--forward", action="append", metavar="PATTERN", help="forward hosts, as for run")
    ca.add_argument("--env", action="store_true", help="print the trust settings as shell exports")
    ca.add_argument("--renew", action="store_true", help="replace the CA with a new key and certificate")
    ca.set_defaults(handler=cmd_ca)

    health = commands.add_parser("health", help="exit 0 when the admin /healthz answers (for HEALTHCHECK)")
    health.add_argument("--url", default="http://127.0.0.1:9901/healthz")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(handler=cmd_health)

    emulator = commands.add_parser("emulator", help="only the demo's API Gateway emulator")
    emulator.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT or PORT (default 127.0.0.1:9000)")
    emulator.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    emulator.set_defaults(handler=cmd_emulator)

    login = commands.add_parser("login", help="log a Cognito user in interactively and cache the refresh token")
    login.add_argument("--config", required=True)
    login.add_argument("--credentials", required=True, help="the name of a cognito entry under credentials:")
    login.set_defaults(handler=cmd_login)

    presign = commands.add_parser("presign", help="print a presigned URL, signed as the route covering it signs")
    presign.add_argument("url", help="the API's own URL (the route is the one whose upstream covers it)")
    presign.add_argument("--config", default="signing-proxy.yaml", help="YAML configuration file")
    presign.add_argument("--expires", type=int, default=3600, help="seconds the URL is valid (default 3600)")
    presign.add_argument("--method", default="GET", help="the HTTP method the URL is for (default GET)")
    presign.set_defaults(handler=cmd_presign)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        print(f"signing-proxy: configuration error:\n{error}", file=sys.stderr)
        return EXIT_CONFIG
    except ModuleNotFoundError as error:
        # A feature whose package is not installed (an optional extra): one line that says what to install.
        print(
            f"signing-proxy: {args.command} needs the Python package {error.name!r}, which is not installed here; "
            f"install it (pip install {error.name}) or the extra that brings it (pip install 'signing-proxy[...]')",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
