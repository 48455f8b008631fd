"""load_policy: the adaptive policy's estimates and decisions (unit), and its hooks in a real engine."""

from __future__ import annotations

import time

import pytest
import torch

from lmcache_core import ChunkGeometry, PagedKV
from lmcache_core.config import Config
from lmcache_core.engine import LookupResult
from lmcache_core.errors import ConfigError
from lmcache_core.keys import ChunkKey
from lmcache_core.policy import AdaptivePolicy, DecayedLine, LoadPolicy, make_policy

CHUNK = 256
BYTES_PER_TOKEN = 8192


def _lookup(tiers: list[str]) -> LookupResult:
    keys = tuple(_key(i) for i in range(len(tiers)))
    return LookupResult(CHUNK * len(tiers), keys, tuple(tiers))


def _key(i: int) -> ChunkKey:
    from lmcache_core.keys import Namespace, chunk_keys

    ns = Namespace("policy-test", "g", "default", "", "")
    return chunk_keys(list(range(i * CHUNK, (i + 1) * CHUNK)), ns, CHUNK)[0]


def _bytes(n: int) -> int:
    return n * BYTES_PER_TOKEN


def test_decayed_line_fits_latency_and_slope():
    line = DecayedLine(0.9)
    assert line.coefficients() is None
    for x in (1e6, 2e6, 4e6, 8e6):
        line.add(x, 0.02 + x / 30e6)  # 20 ms latency, 30 MB/s
    a, b = line.coefficients()
    assert a == pytest.approx(0.02, rel=1e-6)
    assert 1 / b == pytest.approx(30e6, rel=1e-6)
    one = DecayedLine()
    one.add(100.0, 0.5)
    assert one.coefficients() == (0.0, 0.005)  # one size: proportional


def test_decayed_line_bounds_a_stalled_sample_but_follows_a_lasting_change():
    line = DecayedLine(0.9)
    for i in range(12):
        line.add(1000.0 + 100 * (i % 3), 0.05)  # 50 ms per ~1000 tokens
    before = line.predict(1100.0)
    line.add(1100.0, 0.05 * 20)  # one prefill stalled 20x by another process
    assert line.clipped == 1
    assert line.predict(1100.0) < before * 1.5  # unclipped, one sample would have tripled it
    plain = DecayedLine(0.9, clip=1e9)
    for i in range(12):
        plain.add(1000.0 + 100 * (i % 3), 0.05)
    plain.add(1100.0, 0.05 * 20)
    assert plain.predict(1100.0) > before * 2.5
    for i in range(20):  # the engine really got 10x slower: followed within 20 samples
        line.add(1000.0 + 100 * (i % 3), 0.5)
    assert line.predict(1100.0) == pytest.approx(0.5, rel=0.2)
    for bad in ({"decay": 0.0}, {"clip": 1.0}):
        with pytest.raises(ValueError, match="DecayedLine"):
            DecayedLine(**bad)


def test_adaptive_keeps_its_cut_through_a_few_stalled_prefills():
    """A slow tier that costs 10x the recompute stays cut although two prefills stalled 20x."""
    p = AdaptivePolicy()
    lk = _lookup(["s3"] * 4)
    for n in (256, 512, 1024, 2048, 512, 1024):
        p.observe_prefill(n, n / 100e3)  # 100k tokens/s
    for mb in (2, 4, 8):
        p.observe_fetch([("s3", mb * 1_000_000)], mb / 100.0, 0, 0)  # 100 MB/s: 21 ms a chunk vs 2.6 ms
    assert p.plan(lk, 4 * CHUNK, 0, _bytes) == 0
    p.observe_prefill(1024, 20 * 1024 / 100e3)
    p.observe_prefill(1024, 20 * 1024 / 100e3)
    assert p.plan(lk, 4 * CHUNK, 0, _bytes) == 0
    assert p.stats()["prefill_clipped"] == 2


def test_always_loads_every_hit():
    lk = _lookup(["memory", "s3"])
    assert LoadPolicy().plan(lk, 512, 0, _bytes) == 512
    assert isinstance(make_policy(Config.from_dict({"tiers": ["memory://"]})), LoadPolicy)
    assert isinstance(make_policy(Config.from_dict({"tiers": ["memory://"], "load_policy": "adaptive"})),
                      AdaptivePolicy)
    with pytest.raises(ConfigError, match="load_policy"):
        Config.from_dict({"load_policy": "sometimes"})


def test_adaptive_loads_until_measured_then_cuts_the_slow_tier():
    p = AdaptivePolicy()
    lk = _lookup(["memory", "memory", "s3", "s3", "s3", "s3"])
    assert p.plan(lk, 6 * CHUNK, 0, _bytes) == 6 * CHUNK  # nothing measured: load (and measure)
    for n in (256, 512, 1024):  # 100k tokens/s, 2 ms overhead
        p.observe_prefill(n, 0.002 + n / 100e3)
    assert p.plan(lk, 6 * CHUNK, 0, _bytes) == 6 * CHUNK  # tiers unmeasured: still load
    p.observe_fetch([("memory", _bytes(CHUNK))], 1e-5, 512, 256)
    for mb in (2, 4, 8):
        p.observe_fetch([("s3", mb * 1_000_000)], 0.01 + mb / 30.0, 2048, 0)  # 30 MB/s
    # s3: 2 MiB a chunk at 30 MB/s ~ 70 ms against 2.6 ms to recompute it; memory: ~free
    assert p.plan(lk, 6 * CHUNK, 0, _bytes) == 2 * CHUNK
    assert p.skipped_tokens == 4 * CHUNK
    # a fast tier that prefill cannot beat is loaded in full
    fast = _lookup(["memory"] * 6)
    assert p.plan(fast, 6 * CHUNK - 1, 0, _bytes) == 6 * CHUNK - 1
    # tokens the engine holds itself (skip_tokens) are never cut below
    assert p.plan(lk, 6 * CHUNK, 3 * CHUNK, _bytes) == 3 * CHUNK


