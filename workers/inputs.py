"""Input images of img2img and inpaint jobs (``init_image``, ``mask_image``), fetched and checked.

Everything about an input image is hostile until checked (reliability R16-R19):

- An ``object_key`` input is read back from the object store, where the API put a decoded base64
  upload. A URL input is fetched by hand, one hop at a time: every hop's URL passes
  `dreamq.outbound.check_url` against the operator's allow-list, at most `MAX_REDIRECTS`
  redirects are followed, one deadline covers all hops together, and the body is streamed under a
  byte cap that does not trust Content-Length.
- The bytes then pass the format allowlist (PNG, JPEG, WEBP, told by Pillow from the bytes, never
  from Content-Type or a file name) and the pixel cap, read from the header before any pixel is
  decoded; a Pillow decompression-bomb warning counts as a refusal too.

Every refusal is a `PublicJobError` whose message names the field and says what was wrong, never
how dreamq failed; details go to the log.

DNS rebinding (R17) is not closed yet: `check_url` resolves each hop's host and returns the
addresses it validated, which `_Hop.addresses` keeps, but httpx resolves the name again when it
connects, so a name whose answer changes between the two lookups can still reach a refused
address. The fix is a transport that connects to ``hop.addresses`` while keeping the URL's host
for the Host header and TLS; nothing else here needs to change for it. Until then the window is
one DNS TTL, which the attacker controls. The lookup in `check_url` is also outside the fetch
deadline: only the system resolver's own timeouts bound it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageOps

from dreamq.errors import PublicJobError
from dreamq.jobparams import ImageInput
from dreamq.outbound import BlockedUrl, Network, Resolver, check_url, parse_cidrs
from dreamq.settings import Settings
from storage.objects import ObjectStore

log = logging.getLogger("dreamq.inputs")

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEADERS = {
    "user-agent": "dreamq",
    "accept": "image/png, image/jpeg, image/webp",
    # Raw bytes only: httpx would otherwise inflate gzip on the fly, and one 64 KB chunk of a
    # gzip bomb inflates to 64 MB before the byte cap sees it. A server that compresses anyway
    # sends bytes no image decoder accepts, which is refused as not an image.
    "accept-encoding": "identity",
}


@dataclass(frozen=True, slots=True)
class _Hop:
    """One request of a fetch: the URL as httpx will send it and the addresses validated for it
    (kept for connect-time pinning, see the module docstring)."""

    url: httpx.URL
    addresses: tuple[str, ...]


class _Deadline:
    """One time budget for a whole fetch, every hop included.

    httpx timeouts bound each operation (a connect, one read), not their sum: a server that
    sends a byte just before each read timeout would hold the worker for ever. So reads are
    also checked against the clock, and a timer shuts down the socket of the response being
    read at the deadline, which wakes a read blocked in the kernel at once.
    """

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            # Forget the socket first: the connection may go back to the pool and serve another
            # fetch, which a late-firing timer must not cut.
            self._socket = None
        self._timer.cancel()

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def passed(self) -> bool:
        return self.expired or self.remaining() <= 0

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: watch the socket from the moment it connects, so the deadline
        also cuts a server that trickles its status line and headers."""
        if event == "connection.connect_tcp.complete":
            self.watch_stream(info.get("return_value"))

    def watch(self, response: httpx.Response) -> None:
        # absent with mock transports
        self.watch_stream(response.extensions.get("network_stream"))

    def watch_stream(self, stream: Any) -> None:
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._socket = sock if isinstance(sock, socket.socket) else None
            if self.expired:
                self._shutdown()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._socket is not None:
            # The plain socket's shutdown, also for TLS: SSLSocket.shutdown would tear down the
            # TLS state under the reading thread's feet.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)


def _size_text(count: int) -> str:
    mib, kib = 1024 * 1024, 1024
    if count >= mib:
        return f"{count // mib} MB" if count % mib == 0 else f"{count / mib:.1f} MB"
    if count >= kib and count % kib == 0:
        return f"{count // kib} KB"
    return f"{count} bytes"


