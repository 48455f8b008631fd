"""The shared storage contract against a real valkey-server (standalone and cluster)."""

from __future__ import annotations

from typing import Callable

import pytest

from lmcache_core.keys import ChunkKey
from lmcache_core.memory import BufferPool
from lmcache_core.plugins import PluginManager
from lmcache_core.storage import Store, StoreContext
from lmcache_core.testing.servers import RedisCluster, RedisServer
from lmcache_core.testing.storage_tests import StoreTests
from lmcache_storage_valkey.store import ValkeyStore


class _Backdoor(StoreTests):
    def raw_get(self, store: Store, key: ChunkKey) -> bytes | None:
        assert isinstance(store, ValkeyStore)
        return store.client.get(store.key_name(key))

    def raw_set(self, store: Store, key: ChunkKey, data: bytes) -> None:
        assert isinstance(store, ValkeyStore)
        store.client.set(store.key_name(key), data)


class TestValkeyStandalone(_Backdoor):
    @pytest.fixture
    def store_factory(self, valkey_server: RedisServer, unique_prefix: str) -> Callable[[StoreContext], Store]:
        return lambda ctx: ValkeyStore.from_url(f"{valkey_server.url}?prefix={unique_prefix}", ctx)


class TestValkeyCluster(_Backdoor):
    large_nbytes = 16 << 20
    state_machine_examples = 8

    @pytest.fixture
    def store_factory(self, valkey_cluster: RedisCluster, unique_prefix: str) -> Callable[[StoreContext], Store]:
        return lambda ctx: ValkeyStore.from_url(f"{valkey_cluster.url}?prefix={unique_prefix}", ctx)


def test_server_is_valkey_and_client_is_valkey_py(valkey_server: RedisServer) -> None:
    store = ValkeyStore.from_url(valkey_server.url, StoreContext(BufferPool()))
    try:
        info = store.client.info("server")
        assert "valkey_version" in info or info.get("server_name") == "valkey", info
        assert type(store.client).__module__.startswith("valkey")
        conn = store.client.connection_pool.get_connection("SET")
        try:
            assert type(conn._command_packer).__name__ == "PythonRespSerializer"
        finally:
            store.client.connection_pool.release(conn)
    finally:
        store.close()


def test_password_protected_server(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory.valkey(password="pw")
    ok = ValkeyStore.from_url(server.url, StoreContext(BufferPool()))
    bad = ValkeyStore.from_url(f"valkey://127.0.0.1:{server.port}", StoreContext(BufferPool()))
    try:
        assert ok.health().ok
        h = bad.health()
        assert not h.ok and "auth" in h.reason.lower()
    finally:
        ok.close()
        bad.close()


def test_registered_through_the_entry_point() -> None:
    pm = PluginManager()
    for scheme in ("valkey", "valkeys", "valkey+unix", "valkey+cluster"):
        reg = pm.storage_for_scheme(scheme)
        assert reg.distribution == "lmcache-storage-valkey" and reg.extra == "valkey"
    assert pm.storage_for_scheme("valkey").load() is ValkeyStore
