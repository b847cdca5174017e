"""The outbound-URL guard (dreamq/outbound.py) with injected resolvers, and the pinned transport
(dreamq/guarded_http.py) against servers on loopback: no DNS."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fakeredis
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from api.app import Overrides, create_app
from dreamq.guarded_http import Deadline, PinnedBackend, pinned_transport
from dreamq.outbound import (
    INTERNAL_NAME,
    INVALID,
    NON_PUBLIC,
    OTHER_SCHEME,
    BlockedUrl,
    Resolver,
    allowed,
    check_url,
    early_refusal,
    literal_address,
    parse_cidrs,
    system_resolve,
    unwrap,
)
from dreamq.queue import AsyncRecordingPublisher
from dreamq.registry import ModelEntry, Registry
from dreamq.settings import Settings
from storage.apikeys import ApiKeyStore
from storage.objects import MemoryObjectStore
from tests.support.ssrf import (
    R16_ADDRESS_URLS,
    R16_ADDRESSES,
    R16_NAME_URLS,
    R16_SCHEME_URLS,
    Answers,
    refuse_connections,
)
from tests.support.tcp import Handler, listener, read_request, tcp_server

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"
LOOPBACK = parse_cidrs("127.0.0.0/8")

BLOCKED = [*R16_ADDRESSES, "fe80::1%eth0"]


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


# --- early refusal: the URL alone, no DNS (R16 at submission) ------------------------------


class NoDns:
    """A resolver that fails the test if called: early refusal must never look anything up."""

    def __call__(self, host: str, port: int) -> list[str]:
        raise AssertionError(f"looked up {host}")


@pytest.mark.parametrize("url", R16_ADDRESS_URLS)
def test_r16_every_literal_address_form_is_refused_early(url: str) -> None:
    assert early_refusal(url, []) == NON_PUBLIC
    with pytest.raises(BlockedUrl, match="non-public address"):
        check_url(url, [], NoDns())


@pytest.mark.parametrize("url", R16_SCHEME_URLS)
def test_r16_other_schemes_are_refused_early(url: str) -> None:
    assert early_refusal(url, []) == OTHER_SCHEME


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST.",
        "app.localhost",
        "metadata.google.internal",
        "metadata.goog",
        "db.corp.internal",
        "printer.local",
    ],
)
def test_r16_names_that_exist_only_inside_a_network_are_refused_early(host: str) -> None:
    assert early_refusal(f"http://{host}:8080/x", []) == INTERNAL_NAME


@pytest.mark.parametrize(
    "host", ["1.2.3.4.5", "08.0.0.1", "256.0.0.1", "example.123", "cafe.0x1", "0x"]
)
def test_hosts_that_look_numeric_but_are_no_address_are_invalid(host: str) -> None:
    # Resolvers would send these to DNS; browsers (WHATWG URL) refuse them.
    assert early_refusal(f"http://{host}/", []) == INVALID


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("10.0.0.1.", "10.0.0.1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        ("images.example.com", None),
        ("deadbeef", None),
    ],
)
def test_literal_address_reads_what_the_c_resolver_reads(host: str, address: str | None) -> None:
    expected = None if address is None else ipaddress.ip_address(address)
    assert literal_address(host) == expected
    if address is not None and ":" not in address and not host.endswith("."):
        # The system resolver agrees, with no DNS involved: these are numeric forms. (With a
        # trailing dot glibc asks DNS instead; the guard still reads the address, to refuse.)
        assert system_resolve(host, 80) == [address]


@pytest.mark.parametrize(
    "url",
    [
        "https://images.example.com/a.png",
        "http://93.184.216.34/",
        "http://[2606:2800:220:1::1]:8080/",
        "http://intranet/",  # a bare name: only its addresses can tell, at connect time
    ],
)
def test_public_looking_urls_pass_early(url: str) -> None:
    assert early_refusal(url, []) is None


@pytest.mark.parametrize(
    ("url", "allow", "passes"),
    [
        ("http://127.0.0.1:8000/hook", "127.0.0.0/8", True),
        ("http://127.1:8000/hook", "127.0.0.0/8", True),
        ("http://localhost:8000/hook", "127.0.0.0/8", True),
        ("http://app.localhost/", "::1/128", True),
        ("http://[::1]/", "127.0.0.0/8", False),
        ("http://10.0.0.1/", "127.0.0.0/8", False),
        ("http://metadata.google.internal/", "127.0.0.0/8", False),
        ("http://metadata.google.internal/", "169.254.169.254/32", True),
        ("http://db.corp.internal/", "10.0.0.0/8", True),  # its address decides, at connect
    ],
)
def test_the_allow_list_applies_early(url: str, allow: str, passes: bool) -> None:
    assert (early_refusal(url, parse_cidrs(allow)) is None) is passes


@pytest.mark.parametrize("address", ["::127.0.0.1", "::a9fe:a9fe", "64:ff9b:1::a9fe:a9fe"])
def test_ipv6_forms_is_global_misjudges_are_refused(address: str) -> None:
    assert ipaddress.ip_address(address).is_global  # what the guard must not trust
    assert not allowed(ipaddress.ip_address(address), [])


# --- connect time: the pinned transport (R16, R17) -----------------------------------------


def ok_response(connection: socket.socket, stop: threading.Event) -> None:
    request = read_request(connection)
    host = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"host:")
    )
    connection.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(host), host)
    )


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    return refuse_connections(monkeypatch)


def test_the_transport_checks_what_the_name_resolves_to_and_never_connects(
    no_connect: list[object],
) -> None:
    """The wiring of the pinned backend into httpx: a name only the injected resolver knows,
    answering a refused address. An httpx or httpcore upgrade that drops the backend makes
    httpx resolve the name itself, which fails with a ConnectError instead."""
    with (
        listener() as target,
        httpx.Client(transport=pinned_transport([], resolve=Answers(["127.0.0.1"]))) as client,
    ):
        with pytest.raises(BlockedUrl, match="non-public address"):
            client.get(f"http://blocked.test:{target.port}/")
        assert not target.reached()
    assert no_connect == []


def test_the_transport_refuses_to_build_without_the_pool_it_replaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def renamed(self: httpx.HTTPTransport, **kwargs: object) -> None:
        self.pool = None  # type: ignore[attr-defined]

    monkeypatch.setattr(httpx.HTTPTransport, "__init__", renamed)
    with pytest.raises(RuntimeError, match="_pool"):
        pinned_transport([])


@pytest.mark.parametrize("host", ["127.1", "0x7f000001", "2130706433", "0177.0.0.1", "127.0.0.1"])
def test_the_backend_refuses_numeric_hosts_through_the_system_resolver(host: str) -> None:
    with listener() as target:
        with pytest.raises(BlockedUrl, match="non-public address"):
            PinnedBackend([]).connect_tcp(host, target.port, timeout=1.0)
        assert not target.reached()


def test_r17_the_connection_goes_to_the_validated_address_not_to_a_new_lookup() -> None:
    # rebind.test exists for no system resolver (.test is reserved, RFC 2606): had httpx
    # resolved the name again, the request would fail instead of reaching the server.
    resolve = Answers(["127.0.0.1"], ["169.254.169.254"])
    with (
        tcp_server(ok_response) as server,
        httpx.Client(transport=pinned_transport(LOOPBACK, resolve=resolve)) as client,
    ):
        response = client.get(f"http://rebind.test:{server.port}/")
        assert response.status_code == 200
        assert response.text == f"rebind.test:{server.port}"  # the Host header names the host
        assert resolve.calls == [("rebind.test", server.port)]
        # The next connection looks up again, and the rebound answer is refused.
        with pytest.raises(BlockedUrl):
            client.get(f"http://rebind.test:{server.port}/")
    assert server.connections == 1


def test_each_validated_address_is_tried_in_order() -> None:
    # Nothing listens on 127.0.0.2 at the server's port: refused, then the next address.
    with (
        tcp_server(ok_response) as server,
        httpx.Client(
            transport=pinned_transport(LOOPBACK, resolve=Answers(["127.0.0.2", "127.0.0.1"]))
        ) as client,
    ):
        assert client.get(f"http://two.test:{server.port}/").status_code == 200


def test_the_dns_lookup_is_bounded_by_the_connect_timeout() -> None:
    release = threading.Event()

    def stuck(host: str, port: int) -> list[str]:
        release.wait(10)  # getaddrinfo on a resolver that never answers
        return ["127.0.0.1"]

    try:
        with httpx.Client(transport=pinned_transport(LOOPBACK, resolve=stuck)) as client:
            started = time.monotonic()
            with pytest.raises(httpx.ConnectTimeout):
                client.get("http://slow-dns.test/", timeout=0.3)
            assert 0.3 <= time.monotonic() - started < 1.0
    finally:
        release.set()


def self_signed(name: str, directory: Path) -> tuple[Path, Path]:
    """A certificate for `name` (and no IP address), signed by its own key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@dataclass
