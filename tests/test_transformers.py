"""The transformers integration: identical greedy tokens with and without the cache."""
from __future__ import annotations

import torch

from lmcache_core import Config
from lmcache_core.integrations.transformers import CachedModel, random_llama


def test_greedy_tokens_identical_and_hit_length_reported(tmp_path):
    model = random_llama(num_layers=3, hidden=128, heads=4, kv_heads=2, vocab=500, seed=1)
    cfg = Config.from_dict({"tiers": ["memory://", f"disk://{tmp_path}"], "chunk_size": 64, "device": "cpu"})
    cm = CachedModel(model, config=cfg, model_name="tiny")
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(0, 500, (200,), generator=g).tolist()
    q1, q2 = torch.randint(0, 500, (30,), generator=g).tolist(), torch.randint(0, 500, (17,), generator=g).tolist()
    try:
        ref1 = cm.generate(doc + q1, 12, use_cache=False)
        first = cm.generate(doc + q1, 12)
        assert first.hit_tokens == 0 and first.tokens == ref1.tokens and first.stored_tokens == 230
        cm.engine.flush()
        ref2 = cm.generate(doc + q2, 12, use_cache=False)
        second = cm.generate(doc + q2, 12)
        assert second.hit_tokens == 192  # 3 whole chunks of the shared document
        assert second.by_tier == {"memory": 192}
        assert second.tokens == ref2.tokens
        again = cm.generate(doc + q1, 12)  # exact repeat: everything but the last token
        assert again.hit_tokens == 229 and again.tokens == ref1.tokens
    finally:
        cm.close()
    # a new process-like engine on the same disk: hits come from disk
    cm2 = CachedModel(model, config=cfg, model_name="tiny")
    try:
        third = cm2.generate(doc + q2, 12)
        assert third.by_tier == {"disk": 216} and third.tokens == ref2.tokens  # stored by `second`
    finally:
        cm2.close()


def test_other_model_name_never_hits(tmp_path):
    model = random_llama(num_layers=2, hidden=64, heads=2, kv_heads=1, vocab=100)
    cfg = Config.from_dict({"tiers": [f"disk://{tmp_path}"], "chunk_size": 16, "device": "cpu"})
    ids = list(range(50))
    a = CachedModel(model, config=cfg, model_name="a")
    a.generate(ids, 2)
    a.close()
    b = CachedModel(model, config=cfg, model_name="b")
    assert b.generate(ids, 2).hit_tokens == 0
    b.close()


def test_random_models_of_one_shape_never_share_chunks(tmp_path):
    """Models built from a config have no checkpoint path: their weights are the identity, so two
    random models of the same shape on one persistent disk tier never serve each other's KV."""
    from lmcache_core.integrations.transformers import model_identity

    a, b = random_llama(num_layers=2, seed=1), random_llama(num_layers=2, seed=2)
    assert model_identity(a) != model_identity(b)
    assert model_identity(a) == model_identity(random_llama(num_layers=2, seed=1))  # same weights, same id
    assert model_identity(a.to(torch.bfloat16)) != model_identity(random_llama(num_layers=2, seed=1))
    cfg = Config.from_dict({"tiers": [f"disk://{tmp_path}/shared"], "chunk_size": 64, "device": "cpu"})
    prompt = list(range(3, 200))
    ca = CachedModel(random_llama(num_layers=2, seed=1), config=cfg)
    try:
        ca.generate(prompt, 4)
        ca.engine.flush()
    finally:
        ca.close()
    cb = CachedModel(b, config=cfg)
    try:
        ref = cb.generate(prompt, 4, use_cache=False)
        got = cb.generate(prompt, 4)
        assert got.hit_tokens == 0 and got.tokens == ref.tokens
    finally:
        cb.close()
    ca2 = CachedModel(random_llama(num_layers=2, seed=1), config=cfg)
    try:
        assert ca2.generate(prompt, 4).hit_tokens == len(prompt) - 1  # the same weights find their own chunks
    finally:
        ca2.close()


def test_kv_codec_fp8_through_cached_model(tmp_path):
    """kv_codec fp8 in the transformers integration: hits of the same lengths as exact KV, from
    memory and from disk, and the greedy tokens of a hit equal a second fp8 hit's (the stored
    fp8 KV decodes the same every time); an exact engine on the same disk never sees them."""
    model = random_llama(num_layers=3, hidden=128, heads=4, kv_heads=2, vocab=500, seed=1)
    cfg = Config.from_dict({"tiers": ["memory://", f"disk://{tmp_path}"], "chunk_size": 64, "device": "cpu",
                            "kv_codec": "fp8"})
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(0, 500, (200,), generator=g).tolist()
    q = torch.randint(0, 500, (17,), generator=g).tolist()
    cm = CachedModel(model, config=cfg, model_name="tiny")
    try:
        assert cm.generate(doc + q, 8).stored_tokens == 217
        cm.engine.flush()
        hit = cm.generate(doc + q, 8)
        assert hit.hit_tokens == 216 and hit.by_tier == {"memory": 216} and len(hit.tokens) == 8
    finally:
        cm.close()
    cm2 = CachedModel(model, config=cfg, model_name="tiny")
    try:
        again = cm2.generate(doc + q, 8)
        assert again.by_tier == {"disk": 216} and again.tokens == hit.tokens
    finally:
        cm2.close()
    exact = CachedModel(model, config=cfg.replace(kv_codec="none"), model_name="tiny")
    try:
        assert exact.generate(doc + q, 8).hit_tokens == 0
    finally:
        exact.close()
