"""CORS answered by the proxy (proxy/cors.py), request by request over real sockets.

``tests/test_browser.py`` shows a real browser accepts the answers; these pin
each rule: preflights never go upstream, the upstream's CORS headers are
replaced, ``Vary: Origin`` is kept with the upstream's, and without a ``cors``
section nothing changes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from aiohttp import web

from proxy.config import ConfigError, parse_config
from proxy.server import ProxyServer
from tests.conftest import StartProxy, static_route
from tests.support.rawhttp import RawResponse, raw_request
from tests.support.sigv4_upstream import Received, SigV4Upstream

APP = "http://localhost:3000"


def preflight(origin: str, method: str = "POST", headers: str = "content-type,x-custom") -> bytes:
    return (
        f"OPTIONS /pets HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: {method}\r\n"
        f"Access-Control-Request-Headers: {headers}\r\nConnection: close\r\n\r\n"
    ).encode()


def get(origin: str | None, path: str = "/pets") -> bytes:
    line = f"Origin: {origin}\r\n" if origin else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{line}Connection: close\r\n\r\n".encode()


def cors_headers(response: RawResponse) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in response.headers:
        if name.lower().startswith("access-control-") or name.lower() == "vary":
            found.setdefault(name.lower(), []).append(value)
    return found


async def upstream_with_its_own_cors(request: web.Request, received: Received) -> web.StreamResponse:
    return web.json_response(
        {"signature_ok": received.signature_ok},
        headers={"Access-Control-Allow-Origin": "https://elsewhere.example", "Access-Control-Max-Age": "1",
                 "Vary": "Accept-Encoding", "X-Request-Id": "r-1", "X-Trace": "t"},
    )  # fmt: skip


async def cors_proxy(start_proxy: StartProxy, upstream: SigV4Upstream, **cors: Any) -> ProxyServer:
    upstream.responder = upstream_with_its_own_cors
    return await start_proxy({**static_route(upstream.url), "cors": {"allow_origins": [APP], **cors}})


async def test_a_preflight_is_answered_here_and_never_signed_or_forwarded(
    sigv4_upstream: SigV4Upstream, start_proxy: StartProxy
) -> None:
    proxy = await cors_proxy(start_proxy, sigv4_upstream, max_age="1h")
    response = await raw_request(proxy.url, preflight(APP))
    assert (response.status, response.body) == (204, b"")
    assert response.header_values("content-length") == []
    assert cors_headers(response) == {
        "access-control-allow-origin": [APP],
        "access-control-allow-methods": ["POST"],
        "access-control-allow-headers": ["content-type, x-custom"],
        "access-control-max-age": ["3600"],
        "vary": ["Origin, Access-Control-Request-Method, Access-Control-Request-Headers"],
    }
    assert sigv4_upstream.received == []


@pytest.mark.parametrize(
    ("cors", "request_bytes", "says"),
    [
        ({}, preflight("http://evil.example"), "origin 'http://evil.example' is not in cors.allow_origins"),
        ({"allow_methods": ["GET"]}, preflight(APP, "DELETE"), "method 'DELETE' is not in cors.allow_methods"),
        ({"allow_headers": ["content-type"]}, preflight(APP), "header(s) x-custom not in cors.allow_headers"),
    ],
    ids=["origin", "method", "header"],
)
async def test_a_preflight_that_is_not_allowed_is_refused_here(
    sigv4_upstream: SigV4Upstream, start_proxy: StartProxy, cors: dict[str, Any], request_bytes: bytes, says: str
) -> None:
    proxy = await cors_proxy(start_proxy, sigv4_upstream, **cors)
    response = await raw_request(proxy.url, request_bytes)
    assert response.status == 403
    assert json.loads(response.body) == {"message": says, "reason": "cors_not_allowed"}
    if "origin" in says:
        assert cors_headers(response) == {"vary": ["Origin"]}  # no CORS headers: the browser blocks it
    assert sigv4_upstream.received == []


async def test_an_answer_gets_our_cors_headers_instead_of_the_upstreams(
    sigv4_upstream: SigV4Upstream, start_proxy: StartProxy
) -> None:
    proxy = await cors_proxy(start_proxy, sigv4_upstream, expose_headers=["X-Request-Id"])
    response = await raw_request(proxy.url, get(APP))
    assert response.status == 200 and json.loads(response.body) == {"signature_ok": True}
    assert cors_headers(response) == {
        "vary": ["Accept-Encoding, Origin"],
        "access-control-allow-origin": [APP],
        "access-control-expose-headers": ["X-Request-Id"],
    }
    assert response.header_values("x-request-id") == ["r-1"]


async def test_an_origin_not_allowed_gets_no_cors_headers(
    sigv4_upstream: SigV4Upstream, start_proxy: StartProxy
) -> None:
    """The request still goes (a browser would send it and hide the answer); the upstream's CORS does not leak."""
    proxy = await cors_proxy(start_proxy, sigv4_upstream)
    for origin in ("http://evil.example", None):
        response = await raw_request(proxy.url, get(origin))
        assert response.status == 200
        assert cors_headers(response) == {"vary": ["Accept-Encoding, Origin"]}


