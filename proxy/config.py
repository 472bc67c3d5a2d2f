"""Configuration: read YAML once, expand ``${VAR}``, validate into frozen objects.

Everything after start-up trusts these objects; nothing re-validates. Errors
are collected by pydantic (which names the key and says what it expected) and
turned into one ``ConfigError`` whose message lists every problem, one a line.
pydantic is used because writing a validator that reports *every* bad key
with its path is exactly the code we would otherwise get wrong.
"""

from __future__ import annotations

import math
import os
import re
import ssl
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from . import awsenv
from .hosts import HostPattern, aws_endpoint, parse_pattern
from .http.egress import Egress, ProxyEnvironment, ProxyURL
from .http.tls import tls_context
from .signing import normalize_path, sigv4a
from .signing.services import ServiceRules, rules_for, s3_scope


class ConfigError(Exception):
    """The configuration is unusable; the message says which key and why."""


# ---------------------------------------------------------------- value types

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


MAX_VALUES = 100_000  # a configuration is a few hundred values; YAML alias bombs expand to billions


def expand_env(value: Any, where: str = "", budget: list[int] | None = None) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a YAML tree.

    Counts the values it visits: YAML aliases share subtrees, and a short file
    of nested aliases would otherwise expand into more values than memory holds.
    """
    budget = budget if budget is not None else [MAX_VALUES]
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"the configuration expands to more than {MAX_VALUES} values (nested YAML aliases?)")
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k), budget) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}.{i}", budget) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ and (os.environ[name] or default is None):
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (use ${{{name}:-default}} for a default)")

    return _ENV_REF.sub(substitute, value)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``30s``, ``1.5m``, ``250ms``, ``2h`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 250ms")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError("expected a duration such as 30s, 5m or 250ms, got a non-finite number")
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration such as 30s, 5m or 250ms, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("expected a duration greater than zero")
    return seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}


def parse_size(value: Any) -> int:
    """``10MiB``, ``512KB``, ``1GiB`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10MiB or 512KB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"expected a size such as 10MiB or 512KB, got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])
    if size < 0:
        raise ValueError("expected a size of zero or more")
    return size


def parse_listen(value: Any) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or a bare port (host 127.0.0.1)."""
    text = str(value).strip()
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.lstrip(":")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT or a port number, got {value!r}")
    return host or "127.0.0.1", int(port_text)


def usable_cores(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """Cores this process may use: its CPU affinity, capped by a container's CPU quota (cgroup v2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path(cgroup_cpu_max).read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, -(-int(quota) // int(period))))  # a 1.5-CPU limit gets 2 workers


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Listen = Annotated[tuple[str, int], BeforeValidator(parse_listen)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


# ---------------------------------------------------------------- credentials


class _SourceBase(_Frozen):
    endpoint_url: str | None = None  # STS / Cognito endpoint override (VPC endpoints, emulators)


class DefaultChainSource(_SourceBase):
    type: Literal["default"]


class ProfileSource(_SourceBase):
    type: Literal["profile"]
    profile: str


class StaticSource(_SourceBase):
    type: Literal["static"]
    access_key_id: str = Field(min_length=1)
    secret_access_key: str = Field(min_length=1, repr=False)
    session_token: str | None = Field(default=None, repr=False)


class AssumeRoleSource(_SourceBase):
    type: Literal["assume_role"]
    role_arn: str = Field(pattern=r"^arn:[^:]+:iam::\d{12}:role/.+")
    source: str = "default"
    external_id: str | None = Field(default=None, repr=False)
    session_name: str = "signing-proxy"
    duration_seconds: int = Field(default=3600, ge=900, le=43200)
    region: str | None = None


class CognitoSource(_SourceBase):
    type: Literal["cognito"]
    region: str | None = None  # default: read from user_pool_id
    user_pool_id: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d+_\w+$")
    client_id: str = Field(min_length=1)
    client_secret: str | None = Field(default=None, repr=False)
    username: str = Field(min_length=1)
    password: str | None = Field(default=None, repr=False)
    auth_flow: Literal["USER_SRP_AUTH", "USER_PASSWORD_AUTH"] = "USER_SRP_AUTH"
    identity_pool_id: str | None = None
    custom_role_arn: str | None = None
    token_cache: str | None = None  # file for the refresh token `signing-proxy login` stores

    @property
    def pool_region(self) -> str:
        return self.region or self.user_pool_id.split("_", 1)[0]


class CognitoGuestSource(_SourceBase):
    type: Literal["cognito_guest"]
    region: str | None = None  # default: read from identity_pool_id
    identity_pool_id: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d+:.+$")

    @property
    def pool_region(self) -> str:
        return self.region or self.identity_pool_id.split(":", 1)[0]


SourceConfig = Annotated[
    DefaultChainSource | ProfileSource | StaticSource | AssumeRoleSource | CognitoSource | CognitoGuestSource,
    Field(discriminator="type"),
]

# ---------------------------------------------------------------- routes


def region_from_host(host: str) -> str | None:
    """The region in an AWS host name (``abc.execute-api.eu-west-1.amazonaws.com``, any S3 style, ...)."""
    return aws_endpoint(host)[0]


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#@\s]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP method or header name (RFC 9110 5.6.2)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Names = Annotated[tuple[str, ...], BeforeValidator(_as_list)]


class Cors(_Frozen):
    """Browsers' cross-origin requests, answered by the proxy itself (see ``cors``)."""

    allow_origins: Names  # exact origins, or "*"
    allow_methods: Names = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")  # or "*"
    allow_headers: Names = ("*",)  # request headers a page may set; "*": whatever it asks for
    expose_headers: Names = ()  # response headers a page may read beyond the safelisted ones; "*": all
    allow_credentials: bool = False  # cookies and HTTP authentication from the browser
    max_age: Duration = 600.0  # how long a browser may reuse a preflight's answer

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            if value != "*" and not _ORIGIN.fullmatch(value):
                raise ValueError(
                    f"expected an origin such as http://localhost:3000 (no path, no trailing /) or *, got {value!r}"
                )
        return values

    @field_validator("allow_methods", "allow_headers", "expose_headers")
    @classmethod
    def _tokens(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            if value != "*" and not _TOKEN.fullmatch(value):
                raise ValueError(f"expected a method or header name (or *), got {value!r}")
        return values

    @model_validator(mode="after")
    def _credentials_need_origins(self) -> Cors:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("allow_origins: * cannot be combined with allow_credentials (browsers refuse it); "
                             "list the origins")  # fmt: skip
        return self


@dataclass(frozen=True, slots=True)
class Timeouts:
    """A route's effective timeout per phase of an exchange, in seconds."""

    connect: float
    first_byte: float
    idle: float


class Route(_Frozen):
    path_prefix: str = "/"
    upstream: str
    region: str | None = None
    service: str = "execute-api"  # default: read from an S3 host name, else execute-api
    payload: Literal["signed", "unsigned", "streaming"] | None = None  # default: see payload_mode
    signing: Literal["sigv4", "sigv4a"] = "sigv4"
    region_set: str = "*"  # sigv4a: the regions the signature is valid in (comma-separated, or *)
    credentials: str = "default"
    auth: Literal["sigv4", "cognito_id_token", "cognito_access_token", "none"] = "sigv4"
    api_key: str | None = Field(default=None, repr=False)
    timeout: Duration = 30.0  # default for each phase below
    connect_timeout: Duration | None = None
    first_byte_timeout: Duration | None = None
    idle_timeout: Duration | None = None
    websocket_signing: Literal["headers", "query"] = "headers"
    cors: Cors | None = None  # replaces the top-level cors for this route
    # How connections leave (see docs/networks.md); defaults follow the AWS CLI's environment.
    egress_proxy: str | None = Field(default=None, repr=False)  # http://[user:pass@]host:port, or "none"
    ca_bundle: str | None = None  # default: AWS_CA_BUNDLE, the profile's ca_bundle, the system's CAs
    client_cert: str | None = None  # mutual TLS (API Gateway custom domains)
    client_key: str | None = None
    client_key_password: str | None = Field(default=None, repr=False)
    _environment_region: awsenv.Setting | None = PrivateAttr(default=None)  # set by Config
    _egress: Egress | None = PrivateAttr(default=None)  # set by Config
    _ca_bundle: awsenv.Setting | None = PrivateAttr(default=None)  # the bundle in use and where it was set
    connect_to: str | None = None  # dial this http(s)://host:port; Host, TLS name and signature stay upstream's
    max_body: Size | None = None  # default: the top-level max_body

    @model_validator(mode="before")
    @classmethod
    def _service_from_host(cls, data: Any) -> Any:
        if isinstance(data, dict) and "service" not in data and isinstance(data.get("upstream"), str):
            s3 = s3_scope(urlsplit(data["upstream"]).hostname or "")
            if s3 is not None:
                data = {**data, "service": s3[0]}
        return data

    @model_validator(mode="after")
    def _payload(self) -> Route:
        allowed = self.rules.payload_modes
        # A forward rule's template has no host yet: its hosts' routes are checked when they are made.
        template = urlsplit(self.upstream).hostname == FORWARD_TEMPLATE_HOST and "service" not in self.model_fields_set
        if self.payload is not None and self.payload not in allowed and not template:
            raise ValueError(
                f"payload: {self.payload} is not accepted by service {self.service!r}; expected one of {list(allowed)}"
            )
        if self.payload not in (None, "signed") and self.auth != "sigv4":
            raise ValueError(f"payload: {self.payload} needs auth: sigv4")
        if self.signing == "sigv4a":
            if self.auth != "sigv4":
                raise ValueError("signing: sigv4a needs auth: sigv4")
            if self.payload == "streaming":
                raise ValueError("payload: streaming is not available with signing: sigv4a; use unsigned or signed")
            if not sigv4a.available():
                raise ValueError(
                    "signing: sigv4a needs the AWS Common Runtime: pip install 'signing-proxy[sigv4a]' (awscrt)"
                )
        return self

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("expected a path starting with /")
        return normalize_path(value).rstrip("/") or "/"

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        if parts.query or parts.fragment:
            raise ValueError("expected a URL without query or fragment")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"expected a port from 1 to 65535 in {value!r}") from None
        if port == 0:
            raise ValueError(f"expected a port from 1 to 65535 in {value!r}")
        return value

    @field_validator("egress_proxy")
    @classmethod
    def _egress_proxy(cls, value: str | None) -> str | None:
        if value is not None and value != "none":
            try:
                ProxyURL.parse(value)
            except ValueError as error:
                raise ValueError(f"{error}; or none for direct connections") from None
        return value

    @field_validator("connect_to")
    @classmethod
    def _connect_to(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).path not in ("", "/"):
            raise ValueError(f"expected http(s)://host[:port] without a path, got {value!r}")
        return value if value is None else cls._upstream(value)

    @model_validator(mode="after")
    def _client_key(self) -> Route:
        if (self.client_key or self.client_key_password) and not self.client_cert:
            raise ValueError("client_cert: expected a certificate file beside client_key")
        return self

    @model_validator(mode="after")
    def _multi_region(self) -> Route:
        # Not resolved_region: it is cached, and the environment's region is only known once the Config is.
        region = self.region or region_from_host(urlsplit(self.upstream).hostname or "")
        if self.auth == "sigv4" and self.signing == "sigv4" and region == "*":
            raise ValueError(f"signing: {self.upstream_host} is a multi-region endpoint; set signing: sigv4a")
        return self

    @cached_property
    def upstream_scheme(self) -> str:
        return urlsplit(self.upstream).scheme

    @cached_property
    def upstream_host(self) -> str:
        """``host[:port]`` as sent in Host (default ports omitted)."""
        parts = urlsplit(self.upstream)
        default_port = 443 if parts.scheme == "https" else 80
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        return host if parts.port in (None, default_port) else f"{host}:{parts.port}"

    @cached_property
    def timeouts(self) -> Timeouts:
        """The per-phase timeouts, each falling back on ``timeout`` (computed once per route)."""
        return Timeouts(
            connect=self.connect_timeout or min(self.timeout, 10.0),
            first_byte=self.first_byte_timeout or self.timeout,
            idle=self.idle_timeout or max(self.timeout, 300.0),
        )

    @cached_property
    def upstream_address(self) -> tuple[str, str, int]:
        """``(scheme, host, port)`` of the upstream URL (its host is the TLS server name too)."""
        parts = urlsplit(self.upstream)
        return parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)

    @cached_property
    def dial_address(self) -> tuple[str, str, int]:
        """``(scheme, host, port)``: where connections go, ``connect_to`` when set (Host, TLS server name
        and signature stay the upstream's)."""
        if not self.connect_to:
            return self.upstream_address
        parts = urlsplit(self.connect_to)
        return parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)

    @cached_property
    def upstream_path(self) -> str:
        path = urlsplit(self.upstream).path
        return normalize_path(path).rstrip("/") if path not in ("", "/") else ""

    @cached_property
    def rules(self) -> ServiceRules:
        """How this route's service wants requests signed (``signing.services``)."""
        return rules_for(self.service)

    @cached_property
    def payload_mode(self) -> str:
        """``payload`` as set, else the service's default over https, else ``signed``."""
        if self.payload is not None:
            return self.payload
        if self.auth == "sigv4" and self.upstream_scheme == "https":
            return self.rules.default_payload_over_https
        return "signed"

    @cached_property
    def resolved_region(self) -> str | None:
        region = self.region or region_from_host(urlsplit(self.upstream).hostname or "")
        return region or (self._environment_region.value if self._environment_region else None)

    @property
    def region_source(self) -> str:
        """Where ``resolved_region`` came from, for ``check``."""
        if self.region:
            return "the route's region"
        if region_from_host(urlsplit(self.upstream).hostname or ""):
            return "host name"
        return self._environment_region.source if self._environment_region else "-"

    @property
    def trusted_cas(self) -> str:
        """Which CAs this route trusts, for ``check``."""
        if self._ca_bundle is None:
            return "the system's CAs (or SSL_CERT_FILE)"
        return f"{self._ca_bundle.value} from {self._ca_bundle.source}"

    @property
    def egress(self) -> Egress | None:
        """How this route's connections are opened (TLS, forward proxy); set when the Config is validated.

        Read from ``__pydantic_private__`` itself: ``self._egress`` goes through pydantic's
        ``__getattr__`` (2 µs, an AttributeError raised and caught inside), and this is read per request.
        """
        return self.__pydantic_private__["_egress"]  # type: ignore[index]


# ---------------------------------------------------------------- forward proxy

FORWARD_TEMPLATE_HOST = "forward.invalid"  # the stand-in host a forward rule's keys are checked with

# The keys of a route a forward rule may not set: the host it matched gives them.
_ROUTE_ONLY = frozenset({"path_prefix", "upstream"})


class ForwardRule(_Frozen):
    """``forward.hosts[]``: a host pattern, and any route key but path_prefix and upstream (region and
    service default to what the matched host name says)."""

    model_config = ConfigDict(frozen=True, extra="allow", hide_input_in_errors=True)
    host: str

    @cached_property
    def pattern(self) -> HostPattern:
        return parse_pattern(self.host)

    def __repr_args__(self) -> Any:
        """The rule's keys as a route would show them: secrets (api_key, egress_proxy, ...) left out.

        Route keys are pydantic extras here, and extras would otherwise print whatever a route hides.
        """
        for name, value in super().__repr_args__():
            field_info = Route.model_fields.get(name)
            if field_info is None or field_info.repr:
                yield name, value

    @cached_property
    def route_keys(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @cached_property
    def template(self) -> Route:
        """The rule's keys as a route (with a stand-in host): checked once, and where the Config puts
        what the environment adds (egress, CA bundle, region), copied to each host's route."""
        return Route.model_validate({"upstream": f"https://{FORWARD_TEMPLATE_HOST}", **self.route_keys})

    @model_validator(mode="after")
    def _valid(self) -> ForwardRule:
        try:
            parse_pattern(self.host)
        except ValueError as error:
            raise ValueError(f"host: {error}") from None
        given = set(self.route_keys) & _ROUTE_ONLY
        if given:
            raise ValueError(f"{sorted(given)[0]}: not a forward rule key (the matched host is the upstream)")
        try:  # the route keys are checked as a route's, with a stand-in host
            self.template  # noqa: B018
        except ValidationError as error:
            raise ValueError(_format_errors(error).replace("\n", "; ")) from None
        return self

    def route_for(self, host: str, port: int, region: str | None, service: str | None) -> Route:
        """The route for one host this rule matched; raises ValueError when no region can be found."""
        keys: dict[str, Any] = {"service": service or "execute-api", "region": region, **self.route_keys}
        authority = f"{host}:{port}" if port != 443 else host
        route = Route.model_validate({"upstream": f"https://{authority}", **keys})
        template = self.template
        route._egress, route._ca_bundle = template._egress, template._ca_bundle
        route._environment_region = template._environment_region
        if route.auth == "sigv4" and not route.resolved_region:
            raise ValueError(f"region: cannot be read from the host {host!r}")
        return route


class Forward(_Frozen):
    """``forward:``: hosts signed through the proxy (CONNECT, absolute-form, Host), hosts tunnelled blind."""

    hosts: tuple[ForwardRule, ...] = ()
    tunnel: tuple[str, ...] = ()
    ca: str = "~/.config/signing-proxy/ca"

    @field_validator("tunnel")
    @classmethod
    def _tunnel(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            parse_pattern(value, allow_ip=True)
        return values

    @cached_property
    def tunnel_patterns(self) -> tuple[HostPattern, ...]:
        return tuple(parse_pattern(value, allow_ip=True) for value in self.tunnel)

    @cached_property
    def suffixes(self) -> tuple[str, ...]:
        """What the local CA's name constraints permit: the literal tails of the host patterns."""
        tails = {rule.pattern.suffix for rule in self.hosts}
        return tuple(sorted(t for t in tails if not any(t.endswith("." + other) for other in tails)))


# ---------------------------------------------------------------- whole file


class ListenTls(_Frozen):
    """HTTPS on the listen address, for clients that refuse plain HTTP (browsers' mixed content, strict SDKs)."""

    cert: str  # PEM: the certificate (and its chain; the key too when ``key`` is not set)
    key: str | None = None
    _context: ssl.SSLContext | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        if not isinstance(value, dict | ListenTls):
            raise ValueError(f"expected auto, or a mapping with cert (and key), got {value!r}")
        return value

    @model_validator(mode="after")
    def _load(self) -> ListenTls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(_path(self.cert), _path(self.key))
        except (OSError, ValueError) as error:
            raise ValueError(f"cert: cannot load the certificate and key ({self.cert!r}): {_why(error)}") from None
        self._context = context
        return self

    @property
    def context(self) -> ssl.SSLContext:
        assert self._context is not None
        return self._context


class Config(_Frozen):
    listen: Listen = ("127.0.0.1", 8080)
    listen_tls: (
        Annotated[  # serve HTTPS on listen: auto (a certificate from the local CA), or this one
            Annotated[Literal["auto"], Tag("auto")] | Annotated[ListenTls, Tag("files")],
            Discriminator(lambda value: "auto" if value == "auto" else "files"),
        ]
        | None
    ) = None
    admin_listen: Listen | None = None  # /healthz, /readyz, /metrics; off unless set
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    max_body: Size = 10 * 1024 * 1024
    shutdown_grace: Duration = 10.0  # in-flight requests get this long after SIGTERM
    header_timeout: Duration = 30.0  # for a request head, and the longest pause in a body (also idle keep-alive)
    workers: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"  # processes sharing the port
    inbound_token: str | None = Field(default=None, min_length=16, repr=False)  # Proxy-Authorization: Bearer ...
    credentials: dict[str, SourceConfig] = Field(default_factory=dict)
    cors: Cors | None = None  # for every route without its own; off unless set
    routes: tuple[Route, ...] = ()
    forward: Forward = Field(default_factory=Forward)

    @model_validator(mode="after")
    def _references(self) -> Config:
        if not self.routes and not self.forward.hosts and not self.forward.tunnel:
            raise ValueError("routes: expected at least one route (or forward hosts)")
        names = set(self.credentials) | {"default"}
        for index, rule in enumerate(self.forward.hosts):
            credentials = rule.route_keys.get("credentials", "default")
            if credentials not in names:
                raise ValueError(
                    f"forward.hosts.{index}.credentials: unknown credentials {credentials!r}; "
                    f"expected one of {sorted(names)}"
                )
        for index, route in enumerate(self.routes):
            if route.credentials not in names:
                raise ValueError(
                    f"routes.{index}.credentials: unknown credentials {route.credentials!r}; "
                    f"expected one of {sorted(names)}"
                )
            if route.auth.startswith("cognito_") and not isinstance(
                self.credentials.get(route.credentials), CognitoSource
            ):
                raise ValueError(f"routes.{index}.auth: {route.auth} needs credentials of type cognito")
        for name, source in self.credentials.items():
            if isinstance(source, AssumeRoleSource):
                self._check_chain(name, source, names)
        prefixes = [r.path_prefix for r in self.routes]
        for prefix in prefixes:
            if prefixes.count(prefix) > 1:
                raise ValueError(f"routes: path_prefix {prefix!r} appears more than once")
        self._environment()
        return self

    def _environment(self) -> None:
        """Fill in what routes leave to the environment, as the AWS CLI would: region, CA bundle, proxy."""
        try:
            proxies = ProxyEnvironment.read()
        except ValueError as error:
            raise ValueError(f"environment {error}") from None
        shared: dict[tuple[Any, ...], Egress] = {}
        looked_up: dict[tuple[str, str | None], awsenv.Setting | None] = {}  # a botocore session each: once

        def setting(name: str, profile: str | None) -> awsenv.Setting | None:
            if (name, profile) not in looked_up:
                looked_up[name, profile] = awsenv.region(profile) if name == "region" else awsenv.ca_bundle(profile)
            return looked_up[name, profile]

        # A forward rule's settings are a template route's, copied to the route of each host it matches.
        entries = [(f"routes.{index}", route, True) for index, route in enumerate(self.routes)]
        entries += [(f"forward.hosts.{index}", rule.template, False) for index, rule in enumerate(self.forward.hosts)]
        for where, route, host_known in entries:
            source = self.credentials.get(route.credentials)
            profile = source.profile if isinstance(source, ProfileSource) else None
            needs_region = route.auth == "sigv4" and route.signing == "sigv4"  # sigv4a has region_set instead
            if needs_region and not route.region and not region_from_host(route.upstream_address[1]):
                route._environment_region = setting("region", profile)
                if route._environment_region is None and host_known:
                    raise ValueError(
                        f"{where}.region: cannot be read from the host {route.upstream_host!r}, and neither "
                        "AWS_REGION, AWS_DEFAULT_REGION nor the profile's region is set; set region explicitly"
                    )
            bundle = route.ca_bundle or None
            bundle_source = f"{where}.ca_bundle"
            route._ca_bundle = awsenv.Setting(bundle, "the route's ca_bundle") if bundle else None
            if bundle is None and (found := setting("ca_bundle", profile)) is not None:
                bundle, bundle_source = found.value, f"ca_bundle from {found.source}"
                route._ca_bundle = found
            settings = (bundle, route.client_cert, route.client_key, route.client_key_password, route.egress_proxy)
            if settings not in shared:
                shared[settings] = self._egress(where, route, bundle, bundle_source, proxies)
            route._egress = shared[settings]

    def _egress(
        self, where: str, route: Route, bundle: str | None, bundle_source: str, proxies: ProxyEnvironment
    ) -> Egress:
        try:
            tls = tls_context(_path(bundle))
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            raise ValueError(f"{bundle_source}: cannot load CA certificates from {bundle!r}: {_why(error)}") from None
        if route.client_cert:
            try:
                tls.load_cert_chain(
                    _path(route.client_cert), _path(route.client_key), password=route.client_key_password or None
                )
            except (OSError, ValueError) as error:  # the password is never in the message
                raise ValueError(
                    f"{where}.client_cert: cannot load the certificate and key ({route.client_cert!r}, "
                    f"{route.client_key or 'in the same file'!r}): {_why(error)}; a wrong client_key_password "
                    "shows as a PEM error"
                ) from None
        proxy: ProxyURL | ProxyEnvironment | None = proxies
        if route.egress_proxy == "none":
            proxy = None
        elif route.egress_proxy:
            proxy = ProxyURL.parse(route.egress_proxy)  # checked by the field validator
        return Egress(tls, proxy, self.listen)

    def _check_chain(self, name: str, source: AssumeRoleSource, names: set[str]) -> None:
        seen = [name]
        current: Any = source
        while isinstance(current, AssumeRoleSource):
            if current.source not in names:
                raise ValueError(f"credentials.{seen[-1]}.source: unknown credentials {current.source!r}")
            if current.source in seen:
                raise ValueError(f"credentials.{name}.source: cycle {' -> '.join([*seen, current.source])}")
            seen.append(current.source)
            current = self.credentials.get(current.source)

    @property
    def largest_body(self) -> int:
        """The most any route (or forward rule) accepts: what the front buffers at most for one request."""
        routes = [route.max_body for route in self.routes]
        rules = [
            parse_size(rule.route_keys["max_body"]) for rule in self.forward.hosts if "max_body" in rule.route_keys
        ]
        return max([self.max_body, *(size for size in routes if size is not None), *rules])

    @property
    def streamed_max_body(self) -> int | None:
        """The limit on a streamed body (``payload: unsigned`` or ``streaming``): ``max_body`` only if set."""
        return self.max_body if "max_body" in self.model_fields_set else None

    @property
    def worker_count(self) -> int:
        """``workers`` as a number: ``auto`` is one per core this process may use."""
        return int(self.workers) if self.workers != "auto" else usable_cores()

    def source(self, name: str) -> SourceConfig:
        return self.credentials.get(name) or DefaultChainSource(type="default")


def _path(value: str | None) -> str | None:
    """A file setting with ``~`` expanded, so ``~/.config/...`` works in YAML as in a shell."""
    return os.path.expanduser(value) if value else None


def _why(error: Exception) -> str:
    """A file error's cause without its arguments: an OSError's text, an SSLError's OpenSSL reason."""
    return str(getattr(error, "strerror", None) or getattr(error, "reason", None) or type(error).__name__)


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        loc = list(item["loc"])
        if len(loc) > 2 and loc[0] == "credentials":
            del loc[2]  # the discriminator tag pydantic inserts
        if loc[:2] == ["listen_tls", "files"]:
            del loc[1]
        where = ".".join(str(part) for part in loc)
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where and not message.startswith(where) else message)
    return "\n".join(lines)


def parse_config(data: Any) -> Config:
    """Validate a YAML tree (already loaded) into a ``Config``; raise ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a mapping of keys (listen, routes, ...)")
    try:
        return Config.model_validate(expand_env(data))
    except ValidationError as error:
        raise ConfigError(_format_errors(error)) from None
    except RecursionError:
        raise ConfigError("the configuration is nested too deeply") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML file; every failure is a ``ConfigError`` naming the problem."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start} is {raw[error.start]:#04x})") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    return parse_config(data)
