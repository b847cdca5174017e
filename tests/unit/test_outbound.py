"""The outbound-URL guard (dreamq/outbound.py), with an injected resolver: no DNS."""

from __future__ import annotations

import ipaddress

import pytest

from dreamq.outbound import BlockedUrl, Resolver, allowed, check_url, parse_cidrs, unwrap

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"

BLOCKED = [
    "127.0.0.1",
    "::1",
    "::ffff:127.0.0.1",
    "169.254.169.254",
    "fd00:ec2::254",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.0.1",
    "100.64.0.1",
    "100.100.100.200",
    "0.0.0.0",
    "64:ff9b::a9fe:a9fe",
    "2002:a9fe:a9fe::1",
    "fe80::1%eth0",
]


class FakeResolver:
    def __init__(self, *addresses: str, error: OSError | None = None) -> None:
        self.addresses = list(addresses)
        self.error = error
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if self.error is not None:
            raise self.error
        return self.addresses


def check(url: str, resolve: Resolver, allow: str = "") -> list[str]:
    return check_url(url, parse_cidrs(allow), resolve)


@pytest.mark.parametrize("address", BLOCKED)
def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(BlockedUrl, match="non-public address"):
        check("https://hooks.example.com/x", FakeResolver(address))


@pytest.mark.parametrize("address", [PUBLIC_V4, PUBLIC_V6, "8.8.8.8"])
def test_public_addresses_are_accepted(address: str) -> None:
    resolve = FakeResolver(address)
    assert check("https://hooks.example.com/x", resolve) == [address]
    assert resolve.calls == [("hooks.example.com", 443)]


@pytest.mark.parametrize(
    ("url", "port"),
    [
        ("http://hooks.example.com/x", 80),
        ("https://hooks.example.com/x", 443),
        ("https://hooks.example.com:8443/x", 8443),
        ("http://[2606:2800:220:1::1]:81/", 81),
    ],
)
def test_the_resolver_gets_the_host_and_the_effective_port(url: str, port: int) -> None:
    resolve = FakeResolver(PUBLIC_V4)
    check(url, resolve)
    assert resolve.calls[0][1] == port


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://hooks.example.com:70/_x",
        "ftp://hooks.example.com/x",
        "hooks.example.com/x",
        "http:///no-host",
    ],
)
def test_other_schemes_are_refused_before_resolving(url: str) -> None:
    resolve = FakeResolver(PUBLIC_V4)
    with pytest.raises(BlockedUrl, match="only http and https"):
        check(url, resolve)
    assert resolve.calls == []


@pytest.mark.parametrize("url", ["http://hooks.example.com:99999/", "http://[::1"])
def test_malformed_urls_are_blocked_not_crashes(url: str) -> None:
    resolve = FakeResolver(PUBLIC_V4)
    with pytest.raises(BlockedUrl):
        check(url, resolve)
    assert resolve.calls == []


def test_a_host_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(BlockedUrl, match="does not resolve"):
        check("https://nx.example.com/", FakeResolver(error=OSError("Name or service not known")))


@pytest.mark.parametrize(
    "addresses",
    [(PUBLIC_V4, "10.0.0.1"), ("169.254.169.254", PUBLIC_V4), (PUBLIC_V6, "::1")],
)
def test_one_private_address_among_public_ones_is_refused(addresses: tuple[str, str]) -> None:
    with pytest.raises(BlockedUrl):
        check("https://rebind.example.com/", FakeResolver(*addresses))


@pytest.mark.parametrize("address", ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"])
def test_an_allow_list_lets_loopback_through(address: str) -> None:
    assert check("http://localhost:8080/", FakeResolver(address), "127.0.0.0/8,::1/128") == [
        address
    ]


@pytest.mark.parametrize("address", ["10.0.0.1", "169.254.169.254", "192.168.0.1"])
def test_an_allow_list_allows_only_what_it_names(address: str) -> None:
    with pytest.raises(BlockedUrl):
        check("http://internal/", FakeResolver(address), "127.0.0.0/8,::1/128")


def test_parse_cidrs_tolerates_spaces_empty_parts_and_host_bits() -> None:
    assert parse_cidrs(" 127.0.0.0/8 , ,::1/128,10.1.2.3/8,") == [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.0.0.0/8"),
    ]
    assert parse_cidrs("") == []


@pytest.mark.parametrize(
    ("wrapped", "inner"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("2002:a9fe:a9fe::1", "169.254.169.254"),
        (PUBLIC_V6, PUBLIC_V6),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_unwrap_finds_the_embedded_ipv4_address(wrapped: str, inner: str) -> None:
    assert unwrap(ipaddress.ip_address(wrapped)) == ipaddress.ip_address(inner)


def test_an_allowed_ipv4_range_also_covers_its_mapped_ipv6_form() -> None:
    allow = parse_cidrs("10.0.0.0/8")
    assert allowed(ipaddress.ip_address("::ffff:10.1.2.3"), allow)
    assert not allowed(ipaddress.ip_address("::ffff:192.168.1.1"), allow)
