"""The shared storage contract against real Redis servers: standalone, cluster, unix socket, ACL user."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from lmcache_core.keys import ChunkKey
from lmcache_core.memory import BufferPool
from lmcache_core.storage import Store, StoreContext
from lmcache_core.testing.servers import RedisCluster, RedisServer, ServerUnavailable
from lmcache_core.testing.storage_tests import StoreTests, make_chunk, make_key
from lmcache_storage_redis.store import RedisStore


class _Backdoor(StoreTests):
    """Raw GET/SET through the client library, around the store's own logic."""

    def raw_get(self, store: Store, key: ChunkKey) -> bytes | None:
        assert isinstance(store, RedisStore)
        return store.client.get(store.key_name(key))

    def raw_set(self, store: Store, key: ChunkKey, data: bytes) -> None:
        assert isinstance(store, RedisStore)
        store.client.set(store.key_name(key), data)


class TestRedisStandalone(_Backdoor):
    @pytest.fixture
    def store_factory(self, redis_server: RedisServer, unique_prefix: str) -> Callable[[StoreContext], Store]:
        return lambda ctx: RedisStore.from_url(f"{redis_server.url}?prefix={unique_prefix}", ctx)


class TestRedisTls(_Backdoor):
    large_nbytes = 16 << 20
    state_machine_examples = 5

    @pytest.fixture
    def store_factory(self, redis_tls_server: RedisServer, unique_prefix: str) -> Callable[[StoreContext], Store]:
        url = f"{redis_tls_server.url}?prefix={unique_prefix}&ssl_ca_certs={redis_tls_server.ca_file}"
        return lambda ctx: RedisStore.from_url(url, ctx)

    def test_unverified_certificate_is_unhealthy(self, redis_tls_server: RedisServer) -> None:
        store = RedisStore.from_url(redis_tls_server.url, StoreContext(BufferPool()))  # system CAs only
        h = store.health()
        store.close()
        assert not h.ok and "certificate" in h.reason.lower()


class TestRedisCluster(_Backdoor):
    large_nbytes = 16 << 20

    @pytest.fixture
    def store_factory(self, redis_cluster: RedisCluster, unique_prefix: str) -> Callable[[StoreContext], Store]:
        return lambda ctx: RedisStore.from_url(f"{redis_cluster.url}?prefix={unique_prefix}", ctx)


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private server with a unix socket and an ACL user limited to keys starting with ``lm``."""
    sock = tmp_path_factory.mktemp("sock") / "redis.sock"
    try:
        server = RedisServer.redis(extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"]).start()
    except ServerUnavailable as exc:
        pytest.skip(f"redis-server unavailable: {exc}")
    server.command("ACL", "SETUSER", "lmuser", "on", ">s3cret", "~lm*", "+@all")
    server.sock = sock  # type: ignore[attr-defined]
    yield server
    server.close()


class TestRedisUnixSocketWithAclUser(_Backdoor):
    large_nbytes = 8 << 20
    state_machine_examples = 5

    @pytest.fixture
    def store_factory(self, acl_server: RedisServer, unique_prefix: str) -> Callable[[StoreContext], Store]:
        url = f"unix://lmuser:s3cret@{acl_server.sock}?prefix=lm{unique_prefix}"  # type: ignore[attr-defined]
        return lambda ctx: RedisStore.from_url(url, ctx)

    def test_acl_forbids_other_prefixes(self, acl_server: RedisServer, pool: BufferPool) -> None:
        url = f"unix://lmuser:s3cret@{acl_server.sock}?prefix=other"  # type: ignore[attr-defined]
        store = RedisStore.from_url(url, StoreContext(pool))
        c = make_chunk(pool, make_key(1))
        try:
            with pytest.raises(Exception, match="NOPERM|permission"):
                store.put(make_key(1), c)
        finally:
            c.release()
            store.close()

    def test_wrong_password_is_unhealthy(self, acl_server: RedisServer, pool: BufferPool) -> None:
        url = f"unix://lmuser:wrong@{acl_server.sock}"  # type: ignore[attr-defined]
        store = RedisStore.from_url(url, StoreContext(pool))
        h = store.health()
        store.close()
        assert not h.ok
        assert "WRONGPASS" in h.reason.upper() or "invalid" in h.reason.lower(), h.reason


class TestRedisTtl:
    def test_ttl_is_set_on_values(self, redis_server: RedisServer, unique_prefix: str) -> None:
        pool = BufferPool()
        store = RedisStore.from_url(f"{redis_server.url}?prefix={unique_prefix}&ttl=120", StoreContext(pool))
        key = make_key(5)
        c = make_chunk(pool, key)
        try:
            store.put(key, c)
        finally:
            c.release()
        ttl = store.client.ttl(store.key_name(key))
        store.clear()
        store.close()
        assert 100 < ttl <= 120
        assert pool.live_count() == 0


def test_connections_send_values_without_copying(redis_server: RedisServer, redis_cluster: RedisCluster) -> None:
    """Both client kinds use the zero-copy packer (memoryviews go to sendall as they are)."""
    pool = BufferPool()
    for url in (redis_server.url, redis_cluster.url):
        store = RedisStore.from_url(url, StoreContext(pool))
        try:
            assert store.health().ok
            client = store.client
            pools = ([n.redis_connection.connection_pool for n in client.get_nodes()]
                     if hasattr(client, "get_nodes") else [client.connection_pool])
            for p in pools:
                conn = p.get_connection()
                try:
                    assert type(conn._command_packer).__name__ == "PythonRespSerializer"
                    packed = conn.pack_command("SET", "k", memoryview(b"x" * 100_000))
                    assert any(isinstance(part, memoryview) for part in packed)
                finally:
                    p.release(conn)
        finally:
            store.close()


def test_direct_read_error_reply_and_reuse(redis_server: RedisServer, unique_prefix: str) -> None:
    """An error reply (WRONGTYPE) raises and leaves the connection usable; a restart is survived."""
    import redis as redis_py

    pool = BufferPool()
    store = RedisStore.from_url(f"{redis_server.url}?prefix={unique_prefix}&max_connections=1", StoreContext(pool))
    key = make_key(1)
    try:
        store.client.rpush(store.key_name(key), "x")
        with pytest.raises(redis_py.exceptions.ResponseError, match="WRONGTYPE"):
            store.get(key)
        store.client.delete(store.key_name(key))
        assert store.get(key) is None
        c = make_chunk(pool, key)
        try:
            store.put(key, c)
        finally:
            c.release()
        got = store.get(key)
        assert got is not None
        got.release()
    finally:
        store.clear()
        store.close()
    assert pool.live_count() == 0


def test_direct_read_survives_server_restart(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory.redis()
    pool = BufferPool()
    store = RedisStore.from_url(server.url, StoreContext(pool))
    key = make_key(2)
    try:
        assert store.get(key) is None  # opens a pooled connection
        server.restart()  # that connection is now stale
        assert store.get(key) is None, "the stale connection must be replaced, not reported as an error"
    finally:
        store.close()
