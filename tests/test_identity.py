"""Everything that makes KV differ is in the key: model fingerprint, parallel shard, and the
per-request inputs (adapter, cache salt, multimodal items, prompt embeddings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcache_core import CacheEngine, ChunkGeometry, Config
from lmcache_core.errors import ConfigError
from lmcache_core.keys import KeyExtras, MMItem, Namespace, chunk_keys, model_fingerprint, shard_id

NS = Namespace("m", "L2-P2-H2-D8-float16")
TOKENS = list(range(10, 10 + 700))  # chunks [0,256) [256,512) [512,700)


def digests(extras: KeyExtras | None, ns: Namespace = NS, tokens: list[int] = TOKENS) -> list[bytes]:
    return [k.digest for k in chunk_keys(tokens, ns, 256, extras=extras)]


def test_no_extras_keeps_the_plain_chain() -> None:
    assert digests(None) == digests(KeyExtras())


@pytest.mark.parametrize("extras", [
    KeyExtras(adapter=("sql-lora", "/adapters/sql", "1")),
    KeyExtras(adapter=("sql-lora", "/adapters/sql-v2", "1")),  # same name, other weights
    KeyExtras(cache_salt="tenant-a"),
    KeyExtras(extra_key="k"),
])
def test_request_wide_inputs_change_every_chunk(extras: KeyExtras) -> None:
    plain, other = digests(None), digests(extras)
    assert all(a != b for a, b in zip(plain, other))


def test_adapters_and_salts_never_collide() -> None:
    variants = [KeyExtras(adapter=("a", "/p", "1")), KeyExtras(adapter=("b", "/p", "2")),
                KeyExtras(cache_salt="a"), KeyExtras(cache_salt="b"), KeyExtras(extra_key="a"),
                KeyExtras(adapter=("a", "/p", "1"), cache_salt="a")]
    firsts = {digests(v)[0] for v in variants}
    assert len(firsts) == len(variants)


def test_multimodal_item_enters_the_chunks_it_covers_and_the_chain() -> None:
    img_a = KeyExtras(mm=(MMItem("hash-a", 300, 100),))  # inside chunk 1
    img_b = KeyExtras(mm=(MMItem("hash-b", 300, 100),))
    moved = KeyExtras(mm=(MMItem("hash-a", 320, 100),))
    plain, a, b, m = digests(None), digests(img_a), digests(img_b), digests(moved)
    assert a[0] == plain[0]  # chunk 0 does not see the image
    assert a[1] != plain[1] and a[1] != b[1] and a[1] != m[1]  # the image and its place count
    assert a[2] != b[2]  # later chunks through the chain
    spanning = digests(KeyExtras(mm=(MMItem("hash-a", 200, 100),)))  # [200, 300): chunks 0 and 1
    assert spanning[0] != plain[0]


def test_prompt_embeddings_are_keyed_per_chunk() -> None:
    emb = torch.randn(700, 16, dtype=torch.bfloat16)
    ex = KeyExtras(embeds=KeyExtras.embed_digests(emb, 256), embeds_chunk=256, embeds_tokens=700)
    emb2 = emb.clone()
    emb2[600, 3] += 1
    ex2 = KeyExtras(embeds=KeyExtras.embed_digests(emb2, 256), embeds_chunk=256, embeds_tokens=700)
    zeros = [0] * 700
    a, b = digests(ex, tokens=zeros), digests(ex2, tokens=zeros)
    assert a[:2] == b[:2] and a[2] != b[2]
    assert digests(None, tokens=zeros)[0] != a[0]
    with pytest.raises(ValueError, match="prompt-embedding digests"):
        chunk_keys(zeros, NS, 128, extras=ex)  # other chunking than the digests


def test_fingerprint_covers_what_changes_kv() -> None:
    base = dict(revision="main", dtype="bfloat16", quantization=None, kv_cache_dtype="auto", overrides={})
    ref = model_fingerprint("org/model", **base)
    assert ref.startswith("org/model@main#")
    for change in ({"revision": "v2"}, {"dtype": "float16"}, {"quantization": "awq"},
                   {"kv_cache_dtype": "fp8_e4m3"}, {"overrides": {"rope_scaling": {"factor": 2}}}):
        assert model_fingerprint("org/model", **{**base, **change}) != ref, change
    assert model_fingerprint("org/model", **base) == ref  # deterministic
    assert model_fingerprint("", weights="ab12") != model_fingerprint("", weights="cd34")


def test_engine_without_a_model_is_an_error() -> None:
    cfg = Config.from_dict({"tiers": ["memory://"], "device": "cpu"})
    with pytest.raises(ConfigError, match="model identity"):
        CacheEngine(ChunkGeometry(2, 2, 8, "float16"), cfg)
    with pytest.raises(ConfigError, match="model identity"):
        Namespace("unknown", "x")


def test_shards_name_tp_rank_and_pp_stage() -> None:
    assert shard_id() == ""  # one GPU: keys unchanged
    assert shard_id(1, 2) == "tp1of2.pp0of1"
    assert shard_id(0, 1, 1, 2, (16, 32)) == "tp0of1.pp1of2.layers16-32"
    with pytest.raises(ConfigError):
        shard_id(2, 2)
    ids = {Namespace("m", "x", shard=shard_id(r, 2)).id for r in range(2)} | {Namespace("m", "x").id}
    assert len(ids) == 3


def test_two_tp_ranks_store_disjoint_keys_and_read_their_own_bytes(tmp_path) -> None:
    """Two ranks of one TP group on one shared disk: same tokens, disjoint keys, bit-exact own reads;
    a scheduler that plans for both promises only what both hold."""
    from lmcache_core.layout import PagedKV

    geom = ChunkGeometry(2, 2, 8, "float16")
    cfg = Config.from_dict({"tiers": [f"disk://{tmp_path}/d"], "device": "cpu", "chunk_size": 16})
    ranks = [CacheEngine(geom, cfg, model="m", shard=shard_id(r, 2)) for r in range(2)]
    caches = [PagedKV.from_vllm_flash([torch.randn(2, 4, 16, 2, 8).half() for _ in range(2)]) for _ in range(2)]
    tokens = list(range(40))
    ranks[0].store(tokens, caches[0], [0, 1, 2], wait=True)
    k0, k1 = ranks[0].keys(tokens), ranks[1].keys(tokens)
    assert not set(k0) & set(k1)
    assert ranks[1].lookup(tokens).hit_tokens == 0  # rank 1 never reads rank 0's bytes
    sched = CacheEngine(geom, cfg, model="m", shard=shard_id(0, 2))
    sched.peer_namespaces = (ranks[1].namespace,)
    assert sched.lookup(tokens).hit_tokens == 0  # rank 1 is missing: nothing promised
    ranks[1].store(tokens, caches[1], [3, 2, 1], wait=True)
    assert sched.lookup(tokens).hit_tokens == 40
    for r, blocks in ((0, [0, 1, 2]), (1, [3, 2, 1])):
        dst = PagedKV.from_vllm_flash([torch.zeros(2, 4, 16, 2, 8).half() for _ in range(2)])
        assert ranks[r].retrieve(tokens, dst, [0, 1, 2]).hit_tokens == 40
        for layer in range(2):
            src = caches[r].layers[layer]
            got = dst.layers[layer]
            for i, b in enumerate(blocks):
                n = 16 if i < 2 else 8
                assert torch.equal(got.k[i, :n], src.k[b, :n]) and torch.equal(got.v[i, :n], src.v[b, :n])
    for e in ranks + [sched]:
        e.close()


def test_embed_digests_accept_numpy() -> None:
    arr = np.arange(40, dtype=np.float32).reshape(10, 4)
    assert len(KeyExtras.embed_digests(arr, 4)) == 3
