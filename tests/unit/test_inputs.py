"""Input images: fetched from a real HTTP server on loopback, refused for every hostile shape
(reliability R16-R19; connect-time pinning through injected resolvers)."""

from __future__ import annotations

import io
import ipaddress
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, features

from dreamq.errors import PublicJobError
from dreamq.jobparams import ImageInput
from dreamq.outbound import Network, Resolver, system_resolve
from dreamq.settings import Settings
from storage.objects import MemoryObjectStore, ObjectStore
from tests.support.ssrf import R16_ADDRESSES, Answers, refuse_connections
from tests.support.tcp import listener
from workers.inputs import InputLoader

LOOPBACK: list[Network] = [ipaddress.ip_network("127.0.0.0/8")]
Route = Callable[[BaseHTTPRequestHandler], None]


class HttpServer:
    """A threaded HTTP server on a free loopback port; tests add routes by path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.stop = threading.Event()  # releases handlers that hold a connection open
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path)
                try:
                    if route is None:
                        self.send_error(404)
                    else:
                        route(self)
                except OSError:
                    pass  # the client hung up, as it should when it refuses a body

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A short poll interval: shutdown() returns only when serve_forever next looks at it.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    server = HttpServer()
    server.thread.start()
    yield server
    server.stop.set()
    server.httpd.shutdown()
    server.httpd.server_close()
    server.thread.join(timeout=5)


def body(data: bytes, content_type: str = "image/png", *, length: bool = True) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        if length:
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return route


def redirect(location: str, status: int = 302) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def endless(*, declared: int | None) -> Route:
    """Zeros until the client hangs up, optionally under an honest-looking Content-Length."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        if declared is not None:
            handler.send_header("Content-Length", str(declared))
        handler.end_headers()
        chunk = bytes(64 * 1024)
        for _ in range(1600):  # 100 MB at most, should the client never hang up
            handler.wfile.write(chunk)

    return route


def slow_headers(stop: threading.Event, *, interval: float) -> Route:
    """A status line, then one header byte every ``interval`` seconds: never a whole response."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        handler.wfile.flush()
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < 30:
            handler.wfile.write(b"a")
            handler.wfile.flush()
            stop.wait(interval)

    return route


def drip(stop: threading.Event, *, interval: float, stall_after: float | None = None) -> Route:
    """A byte every ``interval`` seconds; after ``stall_after`` seconds, silence on an open
    connection (each read then blocks until the client gives up)."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.end_headers()
        handler.wfile.flush()
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < 30:
            if stall_after is None or time.monotonic() - started < stall_after:
                handler.wfile.write(b"\x89")
                handler.wfile.flush()
            stop.wait(interval)

    return route


def picture(width: int = 48, height: int = 32) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    y = np.linspace(0, 255, height, dtype=np.uint8)
    red = np.tile(x, (height, 1))
    green = np.tile(y[:, None], (1, width))
    rgb = np.stack([red, green, np.full((height, width), 90, np.uint8)], axis=-1)
    return Image.fromarray(rgb)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def fits_file() -> bytes:
    """A 4x4 FITS image: 80-character header cards in a 2880-byte block, then the pixels."""
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8",
             "NAXIS   =                    2", "NAXIS1  =                    4",
             "NAXIS2  =                    4", "END"]  # fmt: skip
    header = "".join(card.ljust(80) for card in cards).encode().ljust(2880, b" ")
    return header + bytes(16).ljust(2880, b"\0")


def test_the_refused_formats_are_ones_pillow_would_open() -> None:
    # Without this, the allowlist test could pass on bytes Pillow cannot read at all.
    for data, expected in ((encoded(picture(), "EPS"), "EPS"), (fits_file(), "FITS"),
                           (encoded(picture(), "TIFF"), "TIFF")):  # fmt: skip
        assert Image.open(io.BytesIO(data)).format == expected


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixel data: decoding it would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def fetch(
    url: str,
    *,
    field: str = "init_image",
    allow: list[Network] = LOOPBACK,
    max_bytes: int = 20 * 1024 * 1024,
    max_pixels: int = 4096 * 4096,
    timeout_seconds: float = 5.0,
    resolve: Resolver = system_resolve,
) -> Image.Image:
    return load_image(
        ImageInput(url=url),
        field=field,
        objects=MemoryObjectStore(),
        allow=allow,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        timeout_seconds=timeout_seconds,
        resolve=resolve,
    )


