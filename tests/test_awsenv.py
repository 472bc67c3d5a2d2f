"""Region and CA bundle from the environment and the shared config file, as the AWS CLI resolves them."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from proxy.config import ConfigError, parse_config
from tests.conftest import TEST_KEY_ID, TEST_SECRET, StartProxy, static_route
from tests.support.sigv4_upstream import SigV4Upstream
from tests.test_cli import run_cli


def custom_domain_route(upstream_url: str, **route: object) -> dict[str, object]:
    """``static_route`` without ``region:``, to a host name that carries none."""
    config = static_route(upstream_url, **route)
    del config["routes"][0]["region"]  # type: ignore[index]
    return config


@pytest.mark.parametrize(
    ("environment", "expected", "source"),
    [
        ({"AWS_REGION": "ap-southeast-2"}, "ap-southeast-2", "AWS_REGION"),
        ({"AWS_DEFAULT_REGION": "ca-central-1"}, "ca-central-1", "AWS_DEFAULT_REGION"),
        ({"AWS_REGION": "ap-southeast-2", "AWS_DEFAULT_REGION": "ca-central-1"}, "ap-southeast-2", "AWS_REGION"),
    ],
)
async def test_a_custom_domain_is_signed_for_the_environment_region(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], expected: str, source: str
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    async with SigV4Upstream({TEST_KEY_ID: TEST_SECRET}, region=expected) as upstream:
        server = await start_proxy(custom_domain_route(upstream.url))
        assert server.config.routes[0].region_source == source
        async with aiohttp.ClientSession() as session, session.get(f"{server.url}/orders") as response:
            assert response.status == 200, await response.text()
    assert upstream.received[-1].signature_ok  # awscrt checked the scope names `expected`


async def test_the_region_and_ca_bundle_of_the_profile_that_signs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "config"
    shared.write_text("[default]\nregion = us-west-2\n[profile dev]\nregion = eu-north-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(shared))
    base = custom_domain_route("http://api.example.test")
    config = parse_config({**base, "credentials": {"dev": {"type": "profile", "profile": "dev"}},
                           "routes": [{**base["routes"][0], "credentials": "dev"}]})  # type: ignore[index]  # fmt: skip
    route = config.routes[0]
    assert (route.resolved_region, route.region_source) == ("eu-north-1", f"profile dev in {shared}")
    # The default chain's routes read the default profile (or AWS_PROFILE's).
    assert parse_config(custom_domain_route("http://api.example.test")).routes[0].resolved_region is not None
    default = parse_config({"routes": [{"upstream": "http://api.example.test"}]}).routes[0]
    assert (default.resolved_region, default.region_source) == ("us-west-2", f"profile default in {shared}")
    # The host name and region: still win over all of these.
    monkeypatch.setenv("AWS_REGION", "sa-east-1")
    named = parse_config({"routes": [{"upstream": "https://a.execute-api.me-south-1.amazonaws.com"}]}).routes[0]
    assert (named.resolved_region, named.region_source) == ("me-south-1", "host name")


def test_no_region_anywhere_is_a_config_error_naming_the_route() -> None:
    with pytest.raises(ConfigError, match=r"routes\.0\.region: .*AWS_REGION, AWS_DEFAULT_REGION"):
        parse_config(custom_domain_route("http://api.example.test"))


async def test_check_prints_where_each_route_region_came_from(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"credentials:\n  fixed: {{type: static, access_key_id: {TEST_KEY_ID}, secret_access_key: '{TEST_SECRET}'}}\n"
        "routes:\n  - {upstream: 'https://api.example.test/prod', credentials: fixed}\n"
        "  - {path_prefix: /b, upstream: 'https://a.execute-api.eu-west-1.amazonaws.com', credentials: fixed}\n"
    )
    proxy = {"HTTPS_PROXY": "http://user:proxy-password@proxy.corp:3128", "NO_PROXY": ".amazonaws.com"}
    code, out, err = await run_cli("check", "--config", str(config), env={"AWS_DEFAULT_REGION": "us-east-2", **proxy})
    assert code == 0, err
    assert "region us-east-2 from AWS_DEFAULT_REGION\n    connects through egress proxy http://proxy.corp:3128" in out
    assert "region eu-west-1 from host name\n" in out and out.count("egress proxy") == 1  # NO_PROXY: direct
    assert "proxy-password" not in out + err
    assert "trusts the system's CAs (or SSL_CERT_FILE)" in out
    code, _, err = await run_cli("check", "--config", str(config))
    assert code == 2 and "routes.0.region" in err


@pytest.mark.parametrize(
    ("upstream", "region"),
    [
        ("https://abc123.execute-api.eu-west-1.amazonaws.com/prod", "eu-west-1"),
        ("https://xyz.lambda-url.us-east-2.on.aws", "us-east-2"),
        ("https://search-logs-abc.eu-central-1.es.amazonaws.com", "eu-central-1"),  # OpenSearch: region first
        ("https://sts.amazonaws.com", "us-east-1"),  # global endpoints sign for us-east-1
        ("https://bucket.s3.ap-south-1.amazonaws.com", "ap-south-1"),
    ],
)
def test_routes_read_the_region_from_every_aws_host_form_forward_mode_knows(upstream: str, region: str) -> None:
    """One host table for routes and forward rules: a route needs no region: where a forward rule needs none."""
    route = parse_config(custom_domain_route(upstream)).routes[0]
    assert (route.resolved_region, route.region_source) == (region, "host name")
