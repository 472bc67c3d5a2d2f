"""CORS answered by the proxy, so that a web app in a browser can call a signed API through it.

A browser sends a *preflight* (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) before any cross-origin request that is not a
simple one, and it carries no credentials. Signed and forwarded, API Gateway
answers it or refuses it in ways the browser rejects. With a ``cors`` section
the proxy answers preflights itself (never signed, never forwarded) and puts its
own CORS headers on every answer, replacing whatever the upstream sent, so the
policy lives in one place: the proxy's config.

Pure decisions only: headers in, headers out. ``forwarding`` applies them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .config import Config, Cors

# Response headers a page may read without being told (the CORS-safelisted response headers).
SAFELISTED = frozenset(
    {"cache-control", "content-language", "content-length", "content-type", "expires", "last-modified", "pragma"}
)

Headers = list[tuple[str, str]]


class Rejected(Exception):
    """A preflight the policy does not allow; the message says what to add to the config."""


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    """A browser's CORS preflight (an ``OPTIONS`` a page never sends itself carries both headers)."""
    return method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers


class Policy:
    """One ``cors`` section, with its lists turned into what answers need."""

    def __init__(self, config: Cors) -> None:
        self.any_origin = "*" in config.allow_origins
        self.origins = frozenset(config.allow_origins)
        self.any_method = "*" in config.allow_methods
        self.methods = frozenset(m.upper() for m in config.allow_methods)
        self.any_header = "*" in config.allow_headers
        self.headers = frozenset(h.lower() for h in config.allow_headers)
        self.expose_all = "*" in config.expose_headers
        self.expose = ", ".join(config.expose_headers)
        self.credentials = config.allow_credentials
        self.max_age = str(round(config.max_age))

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any_origin or origin in self.origins)

    def _origin_headers(self, origin: str) -> Headers:
        # "*" is sent as "*" only without credentials; with them the origin is named (the Fetch standard).
        allowed = "*" if self.any_origin and not self.credentials else origin
        headers = [("Access-Control-Allow-Origin", allowed)]
        if self.credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        return headers

    def preflight(self, origin: str | None, method: str, requested_headers: str | None) -> Headers:
        """The headers of a ``204`` answer to a preflight; raises ``Rejected`` saying what is not allowed."""
        if not self.allows(origin):
            raise Rejected(f"origin {origin!r} is not in cors.allow_origins")
        assert origin is not None
        if not self.any_method and method.upper() not in self.methods:
            raise Rejected(f"method {method!r} is not in cors.allow_methods")
        requested = [name.strip() for name in (requested_headers or "").split(",") if name.strip()]
        refused = [name for name in requested if not self.any_header and name.lower() not in self.headers]
        if refused:
            raise Rejected(f"header(s) {', '.join(refused)} not in cors.allow_headers")
        headers = self._origin_headers(origin)
        headers.append(("Access-Control-Allow-Methods", method))
        if requested:
            headers.append(("Access-Control-Allow-Headers", ", ".join(requested)))
        headers.append(("Access-Control-Max-Age", self.max_age))
        headers.append(("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"))
        return headers

    def answer_headers(self, origin: str | None, headers: Iterable[tuple[str, str]]) -> Headers:
        """An answer's headers with the upstream's CORS headers replaced by ours, and ``Origin`` in ``Vary``."""
        kept: Headers = []
        vary: list[str] = []
        for name, value in headers:
            lower = name.lower()
            if lower == "vary":
                vary += [v.strip() for v in value.split(",") if v.strip()]
            elif not lower.startswith("access-control-"):
                kept.append((name, value))
        if "*" not in vary and not any(v.lower() == "origin" for v in vary):
            vary.append("Origin")
        kept.append(("Vary", ", ".join(vary)))
        if self.allows(origin):
            assert origin is not None
            kept += self._origin_headers(origin)
            exposed = self._exposed(kept)
            if exposed:
                kept.append(("Access-Control-Expose-Headers", exposed))
        return kept

    def _exposed(self, headers: Headers) -> str:
        if not self.expose_all:
            return self.expose
        if not self.credentials:
            return "*"
        # With credentials "*" is a header name, not a wildcard: name the answer's headers instead.
        names = {name for name, _ in headers if name.lower() not in SAFELISTED}
        return ", ".join(sorted(n for n in names if not n.lower().startswith("access-control-")))


def policies(config: Config) -> tuple[Policy | None, dict[str, Policy | None]]:
    """The top-level policy, and each route's (its own ``cors``, else the top-level one), by path prefix."""
    top = Policy(config.cors) if config.cors is not None else None
    by_route = {r.path_prefix: Policy(r.cors) if r.cors is not None else top for r in config.routes}
    return top, by_route


def any_origin(config: Config) -> bool:
    """Some ``cors`` section allows every origin (worth a warning: every web page may then use the proxy)."""
    sections = [config.cors, *(route.cors for route in config.routes)]
    return any(section is not None and "*" in section.allow_origins for section in sections)
