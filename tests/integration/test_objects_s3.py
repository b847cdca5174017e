"""S3ObjectStore against a real S3 protocol server (moto) and plain HTTP GETs of its URLs."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from botocore.exceptions import ClientError
from pydantic import ValidationError

from dreamq.settings import Settings
from storage.objects import (
    IMMUTABLE_CACHE_CONTROL,
    PRIVATE_CACHE_CONTROL,
    S3ObjectStore,
    open_object_store,
)
from tests.support.s3 import SECRET_ACCESS_KEY, MotoS3, moto_s3_server

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3_server() as server:
        yield server


@pytest.fixture
def bucket(moto: MotoS3) -> str:
    # The server is shared by the module, so each test gets its own bucket.
    name = f"outputs-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    return name


def make_store(moto: MotoS3, bucket: str, prefix: str = "") -> S3ObjectStore:
    return S3ObjectStore(
        bucket, prefix, client=moto.client(), public_base=f"{moto.endpoint_url}/{bucket}"
    )


def test_put_stores_bytes_and_headers(moto: MotoS3, bucket: str) -> None:
    store = make_store(moto, bucket)
    assert not store.exists("jobs/1/0.png")
    store.put("jobs/1/0.png", PNG, "image/png")
    assert store.exists("jobs/1/0.png")
    assert store.get("jobs/1/0.png") == PNG
    head = moto.client().head_object(Bucket=bucket, Key="jobs/1/0.png")
    assert head["ContentType"] == "image/png"
    assert head["CacheControl"] == IMMUTABLE_CACHE_CONTROL


def test_url_answers_the_bytes_over_plain_http(moto: MotoS3, bucket: str) -> None:
    store = make_store(moto, bucket)
    url = store.url("jobs/1/0 final.png")  # promised before the object exists
    assert url == f"{moto.endpoint_url}/{bucket}/jobs/1/0%20final.png"
    assert httpx.get(url).status_code == 404
    store.put("jobs/1/0 final.png", PNG, "image/png")
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == IMMUTABLE_CACHE_CONTROL


def test_private_bucket_refuses_anonymous_get(moto: MotoS3) -> None:
    # Documents the deployment requirement: output links need an anonymous-read bucket policy.
    name = f"private-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name, public_read=False)
    store = make_store(moto, name)
    store.put("0.png", PNG, "image/png")
    assert httpx.get(store.url("0.png")).status_code == 403


def test_prefix_is_applied_to_keys_and_urls(moto: MotoS3, bucket: str) -> None:
    store = make_store(moto, bucket, prefix="/dreamq/outputs/")
    store.put("1/0.png", PNG, "image/png")
    listed = moto.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [obj["Key"] for obj in listed] == ["dreamq/outputs/1/0.png"]
    assert store.url("1/0.png") == f"{moto.endpoint_url}/{bucket}/dreamq/outputs/1/0.png"
    assert httpx.get(store.url("1/0.png")).content == PNG
    # A store without the prefix sees a different key space.
    assert not make_store(moto, bucket).exists("1/0.png")


def test_missing_object(moto: MotoS3, bucket: str) -> None:
    store = make_store(moto, bucket)
    assert not store.exists("nope.png")
    with pytest.raises(KeyError):
        store.get("nope.png")


def test_missing_bucket_is_an_error_not_absence(moto: MotoS3) -> None:
    store = make_store(moto, f"absent-{uuid.uuid4().hex[:12]}")
    with pytest.raises(ClientError, match="NoSuchBucket"):
        store.get("0.png")


def test_factory_uses_the_boto3_credential_chain(
    moto: MotoS3, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same variables a worker subprocess gets from MotoS3.env().
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)
    settings = Settings(storage_url=f"s3://{bucket}/out")
    assert settings.s3_endpoint_url == moto.endpoint_url
    store = open_object_store(settings)
    store.put("0.png", PNG, "image/png")
    assert store.url("0.png") == f"{moto.endpoint_url}/{bucket}/out/0.png"
    assert httpx.get(store.url("0.png")).content == PNG


# --- R24: a private bucket's links are presigned, with a bounded lifetime ----------------------


def private_store(moto: MotoS3, *, presign_seconds: int, prefix: str = "out") -> S3ObjectStore:
    name = f"private-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name, public_read=False)
    return S3ObjectStore(
        name,
        prefix,
        client=moto.client(),
        public_base=f"{moto.endpoint_url}/{name}",
        presign_seconds=presign_seconds,
    )


def query(url: str) -> dict[str, str]:
    return dict(httpx.URL(url).params.multi_items())


def sigv4_valid(url: str, secret: str = SECRET_ACCESS_KEY) -> bool:
    """Verify a presigned GET link the way S3 does (Signature Version 4, query form)."""
    parsed = httpx.URL(url)
    params = query(url)
    signature = params.pop("X-Amz-Signature")
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )
    canonical_request = "\n".join(
        ["GET", parsed.raw_path.split(b"?")[0].decode(), canonical_query,
         f"host:{parsed.netloc.decode()}", "", "host", "UNSIGNED-PAYLOAD"]
    )  # fmt: skip
    scope = params["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", params["X-Amz-Date"], scope,
         hashlib.sha256(canonical_request.encode()).hexdigest()]
    )  # fmt: skip
    key = f"AWS4{secret}".encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


def test_private_bucket_links_are_presigned_and_answer_the_bytes(moto: MotoS3) -> None:
    store = private_store(moto, presign_seconds=3600)
    key = "generations/abc-0.png"
    canonical = store.url(key)  # what the job record keeps
    store.put(key, PNG, "image/png")
    assert httpx.get(canonical).status_code == 403  # the bucket really is private

    link = store.present(canonical)
    assert link.startswith(canonical + "?")
    assert query(link)["X-Amz-Expires"] == "3600"
    response = httpx.get(link)
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["cache-control"] == PRIVATE_CACHE_CONTROL

    # moto accepts any signature and any date, so the signature is checked here: it covers this
    # object's path, and the same query string does not open another object.
    assert sigv4_valid(link)
    assert not sigv4_valid(store.url("generations/abc-1.png") + link[len(canonical) :])


def test_temp_links_live_at_most_a_day(moto: MotoS3) -> None:
    store = private_store(moto, presign_seconds=7 * 24 * 3600)
    temp = store.present(store.url("temp/generations/abc-0.png"))
    kept = store.present(store.url("generations/abc-0.png"))
    assert query(temp)["X-Amz-Expires"] == str(24 * 3600)
    assert query(kept)["X-Amz-Expires"] == str(7 * 24 * 3600)


def test_present_leaves_other_strings_alone(moto: MotoS3, bucket: str) -> None:
    private = private_store(moto, presign_seconds=60)
    assert private.present("iVBORw0KGgo=") == "iVBORw0KGgo="  # a base64 output
    assert private.present("https://elsewhere.example/x.png") == "https://elsewhere.example/x.png"
    public = make_store(moto, bucket)
    assert public.present(public.url("0.png")) == public.url("0.png")


def test_presign_lifetime_is_bounded(moto: MotoS3) -> None:
    with pytest.raises(ValueError, match="1 to 604800 seconds"):
        private_store(moto, presign_seconds=7 * 24 * 3600 + 1)
    with pytest.raises(ValidationError):
        Settings(storage_url="s3://b", output_links="presigned", output_link_seconds=10**6)
    with pytest.raises(ValidationError, match="needs S3 storage"):
        Settings(storage_url="file:///tmp/x", output_links="presigned")