def test_adaptive_probes_a_cut_tier_now_and_then():
    p = AdaptivePolicy()
    p.observe_prefill(1000, 0.01)
    p.observe_fetch([("s3", 10_000_000)], 1.0, 0, 0)
    lk = _lookup(["s3"] * 4)
    plans = [p.plan(lk, 4 * CHUNK, 0, _bytes) for _ in range(p.PROBE_EVERY)]
    assert plans[:-1] == [0] * (p.PROBE_EVERY - 1)
    assert plans[-1] == CHUNK  # one chunk more: the tier is measured again
    fast = AdaptivePolicy()
    fast.observe_prefill(1000, 10.0)  # a slow model: load everything ...
    fast.observe_fetch([("s3", 10_000_000)], 0.1, 0, 0)
    plans = [fast.plan(lk, 4 * CHUNK, 0, _bytes) for _ in range(fast.PROBE_EVERY)]
    assert plans[:-1] == [4 * CHUNK] * (fast.PROBE_EVERY - 1)
    assert plans[-1] == 3 * CHUNK  # ... but now and then recompute one chunk: a longer prefill is timed
    fast.fast_tiers = frozenset({"s3"})  # an in-process tier is never probed: a copy is always cheaper
    assert {fast.plan(lk, 4 * CHUNK, 0, _bytes) for _ in range(2 * fast.PROBE_EVERY)} == {4 * CHUNK}


def test_adaptive_splits_a_mixed_fetch_by_the_slow_tier():
    p = AdaptivePolicy()
    p.observe_fetch([("memory", 1_000_000)], 1e-5, 0, 0)
    p.observe_fetch([("memory", 1_000_000), ("s3", 3_000_000)], 0.1, 0, 0)
    stats = p.stats()
    assert stats["load_bytes_per_s.s3"] == pytest.approx(30e6, rel=0.01)
    assert stats["load_bytes_per_s.memory"] > 1e10


def test_engine_measures_prefill_between_load_and_store(make_engine, tmp_path):
    """The engine's hooks: a miss's lookup and the store of the same prompt on this thread time
    its prefill; a retrieve times the fetch per tier and consults the plan."""
    g = ChunkGeometry(2, 2, 8, "float32")
    eng = make_engine(g, tiers=[f"disk://{tmp_path / 'chunks'}?capacity=64MiB"], chunk_size=32,
                      load_policy="adaptive")
    assert isinstance(eng.policy, AdaptivePolicy)
    assert eng.policy.fast_tiers == frozenset()  # disk is timed; an in-process memory tier would not be
    tokens = list(range(256))
    src = [(torch.randn(1, 2, 256, 8), torch.randn(1, 2, 256, 8)) for _ in range(2)]
    kv = PagedKV.from_hf(src)
    slots = torch.arange(256)
    short = AdaptivePolicy()
    short.observe_prefill(short.MIN_PREFILL_TOKENS - 1, 0.5)  # a fixed cost per step, not a rate
    assert "prefill_tokens_per_s" not in short.stats()
    assert eng.lookup(tokens).hit_tokens == 0
    time.sleep(0.02)  # the "prefill"
    eng.store(tokens, kv, slots=slots, wait=True)
    stats = eng.policy.stats()
    assert 0 < stats["prefill_tokens_per_s"] < 256 / 0.02 * 1.01
    dst = [(torch.zeros(1, 2, 256, 8), torch.zeros(1, 2, 256, 8)) for _ in range(2)]
    out = PagedKV.from_hf(dst)
    res = eng.retrieve(tokens, out, slots=slots)
    assert res.hit_tokens == 256  # disk loads faster than the slow "prefill" above: all of it
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(src, dst))
    assert [k for k in eng.policy.stats() if k.startswith("load_bytes_per_s.")]  # the disk fetch was timed
    mem = make_engine(g, tiers=["memory://?capacity=64MiB"], chunk_size=32, load_policy="adaptive")
    assert mem.policy.fast_tiers == frozenset({"memory"})


def test_a_retrieve_without_the_callers_lookup_is_never_cut(make_engine, tmp_path):
    """vLLM's worker retrieves without a lookup of its own: its scheduler already told vLLM the hit is
    loaded, so the policy must never cut it (a cut would be a failed load)."""
    g = ChunkGeometry(2, 2, 8, "float32")
    eng = make_engine(g, tiers=[f"disk://{tmp_path / 'chunks'}?capacity=64MiB"], chunk_size=32,
                      load_policy="adaptive")
    src = [(torch.randn(1, 2, 128, 8), torch.randn(1, 2, 128, 8)) for _ in range(2)]
    eng.store(list(range(128)), PagedKV.from_hf(src), slots=torch.arange(128), wait=True)
    eng.policy.observe_prefill(1000, 1e-6)  # recomputing looks free ...
    eng.policy.observe_fetch([("disk", 1_000_000)], 10.0, 0, 0)  # ... and the disk very slow
    dst = [(torch.zeros(1, 2, 128, 8), torch.zeros(1, 2, 128, 8)) for _ in range(2)]
    assert eng.retrieve(list(range(128)), PagedKV.from_hf(dst), slots=torch.arange(128)).hit_tokens == 128
    lk = eng.lookup(list(range(128)), pin=True)
    try:  # with the caller's own lookup (CachedModel's way) the same load is cut to nothing
        assert eng.retrieve(list(range(128)), PagedKV.from_hf(dst), slots=torch.arange(128),
                            lookup=lk).hit_tokens == 0
    finally:
        eng.release(lk)
