"""CacheBlend: exact RoPE re-rotation (scaled variants included), blending at 100% equals full
prefill, segment keys position independent and namespace bound, the separator form."""
from __future__ import annotations

import pytest
import torch

from lmcache_core import Config
from lmcache_core.blend import (BlendConfig, blend_attention_mask, plan_segments, rerotate, select_tokens,
                                split_segments)
from lmcache_core.keys import KeyExtras, Namespace, chunk_keys, segment_extras
from lmcache_core.integrations.transformers import CachedModel, random_llama

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16384},
}


def _model(rope: str = "default", **kw):
    extra = {} if ROPES[rope] is None else {"rope_parameters": dict(ROPES[rope], rope_theta=10000.0)}
    return random_llama(num_layers=3, hidden=128, heads=4, kv_heads=2, vocab=500, seed=3, **extra, **kw)


def _cfg(tmp_path=None, **extra):
    tiers = ["memory://"] + ([f"disk://{tmp_path}"] if tmp_path else [])
    return Config.from_dict({"tiers": tiers, "chunk_size": 32, "device": "cpu", **extra})


def _rand(n: int, seed: int) -> list[int]:
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _kv_at(cm: CachedModel, ids: list[int], start: int):
    cache = cm._new_cache()
    with torch.inference_mode():
        cm._forward(torch.tensor([ids]), cache, start)
    return cm._layer_kv(cache)


@pytest.mark.parametrize("rope", list(ROPES))
def test_rerotation_equals_k_computed_at_the_new_position(rope):
    """A segment computed on its own at position 0, moved to offset 1000, equals the same segment
    computed there, in every layer (RoPE is relative: only K's rotation changes)."""
    model = _model(rope)
    assert model.model.rotary_emb.rope_type == rope
    cm = CachedModel(model, config=_cfg(), model_name=f"rot-{rope}")
    try:
        seg, off = _rand(40, 1), 1000
        at0, there = _kv_at(cm, seg, 0), _kv_at(cm, seg, off)
        inv_freq = model.model.rotary_emb.inv_freq
        for (k0, v0), (kp, vp) in zip(at0, there):
            moved = rerotate(k0, off, inv_freq)
            scale = kp.abs().max()
            # the reference rounds its angles (position * inv_freq) in fp32: ~1000 * 2**-24 rad
            assert torch.allclose(moved, kp, atol=1e-4 * scale, rtol=0), (moved - kp).abs().max() / scale
            assert torch.allclose(v0, vp, atol=2e-5 * vp.abs().max(), rtol=0)
            assert not torch.allclose(k0, kp, atol=1e-2 * scale, rtol=0)  # the rotation did something
    finally:
        cm.close()


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rotations_compose_and_partial_rotary_keeps_the_tail(style):
    k = torch.randn(2, 7, 24, dtype=torch.float64).float()  # [heads, tokens, head_dim]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))  # rotates 16 of 24 dims
    deltas = torch.arange(7) * 13
    a = rerotate(rerotate(k, 100, inv_freq, style=style), deltas, inv_freq, style=style)
    b = rerotate(k, deltas + 100, inv_freq, style=style)
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.equal(a[..., 16:], k[..., 16:])
    assert torch.allclose(rerotate(a, -(deltas + 100), inv_freq, style=style), k, atol=1e-4)


def test_blend_at_100_percent_equals_full_prefill():
    model = _model()
    cm = CachedModel(model, config=_cfg(), model_name="full")
    segs = [_rand(20, 10), _rand(70, 11), _rand(50, 12), _rand(9, 13)]
    ids = [t for s in segs for t in s]
    try:
        ref = cm.generate(ids, 12, use_cache=False)
        cold = cm.generate(segments=segs, max_new_tokens=12, blend=BlendConfig(ratio=1.0))
        assert cold.blended and cold.hit_tokens == 0 and cold.stored_tokens == 140
        warm = cm.generate(segments=segs[2:3] + segs[1:2] + segs[:1] + segs[3:], max_new_tokens=2)  # any order
        assert warm.hit_tokens == 140
        with torch.inference_mode():
            logits, cache, hit, _, _, recomputed = cm._blend_prefill(segs, BlendConfig(ratio=1.0), None)
            full = cm._new_cache()
            want = cm._forward(torch.tensor([ids]), full, 0)
        assert hit == 140 and recomputed == len(ids)
        assert torch.allclose(logits, want, atol=1e-4 * want.abs().max(), rtol=0)
        for (k, v), (fk, fv) in zip(cm._layer_kv(cache), cm._layer_kv(full)):
            assert torch.allclose(k, fk, atol=1e-4, rtol=1e-4) and torch.allclose(v, fv, atol=1e-4, rtol=1e-4)
        again = cm.generate(segments=segs, max_new_tokens=12, blend=BlendConfig(ratio=1.0))
        assert again.tokens == ref.tokens == cold.tokens and again.hit_tokens == 140
    finally:
        cm.close()


