"""Stores shared between instances on real Redis servers: no re-upload of a value another
instance wrote (SET NX after an existence check), and clear() bounded to exactly its prefix."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from lmcache_core.memory import BufferPool
from lmcache_core.storage import StoreContext
from lmcache_core.testing.servers import RedisCluster, RedisServer
from lmcache_core.testing.storage_tests import assert_chunk_is, make_chunk, make_key
from lmcache_storage_redis.store import RedisStore, chunk_pattern, glob_escape


@pytest.fixture
def pool() -> Iterator[BufferPool]:
    p = BufferPool()
    yield p
    assert p.live_count() == 0


@pytest.fixture(params=["standalone", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "standalone":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    return cluster.url


def _store(url: str, pool: BufferPool, prefix: str, extra: str = "") -> RedisStore:
    return RedisStore.from_url(f"{url}?prefix={prefix}{extra}", StoreContext(pool))


def _set_calls(store: RedisStore) -> int:
    """SET commands the server (every node of a cluster) has executed."""
    client = store.client
    if hasattr(client, "get_nodes"):
        infos = list(client.info("commandstats", target_nodes=client.ALL_NODES).values())
    else:
        infos = [client.info("commandstats")]
    return sum(int(i.get("cmdstat_set", {}).get("calls", 0)) for i in infos)


def test_second_writer_does_not_upload_again(url: str, pool: BufferPool, unique_prefix: str) -> None:
    a, b = _store(url, pool, unique_prefix), _store(url, pool, unique_prefix)
    key = make_key(1, unique_prefix)
    c = make_chunk(pool, key)
    try:
        start = _set_calls(a)
        assert a.put(key, c) is True
        before = _set_calls(b)
        assert before == start + 1, "the first put must be one SET (the counter must see it)"
        assert b.put(key, c) is True
        assert a.put(key, c) is True
        assert _set_calls(b) == before, "a value already on the server was sent again"
        assert (a.writes, a.bytes_written, a.skipped_writes) == (1, c.header.image_len, 1)
        assert (b.writes, b.bytes_written, b.skipped_writes) == (0, 0, 1)
    finally:
        c.release()
        a.clear()
        a.close()
        b.close()


def test_put_many_uploads_only_the_missing(url: str, pool: BufferPool, unique_prefix: str) -> None:
    a, b = _store(url, pool, unique_prefix, "&batch=4"), _store(url, pool, unique_prefix, "&batch=4")
    keys = [make_key(i, unique_prefix) for i in range(10)]
    chunks = [make_chunk(pool, k) for k in keys]
    try:
        assert a.put_many(list(zip(keys[::2], chunks[::2]))) == [True] * 5
        assert b.put_many(list(zip(keys, chunks))) == [True] * 10
        assert (b.writes, b.skipped_writes) == (5, 5)
        assert b.bytes_written == sum(c.header.image_len for c in chunks[1::2])
        got = b.get_many(keys)
        try:
            for k, g in zip(keys, got):
                assert_chunk_is(g, k)
        finally:
            for g in got:
                if g is not None:
                    g.release()
    finally:
        for c in chunks:
            c.release()
        b.clear()
        a.close()
        b.close()


def test_lost_race_keeps_the_first_value(redis_server: RedisServer, pool: BufferPool, unique_prefix: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer sets the key between our check and our SET: NX leaves its value alone."""
    store = _store(redis_server.url, pool, unique_prefix)
    key = make_key(1, unique_prefix)
    store.client.set(store.key_name(key), b"first writer's value")
    monkeypatch.setattr(store, "_present", lambda names: [False] * len(names))
    c = make_chunk(pool, key)
    try:
        assert store.put(key, c) is True
        assert store.client.get(store.key_name(key)) == b"first writer's value"
        assert (store.writes, store.skipped_writes) == (0, 1)
    finally:
        c.release()
        store.clear()
        store.close()


def test_ttl_is_renewed_without_upload(redis_server: RedisServer, pool: BufferPool, unique_prefix: str) -> None:
    store = _store(redis_server.url, pool, unique_prefix, "&ttl=120")
    key = make_key(1, unique_prefix)
    c = make_chunk(pool, key)
    try:
        assert store.put(key, c)
        store.client.expire(store.key_name(key), 10)
        assert store.put(key, c)
        assert 100 < store.client.ttl(store.key_name(key)) <= 120
        assert (store.writes, store.skipped_writes) == (1, 1)
    finally:
        c.release()
        store.clear()
        store.close()


# -- clear is bounded to exactly our prefix and namespaces ----------------------------------------------
def _put(store: RedisStore, pool: BufferPool, key: Any) -> None:
    c = make_chunk(pool, key)
    try:
        assert store.put(key, c)
    finally:
        c.release()


def test_clear_does_not_reach_a_longer_prefix(url: str, pool: BufferPool, unique_prefix: str) -> None:
    """The issue's reproduction: prefix ``lmcache`` deleted the keys of prefix ``lmcache/team-b``."""
    outer = _store(url, pool, unique_prefix)
    inner = _store(url, pool, f"{unique_prefix}/team-b")
    k = make_key(1, unique_prefix)
    try:
        _put(outer, pool, k)
        _put(inner, pool, k)  # the same namespace and digest, under the longer prefix
        outer.clear(all_namespaces=True)
        assert outer.exists([k]) == [False]
        assert inner.exists([k]) == [True], "clear() of prefix P deleted keys of prefix P/team-b"
    finally:
        inner.clear(all_namespaces=True)
        outer.close()
        inner.close()


def test_clear_escapes_glob_characters(url: str, pool: BufferPool, unique_prefix: str) -> None:
    """The issue's reproduction: prefix ``p*`` deleted unrelated keys."""
    star = _store(url, pool, f"{unique_prefix}p*")
    other = _store(url, pool, f"{unique_prefix}pq")
    k = make_key(1, unique_prefix)
    plain = f"{unique_prefix}px-unrelated"
    try:
        _put(star, pool, k)
        _put(other, pool, k)
        star.client.set(plain, b"not ours")
        star.clear(all_namespaces=True)
        assert star.exists([k]) == [False]
        assert other.exists([k]) == [True], "clear() of prefix p* deleted keys of prefix pq"
        assert star.client.get(plain) == b"not ours"
    finally:
        other.clear(all_namespaces=True)
        star.client.delete(plain)
        star.close()
        other.close()


def test_tenant_clear_keeps_other_tenants(url: str, pool: BufferPool, unique_prefix: str) -> None:
    a, b = _store(url, pool, unique_prefix), _store(url, pool, unique_prefix)
    ka = [make_key(i, "tenant-a" + unique_prefix) for i in range(3)]
    kb = [make_key(i, "tenant-b" + unique_prefix) for i in range(3)]
    try:
        for k in ka:
            _put(a, pool, k)
        for k in kb:
            _put(b, pool, k)
        b.clear()
        assert a.exists(ka) == [True] * 3, "tenant b's clear() deleted tenant a's values"
        assert a.exists(kb) == [False] * 3
        b.clear(namespace=ka[0].namespace)
        assert a.exists(ka) == [False] * 3
    finally:
        a.clear(all_namespaces=True)
        a.close()
        b.close()


def test_glob_escape() -> None:
    assert glob_escape("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"
    assert chunk_pattern("lm", b"\x00" * 16).startswith("lm/" + "00" * 16 + "/[0-9a-f]")
