"""Prometheus metrics, one registry per running proxy.

A finished request is only queued on the request path; ``flush`` adds up the
queue and updates counters and histograms once per series, at most
``FLUSH_DELAY`` later and before every scrape. Updating them per request cost
5 µs, 9 µs with worker processes (each update is a write to a shared file):
a tenth of a small proxied request. Values that already live elsewhere
(credential refresh counts, open connections) are read at scrape time by a
collector instead of being mirrored on every change.
prometheus-client is used because its text format and histogram semantics
are what every scraper expects, and they are easy to get subtly wrong.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .logs import Exchange

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
FLUSH_DELAY = 0.05  # seconds a finished request may wait before it is counted (scrapes flush first)


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
        self.signature_mismatches = Counter(
            "signing_proxy_signature_mismatches", "Upstream 403s that refused the signature (the log says why).",
            ["route"], registry=registry,
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
        self._pending: list[Exchange] = []
        self._flush_timer: asyncio.TimerHandle | None = None

    def observe(self, exchange: Exchange) -> None:
        """Count one finished request (within ``FLUSH_DELAY``)."""
        self._pending.append(exchange)
        if self._flush_timer is None:
            try:
                self._flush_timer = asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)
            except RuntimeError:  # no event loop: count at once
                self.flush()

    def signature_mismatch(self, route: str) -> None:
        """Count a refused signature at once (rare, and worth seeing without delay)."""
        self.signature_mismatches.labels(route).inc()

    def flush(self) -> None:
        """Count every queued request: each series is updated once, by the sum of its requests."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        pending, self._pending = self._pending, []
        requests: Tally[tuple[str, str, int]] = Tally()
        errors: Tally[tuple[str, str]] = Tally()
        routes: dict[str, _RouteTally] = {}
        for exchange in pending:
            route = exchange.route
            requests[(route, exchange.method, exchange.status // 100)] += 1
            tally = routes.get(route)
            if tally is None:
                tally = routes[route] = _RouteTally()
            tally.add(exchange)
            if exchange.error_kind:
                errors[(route, exchange.error_kind)] += 1
        for key, count in requests.items():
            series = self._requests_by_key.get(key)
            if series is None:  # labels() costs a lock and a dict walk: look each series up once
                series = self._requests_by_key[key] = self.requests.labels(key[0], key[1], f"{key[2]}xx")
            series.inc(count)
        for route, tally in routes.items():
            per_route = self._per_route.get(route)
            if per_route is None:
                per_route = self._per_route[route] = (
                    self.duration.labels(route),
                    self.upstream_first_byte.labels(route),
                    self.bytes_in.labels(route),
                    self.bytes_out.labels(route),
                )
            duration, first_byte, bytes_in, bytes_out = per_route
            add_to_histogram(duration, tally.duration_buckets, tally.duration_sum)
            add_to_histogram(first_byte, tally.first_byte_buckets, tally.first_byte_sum)
            if tally.bytes_in:
                bytes_in.inc(tally.bytes_in)
            if tally.bytes_out:
                bytes_out.inc(tally.bytes_out)
        for (route, kind), count in errors.items():
            self.upstream_errors.labels(route, kind).inc(count)

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


class _RouteTally:
    """One route's share of a flush: histogram bucket counts and sums, byte totals."""

    __slots__ = ("bytes_in", "bytes_out", "duration_buckets", "duration_sum", "first_byte_buckets", "first_byte_sum")

    def __init__(self) -> None:
        self.duration_buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.first_byte_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.duration_sum = self.first_byte_sum = 0.0
        self.bytes_in = self.bytes_out = 0

    def add(self, exchange: Exchange) -> None:
        self.duration_buckets[bisect_left(LATENCY_BUCKETS, exchange.duration)] += 1
        self.duration_sum += exchange.duration
        first_byte = exchange.upstream_first_byte
        if first_byte is not None:
            self.first_byte_buckets[bisect_left(LATENCY_BUCKETS, first_byte)] += 1
            self.first_byte_sum += first_byte
        self.bytes_in += exchange.bytes_in
        self.bytes_out += exchange.bytes_out


def add_to_histogram(histogram: Any, bucket_counts: list[int], total: float) -> None:
    """Add many observations to a histogram child at once.

    prometheus-client observes one value at a time; its children keep a value per
    bucket (``_buckets``, non-cumulative: an observation lands in the first bucket
    whose bound is not below it) and ``_sum``. tests/test_operations.py checks the
    exposed buckets, sum and count against the requests made.
    """
    if not any(bucket_counts):
        return
    histogram._raise_if_not_observable()
    for index, count in enumerate(bucket_counts):
        if count:
            histogram._buckets[index].inc(count)
    histogram._sum.inc(total)