class InputLoader:
    """Loads job input images; build one per worker process, since it holds the HTTP client.

    The client never follows redirects itself (each hop is validated here) and ignores proxy
    settings from the environment, which would connect on dreamq's behalf to addresses it never
    validated.
    """

    def __init__(
        self,
        *,
        objects: ObjectStore,
        allow: list[Network],
        max_bytes: int,
        max_pixels: int,
        timeout_seconds: float,
        transport: httpx.BaseTransport | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        self._objects = objects
        self._allow = list(allow)
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._timeout = timeout_seconds
        self._resolve = resolve
        self._client = httpx.Client(
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            headers=_HEADERS,
            # A fresh connection per fetch: the deadline watches each socket from its connect,
            # and input fetches are rare beside the seconds of GPU work they feed.
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    @classmethod
    def from_settings(cls, settings: Settings, objects: ObjectStore) -> InputLoader:
        return cls(
            objects=objects,
            allow=parse_cidrs(settings.outbound_allow_cidrs),
            max_bytes=settings.input_max_bytes,
            max_pixels=settings.input_max_pixels,
            timeout_seconds=settings.input_timeout_seconds,
        )

    def close(self) -> None:
        self._client.close()

    def load(self, ref: ImageInput, *, field: str) -> Image.Image:
        """The checked image: mode "L" for a ``mask_image``, "RGB" otherwise."""
        if ref.object_key is not None:
            data = self._read_object(ref.object_key, field)
        else:
            assert ref.url is not None  # ImageInput holds exactly one of the two
            data = self._fetch(ref.url, field)
        return decode_image(data, field=field, max_pixels=self._max_pixels)

    # --- object store ----------------------------------------------------------------------

    def _read_object(self, key: str, field: str) -> bytes:
        # Only a missing object is the input's fault; a storage outage propagates to the runner
        # as an internal failure (logged, with a generic message for the client).
        try:
            data = self._objects.get(key)
        except KeyError:
            log.warning("%s: object %s is missing", field, key)
            raise PublicJobError(f"The uploaded {field} could not be found.") from None
        if len(data) > self._max_bytes:
            raise PublicJobError(f"The {field} is larger than {_size_text(self._max_bytes)}.")
        return data

    # --- URL -------------------------------------------------------------------------------

    def _fetch(self, url: str, field: str) -> bytes:
        started = time.monotonic()
        with _Deadline(self._timeout) as deadline:
            try:
                data = self._follow(url, field, deadline)
            except httpx.HTTPError as exc:
                if isinstance(exc, httpx.TimeoutException) or deadline.passed():
                    raise self._timed_out(field) from None
                log.warning("%s: fetch failed: %s", field, type(exc).__name__)
                raise PublicJobError(
                    f"The {field} could not be fetched: the connection failed."
                ) from None
            except httpx.InvalidURL:  # not an HTTPError: raised while building a request
                raise PublicJobError(f"The {field} URL is not valid.") from None
        log.info("%s: fetched %d bytes in %.2f s", field, len(data), time.monotonic() - started)
        return data

    def _timed_out(self, field: str) -> PublicJobError:
        unit = "second" if self._timeout == 1 else "seconds"
        return PublicJobError(f"The {field} could not be fetched within {self._timeout:g} {unit}.")

    def _follow(self, url: str, field: str, deadline: _Deadline) -> bytes:
        current = url
        for hops in range(MAX_REDIRECTS + 1):
            hop = self._check(current, field, redirected=hops > 0)
            remaining = deadline.remaining()
            if remaining <= 0:
                raise self._timed_out(field)
            request = self._client.build_request(
                "GET", hop.url, timeout=remaining, extensions={"trace": deadline.trace}
            )
            response = self._client.send(request, stream=True)
            try:
                deadline.watch(response)
                status = response.status_code
                if status in _REDIRECTS:
                    current = self._location(response, field)
                    continue
                if status != 200:
                    raise PublicJobError(
                        f"The {field} could not be fetched: the server answered {status}."
                    )
                return self._read_body(response, field, deadline)
            finally:
                response.close()
        raise PublicJobError(
            f"The {field} could not be fetched: more than {MAX_REDIRECTS} redirects."
        )

    def _check(self, url: str, field: str, *, redirected: bool) -> _Hop:
        refused = (
            f"The {field} URL redirects to a URL that is not allowed"
            if redirected
            else f"The {field} URL is not allowed"
        )
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise PublicJobError(f"{refused}: the URL is not valid.") from None
        # Validate the URL exactly as httpx will send it: the stdlib and httpx parse odd URLs
        # (backslashes, stray '@') differently, and the host checked must be the host connected.
        canonical = str(parsed)
        try:
            addresses = (
                check_url(canonical, self._allow)
                if self._resolve is None
                else check_url(canonical, self._allow, self._resolve)
            )
        except BlockedUrl as exc:
            raise PublicJobError(f"{refused}: {exc}.") from None
        if urlsplit(canonical).hostname != parsed.raw_host.decode("ascii").lower():
            raise PublicJobError(f"{refused}: the URL is not valid.")
        return _Hop(url=parsed, addresses=tuple(addresses))

    def _location(self, response: httpx.Response, field: str) -> str:
        location = response.headers.get("location")
        status = response.status_code
        if not location:
            raise PublicJobError(
                f"The {field} could not be fetched: the server answered {status} with no "
                "redirect target."
            )
        try:
            return str(response.url.join(location))
        except (httpx.InvalidURL, ValueError):
            raise PublicJobError(
                f"The {field} could not be fetched: the server redirected to an invalid URL."
            ) from None

    def _read_body(self, response: httpx.Response, field: str, deadline: _Deadline) -> bytes:
        too_large = PublicJobError(f"The {field} is larger than {_size_text(self._max_bytes)}.")
        declared = response.headers.get("content-length", "")
        # An honest length refuses a big file at once; a false or missing one is caught by the
        # count below, which is the real cap.
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise too_large
        chunks: list[bytes] = []
        received = 0
        for chunk in response.iter_raw():
            received += len(chunk)
            if received > self._max_bytes:
                raise too_large
            if deadline.passed():
                raise self._timed_out(field)
            chunks.append(chunk)
        # Cut at the deadline, a body framed by connection close just looks short: without this
        # check a truncated image would go on to the decoder.
        if deadline.expired:
            raise self._timed_out(field)
        return b"".join(chunks)


def decode_image(data: bytes, *, field: str, max_pixels: int) -> Image.Image:
    """Decode checked bytes: allowlisted formats only, the pixel cap read before decoding.

    Pillow's bomb warning is made an error here; `warnings.catch_warnings` is process-global,
    which is fine for a worker that decodes one job's images at a time.
    """
    too_many = PublicJobError(f"The {field} has more than {max_pixels:,} pixels.")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Lazy: reads the header only, and only with the allowlisted format plugins.
            opened = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise too_many from None
        except Exception as exc:  # any parser failure on hostile bytes is the input's fault
            log.info("%s: not an allowed image: %s", field, type(exc).__name__)
            raise PublicJobError(f"The {field} is not a PNG, JPEG or WEBP image.") from None
        width, height = opened.size
        if width * height > max_pixels:
            log.info("%s: %dx%d pixels refused", field, width, height)
            raise too_many
        try:
            opened.load()
            # Phone photos are stored sideways with an EXIF orientation tag; apply it so the
            # model sees what the client's viewer shows.
            image = ImageOps.exif_transpose(opened)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise too_many from None
        except Exception as exc:
            log.info("%s: decoding failed: %s", field, type(exc).__name__)
            raise PublicJobError(f"The {field} could not be decoded.") from None
    if image.mode in ("P", "PA"):
        # Through RGBA first: Pillow resolves a palette's transparency only that way (and warns
        # on a direct conversion).
        image = image.convert("RGBA")
    return image.convert("L" if field == "mask_image" else "RGB")
