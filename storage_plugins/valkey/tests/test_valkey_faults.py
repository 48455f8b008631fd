"""Fault tests through the engine against a private valkey-server: dead, restarted, hung, corrupt, full."""

from __future__ import annotations

import pytest

from lmcache_core.keys import ChunkKey
from lmcache_core.storage import Store
from lmcache_core.testing.fault_tests import CHUNK, RemoteTier, RemoteTierFaultTests, engine_for, kv_for, \
    retrieve_into_zeros
from lmcache_core.testing.fixtures import ServerFactory


def raw_set(store: Store, key: ChunkKey, data: bytes) -> None:
    store.client.set(store.key_name(key), data)  # type: ignore[attr-defined]


class TestValkeyFaults(RemoteTierFaultTests):
    @pytest.fixture
    def remote(self, server_factory: ServerFactory) -> RemoteTier:
        server = server_factory.valkey()
        return RemoteTier(url=server.url + "?timeout=2&connect_timeout=0.5", name="valkey", stop=server.kill,
                          start=server.start, raw_set=raw_set,
                          pid=lambda: server.proc.pid if server.proc else None, call_timeout_s=2.5)


def test_past_maxmemory_engine_keeps_answering(server_factory: ServerFactory) -> None:
    import torch

    server = server_factory.valkey(maxmemory="4mb", maxmemory_policy="noeviction")
    a = engine_for(["memory://?capacity=256MiB", server.url])
    b = engine_for(["memory://?capacity=256MiB", server.url])
    try:
        runs = []
        for i in range(8):
            tokens = [i * 100_000 + t for t in range(CHUNK * 16)]  # 2 MiB per run, 16 MiB in all
            kv, layers = kv_for(tokens, seed=i)
            a.store(tokens, kv, slots=torch.arange(len(tokens)))
            runs.append((tokens, layers))
        assert a.flush(60)
        served = sum(retrieve_into_zeros(b, t, layers)[1].get("valkey", 0) for t, layers in runs)
        assert served > 0
        assert a.metrics.value("lmcache_errors", tier="valkey", op="put") >= 1
    finally:
        a.close()
        b.close()
