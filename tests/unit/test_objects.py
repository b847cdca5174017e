"""LocalDirObjectStore and MemoryObjectStore: the two stores that need no server."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from dreamq.settings import Settings
from storage.objects import (
    LocalDirObjectStore,
    MemoryObjectStore,
    ObjectStore,
    S3ObjectStore,
    open_object_store,
    s3_public_base,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
ESCAPING_KEYS = ["../x.png", "a/../../x.png", "/etc/passwd", "", "a//b.png", "a/./b.png", "a\\b"]


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalDirObjectStore(tmp_path / "outputs", "http://api.test/files")
    return MemoryObjectStore("http://api.test/files")


def test_put_then_get_exists(store: ObjectStore) -> None:
    assert not store.exists("jobs/1/0.png")
    store.put("jobs/1/0.png", PNG, "image/png")
    assert store.exists("jobs/1/0.png")
    assert store.get("jobs/1/0.png") == PNG


def test_put_overwrites(store: ObjectStore) -> None:
    store.put("a.png", b"old", "image/png")
    store.put("a.png", b"new", "image/png")
    assert store.get("a.png") == b"new"


def test_get_missing_raises_key_error(store: ObjectStore) -> None:
    with pytest.raises(KeyError):
        store.get("nope.png")


def test_url_is_known_before_the_object_exists(store: ObjectStore) -> None:
    assert store.url("jobs/1/0.png") == "http://api.test/files/jobs/1/0.png"
    assert store.url("a b.png") == "http://api.test/files/a%20b.png"


@pytest.mark.parametrize("key", ESCAPING_KEYS)
def test_bad_keys_are_refused(store: ObjectStore, key: str) -> None:
    for call in (
        lambda: store.put(key, b"x", "image/png"),
        lambda: store.url(key),
        lambda: store.exists(key),
        lambda: store.get(key),
    ):
        with pytest.raises(ValueError):
            call()


def test_local_writes_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalDirObjectStore(tmp_path, "http://api.test/files")
    store.put("jobs/7/0.png", PNG, "image/png")
    store.put("jobs/7/0.png", PNG[::-1], "image/png")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["0.png"]
    assert (tmp_path / "jobs/7/0.png").stat().st_mode & 0o777 == 0o644


def test_local_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalDirObjectStore(tmp_path, "http://api.test/files")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put("0.png", PNG, "image/png")
    assert list(tmp_path.iterdir()) == []


def test_local_path_for(tmp_path: Path) -> None:
    store = LocalDirObjectStore(tmp_path, "http://api.test/files")
    assert store.path_for("jobs/1/0.png") == tmp_path.resolve() / "jobs/1/0.png"
    with pytest.raises(ValueError):
        store.path_for("../outside.png")


def test_local_refuses_a_symlink_out_of_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    store = LocalDirObjectStore(root, "http://api.test/files")
    with pytest.raises(ValueError):
        store.put("link/x.png", PNG, "image/png")
    assert list(outside.iterdir()) == []


def test_memory_is_thread_safe_and_keeps_content_type() -> None:
    store = MemoryObjectStore()
    threads = [
        threading.Thread(target=store.put, args=(f"{i}.png", PNG, "image/png")) for i in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(store.get(f"{i}.png") == PNG for i in range(20))
    assert store.content_type("3.png") == "image/png"
    assert store.url("3.png") == "memory://outputs/3.png"


def test_factory_file_url_creates_the_directory(tmp_path: Path) -> None:
    root = tmp_path / "new" / "outputs"
    settings = Settings(storage_url=f"file://{root}", public_url="http://api.test:8000/")
    store = open_object_store(settings)
    assert isinstance(store, LocalDirObjectStore)
    assert root.is_dir()
    assert store.url("1/0.png") == "http://api.test:8000/files/1/0.png"


def test_factory_s3_url_builds_urls_without_network() -> None:
    settings = Settings(storage_url="s3://outs/img/", s3_endpoint_url="http://s3.test:9000")
    store = open_object_store(settings)
    assert isinstance(store, S3ObjectStore)
    assert (store.bucket, store.prefix) == ("outs", "img")
    assert store.url("1/0.png") == "http://s3.test:9000/outs/img/1/0.png"


def test_s3_public_base_defaults() -> None:
    assert s3_public_base("b", None, "https://cdn.test") == "https://cdn.test"
    assert s3_public_base("b", "http://s3.test:9000/", None) == "http://s3.test:9000/b"
    assert s3_public_base("b", None, None) == "https://b.s3.amazonaws.com"