async def test_the_proxys_own_answers_carry_cors_headers(
    sigv4_upstream: SigV4Upstream, start_proxy: StartProxy
) -> None:
    """A page reads a 413 or 404 as JSON, rather than seeing a network error."""
    proxy = await cors_proxy(start_proxy, sigv4_upstream)
    big = f"POST /pets HTTP/1.1\r\nHost: x\r\nOrigin: {APP}\r\nContent-Length: {11 << 20}\r\n\r\n".encode()
    response = await raw_request(proxy.url, big)
    assert response.status == 413
    assert cors_headers(response)["access-control-allow-origin"] == [APP]


async def test_any_origin_with_and_without_credentials(
    sigv4_upstream: SigV4Upstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="signing_proxy.server")
    sigv4_upstream.responder = upstream_with_its_own_cors
    config = static_route(sigv4_upstream.url)
    config["cors"] = {"allow_origins": "*", "expose_headers": "*"}
    config["routes"].append(
        {**config["routes"][0], "path_prefix": "/creds",
         "cors": {"allow_origins": [APP], "allow_credentials": True, "expose_headers": "*"}}
    )  # fmt: skip
    proxy = await start_proxy(config)
    response = await raw_request(proxy.url, get("http://anything.example"))
    assert cors_headers(response)["access-control-allow-origin"] == ["*"]
    assert cors_headers(response)["access-control-expose-headers"] == ["*"]
    response = await raw_request(proxy.url, get(APP, "/creds/pets"))
    found = cors_headers(response)
    assert found["access-control-allow-origin"] == [APP]  # with credentials "*" is not a wildcard
    assert found["access-control-allow-credentials"] == ["true"]
    assert found["access-control-expose-headers"] == ["Date, Server, Vary, X-Request-Id, X-Trace"]
    assert any("cors.allow_origins has *" in r.getMessage() for r in caplog.records)


async def test_without_a_cors_section_nothing_changes(sigv4_upstream: SigV4Upstream, start_proxy: StartProxy) -> None:
    sigv4_upstream.responder = upstream_with_its_own_cors
    proxy = await start_proxy(static_route(sigv4_upstream.url))
    response = await raw_request(proxy.url, preflight(APP))
    assert response.status == 200  # signed and forwarded, as before
    assert [r.method for r in sigv4_upstream.received] == ["OPTIONS"]
    assert sigv4_upstream.received[0].signature_ok
    assert cors_headers(response) == {
        "access-control-allow-origin": ["https://elsewhere.example"],
        "access-control-max-age": ["1"],
        "vary": ["Accept-Encoding"],
    }


@pytest.mark.parametrize(
    ("cors", "error"),
    [
        ({"allow_origins": ["http://localhost:3000/"]}, "routes.0.cors.allow_origins: expected an origin such as"),
        ({"allow_origins": "*", "allow_credentials": True}, "cannot be combined with allow_credentials"),
        ({"allow_origins": [APP], "allow_headers": ["x y"]}, "routes.0.cors.allow_headers: expected a method or"),
        ({"allow_origins": [APP], "max_age": "soon"}, "routes.0.cors.max_age: expected a duration"),
        ({"allow_methods": ["GET"]}, "routes.0.cors.allow_origins: Field required"),
    ],
)
def test_cors_config_errors_name_the_key(cors: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as failed:
        parse_config({"routes": [{"upstream": "http://127.0.0.1:1", "region": "eu-west-1", "cors": cors}]})
    assert error in str(failed.value)