def test_recompute_ratio_sets_the_recomputed_tokens_and_blending_is_never_stored_as_a_prefix():
    cm = CachedModel(_model(), config=_cfg(), model_name="ratio")
    segs = [_rand(100, 20), _rand(100, 21), _rand(7, 22)]
    try:
        for ratio, want in ((0.0, 7), (0.15, 7 + 30), (0.3, 7 + 60)):
            out = cm.generate(segments=segs, max_new_tokens=3, blend=BlendConfig(ratio=ratio))
            assert out.blended and out.recomputed_tokens == want
        assert cm.engine.lookup([t for s in segs for t in s]).hit_tokens == 0  # blended KV is not a prefix
        naive = cm.generate(segments=segs, max_new_tokens=3, blend=BlendConfig(ratio=0.0, rerotate=False))
        assert naive.blended and naive.hit_tokens == 200
    finally:
        cm.close()


def test_segment_keys_are_position_independent_and_namespace_bound(tmp_path):
    ns = Namespace(model="m", layout="l")
    seg = _rand(80, 30)
    sx = segment_extras()
    keys = chunk_keys(seg, ns, 32, extras=sx)
    assert len(keys) == 3 and keys[-1].num_tokens == 16
    assert keys != chunk_keys(seg, ns, 32)  # never a prefix chunk's key
    assert keys != chunk_keys(seg, Namespace(model="m2", layout="l"), 32, extras=sx)
    assert keys != chunk_keys(seg, Namespace(model="m", layout="l", tenant="t2"), 32, extras=sx)
    assert keys != chunk_keys(seg, ns, 32, extras=segment_extras(KeyExtras(adapter=("lora-a",))))
    assert keys != chunk_keys(seg, ns, 32, extras=segment_extras(KeyExtras(cache_salt="s")))
    with pytest.raises(ValueError):
        segment_extras(KeyExtras(embeds=(b"x" * 16,), embeds_chunk=32, embeds_tokens=32))

    model = _model()
    a, b, q1, q2 = _rand(50, 31), _rand(60, 32), _rand(5, 33), _rand(6, 34)
    cm = CachedModel(model, config=_cfg(tmp_path), model_name="seg")
    try:
        first = cm.generate(segments=[a, b, q1], max_new_tokens=2)
        assert first.hit_tokens == 0 and first.stored_tokens == 110
        cm.engine.flush()
        moved = cm.generate(segments=[_rand(9, 35), b, a, q2], max_new_tokens=2)  # new prefix, new order
        assert moved.hit_tokens == 110 and moved.by_tier == {"memory": 110} and moved.stored_tokens == 9
    finally:
        cm.close()
    other = CachedModel(model, config=_cfg(tmp_path), model_name="seg-other")
    try:
        assert other.generate(segments=[a, b, q1], max_new_tokens=2).hit_tokens == 0
    finally:
        other.close()
    again = CachedModel(model, config=_cfg(tmp_path), model_name="seg")  # a new engine: from disk
    try:
        assert again.generate(segments=[b, a, q1], max_new_tokens=2).by_tier == {"disk": 110}
    finally:
        again.close()


def test_separator_form_equals_segments():
    sep = 499
    segs = [[t % 499 for t in _rand(n, 40 + n)] for n in (30, 40, 6)]
    joined = segs[0] + [sep] + segs[1] + [sep, sep] + segs[2]
    assert split_segments(joined, sep) == segs
    assert split_segments(segs[0] + [sep, 3] + segs[1] + [sep], [sep, 3]) == [segs[0], segs[1] + [sep]]
    cm = CachedModel(_model(), config=_cfg(), model_name="sep")
    try:
        a = cm.generate(segments=segs, max_new_tokens=6)
        b = cm.generate(joined, 6, separator=sep)
        assert b.blended and b.hit_tokens == 70 and b.prompt_tokens == 76 and a.tokens == b.tokens
    finally:
        cm.close()


def test_a_model_that_cannot_blend_gets_a_full_prefill(caplog):
    model = random_llama(num_layers=2, hidden=64, heads=2, kv_heads=1, vocab=100,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    cm = CachedModel(model, config=_cfg(), model_name="dyn")
    segs = [list(range(1, 40)), list(range(40, 50))]
    try:
        ref = cm.generate([t for s in segs for t in s], 5, use_cache=False)
        out = cm.generate(segments=segs, max_new_tokens=5)
        assert not out.blended and out.hit_tokens == 0 and out.tokens == ref.tokens
        assert "dynamic" in caplog.text
    finally:
        cm.close()


def test_selection_and_mask():
    fresh = torch.tensor([False] * 10 + [True] * 2)
    dev = torch.arange(12, dtype=torch.float32).flip(0)
    assert select_tokens(dev, fresh, 0.2).tolist() == [0, 1, 10, 11]
    assert select_tokens(dev, fresh, 0.0).tolist() == [10, 11]
    assert select_tokens(dev, fresh, 1.0).numel() == 12
    mask = blend_attention_mask(torch.tensor([1, 3]), 4, torch.float32)
    assert mask.shape == (1, 1, 2, 4) and (mask[0, 0] == 0).tolist() == [[True, True, False, False], [True] * 4]
    plan = plan_segments([[1, 2], [3], [4, 5, 6]])
    assert plan.offsets == (0, 2, 3) and plan.fresh_mask().tolist() == [False] * 3 + [True] * 3
    with pytest.raises(ValueError):
        plan_segments([[1], []])
    with pytest.raises(Exception, match="ratio"):
        BlendConfig(ratio=1.5)
