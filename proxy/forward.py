"""Forward-proxy mode: which hosts a client may reach through the proxy, and as what.

A client configured with ``HTTPS_PROXY=http://127.0.0.1:8080`` names the real
host (``CONNECT abc.execute-api.eu-west-1.amazonaws.com:443``, or an
absolute-form ``GET http://host/path``). ``ForwardProxy`` decides:

* a host a ``forward.hosts`` rule matches (first match wins) is **signed**: the
  rule becomes a route for ``https://host`` (region and service read from the
  host name unless the rule sets them), cached per host, so that forwarding
  handles it exactly as a reverse-proxy route: credentials, API key, limits,
  timeouts, WebSockets, logs and metrics. For CONNECT, TLS is terminated with a
  leaf certificate of the local CA (``ca``);
* a host ``forward.tunnel`` lists is passed through as a **blind** tunnel;
* anything else is refused with 403 naming the host: never an open proxy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Forward, ForwardRule, Route
from .hosts import aws_endpoint, split_authority
from .http.front import Refusal
from .http.tunnel import Terminate, Tunnel

if TYPE_CHECKING:
    from .ca import CertificateAuthority  # cryptography: imported only when forward mode is on

MAX_CACHED_ROUTES = 4096


@dataclass(frozen=True, slots=True)
class Allowed:
    """A host a forward rule signs for: the rule (its pattern labels logs and metrics) and the route."""

    rule: ForwardRule
    route: Route


def refused(host: str, port: int) -> Refusal:
    return Refusal(
        f"{host}:{port} is not a forward host of this proxy; add it to forward.hosts (signed) "
        "or forward.tunnel (passed through unsigned)",
        403,
        "host_not_allowed",
    )


class ForwardProxy:
    """The forward rules of one configuration, with the CA that certifies their hosts."""

    def __init__(self, forward: Forward, ca: CertificateAuthority | None) -> None:
        self.forward = forward
        self.ca = ca
        self._routes: dict[tuple[str, int], Allowed] = {}
        self.active = bool(forward.hosts or forward.tunnel)  # forward mode is configured at all

    def allowed(self, host: str, port: int) -> Allowed | None:
        """The route for a signed host, or None when no rule matches it; raises ``Refusal`` for a
        matched host whose region cannot be told."""
        key = (host, port)
        cached = self._routes.get(key)
        if cached is not None:
            return cached
        rule = next((rule for rule in self.forward.hosts if rule.pattern.matches(host, port)), None)
        if rule is None:
            return None
        region, service = aws_endpoint(host)
        try:
            route = rule.route_for(host, port, region, service)
        except ValueError:
            raise Refusal(
                f"{host} matches forward rule {rule.host!r} but its region cannot be read from the name; "
                "set region on the rule",
                403,
                "region_unknown",
            ) from None
        if len(self._routes) >= MAX_CACHED_ROUTES:
            self._routes.clear()
        allowed = self._routes[key] = Allowed(rule, route)
        return allowed

    def connect(self, authority: str) -> Terminate | Tunnel:
        """What to do with ``CONNECT authority``: terminate TLS for a signed host, tunnel a listed one;
        raises ``Refusal`` (403) for anything else."""
        if not self.active:
            raise Refusal(
                "CONNECT needs forward mode (hosts under forward.hosts or forward.tunnel); "
                "this proxy is configured as a reverse proxy only",
                reason="bad_request_target",
            )
        parts = split_authority(authority, default_port=0)
        if parts is None or parts[1] == 0:
            raise Refusal("CONNECT needs host:port", 400, "bad_request_target")
        host, port = parts
        if self.allowed(host, port) is not None and self.ca is not None:
            return Terminate(self.ca.context_for(host), f"{host}:{port}")
        if any(pattern.matches(host, port) for pattern in self.forward.tunnel_patterns):
            return Tunnel(host, port)
        raise refused(host, port)

    def for_target(self, authority: str, default_port: int) -> Allowed:
        """The signed host named by an absolute-form target or a tunnel; raises ``Refusal`` (403)."""
        parts = split_authority(authority, default_port)
        if parts is None:
            raise Refusal(f"malformed host {authority[:100]!r}", 400, "bad_request_target")
        allowed = self.allowed(*parts)
        if allowed is None:
            raise refused(*parts)
        return allowed
