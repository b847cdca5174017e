"""Output objects (images, videos): where workers put them and the links clients GET.

``url()`` is string work only: the API promises ``future_links`` before any object exists. It is
the object's canonical link, the one job records keep. ``present()`` turns a canonical link into
the one a client is given at that moment: the same link for a public bucket, a presigned one
with a bounded lifetime for a private bucket (R24), made afresh on every fetch and webhook, so a
link read late is still valid for its whole lifetime.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, unquote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from storage.layout import TEMP_LIFETIME_SECONDS, TEMP_PREFIX

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from dreamq.settings import Settings

# An output is written once under a fresh key and never rewritten, so any cache may keep it.
IMMUTABLE_CACHE_CONTROL = "public, max-age=31536000, immutable"
# A private bucket's outputs are one client's: browsers may keep them, shared caches may not.
PRIVATE_CACHE_CONTROL = "private, max-age=31536000, immutable"

MAX_PRESIGN_SECONDS = 7 * 24 * 3600
"""The longest lifetime S3 (Signature Version 4) accepts for a presigned link."""

# Path style because MinIO, moto and most self-hosted servers have no per-bucket DNS names.
# Signature version 4 named explicitly: boto3 still presigns S3 links with version 2 otherwise,
# which newer regions and servers refuse.
S3_CLIENT_CONFIG = Config(
    s3={"addressing_style": "path"},
    signature_version="s3v4",
    retries={"max_attempts": 5, "mode": "standard"},
)


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def url(self, key: str) -> str: ...

    def present(self, url: str) -> str:
        """The link to give a client for a canonical `url()`; anything else unchanged."""
        ...

    def exists(self, key: str) -> bool: ...

    def get(self, key: str) -> bytes: ...  # for tests and tooling; KeyError when missing


def check_key(key: str) -> str:
    # Every store checks, not only the local one: HTTP clients normalise ``..`` out of a URL,
    # so such a key would also get a public link that points at some other object.
    parts = key.split("/")
    if not key or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


def _join_url(base: str, key: str) -> str:
    return f"{base.rstrip('/')}/{quote(key, safe='/')}"


class S3ObjectStore:
    """Objects in one bucket of S3 or an S3-compatible server, under an optional prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: S3Client,
        public_base: str,
        presign_seconds: int | None = None,
    ):
        """`presign_seconds` set: the bucket is private, and clients get presigned links that
        live that long (`temp` outputs' links at most the day their objects live)."""
        if presign_seconds is not None and not 0 < presign_seconds <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"presigned links live 1 to {MAX_PRESIGN_SECONDS} seconds")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client  # boto3 clients are thread-safe: one per process, never per job
        self._public_base = public_base
        self._presign_seconds = presign_seconds

    def _full_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._client.put_object(
            Bucket=self.bucket,
            Key=self._full_key(key),
            Body=data,
            ContentType=content_type,
            CacheControl=(
                IMMUTABLE_CACHE_CONTROL if self._presign_seconds is None else PRIVATE_CACHE_CONTROL
            ),
        )

    def url(self, key: str) -> str:
        return _join_url(self._public_base, self._full_key(key))

    def present(self, url: str) -> str:
        base = self._public_base.rstrip("/") + "/"
        if self._presign_seconds is None or not url.startswith(base):
            return url  # a public bucket, or not one of ours (a base64 output)
        full_key = unquote(url[len(base) :])
        key = full_key[len(self.prefix) + 1 :] if self.prefix else full_key
        lifetime = self._presign_seconds
        if key.startswith(TEMP_PREFIX):
            lifetime = min(lifetime, TEMP_LIFETIME_SECONDS)
        # Signing is local computation: no request reaches S3 here.
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": full_key}, ExpiresIn=lifetime
        )

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._full_key(key))
        except ClientError as exc:
            # HEAD has no body, so a missing key is only the bare status code.
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def expire_prefix(self, prefix: str, days: int) -> None:
        """Have the bucket delete objects under ``prefix`` after ``days``: one lifecycle rule,
        added beside the operator's own rules, never replacing them."""
        rule_id = f"dreamq-expire-{prefix.strip('/').replace('/', '-')}"
        try:
            rules = self._client.get_bucket_lifecycle_configuration(Bucket=self.bucket)["Rules"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
                raise
            rules = []
        if any(rule.get("ID") == rule_id for rule in rules):
            return
        rule: Any = {
            "ID": rule_id,
            "Filter": {"Prefix": self._full_key(prefix.rstrip("/")) + "/"},
            "Status": "Enabled",
            "Expiration": {"Days": days},
        }
        self._client.put_bucket_lifecycle_configuration(
            Bucket=self.bucket, LifecycleConfiguration={"Rules": [*rules, rule]}
        )

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._full_key(key))
        except self._client.exceptions.NoSuchKey:
            raise KeyError(key) from None
        return response["Body"].read()