def load_image(ref: ImageInput, *, field: str, objects: ObjectStore, **limits: Any) -> Image.Image:
    """One load with a one-off loader (workers keep one per process)."""
    loader = InputLoader(objects=objects, **limits)
    try:
        return loader.load(ref, field=field)
    finally:
        loader.close()


def refused(call: Callable[[], object]) -> str:
    with pytest.raises(PublicJobError) as info:
        call()
    return info.value.message


# --- accepted ------------------------------------------------------------------------------


def test_png_is_fetched_as_rgb(http_server: HttpServer) -> None:
    source = picture()
    # Content-Type is ignored: the bytes decide the format.
    http_server.routes["/a.png"] = body(encoded(source.convert("RGBA"), "PNG"), "text/plain")
    image = fetch(http_server.url("/a.png"))
    assert image.mode == "RGB"
    assert image.size == (48, 32)
    assert np.array_equal(np.asarray(image), np.asarray(source))


def test_jpeg_is_fetched(http_server: HttpServer) -> None:
    http_server.routes["/a.jpg"] = body(encoded(picture(), "JPEG"), "image/jpeg")
    image = fetch(http_server.url("/a.jpg"))
    assert (image.mode, image.size) == ("RGB", (48, 32))
    # JPEG is lossy: close to the source, not equal.
    diff = np.abs(np.asarray(image, np.int16) - np.asarray(picture(), np.int16))
    assert diff.mean() < 8


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WEBP")
def test_webp_is_fetched(http_server: HttpServer) -> None:
    http_server.routes["/a.webp"] = body(encoded(picture(), "WEBP"), "image/webp", length=False)
    assert fetch(http_server.url("/a.webp")).size == (48, 32)


def test_mask_image_comes_back_as_grey(http_server: HttpServer) -> None:
    http_server.routes["/mask.png"] = body(encoded(picture(), "PNG"))
    mask = fetch(http_server.url("/mask.png"), field="mask_image")
    assert (mask.mode, mask.size) == ("L", (48, 32))


def test_redirect_chain_is_followed(http_server: HttpServer) -> None:
    http_server.routes["/one"] = redirect("/two", 301)  # relative
    http_server.routes["/two"] = redirect(http_server.url("/three"), 303)  # absolute
    http_server.routes["/three"] = redirect("four", 307)  # relative to /three
    http_server.routes["/four"] = redirect("/a.png", 308)
    http_server.routes["/a.png"] = body(encoded(picture(), "PNG"))
    assert fetch(http_server.url("/one")).size == (48, 32)


def test_object_store_input_is_read() -> None:
    objects = MemoryObjectStore()
    objects.put("inputs/1/init.png", encoded(picture(), "PNG"), "image/png")
    image = load_image(
        ImageInput(object_key="inputs/1/init.png"),
        field="init_image",
        objects=objects,
        allow=[],  # no network involved
        max_bytes=1024 * 1024,
        max_pixels=4096,
        timeout_seconds=1.0,
    )
    assert np.array_equal(np.asarray(image), np.asarray(picture()))


def test_loader_from_settings_reuses_its_client(http_server: HttpServer) -> None:
    http_server.routes["/a.png"] = body(encoded(picture(), "PNG"))
    settings = Settings(outbound_allow_cidrs="127.0.0.0/8", input_max_pixels=4096)
    loader = InputLoader.from_settings(settings, MemoryObjectStore())
    try:
        for _ in range(2):
            assert loader.load(ImageInput(url=http_server.url("/a.png")), field="x").size == (
                48,
                32,
            )
        message = refused(lambda: loader.load(ImageInput(url=http_server.url("/b")), field="x"))
        assert message == "The x could not be fetched: the server answered 404."
    finally:
        loader.close()


