"""The egress settings as curl and botocore read them: proxy URLs, which variable wins, NO_PROXY entries."""

from __future__ import annotations

import base64

import pytest

from proxy.http.egress import ProxyEnvironment, ProxyURL, bypassed


@pytest.mark.parametrize(
    ("entries", "host", "port", "expected"),
    [
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),  # a name covers its subdomains
        (".example.com", "api.example.com", 443, True),
        ("*.example.com", "api.example.com", 443, True),
        (".example.com", "example.com", 443, True),  # curl >= 7.86: the leading dot changes nothing
        ("example.com", "badexample.com", 443, False),  # by label, not by string suffix
        ("EXAMPLE.com.", "Api.Example.Com", 443, True),  # case and a trailing dot
        ("example.com:8443", "api.example.com", 8443, True),
        ("example.com:8443", "api.example.com", 443, False),
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("10.0.0.0/8", "ten.example", 80, False),  # ranges match addresses only, names are not resolved
        ("127.0.0.1", "127.0.0.1", 80, True),
        ("127.0.0.1", "localhost", 80, False),  # as curl: no resolution
        ("::1", "::1", 443, True),
        ("[::1]:8443", "::1", 8443, True),
        ("[::1]:8443", "::1", 443, False),
        ("fd00::/8", "fd12::5", 443, True),
        ("*", "anything.example", 443, True),
        ("a.example, b.example\tc.example", "x.c.example", 443, True),
        ("", "example.com", 443, False),
    ],
)
def test_no_proxy_entries(entries: str, host: str, port: int, expected: bool) -> None:
    parsed = ProxyEnvironment.read({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": entries})
    assert bypassed(parsed.no_proxy, host, port) is expected
    assert (parsed.proxy_for("https", host, port) is None) is expected


def test_which_variable_applies() -> None:
    both = ProxyEnvironment.read(
        {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2", "HTTP_PROXY": "h:3"}
    )
    assert str(both.https) == "http://lower:1"  # lower case wins, as in curl
    assert str(both.http) == "http://h:3"  # no scheme: http://
    ignored = ProxyEnvironment.read({"ALL_PROXY": "socks5://all:1080"})  # as botocore: not read
    assert ignored.https is None and ignored.http is None
    assert ProxyEnvironment.read({}).proxy_for("https", "example.com", 443) is None
    assert str(ProxyEnvironment.read({"HTTP_PROXY": "http://p"}).http) == "http://p:80"


def test_the_user_info_becomes_basic_auth_and_is_never_shown() -> None:
    proxy = ProxyURL.parse("http://svc%40corp:p%3Ass%20word@proxy.corp:3128")
    assert proxy.authorization == "Basic " + base64.b64encode(b"svc@corp:p:ss word").decode()
    assert "ss" not in str(proxy) and "ss%20word" not in repr(proxy) and "Basic" not in repr(proxy)


@pytest.mark.parametrize("url", ["https://u:hidden@p:443", "socks5://u:hidden@p:1080", "http://u:hidden@:3128"])
def test_unusable_proxy_urls_are_named_without_the_password(url: str) -> None:
    with pytest.raises(ValueError, match=r"^HTTPS_PROXY: expected") as raised:
        ProxyEnvironment.read({"HTTPS_PROXY": url})
    assert "hidden" not in str(raised.value)


@pytest.mark.parametrize(
    "url", ["http://alice:9876/Xy@proxy.corp:3128", "http://alice:pw?x@proxy.corp:3128", "http://a:b#c@proxy:3128"]
)
def test_a_password_with_an_unencoded_delimiter_is_refused_without_showing_any_of_it(url: str) -> None:
    """urlsplit ends the address at the '/', '?' or '#': the rest of the password would pass for a port or path."""
    with pytest.raises(ValueError, match="percent-encode") as refused:
        ProxyURL.parse(url)
    assert not any(part in str(refused.value) for part in ("9876", "Xy", "pw", "alice", "#c"))


def test_a_trailing_slash_and_an_encoded_password_are_fine() -> None:
    assert str(ProxyURL.parse("http://proxy.corp:3128/")) == "http://proxy.corp:3128"
    encoded = ProxyURL.parse("http://alice:p%2Fw%40rd@proxy.corp:3128")
    assert encoded.authorization == "Basic " + base64.b64encode(b"alice:p/w@rd").decode()
