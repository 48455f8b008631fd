"""CacheEngine: store/retrieve whole and layer by layer, zero-copy fan-out, faults."""
from __future__ import annotations

import pytest
import torch

from lmcache_core.errors import ConfigError, LayoutError
from lmcache_core.layout import ChunkGeometry, PagedKV, slot_mapping

from .conftest import random_kv

L, H, D, BS, NB = 4, 2, 16, 16, 48


def paged(seed: int, dtype=torch.bfloat16) -> tuple[list[torch.Tensor], PagedKV]:
    caches = [random_kv((2, NB, BS, H, D), dtype, seed * 100 + i) for i in range(L)]
    return caches, PagedKV.from_vllm_flash(caches)


def values(caches, blocks, n):
    s = slot_mapping(blocks, BS, 0, n)
    return [c[:, s // BS, s % BS] for c in caches]


def test_store_then_retrieve_in_another_cache(make_engine):
    src_c, src = paged(1)
    dst_c, dst = paged(2)
    eng = make_engine(src.geometry)
    tokens = list(range(1000, 1100))  # 3 full chunks of 32 + a partial of 4
    sb, db = torch.randperm(NB)[:7], torch.randperm(NB)[:7]
    assert eng.store(tokens, src, sb, wait=True) == 100
    assert eng.lookup(tokens).hit_tokens == 100
    assert eng.lookup(tokens[:64] + [1] * 36).hit_tokens == 64  # prefix semantics
    res = eng.retrieve(tokens, dst, db)
    assert res.hit_tokens == 100 and res.by_tier == {"memory": 100}
    for a, b in zip(values(src_c, sb, 100), values(dst_c, db, 100)):
        assert torch.equal(a, b)
    # storing again writes nothing new
    assert eng.store(tokens, src, sb, wait=True) == 0


def test_max_tokens_loads_part_of_a_chunk_and_leaves_the_rest(make_engine):
    src_c, src = paged(1)
    dst_c, dst = paged(2)
    eng = make_engine(src.geometry)
    tokens = list(range(64))
    blocks = torch.arange(4)
    eng.store(tokens, src, blocks, wait=True)
    before = [c.clone() for c in dst_c]
    res = eng.retrieve(tokens, dst, blocks, max_tokens=40)
    assert res.hit_tokens == 40
    s = slot_mapping(blocks, BS, 0, 64)
    for c, b0, sc in zip(dst_c, before, src_c):
        got = c[:, s // BS, s % BS]
        assert torch.equal(got[:, :40], sc[:, s // BS, s % BS][:, :40])
        assert torch.equal(got[:, 40:], b0[:, s // BS, s % BS][:, 40:])  # untouched


def test_layerwise_retrieve_in_order_and_layerwise_store(make_engine):
    src_c, src = paged(3)
    dst_c, dst = paged(4)
    eng = make_engine(src.geometry)
    tokens = list(range(70))
    blocks = torch.arange(5)
    task = eng.start_store(tokens, src, blocks)
    for layer in range(L):
        task.save_layer(layer)
    assert task.finish(wait=True) == 70
    r = eng.start_retrieve(tokens, dst, blocks)
    assert r.hit_tokens == 70
    s = slot_mapping(blocks, BS, 0, 70)
    for layer in r:
        # layer `layer` is complete when released; later layers not loaded yet on a sync device
        assert torch.equal(dst_c[layer][:, s // BS, s % BS], src_c[layer][:, s // BS, s % BS])
        if layer + 1 < L:
            assert not torch.equal(dst_c[layer + 1][:, s // BS, s % BS], src_c[layer + 1][:, s // BS, s % BS])
    assert r.order == list(range(L))
    r.finish()
    assert eng.pool.live_count() == eng.tiers.by_name("memory").usage().items


def test_layer_by_layer_calls_hand_the_device_one_batch(make_engine, monkeypatch):
    # the transfer keys its per-batch tables (kernel tables, ring layout, checks) on the batch's
    # tensors: a store and a load hand the same pairs for every layer, not fresh views each time
    _, src = paged(5)
    _, dst = paged(6)
    eng = make_engine(src.geometry)
    seen: dict[str, list[list[tuple[int, int]]]] = {"gather": [], "scatter": []}
    for name in seen:
        real = getattr(eng.device, f"{name}_many")

        def spy(kv, batch, layers=None, _real=real, _name=name):
            seen[_name].append([(id(s), id(c)) for s, c in batch])
            return _real(kv, batch, layers)

        monkeypatch.setattr(eng.device, f"{name}_many", spy)
    tokens, blocks = list(range(70)), torch.arange(5)
    task = eng.start_store(tokens, src, blocks)
    for layer in range(L):
        task.save_layer(layer)
    assert task.finish(wait=True) == 70
    r = eng.start_retrieve(tokens, dst, blocks)
    assert list(r) == list(range(L))
    r.finish()
    for name, calls in seen.items():
        assert len(calls) == L and all(c == calls[0] for c in calls), name


def test_unfinished_layerwise_store_stores_nothing(make_engine):
    _, src = paged(1)
    eng = make_engine(src.geometry)
    task = eng.start_store(list(range(32)), src, torch.arange(2))
    task.save_layer(0)
    with pytest.raises(RuntimeError, match="before layers"):
        task.finish()
    assert eng.lookup(list(range(32))).hit_tokens == 0


def test_zero_copy_fan_out_and_no_leak(make_engine, tmp_path):
    _, src = paged(5)
    eng = make_engine(src.geometry, tiers=["memory://", f"disk://{tmp_path / 'a'}", f"disk://{tmp_path / 'b'}"])
    seen: dict[str, list[int]] = {}
    for tier in eng.tiers.tiers:
        store = tier.store
        orig = store.put

        def spy(key, chunk, orig=orig, name=store.name):
            seen.setdefault(name, []).append(chunk.buf.address)
            return orig(key, chunk)

        store.put = spy  # type: ignore[method-assign]
    allocations = eng.pool.allocations
    eng.store(list(range(64)), src, torch.arange(4), wait=True)
    assert set(seen) == {"memory", "disk", "disk2"}
    assert seen["memory"] == seen["disk"] == seen["disk2"]  # the same buffers, no copy per tier
    assert eng.pool.allocations - allocations == 2  # one buffer per chunk, whatever the tier count
    eng.tiers.by_name("memory").clear()
    assert eng.pool.live_count() == 0  # every reference came back


def test_corrupt_chunk_on_disk_ends_the_prefix_never_wrong_kv(make_engine, tmp_path):
    src_c, src = paged(6)
    dst_c, dst = paged(7)
    eng = make_engine(src.geometry)
    tokens = list(range(96))
    blocks = torch.arange(6)
    eng.store(tokens, src, blocks, wait=True)
    eng.tiers.by_name("memory").clear()
    disk = eng.tiers.by_name("disk")
    second = eng.keys(tokens)[1]
    path = disk._path(second)
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF  # a flipped payload byte
    path.write_bytes(bytes(data))
    before = [c.clone() for c in dst_c]
    res = eng.retrieve(tokens, dst, blocks)
    assert res.hit_tokens == 32  # chunk 0 only
    s = slot_mapping(blocks, BS, 0, 96)
    for c, b0, sc in zip(dst_c, before, src_c):
        assert torch.equal(c[:, s // BS, s % BS][:, :32], sc[:, s // BS, s % BS][:, :32])
        assert torch.equal(c[:, s // BS, s % BS][:, 32:], b0[:, s // BS, s % BS][:, 32:])
    assert not path.exists()
    assert eng.metrics.value("lmcache_corrupt_chunks", tier="disk") == 1
    assert eng.lookup(tokens).hit_tokens == 32


def test_engine_rejects_mismatched_layouts(make_engine):
    _, src = paged(1)
    eng = make_engine(ChunkGeometry(L, H, D, "float16"))
    with pytest.raises(LayoutError, match="does not match"):
        eng.store(list(range(32)), src, torch.arange(2))
    eng2 = make_engine(src.geometry, chunk_size=24)
    with pytest.raises(ConfigError, match="multiple of the engine block size 16"):
        eng2.store(list(range(32)), src, torch.arange(2))


def test_unknown_scheme_names_the_extra(make_engine):
    from lmcache_core.errors import PluginError

    with pytest.raises(PluginError, match=r'no storage plugin handles s3://.*pip install "lmcache-core\[s3\]"'):
        from lmcache_core.plugins import PluginManager

        PluginManager(load_entry_points=False).storage_for_scheme("s3")


def test_metrics_count_hits_by_tier(make_engine):
    _, src = paged(1)
    _, dst = paged(2)
    eng = make_engine(src.geometry)
    tokens = list(range(64))
    eng.store(tokens, src, torch.arange(4), wait=True)
    eng.retrieve(tokens, dst, torch.arange(4))
    eng.tiers.by_name("memory").clear()
    eng.retrieve(tokens, dst, torch.arange(4))
    assert eng.metrics.value("lmcache_hit_tokens", tier="memory") == 64
    assert eng.metrics.value("lmcache_hit_tokens", tier="disk") == 64
    assert eng.metrics.value("lmcache_bytes", tier="disk", direction="write") > 0
    assert eng.lookup(tokens).by_tier == {"memory": 64}  # promoted on the disk hit