def test_injected_transport_is_used() -> None:
    png = encoded(picture(), "PNG")
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        assert request.headers["accept-encoding"] == "identity"
        return httpx.Response(200, stream=httpx.ByteStream(png))  # streamed, like the network

    loader = InputLoader(
        objects=MemoryObjectStore(),
        allow=[],
        max_bytes=1024 * 1024,
        max_pixels=4096,
        timeout_seconds=1.0,
        transport=httpx.MockTransport(handle),
        resolve=lambda host, port: ["93.184.215.14"],  # a public address
    )
    try:
        image = loader.load(ImageInput(url="https://images.example/a.png"), field="init_image")
    finally:
        loader.close()
    assert image.size == (48, 32)
    assert seen == ["https://images.example/a.png"]


# --- refused: addresses -----------------------------------------------------------------------


def test_loopback_is_refused_without_an_allow_list(http_server: HttpServer) -> None:
    http_server.routes["/a.png"] = body(encoded(picture(), "PNG"))
    message = refused(lambda: fetch(http_server.url("/a.png"), allow=[]))
    assert message == (
        "The init_image URL is not allowed: the host resolves to a non-public address."
    )


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.png"])
def test_other_schemes_are_refused(url: str) -> None:
    message = refused(lambda: fetch(url))
    assert message == "The init_image URL is not allowed: only http and https URLs are allowed."


def test_redirect_to_a_private_address_is_refused(http_server: HttpServer) -> None:
    http_server.routes["/go"] = redirect("http://10.0.0.1/a.png")
    started = time.monotonic()
    message = refused(lambda: fetch(http_server.url("/go"), field="mask_image"))
    assert message == (
        "The mask_image URL redirects to a URL that is not allowed: "
        "the host resolves to a non-public address."
    )
    assert time.monotonic() - started < 2  # refused before any connection attempt


def test_redirect_to_a_name_resolving_privately_is_refused(http_server: HttpServer) -> None:
    names = {"127.0.0.1": ["127.0.0.1"], "metadata.internal.test": ["169.254.169.254"]}

    def resolve(host: str, port: int) -> list[str]:
        if host not in names:
            raise OSError("unknown host")
        return names[host]

    http_server.routes["/go"] = redirect("http://metadata.internal.test/latest/meta-data/")
    message = refused(lambda: fetch(http_server.url("/go"), resolve=resolve))
    assert message.endswith("not allowed: the host resolves to a non-public address.")


# --- refused at connect time: what the name resolves to (R16, R17) -------------------------------


