"""S3 stores shared between instances, on a real S3 server (SeaweedFS): no re-upload of an object
another instance wrote (HEAD, then If-None-Match: *), and clear()/usage() bounded to exactly the prefix."""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from lmcache_core.keys import ChunkKey
from lmcache_core.memory import BufferPool
from lmcache_core.storage import StoreContext
from lmcache_core.testing.servers import SeaweedS3
from lmcache_core.testing.storage_tests import LARGE_GEOMETRY, assert_chunk_is, make_chunk, make_key
from lmcache_storage_s3.store import S3Store


@pytest.fixture
def pool() -> Iterator[BufferPool]:
    p = BufferPool()
    yield p
    assert p.live_count() == 0


def _store(s3: SeaweedS3, bucket: str, prefix: str, pool: BufferPool, **options: str) -> S3Store:
    return S3Store.from_url(s3.url(bucket, prefix, **options), StoreContext(pool))


def _count_uploads(store: S3Store) -> list[str]:
    """Names of the upload requests the store's client sends (PutObject, CompleteMultipartUpload)."""
    sent: list[str] = []

    def hook(model: Any, **_: Any) -> None:
        sent.append(model.name)

    for op in ("PutObject", "CreateMultipartUpload", "CompleteMultipartUpload"):
        store.client.meta.events.register(f"before-call.s3.{op}", hook)
    return sent


def _put(store: S3Store, pool: BufferPool, key: ChunkKey, geometry=None) -> bool:  # type: ignore[no-untyped-def]
    c = make_chunk(pool, key, geometry) if geometry is not None else make_chunk(pool, key)
    try:
        return store.put(key, c)
    finally:
        c.release()


def _raw(store: S3Store, key: ChunkKey) -> bytes:
    return store.client.get_object(Bucket=store.options.bucket, Key=store.object_key(key))["Body"].read()


def test_second_writer_does_not_upload_again(s3_server: SeaweedS3, s3_bucket: str, pool: BufferPool) -> None:
    a, b = _store(s3_server, s3_bucket, "lm", pool), _store(s3_server, s3_bucket, "lm", pool)
    keys = [make_key(i, "shared") for i in range(4)]
    try:
        sent_a, sent_b = _count_uploads(a), _count_uploads(b)
        assert _put(a, pool, keys[0]) and _put(a, pool, keys[1])
        assert sent_a == ["PutObject", "PutObject"]
        assert _put(b, pool, keys[0])
        chunks = [make_chunk(pool, k) for k in keys]
        try:
            assert b.put_many(list(zip(keys, chunks))) == [True] * 4
        finally:
            for c in chunks:
                c.release()
        assert sent_b == ["PutObject", "PutObject"], "objects already in the bucket were uploaded again"
        assert (a.writes, a.skipped_writes) == (2, 0)
        assert (b.writes, b.skipped_writes) == (2, 3)
        assert b.bytes_written == 2 * chunks[0].header.image_len
    finally:
        a.clear(all_namespaces=True)
        a.close()
        b.close()


@pytest.mark.parametrize("size", ["single", "multipart"])
def test_lost_race_keeps_the_first_object(s3_server: SeaweedS3, s3_bucket: str, pool: BufferPool,
                                          monkeypatch: pytest.MonkeyPatch, size: str) -> None:
    """Another writer's object appears between our HEAD and our PUT: If-None-Match refuses ours."""
    store = _store(s3_server, s3_bucket, "race", pool, multipart_threshold="6MiB", part_size="5MiB")
    key = make_key(1, "race", num_tokens=1024 if size == "multipart" else 16)
    store.client.put_object(Bucket=s3_bucket, Key=store.object_key(key), Body=b"first writer's object")
    monkeypatch.setattr(store, "_state", lambda k: "missing")
    sent = _count_uploads(store)
    try:
        assert _put(store, pool, key, LARGE_GEOMETRY if size == "multipart" else None)
        assert _raw(store, key) == b"first writer's object"
        assert (store.writes, store.skipped_writes) == (0, 1)
        assert sent[-1] == ("CompleteMultipartUpload" if size == "multipart" else "PutObject")
        uploads = store.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        assert not [u for u in uploads if u["Key"] == store.object_key(key)], "the refused upload was not aborted"
    finally:
        store.clear(all_namespaces=True)
        store.close()


def test_expired_object_is_replaced(s3_server: SeaweedS3, s3_bucket: str, pool: BufferPool) -> None:
    store = _store(s3_server, s3_bucket, "ttl", pool, ttl="1")
    key = make_key(1, "ttl")
    try:
        assert _put(store, pool, key)
        time.sleep(2.1)
        assert store.exists([key]) == [False]
        assert _put(store, pool, key)
        assert store.writes == 2 and store.exists([key]) == [True]
        got = store.get(key)
        try:
            assert_chunk_is(got, key)
        finally:
            if got is not None:
                got.release()
    finally:
        store.clear()
        store.close()


def test_server_without_conditional_puts_falls_back(s3_server: SeaweedS3, s3_bucket: str, pool: BufferPool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError

    store = _store(s3_server, s3_bucket, "nocond", pool)
    real = store.client.put_object

    def put_object(**kwargs: Any) -> Any:
        if "IfNoneMatch" in kwargs:
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no conditions here"}}, "PutObject")
        return real(**kwargs)

    monkeypatch.setattr(store.client, "put_object", put_object)
    keys = [make_key(i, "nocond") for i in range(2)]
    try:
        assert _put(store, pool, keys[0]) and _put(store, pool, keys[1])
        assert store.writes == 2 and store.exists(keys) == [True, True]
        assert store._conditional is False
    finally:
        store.clear()
        store.close()


def test_clear_and_usage_do_not_reach_a_longer_prefix(s3_server: SeaweedS3, s3_bucket: str,
                                                      pool: BufferPool) -> None:
    outer = _store(s3_server, s3_bucket, "lmcache", pool)
    inner = _store(s3_server, s3_bucket, "lmcache/team-b", pool)
    k = make_key(1, "p")
    try:
        assert _put(outer, pool, k) and _put(inner, pool, k)
        assert outer.usage().items == 1, "usage() counted a longer prefix's objects"
        outer.clear(all_namespaces=True)
        assert outer.exists([k]) == [False]
        assert inner.exists([k]) == [True], "clear() of prefix P deleted objects of prefix P/team-b"
    finally:
        inner.clear(all_namespaces=True)
        outer.close()
        inner.close()


def test_tenant_clear_keeps_other_tenants(s3_server: SeaweedS3, s3_bucket: str, pool: BufferPool) -> None:
    a, b = _store(s3_server, s3_bucket, "lm", pool), _store(s3_server, s3_bucket, "lm", pool)
    ka = [make_key(i, "tenant-a") for i in range(2)]
    kb = [make_key(i, "tenant-b") for i in range(2)]
    try:
        for k in ka:
            assert _put(a, pool, k)
        for k in kb:
            assert _put(b, pool, k)
        b.clear()
        assert a.exists(ka) == [True, True], "tenant b's clear() deleted tenant a's objects"
        assert a.exists(kb) == [False, False]
        b.clear(namespace=ka[0].namespace)
        assert a.exists(ka) == [False, False]
    finally:
        a.clear(all_namespaces=True)
        a.close()
        b.close()
