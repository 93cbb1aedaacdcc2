"""gateway.web.request and gateway.web.forwarded: the request interface's rules
as pure functions (the same rules are exercised over every server in
tests/e2e/test_request_rules.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.protocol.errors import BadRequest, PayloadTooLarge
from gateway.web.forwarded import TrustedProxies, base_url, client_address
from gateway.web.request import (
    Request,
    UnsafeHeader,
    bodiless,
    check_header_value,
    collect_headers,
)


class FakeRequest(Request):
    """Only what the rules read: headers, scheme, authority, peer."""

    def __init__(self, pairs: list[tuple[str, str]], peer: str | None, scheme: str = "http"):
        super().__init__()
        self._headers, self._repeated = collect_headers(pairs)
        self.peer = peer
        self.scheme = scheme

    def authority(self) -> str:
        return self._headers.get("host", "gw:4437")


def test_repeated_single_headers_are_remembered_and_refused_when_read() -> None:
    headers, repeated = collect_headers([("producer-seq", "1"), ("producer-seq", "2")])
    assert headers == {"producer-seq": "1"} and repeated == {"producer-seq"}
    req = FakeRequest([("producer-seq", "1"), ("producer-seq", "1"), ("x", "y")], None)
    with pytest.raises(BadRequest, match="Producer-Seq sent more than once"):
        req.header("producer-seq")
    assert req.header("x") == "y"  # other headers are unaffected


def test_list_headers_are_joined() -> None:
    headers, repeated = collect_headers(
        [("if-none-match", '"a"'), ("x-forwarded-for", "1.2.3.4"), ("if-none-match", '"b"')]
    )
    assert headers["if-none-match"] == '"a", "b"' and repeated is None


@pytest.mark.parametrize(
    "status, head, expected",
    [
        (200, False, False),
        (200, True, True),
        (204, False, True),
        (304, False, True),
        (101, False, True),
        (404, False, False),
        (500, True, True),
    ],
)
def test_bodiless(status: int, head: bool, expected: bool) -> None:
    assert bodiless(status, head) is expected


@pytest.mark.parametrize("value", ["a\r\nSet-Cookie: x", "a\nb", "a\rb", "a\x00b"])
def test_header_values_that_would_split_a_response_are_refused(value: str) -> None:
    with pytest.raises(UnsafeHeader):
        check_header_value("content-type", value)


def test_ordinary_header_values_pass() -> None:
    check_header_value("content-type", 'text/plain; charset="utf-8"\t')


@pytest.mark.parametrize(
    "spec, peer, trusted",
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2", False),
        ("10.0.0.0/8, ::1", "10.200.3.4", True),
        ("10.0.0.0/8, ::1", "::1", True),
        ("10.0.0.0/8", "::ffff:10.1.2.3", True),  # IPv4-mapped
        ("10.0.0.0/8", None, False),
        ("10.0.0.0/8", "/run/gw.sock", False),
        ("*", "203.0.113.9", True),
        ("", "127.0.0.1", False),
    ],
)
def test_trusted_proxies(spec: str, peer: str | None, trusted: bool) -> None:
    assert TrustedProxies(spec).trusts(peer) is trusted


def test_a_malformed_allow_list_is_an_error() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        TrustedProxies("10.0.0.1, proxy.internal")


def test_base_url_from_a_trusted_proxy() -> None:
    trusted = TrustedProxies("10.0.0.0/8")
    req = FakeRequest(
        [
            ("host", "gw:4437"),
            ("x-forwarded-proto", "https, http"),
            ("x-forwarded-host", "a.example"),
        ],
        "10.1.1.1",
    )
    assert base_url(req, trusted) == "https://a.example"
    untrusted = FakeRequest(req._headers.items(), "192.0.2.1")  # type: ignore[arg-type]
    assert base_url(untrusted, trusted) == "http://gw:4437"


def test_forwarded_wins_over_x_forwarded_and_keeps_quoted_ports() -> None:
    trusted = TrustedProxies("*")
    req = FakeRequest(
        [
            ("forwarded", 'for="[2001:db8::1]";proto=https;host="b.example:8443"'),
            ("x-forwarded-proto", "http"),
        ],
        "10.0.0.1",
    )
    assert base_url(req, trusted) == "https://b.example:8443"


def test_client_address_is_the_nearest_untrusted_hop() -> None:
    trusted = TrustedProxies("10.0.0.0/8")
    req = FakeRequest([("x-forwarded-for", "198.51.100.1, 203.0.113.5, 10.0.0.7")], "10.0.0.2")
    assert client_address(req, trusted) == "203.0.113.5"
    direct = FakeRequest([("x-forwarded-for", "198.51.100.1")], "203.0.113.9")
    assert client_address(direct, trusted) == "203.0.113.9"  # spoofed header ignored
    forwarded = FakeRequest([("forwarded", 'for="[2001:db8::1]", for=10.0.0.3')], "10.0.0.2")
    assert client_address(forwarded, trusted) == "2001:db8::1"


class BodyRequest(FakeRequest):
    """A request whose (empty) body has arrived with its headers."""

    def _body_at_hand(self) -> bytes:
        return b""


@pytest.mark.parametrize(
    "declared",
    ["1025", "9" * 30, "9" * 5000, "0" * 4999 + "1025"],
    ids=["just-over", "30-digits", "5000-digits", "leading-zeros"],
)
def test_a_declared_length_over_the_limit_is_413_however_many_digits(declared: str) -> None:
    req = BodyRequest([("content-length", declared)], None)
    with pytest.raises(PayloadTooLarge):
        asyncio.run(req.body(1024))


def test_a_declared_length_within_the_limit_reads_the_body() -> None:
    req = BodyRequest([("content-length", "0" * 5000)], None)
    assert asyncio.run(req.body(1024)) == b""