class LocalDirObjectStore:
    """Objects as files under ``root``, served by the API under ``/files/``."""

    def __init__(self, root: Path, public_base: str):
        self.root = root.resolve()
        self._public_base = public_base

    def path_for(self, key: str) -> Path:
        """The file of ``key``; ValueError for a key that would leave ``root``."""
        path = (self.root / check_key(key)).resolve()
        # resolve() follows symlinks, so a link inside root that points outside is refused too.
        if not path.is_relative_to(self.root):
            raise ValueError(f"object key {key!r} escapes the storage directory")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        # content_type is not stored: the file route derives it from the key's extension.
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temp file in the same directory, so os.replace is an atomic rename on one filesystem
        # and a reader sees either no file or the whole file. The dot hides it from listings.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()  # without fsync a crash may keep the rename but not the data
                os.fsync(file.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the API may run as another user
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def url(self, key: str) -> str:
        return _join_url(self._public_base, check_key(key))

    def present(self, url: str) -> str:
        return url

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def get(self, key: str) -> bytes:
        try:
            return self.path_for(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(key) from None


class MemoryObjectStore:
    """The in-memory twin for unit tests; it checks keys like the real stores do."""

    def __init__(self, public_base: str = "memory://outputs"):
        self._public_base = public_base
        self._objects: dict[str, tuple[bytes, str]] = {}
        self._lock = threading.Lock()  # workers under test may put from several threads

    def put(self, key: str, data: bytes, content_type: str) -> None:
        with self._lock:
            self._objects[check_key(key)] = (bytes(data), content_type)

    def url(self, key: str) -> str:
        return _join_url(self._public_base, check_key(key))

    def present(self, url: str) -> str:
        return url

    def exists(self, key: str) -> bool:
        with self._lock:
            return check_key(key) in self._objects

    def get(self, key: str) -> bytes:
        with self._lock:
            return self._objects[check_key(key)][0]

    def content_type(self, key: str) -> str:
        with self._lock:
            return self._objects[check_key(key)][1]


def s3_public_base(bucket: str, endpoint_url: str | None, public_url: str | None) -> str:
    if public_url:
        return public_url
    if endpoint_url:
        return f"{endpoint_url.rstrip('/')}/{bucket}"
    return f"https://{bucket}.s3.amazonaws.com"


def open_object_store(settings: Settings) -> ObjectStore:
    """Build the store that settings.storage_url names; call once per process."""
    url = urlsplit(settings.storage_url)
    if url.scheme == "file":
        root = Path(unquote(url.path))
        root.mkdir(parents=True, exist_ok=True)
        return LocalDirObjectStore(root, f"{settings.public_url}/files")
    if url.scheme != "s3" or not url.netloc:
        raise ValueError(f"unsupported storage URL {settings.storage_url!r}")
    bucket = url.netloc
    # Credentials and region come from boto3's own chain (AWS_* variables, profiles, roles).
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=S3_CLIENT_CONFIG)
    return S3ObjectStore(
        bucket,
        url.path,
        client=client,
        public_base=s3_public_base(bucket, settings.s3_endpoint_url, settings.s3_public_url),
        presign_seconds=(
            settings.output_link_seconds if settings.output_links == "presigned" else None
        ),
    )


Present = Callable[[str], str]
"""`ObjectStore.present`: a canonical output link to the link a client is given now."""
