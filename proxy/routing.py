"""Routing: which route a request belongs to, and where on the upstream it goes.

Matching runs on the normalized wire path (see ``signing.normalize_path``),
by whole segments: ``/orders`` takes ``/orders`` and ``/orders/7`` but not
``/ordersX``. The longest prefix wins. The matched prefix is replaced by the
upstream URL's own path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import Route
from .signing import join_paths


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    upstream_path: str  # normalized wire path on the upstream


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = sorted(routes, key=lambda r: len(r.path_prefix), reverse=True)

    def match(self, wire_path: str) -> Match | None:
        """The route for a normalized path, or None when no prefix covers it."""
        for route in self._routes:
            prefix = route.path_prefix
            if prefix == "/":
                tail = wire_path
            elif wire_path == prefix or wire_path.startswith(prefix + "/"):
                tail = wire_path[len(prefix) :]
            else:
                continue
            return Match(route, join_paths(route.upstream_path, tail) or "/")
        return None
