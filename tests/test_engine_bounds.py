"""Bounded memory and clean error paths: in-flight bytes have a budget, a fault at any step of
a store or a load releases every pin and buffer, loads write only beyond what the engine has."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmcache_core import CacheEngine, ChunkGeometry, Config
from lmcache_core.errors import LayoutError
from lmcache_core.layout import PagedKV

GEOM = ChunkGeometry(2, 2, 8, "float16")
CHUNK = 16
TOKENS = list(range(100, 164))  # four chunks


def _kv(seed: int = 0, blocks: int = 8) -> PagedKV:
    g = torch.Generator().manual_seed(seed)
    return PagedKV.from_vllm_flash([torch.randn(2, blocks, 16, 2, 8, generator=g).half() for _ in range(2)])


def _engine(tmp_path, **cfg: Any) -> CacheEngine:
    config = Config.from_dict({"tiers": ["memory://?capacity=64MiB", f"disk://{tmp_path}/d"], "device": "cpu",
                               "chunk_size": CHUNK, **cfg})
    return CacheEngine(GEOM, config, model="bounds")


def _pins(engine: CacheEngine) -> int:
    return sum(len(t.store._index._pins) for t in engine.tiers.tiers if hasattr(t.store, "_index"))


def _held(engine: CacheEngine) -> int:
    """Pool buffers the memory tier holds (a cache, not a leak)."""
    mem = engine.tiers.tiers[0].store
    return len(getattr(mem, "_chunks", {}))


def _assert_clean(engine: CacheEngine) -> None:
    engine.flush(10)
    assert engine.inflight_bytes() == 0
    assert _pins(engine) == 0
    assert engine.pool.live_count() == _held(engine)


def test_stores_past_the_inflight_budget_are_dropped_and_counted(tmp_path) -> None:
    one_chunk = GEOM.nbytes(CHUNK)
    eng = _engine(tmp_path, max_inflight_bytes=2 * one_chunk)
    kv = _kv()
    task = eng.start_store(TOKENS[:32], kv, [0, 1])  # two chunks: the whole budget
    assert eng.inflight_bytes() == 2 * one_chunk
    dropped = eng.start_store(TOKENS[:48][::-1], kv, [2, 3, 4])  # another request: over budget
    assert dropped.num_tokens == 0 and eng.dropped_stores == 1
    assert eng.metrics.value("lmcache_dropped_stores", tier="inflight") == 1
    task.save_all()
    task.finish(wait=True)
    _assert_clean(eng)
    assert eng.lookup(TOKENS[:32]).hit_tokens == 32
    eng.close()


def test_a_load_past_the_budget_is_cut_short(tmp_path) -> None:
    eng = _engine(tmp_path, max_inflight_bytes=2 * GEOM.nbytes(CHUNK))
    kv = _kv()
    for start in (0, 32):  # store in two steps that each fit
        eng.store(TOKENS[: start + 32], kv, [0, 1, 2, 3], wait=True)
    assert eng.lookup(TOKENS).hit_tokens == 64
    dst = _kv(1)
    got = eng.retrieve(TOKENS, dst, [4, 5, 6, 7])
    assert got.hit_tokens == 32 and eng.short_loads > 0
    _assert_clean(eng)
    eng.close()


def test_load_writes_only_beyond_skip_tokens(tmp_path) -> None:
    eng = _engine(tmp_path)
    src = _kv(2)
    eng.store(TOKENS, src, [0, 1, 2, 3], wait=True)
    dst = _kv(3)
    before = dst.layers[0].k.clone()
    got = eng.retrieve(TOKENS, dst, [4, 5, 6, 7], skip_tokens=24)  # skip chunk 0, half of chunk 1
    assert got.hit_tokens == 64
    assert got.by_tier and sum(got.by_tier.values()) == 64 - 24
    k = dst.layers[0].k
    assert torch.equal(k[4], before[4])  # chunk 0 untouched
    assert torch.equal(k[5, :8], before[5, :8]) and torch.equal(k[5, 8:], src.layers[0].k[1, 8:])
    assert torch.equal(k[6:8], src.layers[0].k[2:4])
    _assert_clean(eng)
    eng.close()


FAULTS = ["gather", "seal", "put"]


@pytest.mark.parametrize("where", FAULTS)
def test_a_store_fault_at_any_step_leaks_nothing(tmp_path, monkeypatch, where: str) -> None:
    import lmcache_core.chunk as chunkmod

    eng = _engine(tmp_path)
    kv = _kv()

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError(f"injected {where} fault")

    if where == "gather":
        monkeypatch.setattr(eng.device, "gather_many", boom)
    elif where == "seal":
        monkeypatch.setattr(chunkmod, "seal", boom)
    else:
        monkeypatch.setattr(eng.tiers, "put", boom)
    task = eng.start_store(TOKENS, kv, [0, 1, 2, 3])
    try:
        task.save_layer(0)
        task.save_layer(1)
        task.finish(wait=True)
    except RuntimeError as exc:
        assert "injected" in str(exc)
        task.abort()
    monkeypatch.undo()
    _assert_clean(eng)
    assert eng.lookup(TOKENS).hit_tokens == 0
    eng.close()


@pytest.mark.parametrize("where", ["fetch", "slots", "scatter"])
def test_a_load_fault_at_any_step_leaks_nothing(tmp_path, monkeypatch, where: str) -> None:
    eng = _engine(tmp_path)
    eng.store(TOKENS, _kv(4), [0, 1, 2, 3], wait=True)
    dst = _kv(5)
    blocks: list[int] = [4, 5, 6, 7]

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError(f"injected {where} fault")

    if where == "fetch":
        monkeypatch.setattr(eng.tiers, "get_many", boom)
    elif where == "slots":
        blocks = [4, 5]  # block table too short for the hit: a LayoutError after the fetch
    else:
        monkeypatch.setattr(eng.device, "scatter_many", boom)
    with pytest.raises((RuntimeError, LayoutError)):
        task = eng.start_retrieve(TOKENS, dst, blocks)
        try:
            for _ in task:
                pass
        finally:
            task.finish()
    monkeypatch.undo()
    _assert_clean(eng)
    assert eng.lookup(TOKENS).hit_tokens == 64  # nothing lost
    eng.close()


def test_no_fresh_allocation_once_warm(tmp_path) -> None:
    """The forward path reuses pooled buffers: a second identical store/load allocates nothing."""
    eng = _engine(tmp_path, tiers=[f"disk://{tmp_path}/only"])
    kv = _kv()
    eng.store(TOKENS, kv, [0, 1, 2, 3], wait=True)
    eng.retrieve(TOKENS, _kv(1), [4, 5, 6, 7])
    eng.flush()
    warm = eng.pool.allocations
    eng.store(TOKENS[::-1], kv, [0, 1, 2, 3], wait=True)
    eng.retrieve(TOKENS, _kv(1), [4, 5, 6, 7])
    eng.flush()
    assert eng.pool.allocations == warm
    eng.close()


def test_queued_stores_are_flushed_when_a_process_exits_without_close(tmp_path) -> None:
    """store() is asynchronous: a child that stores and exits without close() or flush() still
    writes its chunks; a second process finds them on disk."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import torch
        from lmcache_core import CacheEngine, ChunkGeometry, Config
        from lmcache_core.layout import PagedKV
        geom = ChunkGeometry(2, 2, 8, "float16")
        cfg = Config.from_dict({{"tiers": ["disk://{tmp_path}/exit"], "device": "cpu", "chunk_size": 16}})
        eng = CacheEngine(geom, cfg, model="exit-test")
        kv = PagedKV.from_vllm_flash([torch.randn(2, 8, 16, 2, 8).half() for _ in range(2)])
        print(eng.store(list(range(100, 164)), kv, [0, 1, 2, 3]))  # no close(), no flush()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "64"
    eng = CacheEngine(GEOM, Config.from_dict({"tiers": [f"disk://{tmp_path}/exit"], "device": "cpu",
                                              "chunk_size": CHUNK}), model="exit-test")
    assert eng.lookup(TOKENS).hit_tokens == 64
    eng.close()


