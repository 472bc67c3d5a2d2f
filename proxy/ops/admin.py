"""Admin endpoints on their own port (``admin_listen``), never on the proxy port.

``/healthz`` says the process serves, whatever the upstreams do; ``/readyz``
says every route's credentials are currently valid (503 with what is not, and
why); ``/metrics`` is Prometheus text. Keeping them off the main port leaves
every path there to the upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config import Config
from ..credentials import Provider
from .metrics import Metrics


def not_ready(config: Config, providers: dict[str, Provider]) -> list[dict[str, Any]]:
    """The credential sources routes need that are not valid right now, with the reason."""
    problems = []
    for name in sorted({r.credentials for r in config.routes if r.auth != "none"}):
        status = providers[name].status()
        if not status["ready"]:
            problems.append(
                {
                    "credentials": name,
                    "kind": status["kind"],
                    "routes": [r.path_prefix for r in config.routes if r.credentials == name and r.auth != "none"],
                    "error": status["error"] or "not obtained yet",
                }
            )
    return problems


def admin_app(state: Callable[[], tuple[Config, dict[str, Provider]]], metrics: Metrics) -> web.Application:
    """``state`` returns the current config and providers (they change on reload)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        problems = not_ready(*state())
        if problems:
            return web.json_response({"status": "not ready", "not_ready": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_text(request: web.Request) -> web.Response:
        metrics.flush()  # this process's queued requests (other workers flush within FLUSH_DELAY)
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    return app
