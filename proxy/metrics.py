"""Prometheus metrics, one registry per running proxy.

Counters and histograms are updated on the request path; values that already
live elsewhere (credential refresh counts, open connections) are read at
scrape time by a collector instead of being mirrored on every change.
prometheus-client is used because its text format and histogram semantics
are what every scraper expects, and they are easy to get subtly wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .logs import Exchange

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class Metrics:
    """The proxy's metrics; ``registry`` is what /metrics exposes.

    With several worker processes (PROMETHEUS_MULTIPROC_DIR set by the
    supervisor), metric values live in shared files and the exposed registry
    sums them over all workers.
    """

    def __init__(self) -> None:
        multiprocess_mode = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        # auto_describe would read the shared files while other workers are still creating them.
        self.registry = CollectorRegistry(auto_describe=not multiprocess_mode)
        registry: CollectorRegistry | None = self.registry
        if multiprocess_mode:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)
            registry = None  # values go to the shared files, not to this process's registry
        self.requests = Counter(
            "signing_proxy_requests", "Requests answered, by route, method and status class.",
            ["route", "method", "status_class"], registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            "signing_proxy_request_duration_seconds", "Time from request to the end of the response.",
            ["route"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.upstream_first_byte = Histogram(
            "signing_proxy_upstream_first_byte_seconds", "Time until the upstream's response headers.",
            ["route"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.bytes_in = Counter(
            "signing_proxy_request_body_bytes", "Request body bytes sent upstream.", ["route"], registry=registry
        )
        self.bytes_out = Counter(
            "signing_proxy_response_body_bytes", "Response body bytes relayed to clients.", ["route"], registry=registry
        )
        self.upstream_errors = Counter(
            "signing_proxy_upstream_errors", "Upstream failures, by kind (the error body's reason).",
            ["route", "kind"], registry=registry,
        )  # fmt: skip
        self.open_websockets = Gauge(
            "signing_proxy_open_websockets", "WebSocket connections being relayed.",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.open_connections = Gauge(
            "signing_proxy_open_connections", "Client connections open to the proxy (sampled each second).",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self._requests_by_key: dict[tuple[str, str, int], Any] = {}
        self._per_route: dict[str, tuple[Any, Any, Any, Any]] = {}

    def observe(self, exchange: Exchange) -> None:
        """Count one finished request."""
        route = exchange.route
        key = (route, exchange.method, exchange.status // 100)
        requests = self._requests_by_key.get(key)
        if requests is None:  # labels() costs a lock and a dict walk: look each series up once
            requests = self._requests_by_key[key] = self.requests.labels(route, key[1], f"{key[2]}xx")
        requests.inc()
        per_route = self._per_route.get(route)
        if per_route is None:
            per_route = self._per_route[route] = (
                self.duration.labels(route),
                self.upstream_first_byte.labels(route),
                self.bytes_in.labels(route),
                self.bytes_out.labels(route),
            )
        duration, first_byte, bytes_in, bytes_out = per_route
        duration.observe(exchange.duration)
        if exchange.upstream_first_byte is not None:
            first_byte.observe(exchange.upstream_first_byte)
        if exchange.bytes_in:
            bytes_in.inc(exchange.bytes_in)
        if exchange.bytes_out:
            bytes_out.inc(exchange.bytes_out)
        if exchange.error_kind:
            self.upstream_errors.labels(route, exchange.error_kind).inc()

    def watch(self, providers: Callable[[], dict[str, Any]]) -> None:
        """Report credential refreshes and readiness, read from the providers when scraped."""
        self.registry.register(_CredentialsCollector(providers))


class _CredentialsCollector(Collector):
    def __init__(self, providers: Callable[[], dict[str, Any]]) -> None:
        self._providers = providers

    def collect(self) -> Iterator[Any]:
        refreshes = CounterMetricFamily(
            "signing_proxy_credential_refreshes",
            "Credential refreshes, by source and result.",
            labels=["source", "result"],
        )
        ready = GaugeMetricFamily(
            "signing_proxy_credentials_ready", "1 when a source's credentials are currently valid.", labels=["source"]
        )
        for name, provider in self._providers().items():
            parts = [p for p in (provider.tokens, provider.credentials) if p is not None]
            refreshes.add_metric([name, "success"], sum(p.refresh_count for p in parts))
            refreshes.add_metric([name, "failure"], sum(p.failure_count for p in parts))
            if any(p.refresh_count or p.failure_count for p in parts):
                ready.add_metric([name], 1.0 if provider.status()["ready"] else 0.0)
        yield refreshes
        yield ready