@pytest.mark.parametrize("address", R16_ADDRESSES)
def test_r16_a_name_resolving_to_an_internal_address_is_refused_without_connecting(
    monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    attempts = refuse_connections(monkeypatch)
    with listener() as target:
        url = f"http://images.test:{target.port}/a.png"
        message = refused(lambda: fetch(url, allow=[], resolve=Answers([address])))
        assert not target.reached()
    assert attempts == []
    assert message == (
        "The init_image URL is not allowed: the host resolves to a non-public address."
    )


def test_a_name_that_does_not_resolve_is_refused() -> None:
    def nothing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    message = refused(lambda: fetch("http://nx.test/a.png", resolve=nothing))
    assert message == "The init_image URL is not allowed: the host name does not resolve."


def recording_hosts(route: Route, hosts: list[str]) -> Route:
    def recorded(handler: BaseHTTPRequestHandler) -> None:
        hosts.append(handler.headers["host"])
        route(handler)

    return recorded


def test_r17_the_fetch_connects_to_the_address_it_validated(http_server: HttpServer) -> None:
    # The first lookup answers loopback (allowed here), any later one the metadata address.
    # rebind.test exists for no system resolver (.test is reserved): had httpx resolved the
    # name again at connect, the fetch would fail.
    hosts: list[str] = []
    http_server.routes["/a.png"] = recording_hosts(body(encoded(picture(), "PNG")), hosts)
    port = http_server.httpd.server_address[1]
    resolve = Answers(["127.0.0.1"], ["169.254.169.254"])
    assert fetch(f"http://rebind.test:{port}/a.png", resolve=resolve).size == (48, 32)
    assert resolve.calls == [("rebind.test", port)]
    assert hosts == [f"rebind.test:{port}"]


def test_r17_every_hop_is_checked_when_it_connects(http_server: HttpServer) -> None:
    # The redirect stays on the same name; the lookup for the second connection has been
    # rebound to the metadata address.
    hosts: list[str] = []
    http_server.routes["/go"] = redirect("/a.png")
    http_server.routes["/a.png"] = recording_hosts(body(encoded(picture(), "PNG")), hosts)
    port = http_server.httpd.server_address[1]
    resolve = Answers(["127.0.0.1"], ["169.254.169.254"])
    message = refused(lambda: fetch(f"http://rebind.test:{port}/go", resolve=resolve))
    assert message == (
        "The init_image URL redirects to a URL that is not allowed: "
        "the host resolves to a non-public address."
    )
    assert len(resolve.calls) == 2
    assert hosts == []


def test_r18_a_dns_lookup_that_never_answers_is_cut_at_the_total_deadline() -> None:
    release = threading.Event()

    def stuck(host: str, port: int) -> list[str]:
        release.wait(10)  # getaddrinfo cannot be interrupted
        return ["127.0.0.1"]

    started = time.monotonic()
    try:
        message = refused(
            lambda: fetch("http://slow-dns.test/a.png", resolve=stuck, timeout_seconds=0.5)
        )
    finally:
        release.set()
    assert message == "The init_image could not be fetched within 0.5 seconds."
    assert 0.5 <= time.monotonic() - started < 1.5


def test_redirect_loop_stops(http_server: HttpServer) -> None:
    http_server.routes["/loop"] = redirect("/loop")
    message = refused(lambda: fetch(http_server.url("/loop")))
    assert message == "The init_image could not be fetched: more than 5 redirects."


# --- refused: the server's answer ---------------------------------------------------------------


def test_not_found(http_server: HttpServer) -> None:
    message = refused(lambda: fetch(http_server.url("/missing.png")))
    assert message == "The init_image could not be fetched: the server answered 404."


def test_connection_refused() -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    message = refused(lambda: fetch(f"http://127.0.0.1:{port}/a.png"))
    assert message == "The init_image could not be fetched: the connection failed."


def test_r18_a_huge_body_with_an_honest_content_length_is_refused_at_once(
    http_server: HttpServer,
) -> None:
    http_server.routes["/big"] = endless(declared=1024 * 1024 * 1024)
    message = refused(lambda: fetch(http_server.url("/big"), max_bytes=64 * 1024))
    assert message == "The init_image is larger than 64 KB."


def test_r18_an_endless_body_without_content_length_is_cut_at_the_byte_cap(
    http_server: HttpServer,
) -> None:
    http_server.routes["/big"] = endless(declared=None)
    started = time.monotonic()
    message = refused(lambda: fetch(http_server.url("/big"), max_bytes=256 * 1024))
    assert message == "The init_image is larger than 256 KB."
    assert time.monotonic() - started < 5  # cut, not read to the end


def test_r18_an_endless_body_under_a_false_small_content_length_is_read_no_further(
    http_server: HttpServer,
) -> None:
    # The framing ends the body at the declared length: the rest is never read, and the bytes
    # read are no image.
    http_server.routes["/big"] = endless(declared=1000)
    started = time.monotonic()
    message = refused(lambda: fetch(http_server.url("/big")))
    assert message == "The init_image is not a PNG, JPEG or WEBP image."
    assert time.monotonic() - started < 2


def test_r18_a_body_dribbled_byte_by_byte_is_cut_at_the_total_deadline(
    http_server: HttpServer,
) -> None:
    http_server.routes["/drip"] = drip(http_server.stop, interval=0.05)
    started = time.monotonic()
    message = refused(lambda: fetch(http_server.url("/drip"), timeout_seconds=0.5))
    elapsed = time.monotonic() - started
    assert message == "The init_image could not be fetched within 0.5 seconds."
    assert 0.5 <= elapsed < 1.5


def test_r18_headers_dribbled_byte_by_byte_are_cut_at_the_total_deadline(
    http_server: HttpServer,
) -> None:
    http_server.routes["/headers"] = slow_headers(http_server.stop, interval=0.05)
    started = time.monotonic()
    message = refused(lambda: fetch(http_server.url("/headers"), timeout_seconds=0.5))
    assert message == "The init_image could not be fetched within 0.5 seconds."
    assert time.monotonic() - started < 1.5


def test_r18_a_stall_late_in_the_body_is_cut_at_the_total_deadline(
    http_server: HttpServer,
) -> None:
    # Bytes for 0.8 s, then silence. Per-read timeouts alone would wait a whole read timeout
    # after the last byte (to ~1.8 s); the deadline timer cuts the connection at 1 s.
    http_server.routes["/stall"] = drip(http_server.stop, interval=0.05, stall_after=0.8)
    started = time.monotonic()
    message = refused(lambda: fetch(http_server.url("/stall"), timeout_seconds=1.0))
    elapsed = time.monotonic() - started
    assert message == "The init_image could not be fetched within 1 second."
    assert 1.0 <= elapsed < 1.5


# --- refused: the bytes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"<html><body>not an image</body></html>", "text/html"),
        # R19: formats Pillow reads, served under a PNG name; EPS would run Ghostscript.
        (encoded(picture(), "TIFF"), "image/png"),
        (encoded(picture(), "EPS"), "image/png"),
        (fits_file(), "image/png"),
        (encoded(picture(), "GIF"), "image/gif"),
        (encoded(picture(), "PNG")[:40], "image/png"),  # truncated before any pixel
    ],
    ids=["html", "tiff", "eps", "fits", "gif", "truncated-header"],
)
def test_non_images_are_refused(http_server: HttpServer, data: bytes, content_type: str) -> None:
    http_server.routes["/a.png"] = body(data, content_type)
    message = refused(lambda: fetch(http_server.url("/a.png"), field="mask_image"))
    assert message in (
        "The mask_image is not a PNG, JPEG or WEBP image.",
        "The mask_image could not be decoded.",
    )