def test_every_corrupt_chunk_of_a_load_is_deleted_and_rewritten_by_the_next_store(tmp_path) -> None:
    """Two corrupt chunks on disk: one load finds both (all hit chunks are fetched and verified),
    deletes both, loads the prefix before the first; the store after the recompute rewrites both, so
    the next request gets everything (no promise-and-fail loop)."""
    cfg = Config.from_dict({"tiers": [f"disk://{tmp_path}/c"], "device": "cpu", "chunk_size": CHUNK})
    eng = CacheEngine(GEOM, cfg, model="corrupt")
    src = _kv(8)
    eng.store(TOKENS, src, [0, 1, 2, 3], wait=True)
    store = eng.tiers.tiers[0].store
    paths = [store._path(k) for k in eng.keys(TOKENS)]
    for p in paths[1:3]:
        data = bytearray(p.read_bytes())
        data[4096 + 10] ^= 0xFF
        p.write_bytes(bytes(data))
    got = eng.retrieve(TOKENS, _kv(9), [4, 5, 6, 7])
    assert got.hit_tokens == CHUNK  # the prefix before the first bad chunk
    assert [p.exists() for p in paths] == [True, False, False, True]
    assert eng.metrics.value("lmcache_corrupt_chunks", tier=store.name) == 2
    eng.store(TOKENS, src, [0, 1, 2, 3], wait=True)  # what vLLM stores after recomputing
    assert all(p.exists() for p in paths)
    dst = _kv(10)
    assert eng.retrieve(TOKENS, dst, [4, 5, 6, 7]).hit_tokens == 64
    assert torch.equal(dst.layers[1].k[4:8], src.layers[1].k[0:4])
    _assert_clean(eng)
    eng.close()


