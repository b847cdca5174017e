"""The outbound-URL guard: dreamq only connects to public addresses unless an operator allows more.

Every address a host name resolves to must be global (`is_global`, which unlike `is_private`
also refuses 100.64.0.0/10), after unwrapping IPv6 forms that embed an IPv4 address. Operators
allow private ranges by CIDR (`DREAMQ_OUTBOUND_ALLOW_CIDRS`); `dreamq dev` allows loopback.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedUrl(ValueError):
    """The URL may not be fetched; the message is safe to show the client."""


def parse_cidrs(text: str) -> list[Network]:
    return [
        ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()
    ]


def unwrap(address: IPAddress) -> IPAddress:
    """The IPv4 address hidden in an IPv4-mapped, NAT64 or 6to4 IPv6 address, else the address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def allowed(address: IPAddress, allow: Iterable[Network]) -> bool:
    inner = unwrap(address)
    if any(inner in net or address in net for net in allow):
        return True
    return inner.is_global


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def check_url(url: str, allow: Iterable[Network], resolve: Resolver = _resolve) -> list[str]:
    """Refuse a URL that is not http(s) or whose host resolves to a non-public address.

    Returns the validated addresses.
    """
    try:
        parts = urlsplit(url)
        explicit_port = parts.port  # ValueError for a port that is not 0..65535
    except ValueError:
        raise BlockedUrl("the URL is not valid") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BlockedUrl("only http and https URLs are allowed")
    port = explicit_port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = resolve(parts.hostname, port)
    except (OSError, UnicodeError):  # UnicodeError: a name IDNA cannot encode ("a..b")
        raise BlockedUrl("the host name does not resolve") from None
    networks = list(allow)
    for text in addresses:
        if not allowed(ipaddress.ip_address(text.split("%")[0]), networks):
            raise BlockedUrl("the host resolves to a non-public address")
    return addresses