def test_truncated_pixel_data_is_refused(http_server: HttpServer) -> None:
    data = encoded(Image.effect_noise((64, 64), 64).convert("RGB"), "PNG")
    http_server.routes["/a.png"] = body(data[: len(data) // 2])
    message = refused(lambda: fetch(http_server.url("/a.png")))
    assert message == "The init_image could not be decoded."


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [
        (5_000, 5_000, 4096 * 4096),  # over dreamq's cap
        (50_000, 50_000, 4096 * 4096),  # over Pillow's hard bomb limit too
        (10_000, 10_000, 200_000_000),  # under the cap, but Pillow warns of a bomb
    ],
)
def test_pixel_cap_is_checked_before_decoding(
    http_server: HttpServer, width: int, height: int, max_pixels: int
) -> None:
    # The header holds no pixel data: a decode attempt would say "could not be decoded".
    http_server.routes["/bomb.png"] = body(png_header(width, height))
    message = refused(lambda: fetch(http_server.url("/bomb.png"), max_pixels=max_pixels))
    assert message == f"The init_image has more than {max_pixels:,} pixels."


def test_real_image_over_a_small_pixel_cap(http_server: HttpServer) -> None:
    http_server.routes["/a.png"] = body(encoded(picture(), "PNG"))
    message = refused(lambda: fetch(http_server.url("/a.png"), max_pixels=48 * 32 - 1))
    assert message == "The init_image has more than 1,535 pixels."


def test_object_store_input_is_checked_too() -> None:
    objects = MemoryObjectStore()
    objects.put("inputs/big.png", encoded(picture(), "PNG"), "image/png")
    objects.put("inputs/text.png", b"hello", "image/png")

    def load(key: str, max_bytes: int = 1024 * 1024) -> Image.Image:
        return load_image(
            ImageInput(object_key=key),
            field="init_image",
            objects=objects,
            allow=[],
            max_bytes=max_bytes,
            max_pixels=4096,
            timeout_seconds=1.0,
        )

    assert refused(lambda: load("inputs/missing.png")) == (
        "The uploaded init_image could not be found."
    )
    assert refused(lambda: load("inputs/big.png", max_bytes=100)) == (
        "The init_image is larger than 100 bytes."
    )
    assert refused(lambda: load("inputs/text.png")) == (
        "The init_image is not a PNG, JPEG or WEBP image."
    )