class Tls:
    """A certificate for images.test only, and the contexts that serve it and trust it."""

    server: ssl.SSLContext
    client: ssl.SSLContext

    def serving(self, handle: Handler) -> Handler:
        def over_tls(connection: socket.socket, stop: threading.Event) -> None:
            with self.server.wrap_socket(connection, server_side=True) as tls:
                handle(tls, stop)

        return over_tls


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    cert_file, key_file = self_signed("images.test", tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return Tls(server, ssl.create_default_context(cafile=str(cert_file)))


def test_tls_is_verified_against_the_url_host_not_the_pinned_address(tls: Tls) -> None:
    resolve = Answers(["127.0.0.1"])
    with (
        tcp_server(tls.serving(ok_response)) as server,
        httpx.Client(
            transport=pinned_transport(LOOPBACK, resolve=resolve, ssl_context=tls.client)
        ) as client,
    ):
        # The certificate names images.test only: it verifies because the name, not the
        # address the connection went to, is what TLS checks.
        assert client.get(f"https://images.test:{server.port}/").status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.get(f"https://other.test:{server.port}/")


def test_r18_the_deadline_cuts_a_tls_server_dribbling_its_headers(tls: Tls) -> None:
    # TLS replaces the connected socket object with a new one: the deadline must cut that one.
    def dribble(connection: socket.socket, stop: threading.Event) -> None:
        read_request(connection)
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 150:
            connection.sendall(bytes([byte]))
            if stop.wait(0.02):
                return

    resolve = Answers(["127.0.0.1"])
    with (
        tcp_server(tls.serving(dribble)) as server,
        httpx.Client(
            transport=pinned_transport(LOOPBACK, resolve=resolve, ssl_context=tls.client)
        ) as client,
        Deadline(0.5) as deadline,
    ):
        started = time.monotonic()
        with pytest.raises(httpx.TransportError):
            client.get(
                f"https://images.test:{server.port}/",
                timeout=5.0,
                extensions={"trace": deadline.trace},
            )
        elapsed = time.monotonic() - started
    assert deadline.expired
    assert 0.5 <= elapsed < 1.5


# --- at submission, through the API (R16) -----------------------------------------------------

PUBLIC_IMAGE = "https://images.example.com/init.png"
SUBMISSIONS = {
    # field -> (path, the other fields it needs)
    "webhook": ("/api/v4/dreambooth", {}),
    "init_image": ("/api/v4/dreambooth/img2img", {}),
    "mask_image": ("/api/v4/dreambooth/inpaint", {"init_image": PUBLIC_IMAGE}),
}


@dataclass
class Api:
    client: TestClient
    key: str
    publisher: AsyncRecordingPublisher

    def submit(self, field: str, url: str) -> tuple[str, dict[str, list[str]]]:
        """(status, field errors) of a request with `url` in `field`."""
        path, extra = SUBMISSIONS[field]
        body = {"key": self.key, "model_id": "demo", "prompt": "a fox", **extra, field: url}
        answer = self.client.post(path, json=body).json()
        return answer["status"], answer.get("message") if answer["status"] == "error" else {}


@contextmanager
def api_allowing(cidrs: str) -> Iterator[Api]:
    server = fakeredis.FakeServer()
    publisher = AsyncRecordingPublisher()
    app = create_app(
        Settings(public_url="https://api.example.com", outbound_allow_cidrs=cidrs),
        Overrides(
            redis_client=fakeredis.aioredis.FakeRedis(server=server),
            registry=Registry(models={"demo": ModelEntry(source="/models/demo")}),
            objects=MemoryObjectStore("https://cdn.example.com"),
            publisher=publisher,
        ),
    )
    key, _ = ApiKeyStore(fakeredis.FakeRedis(server=server)).create("a")
    with TestClient(app) as client:
        yield Api(client, key, publisher)


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    with api_allowing("") as api:
        yield api


@pytest.mark.parametrize("field", SUBMISSIONS)
@pytest.mark.parametrize("url", R16_ADDRESS_URLS + R16_NAME_URLS)
def test_r16_the_api_refuses_every_internal_target_at_submission(
    api: Api, field: str, url: str
) -> None:
    reason = INTERNAL_NAME if url in R16_NAME_URLS else NON_PUBLIC
    name = field.replace("_", " ")
    assert api.submit(field, url) == (
        "error",
        {field: [f"The {name} URL is not allowed: {reason}."]},
    )
    assert api.publisher.jobs == []


@pytest.mark.parametrize("field", SUBMISSIONS)
@pytest.mark.parametrize("url", R16_SCHEME_URLS)
def test_r16_the_api_refuses_other_schemes_at_submission(api: Api, field: str, url: str) -> None:
    # The contract refuses them before the guard does, each field in its own words.
    status, errors = api.submit(field, url)
    assert status == "error" and list(errors) == [field]
    assert "http" in errors[field][0]
    assert api.publisher.jobs == []


@pytest.mark.parametrize("field", SUBMISSIONS)
def test_a_public_url_is_accepted_at_submission(api: Api, field: str) -> None:
    # No DNS at submission: the API never looks the name up.
    assert api.submit(field, "https://hooks.example.com/x")[0] == "processing"


@pytest.mark.parametrize("field", SUBMISSIONS)
@pytest.mark.parametrize(
    ("url", "passes"),
    [
        ("http://127.0.0.1:8000/a", True),
        ("http://localhost:8000/a", True),
        ("http://10.0.0.1/a", False),
        ("http://metadata.google.internal/a", False),
    ],
)
def test_the_api_applies_the_allow_list(field: str, url: str, passes: bool) -> None:
    with api_allowing("127.0.0.0/8") as api:
        status, errors = api.submit(field, url)
    assert (status == "processing") is passes, errors
