"""Input images of img2img and inpaint jobs (``init_image``, ``mask_image``), fetched and checked.

Everything about an input image is hostile until checked (reliability R16-R19):

- An ``object_key`` input is read back from the object store, where the API put a decoded base64
  upload. A URL input is fetched by hand, one hop at a time: every hop's URL first passes
  `dreamq.outbound.early_refusal` (scheme, literal addresses, internal names: no DNS), at most
  `MAX_REDIRECTS` redirects are followed, one deadline covers all hops together, and the body is
  streamed under a byte cap that does not trust Content-Length.
- The bytes then pass the format allowlist (PNG, JPEG, WEBP, told by Pillow from the bytes, never
  from Content-Type or a file name) and the pixel cap, read from the header before any pixel is
  decoded; a Pillow decompression-bomb warning counts as a refusal too.

Every refusal is a `PublicJobError` whose message names the field and says what was wrong, never
how dreamq failed; details go to the log.

Connections go through `dreamq.guarded_http.pinned_transport`: when a hop connects, its host is
resolved once, every address must be allowed, and the socket goes to those addresses, never to
the name again, so a name whose answer changes between a check and the connect (DNS rebinding,
R17) cannot reach a refused address; TLS is still verified against the URL's host. The lookup
runs under the fetch's deadline. A refusal there reads like the early one ("The init_image URL
is not allowed: the host resolves to a non-public address.", or "redirects to a URL that is not
allowed" for a later hop).
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageOps

from dreamq.errors import PublicJobError
from dreamq.guarded_http import Deadline, pinned_transport
from dreamq.jobparams import ImageInput
from dreamq.outbound import (
    BlockedUrl,
    Network,
    Resolver,
    early_refusal,
    parse_cidrs,
    system_resolve,
)
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


def _refused(field: str, *, redirected: bool) -> str:
    if redirected:
        return f"The {field} URL redirects to a URL that is not allowed"
    return f"The {field} URL is not allowed"


def _size_text(count: int) -> str:
    mib, kib = 1024 * 1024, 1024
    if count >= mib:
        return f"{count // mib} MB" if count % mib == 0 else f"{count / mib:.1f} MB"
    if count >= kib and count % kib == 0:
        return f"{count // kib} KB"
    return f"{count} bytes"


class InputLoader:
    """Loads job input images; build one per worker process, since it holds the HTTP client.

    The client never follows redirects itself (each hop is checked here) and ignores proxy
    settings from the environment, which would connect on dreamq's behalf to addresses it never
    validated. A `transport` given replaces the pinned one (tests with mock transports).
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
        resolve: Resolver = system_resolve,
    ) -> None:
        self._objects = objects
        self._allow = list(allow)
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._timeout = timeout_seconds
        self._client = httpx.Client(
            # Fresh connections (the transport's default): the deadline watches each socket
            # from its connect, and input fetches are rare beside the GPU work they feed.
            transport=transport or pinned_transport(self._allow, resolve=resolve),
            follow_redirects=False,
            trust_env=False,
            headers=_HEADERS,
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
        with Deadline(self._timeout) as deadline:
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

    def _follow(self, url: str, field: str, deadline: Deadline) -> bytes:
        current = url
        for hops in range(MAX_REDIRECTS + 1):
            refused = _refused(field, redirected=hops > 0)
            hop = self._check(current, refused)
            remaining = deadline.remaining()
            if remaining <= 0:
                raise self._timed_out(field)
            # The remaining time as every timeout, the connect's included: it bounds the DNS
            # lookup the pinned transport makes.
            request = self._client.build_request(
                "GET", hop, timeout=remaining, extensions={"trace": deadline.trace}
            )
            try:
                response = self._client.send(request, stream=True)
            except BlockedUrl as exc:  # the connect-time check: the resolved addresses
                raise PublicJobError(f"{refused}: {exc}.") from None
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

    def _check(self, url: str, refused: str) -> httpx.URL:
        """The hop's URL as httpx will send it, refused early when it can be without DNS."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise PublicJobError(f"{refused}: the URL is not valid.") from None
        # Validate the URL exactly as httpx will send it: the stdlib and httpx parse odd URLs
        # (backslashes, stray '@') differently, and the host checked must be the host connected.
        canonical = str(parsed)
        refusal = early_refusal(canonical, self._allow)
        if refusal is not None:
            raise PublicJobError(f"{refused}: {refusal}.")
        if urlsplit(canonical).hostname != parsed.raw_host.decode("ascii").lower():
            raise PublicJobError(f"{refused}: the URL is not valid.")
        return parsed

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

    def _read_body(self, response: httpx.Response, field: str, deadline: Deadline) -> bytes:
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