def test_chunk_size_not_a_multiple_of_the_block_size_fails_at_engine_start() -> None:
    from lmcache_core.errors import ConfigError

    cfg = Config.from_dict({"tiers": ["memory://"], "device": "cpu", "chunk_size": 200})
    with pytest.raises(ConfigError, match="multiple of the engine block size 16, got 200"):
        CacheEngine(GEOM, cfg, model="m", block_size=16)


def test_slots_are_the_engines_own_tensor_even_under_inference_mode() -> None:
    # vLLM runs its forward under torch.inference_mode; the engine's slot tensors are made outside
    # it (the transfer layer caches per-batch tables by a tensor's version counter, which inference
    # tensors lack), and a caller's slot buffer changed in place afterwards changes nothing
    kv = _kv(blocks=4)
    with torch.inference_mode():
        mapping = torch.arange(64, dtype=torch.int32)
        from_slots = CacheEngine._slots(kv, None, mapping, 16, 32)
        from_blocks = CacheEngine._slots(kv, torch.tensor([3, 1]), None, 0, 32)
        sliced = CacheEngine._slot_ranges(kv, [3, 1], None, [(0, 16), (16, 32)])  # per chunk: views of one
        mapping[16:32] = 0
    for out in (from_slots, from_blocks, *sliced):
        assert not out.is_inference() and out.dtype == torch.int64
        assert out._version >= 0  # an ordinary tensor keeps a version counter (an inference one raises)
    assert from_slots.tolist() == list(range(16, 32))
    assert from_blocks.tolist() == list(range(48, 64)) + list(range(16, 32))
    assert [r.tolist() for r in sliced] == [list(range(48, 64)), list(range(16, 32))]


def test_a_request_converts_and_checks_its_block_table_once_not_per_chunk(tmp_path, monkeypatch) -> None:
    # a block table given as a list was converted and scanned once per chunk: O(chunks x blocks)
    # of host time (30-120 ms at 32K tokens). Now once per store or load, sliced per chunk.
    calls: list[int] = []
    own = CacheEngine._own_slots

    def counting(*args: Any) -> Any:
        calls.append(1)
        return own(*args)

    monkeypatch.setattr(CacheEngine, "_own_slots", staticmethod(counting))
    src, dst = _kv(1), _kv(2)
    blocks, into = [5, 2, 7, 0], [1, 6, 3, 4]
    with _engine(tmp_path) as eng:
        assert eng.store(TOKENS, src, blocks) == len(TOKENS)
        assert eng.flush(timeout=30) and len(calls) == 1
        res = eng.retrieve(TOKENS, dst, into)
        assert res.hit_tokens == len(TOKENS) and len(calls) == 2
    for layer_src, layer_dst in zip(src.layers, dst.layers):
        for a, b in ((layer_src.k, layer_dst.k), (layer_src.v, layer_dst.v)):
            assert torch.equal(a[blocks], b[into])  # every chunk's tokens landed in its own blocks
    with pytest.raises(LayoutError, match="block id 9 is outside"):
        CacheEngine._slot_ranges(src, [0, 9], None, [(0, 16), (16, 32)])
    ranges = CacheEngine._slot_ranges(src, [3, 1], None, [(4, 16), (16, 20)])
    assert [r.tolist() for r in ranges] == [list(range(52, 64)), list(range(16, 20))]
