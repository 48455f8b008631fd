"""The shared storage contract against a real S3 server (SeaweedFS), plus S3-specific paths."""

from __future__ import annotations

from typing import Callable

import pytest

from lmcache_core.errors import ConfigError
from lmcache_core.keys import ChunkKey
from lmcache_core.memory import BufferPool
from lmcache_core.plugins import PluginManager
from lmcache_core.storage import Store, StoreContext
from lmcache_core.testing.servers import SeaweedS3, free_port
from lmcache_core.testing.storage_tests import LARGE_GEOMETRY, StoreTests, assert_chunk_is, make_chunk, make_key
from lmcache_storage_s3.store import S3Options, S3Store, ViewReader


class TestS3Store(StoreTests):
    state_machine_examples = 6
    threads = 4

    @pytest.fixture
    def store_factory(self, s3_server: SeaweedS3, s3_bucket: str,
                      unique_prefix: str) -> Callable[[StoreContext], Store]:
        # Small parts so the 32 MiB test goes through multipart upload and parallel ranged reads.
        url = s3_server.url(s3_bucket, f"lm/{unique_prefix}", multipart_threshold="12MiB", part_size="5MiB")
        return lambda ctx: S3Store.from_url(url, ctx)

    def raw_get(self, store: Store, key: ChunkKey) -> bytes | None:
        assert isinstance(store, S3Store)
        try:
            return store.client.get_object(Bucket=store.options.bucket, Key=store.object_key(key))["Body"].read()
        except store.client.exceptions.NoSuchKey:
            return None

    def raw_set(self, store: Store, key: ChunkKey, data: bytes) -> None:
        assert isinstance(store, S3Store)
        store.client.put_object(Bucket=store.options.bucket, Key=store.object_key(key), Body=data)


def test_multipart_object_is_one_object_with_parts(s3_server: SeaweedS3, s3_bucket: str) -> None:
    pool = BufferPool()
    store = S3Store.from_url(s3_server.url(s3_bucket, "mp", multipart_threshold="6MiB", part_size="5MiB"),
                             StoreContext(pool))
    key = make_key(1, num_tokens=1024)  # 16 MiB in LARGE_GEOMETRY: 4 parts
    c = make_chunk(pool, key, LARGE_GEOMETRY)
    try:
        store.put(key, c)
        head = store.client.head_object(Bucket=s3_bucket, Key=store.object_key(key))
        assert head["ContentLength"] == c.header.image_len
        assert "-" in head["ETag"], "a multipart upload has an ETag of the form md5-N"
    finally:
        c.release()
    got = store.get(key)
    try:
        assert_chunk_is(got, key, LARGE_GEOMETRY)
    finally:
        if got is not None:
            got.release()
        store.close()
    assert pool.live_count() == 0


def test_missing_bucket_is_unhealthy_with_the_fix(s3_server: SeaweedS3) -> None:
    store = S3Store.from_url(s3_server.url("no-such-bucket-here"), StoreContext(BufferPool()))
    h = store.health()
    store.close()
    assert not h.ok and "create_bucket=true" in h.reason


def test_create_bucket_option(s3_server: SeaweedS3, unique_prefix: str) -> None:
    store = S3Store.from_url(s3_server.url(f"made-{unique_prefix}", create_bucket="true"), StoreContext(BufferPool()))
    try:
        assert store.health().ok
        assert store.client.head_bucket(Bucket=f"made-{unique_prefix}")
    finally:
        store.close()


def test_ttl_expired_objects_are_misses(s3_server: SeaweedS3, s3_bucket: str) -> None:
    pool = BufferPool()
    store = S3Store.from_url(s3_server.url(s3_bucket, "ttl", ttl="1"), StoreContext(pool))
    key = make_key(9)
    c = make_chunk(pool, key)
    try:
        store.put(key, c)
    finally:
        c.release()
    assert store.exists([key]) == [True]
    import time

    time.sleep(2.1)
    assert store.exists([key]) == [False]
    assert store.get(key) is None
    store.close()
    assert pool.live_count() == 0


def test_dead_endpoint_is_unhealthy_and_from_url_does_not_connect() -> None:
    port = free_port()
    store = S3Store.from_url(f"s3://b?endpoint_url=http://127.0.0.1:{port}&access_key_id=a&secret_access_key=b"
                             f"&region=us-east-1&max_attempts=1", StoreContext(BufferPool()))
    h = store.health()
    store.close()
    assert not h.ok and str(port) in h.reason


@pytest.mark.parametrize("url,match", [
    ("s3://", "name the bucket"),
    ("s3://b?part_size=1MiB", "at least 5MiB"),
    ("s3://b?access_key_id=x", "both access_key_id"),
    ("s3://b?colour=red", "unknown option"),
])
def test_bad_urls_name_the_problem(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        S3Options.from_url(url)


def test_view_reader_returns_views_not_copies() -> None:
    data = bytearray(b"abcdefgh")
    r = ViewReader(memoryview(data))
    part = r.read(3)
    assert isinstance(part, memoryview) and bytes(part) == b"abc"
    data[0] = ord("z")
    assert bytes(part) == b"zbc", "read() must be a view of the caller's buffer"
    assert r.seek(0, 2) == 8 and r.read(4).nbytes == 0 and len(r) == 8


def test_registered_through_the_entry_point() -> None:
    reg = PluginManager().storage_for_scheme("s3")
    assert reg.distribution == "lmcache-storage-s3" and reg.extra == "s3"
    assert reg.load() is S3Store
