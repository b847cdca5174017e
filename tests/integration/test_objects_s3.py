"""S3ObjectStore against a real S3 protocol server (moto) and plain HTTP GETs of its URLs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from botocore.exceptions import ClientError

from dreamq.settings import Settings
from storage.objects import IMMUTABLE_CACHE_CONTROL, S3ObjectStore, open_object_store
from tests.support.s3 import MotoS3, moto_s3_server

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
