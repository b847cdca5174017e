"""The outbound-URL guard: dreamq only connects to public addresses unless an operator allows more.

One policy, checked twice (reliability R16, R17):

- `early_refusal` reads the URL alone, without DNS, so it is cheap enough for the API to run at
  submission and for the worker and the dispatcher to run before every request, and its message
  is clear. It refuses other schemes, every literal address that is not allowed in all the forms
  the C resolver accepts (``127.1``, ``0x7f000001``, ``2130706433``, ``0177.0.0.1``), and the names
  that only ever mean something inside a network.
- `resolve_allowed` is the check that decides: it resolves the host and requires every address
  to be allowed. `dreamq.guarded_http` runs it when it opens a connection and then connects to
  those very addresses, never to the name again.

An address is allowed when it is global (`is_global`, which unlike `is_private` also refuses
100.64.0.0/10) after unwrapping IPv6 forms that embed an IPv4 address, or when it lies in a range
the operator allowed (`DREAMQ_OUTBOUND_ALLOW_CIDRS`; `dreamq dev` allows loopback). The allow-list
also lets through the internal names whose addresses it covers: ``localhost`` once loopback is
allowed, so dev and tests can use it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

NON_PUBLIC = "the host resolves to a non-public address"
NOT_RESOLVED = "the host name does not resolve"
INVALID = "the URL is not valid"
OTHER_SCHEME = "only http and https URLs are allowed"
INTERNAL_NAME = "the host name exists only inside private networks"

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NEVER_GLOBAL = (
    # IPv4-compatible addresses (RFC 4291 deprecated them): `is_global` says yes, and a host
    # that still routes them reaches the embedded IPv4 address.
    ipaddress.ip_network("::/96"),
    # Local-use NAT64 (RFC 8215): translates to whatever the local network chooses.
    ipaddress.ip_network("64:ff9b:1::/48"),
)
_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
_METADATA = ipaddress.ip_address("169.254.169.254")
# The cloud metadata services' names (GCP); they resolve to the link-local metadata address.
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog"})
# `.internal` is reserved by ICANN for private use (2024) and `.local` is multicast DNS
# (RFC 6762): neither can name a public host, and both reach machines next to the worker.
_PRIVATE_SUFFIXES = (".internal", ".local")
# WHATWG URL: a host whose last label is a number is an IPv4 address or invalid.
_NUMBER_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_NUMERIC_HOST = re.compile(r"[0-9a-fx.]+")


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
    if any(address in net for net in _NEVER_GLOBAL if net.version == address.version):
        return False
    return inner.is_global


def system_resolve(host: str, port: int) -> list[str]:
    """The host's addresses in getaddrinfo's order (RFC 6724 preference), without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def literal_address(host: str) -> IPAddress | None:
    """The address a host names by itself, in any form the C resolver accepts; None for a name.

    Raises ValueError for a host that looks numeric but is no address (``1.2.3.4.5``,
    ``08.0.0.1``): resolvers would send it to DNS, browsers refuse it.
    """
    host = host.rstrip(".")
    if ":" in host:
        return ipaddress.ip_address(host.split("%")[0])
    last = host.rsplit(".", 1)[-1]
    if not _NUMBER_LABEL.fullmatch(last):
        return None
    if not _NUMERIC_HOST.fullmatch(host):
        raise ValueError("a numeric host that is not an address")
    try:
        # inet_aton is what getaddrinfo tries first: octal, hex and fewer than four parts.
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        raise ValueError("a numeric host that is not an address") from None


def early_refusal(url: str, allow: Iterable[Network]) -> str | None:
    """Why the URL is refused on its face, without a DNS lookup; None when only the lookup can
    tell (the message is safe to show the client and never holds the URL)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port outside 0..65535
    except ValueError:
        return INVALID
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return OTHER_SCHEME
    host = parts.hostname.rstrip(".")
    networks = list(allow)
    try:
        address = literal_address(host)
    except ValueError:
        return INVALID
    if address is not None:
        return None if allowed(address, networks) else NON_PUBLIC
    return _internal_name_refusal(host, networks)


def _internal_name_refusal(host: str, allow: list[Network]) -> str | None:
    if host == "localhost" or host.endswith(".localhost"):
        # RFC 6761: loopback, whatever a DNS server answers.
        passes = any(allowed(address, allow) for address in _LOOPBACK)
    elif host in _METADATA_NAMES:
        passes = allowed(_METADATA, allow)
    elif host.endswith(_PRIVATE_SUFFIXES):
        # Which private address it has is unknown until the lookup: an operator who allowed
        # some private range may mean this name; the connect-time check decides by address.
        passes = bool(allow)
    else:
        return None
    return None if passes else INTERNAL_NAME


def resolve_allowed(
    host: str, port: int, allow: Iterable[Network], resolve: Resolver = system_resolve
) -> list[str]:
    """The host's addresses, once every one is allowed; raises BlockedUrl otherwise."""
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError):  # UnicodeError: a name IDNA cannot encode ("a..b")
        raise BlockedUrl(NOT_RESOLVED) from None
    if not addresses:
        raise BlockedUrl(NOT_RESOLVED)
    networks = list(allow)
    for text in addresses:
        if not allowed(ipaddress.ip_address(text.split("%")[0]), networks):
            raise BlockedUrl(NON_PUBLIC)
    return addresses


def check_url(url: str, allow: Iterable[Network], resolve: Resolver = system_resolve) -> list[str]:
    """Both checks for one URL: the early refusal, then every resolved address.

    Returns the validated addresses. A caller that connects afterwards must connect to these,
    which `dreamq.guarded_http` does; this function alone leaves the rebinding window open.
    """
    refusal = early_refusal(url, allow)
    if refusal is not None:
        raise BlockedUrl(refusal)
    parts = urlsplit(url)
    assert parts.hostname is not None  # early_refusal refused a URL without one
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return resolve_allowed(parts.hostname, port, allow, resolve)
