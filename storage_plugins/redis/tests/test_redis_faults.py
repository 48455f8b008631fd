"""Fault tests through the engine against a private redis-server: dead, restarted, hung, corrupt, full."""

from __future__ import annotations

import pytest

from lmcache_core.keys import ChunkKey
from lmcache_core.storage import Store
from lmcache_core.testing.fault_tests import (CHUNK, RemoteTier, RemoteTierFaultTests, engine_for, kv_for,
                                              retrieve_into_zeros)
from lmcache_core.testing.fixtures import ServerFactory
from lmcache_core.testing.servers import RedisServer


def raw_set(store: Store, key: ChunkKey, data: bytes) -> None:
    store.client.set(store.key_name(key), data)  # type: ignore[attr-defined]


def remote_for(server: RedisServer, name: str, url: str | None = None) -> RemoteTier:
    return RemoteTier(url=(url or server.url) + "?timeout=2&connect_timeout=0.5", name=name, stop=server.kill,
                      start=server.start, raw_set=raw_set, pid=lambda: server.proc.pid if server.proc else None, call_timeout_s=2.5)


class TestRedisFaults(RemoteTierFaultTests):
    @pytest.fixture
    def remote(self, server_factory: ServerFactory) -> RemoteTier:
        return remote_for(server_factory.redis(), "redis")


@pytest.mark.parametrize("policy", ["noeviction", "allkeys-lru"])
def test_past_maxmemory_engine_keeps_answering(server_factory: ServerFactory, policy: str) -> None:
    """Fill a 4 MiB server with 16 MiB of chunks: writes fail (noeviction) or evict (LRU); every
    hit a cold engine gets is bit-exact (retrieve_into_zeros checks) and nothing raises."""
    import torch

    server = server_factory.redis(maxmemory="4mb", maxmemory_policy=policy)
    a = engine_for(["memory://?capacity=256MiB", server.url])
    b = engine_for(["memory://?capacity=256MiB", server.url])
    try:
        runs = []
        for i in range(8):
            tokens = [i * 100_000 + t for t in range(CHUNK * 16)]  # 16 chunks of 128 KiB: 2 MiB per run
            kv, layers = kv_for(tokens, seed=i)
            a.store(tokens, kv, slots=torch.arange(len(tokens)))
            runs.append((tokens, layers))
        assert a.flush(60)
        used = int(server.command("info", "memory").split("used_memory:")[1].split()[0])
        assert used <= 6 * 2**20, f"server holds {used} bytes past maxmemory"
        served = 0
        for tokens, layers in runs:
            hits, by_tier = retrieve_into_zeros(b, tokens, layers)  # asserts bit-exact hits
            served += by_tier.get("redis", 0)
        if policy == "noeviction":  # the first chunks fit and stay; later writes fail with OOM
            assert served > 0, "the chunks that fit must be served"
            assert a.metrics.value("lmcache_errors", tier="redis", op="put") >= 1, "OOM errors must be counted"
        else:  # LRU evicts the oldest values, often a run's first chunk: misses, never wrong KV
            evicted = int(server.command("info", "stats").split("evicted_keys:")[1].split()[0])
            assert evicted > 0
    finally:
        a.close()
        b.close()
