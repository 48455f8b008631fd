"""Cross-engine sharing (key_scheme sglang) against the real sglang 0.5.23; writes JSON results.

    python sglang_cross_driver.py OUT.json WORK_DIR

1. Key check: ``lmcache_core.keys.sglang_page_hashes`` against SGLang's own
   ``get_hash_str`` / ``get_storage_hash_str`` (its native SHA-256 extension)
   for random token ids: plain chains, continued chains (prior hash), ids
   above 2**32 - 1, and requests with ``extra_key`` / ``cache_salt``.
2. SGLang -> vLLM: SGLang's host pool + our HiCache backend (loaded by
   SGLang's ``StorageBackendFactory``) write pages into a disk tier; a
   ``CacheEngine`` configured as the vLLM connector configures it
   (``load_config`` of the connector's extra config, ``geometry_from_spec``)
   retrieves them into vLLM-shaped caches (``PagedKV.from_vllm_flash``, or
   ``from_vllm`` for MLA) bit for bit.
3. vLLM -> SGLang: that engine stores from vLLM-shaped caches; a fresh SGLang
   backend finds the pages (``batch_exists``) and loads them into its host
   pool (``batch_get_v1``) bit for bit.
4. Identity: with ``model`` set on both sides, the SGLang backend's model
   fingerprint is the vLLM connector's (``vllm_model_fingerprint`` of a vLLM
   config shaped like the engine's), for plain, fp8-KV and quantized models;
   TP ranks name the same shard as a vLLM worker of that rank; pages of a
   request with ``extra_key`` / ``cache_salt`` are what ``CacheEngine.keys``
   computes from the tokens and ``KeyExtras``.

    python sglang_cross_driver.py sglang-writes|sglang-reads SPEC.json OUT.json

The SGLang-side steps around a real vLLM engine process (see
``test_vllm_engine_and_sglang_share_a_tier``): write a prompt's pages (K/V
from Hugging Face) before vLLM runs; find and load the chunks vLLM stored.
"""

from __future__ import annotations

import json
import random
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sglang_driver import L, H, D, _setup_imports, token_rows  # noqa: E402

PAGE = 16  # SGLang --page-size == vLLM block size == lmcache chunk_size
HOST_DEVICE_TOKENS = 64  # host pool = 2x this: 8 pages
MODEL = "tiny/llama"
MLA_DIM = 24


def host_pool(layout: str, mla: bool, fill: bool, seed: int) -> Any:
    from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo, MLABufferInfo
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64)  # noqa: E731
    common = dict(pin_memory=False, device="cpu", device_capacity_tokens=HOST_DEVICE_TOKENS, start_layer=0,
                  end_layer=L - 1)
    if mla:
        bufs = tuple(torch.zeros(HOST_DEVICE_TOKENS, 1, MLA_DIM) for _ in range(L))
        info = MLABufferInfo(buffers=bufs, data_ptrs=ptrs(bufs), layer_indices=tuple(range(L)), device_layer_num=L,
                             page_size=PAGE, kv_lora_rank=16, qk_rope_head_dim=8, kv_cache_dim=MLA_DIM,
                             dtype=torch.float32, device=torch.device("cpu"))
        pool = MLATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, target_layer_num=L, **common)
    else:
        k = tuple(torch.zeros(HOST_DEVICE_TOKENS, H, D) for _ in range(L))
        v = tuple(torch.zeros(HOST_DEVICE_TOKENS, H, D) for _ in range(L))
        info = MHABufferInfo(buffers=KVBuffers(k=k, v=v, k_data_ptrs=ptrs(k), v_data_ptrs=ptrs(v),
                                               layout=list(KVBufferLayout)[0]),
                             page_size=PAGE, head_num=H, head_dim=D, v_head_dim=D, dtype=torch.float32,
                             device=torch.device("cpu"))
        pool = MHATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, **common)
    if fill:
        pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def sglang_backend(pool: Any, layout: str, mla: bool, tiers: list[str], tp_rank: int = 0, tp_size: int = 1,
                   **extra_keys: Any) -> Any:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    extra = {"backend_name": "lmcache_core", "module_path": "lmcache_core.integrations.sglang",
             "class_name": "LMCacheCoreHiCacheStorage", "interface_v1": 1, "device": "cpu", "tiers": tiers,
             "key_scheme": "sglang", "chunk_size": PAGE, **extra_keys}
    cfg = HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                               attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
                               is_page_first_layout=layout != "layer_first", model_name="/models/tiny",
                               extra_config={"model": MODEL, **extra})
    b = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    b.register_mem_pool_host(pool)
    return b


def vllm_config(model: str = "/models/tiny", dtype: torch.dtype = torch.float32, cache_dtype: str = "auto",
                quantization: str | None = None) -> Any:
    """The parts of a VllmConfig that ``vllm_model_fingerprint`` reads (as vLLM fills them)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        model_config=SimpleNamespace(model=model, revision=None, dtype=dtype, quantization=quantization,
                                     hf_overrides={}, quantization_config=None),
        cache_config=SimpleNamespace(cache_dtype=cache_dtype, calculate_kv_scales=False,
                                     kv_cache_dtype_skip_layers=[]))


def connector_model(name: str, **fields: Any) -> str:
    """The model identity the vLLM connector keys with ``model: name`` in its extra config."""
    from lmcache_core.integrations.vllm import vllm_model_fingerprint

    return vllm_model_fingerprint(vllm_config(**fields), name)


def vllm_side(tiers: list[str], mla: bool, num_blocks: int, fill: bool, seed: int,
              key_scheme: str = "sglang") -> tuple[Any, Any, list]:
    """A CacheEngine built the way the vLLM connector builds its own, plus vLLM-shaped caches."""
    from lmcache_core.engine import CacheEngine
    from lmcache_core.integrations.vllm.common import load_config
    from lmcache_core.integrations.vllm.layout import geometry_from_spec
    from lmcache_core.layout import PagedKV

    _opts, config = load_config({"key_scheme": key_scheme, "chunk_size": PAGE, "tiers": tiers, "device": "cpu",
                                 "model": MODEL})
    config.check_block_size(PAGE)
    gen = torch.Generator().manual_seed(seed)
    if mla:
        geometry = geometry_from_spec(L, 1, MLA_DIM, torch.float32, True)
        caches = [torch.zeros(num_blocks, PAGE, MLA_DIM) for _ in range(L)]
        make_kv = lambda cs: PagedKV.from_vllm(cs, use_mla=True)  # noqa: E731
    else:
        geometry = geometry_from_spec(L, H, D, torch.float32, False)
        caches = [torch.zeros(2, num_blocks, PAGE, H, D) for _ in range(L)]
        make_kv = PagedKV.from_vllm_flash
    if fill:
        for c in caches:
            c.copy_(torch.randn(c.shape, generator=gen))
    engine = CacheEngine(geometry, config, model=connector_model(config.model))
    return engine, make_kv(caches), caches


def vllm_rows(kv: Any, block_ids: list[int], n: int) -> torch.Tensor:
    """Every layer's K and V (or latent) rows of a request's first ``n`` tokens: [n, ...]."""
    from lmcache_core.layout import slot_mapping

    slots = slot_mapping(torch.tensor(block_ids), kv.block_size, 0, n)
    blocks, offs = slots // kv.block_size, slots % kv.block_size
    rows = []
    for lp in kv.layers:
        rows.append(lp.k[blocks, offs])
        if lp.v is not None:
            rows.append(lp.v[blocks, offs])
    return torch.stack(rows, dim=1).reshape(n, -1)


def key_check(seed: int) -> dict[str, Any]:
    from sglang.srt.mem_cache.utils import get_hash_str, get_storage_hash_str, storage_namespace_seed

    from lmcache_core.keys import sglang_namespace_seed, sglang_page_hashes

    class Key(list):  # SGLang's RadixKey carries extra_key / cache_salt as attributes
        extra_key: str | None = None
        cache_salt: str | None = None

    rng = random.Random(seed)
    cases = mismatches = 0
    for trial in range(40):
        page = rng.choice([1, 2, 16, 64])
        n = rng.randrange(0, 5 * page + 3)
        top = (1 << 40) if trial % 5 == 0 else 200_000  # some pages with ids above uint32
        tokens = [rng.randrange(0, top) for _ in range(n)]
        whole = n - n % page
        theirs = get_hash_str(tokens, None, page_size=page) if n else []
        ours = sglang_page_hashes(tokens, page)
        cases += 1
        mismatches += ours != list(theirs)[: whole // page]
        # a continued chain (SGLang hashes a request's tail from its cached prefix's last hash)
        prior = get_hash_str([rng.randrange(0, 1000) for _ in range(page)], None, page_size=page)[0]
        theirs = get_hash_str(tokens, prior, page_size=page) if n else []
        cases += 1
        mismatches += sglang_page_hashes(tokens, page, prior) != list(theirs)[: whole // page]
        # a request namespace (LoRA extra_key, cache_salt)
        key = Key(tokens)
        key.extra_key = rng.choice([None, "", "lora-7"])
        key.cache_salt = rng.choice([None, "", "salt"])
        theirs = get_storage_hash_str(key, None, page_size=page) if n else []
        cases += 2
        mismatches += sglang_page_hashes(tokens, page, extra_key=key.extra_key,
                                         cache_salt=key.cache_salt) != list(theirs)[: whole // page]
        mismatches += sglang_namespace_seed(key.extra_key, key.cache_salt) != storage_namespace_seed(
            key.extra_key, key.cache_salt)
    return {"cases": cases, "mismatches": mismatches}


def cross(layout: str, mla: bool, work: Path) -> dict[str, Any]:
    from sglang.srt.mem_cache.utils import get_hash_str

    from lmcache_core.errors import ConfigError

    out: dict[str, Any] = {"layout": layout, "mla": mla}
    pages = 3
    tokens = [random.Random(7).randrange(0, 32000) for _ in range(pages * PAGE + 5)]  # + a partial page
    keys = get_hash_str(tokens[: pages * PAGE], None, page_size=PAGE)  # what SGLang hands its backend
    block_ids = [5, 2, 7, 1]
    n = pages * PAGE

    # SGLang writes, vLLM reads.
    tiers = [f"disk://{work}/s2v-{layout}-{int(mla)}?capacity=64MiB"]
    src = host_pool(layout, mla, True, 1)
    src_idx = torch.arange(3 * PAGE, (3 + pages) * PAGE)
    writer = sglang_backend(src, layout, mla, tiers)
    out["s2v_set"] = writer.batch_set_v1(keys, src_idx)
    namespace = writer._engine().namespace
    writer.flush()
    writer.close()
    engine, kv, _caches = vllm_side(tiers, mla, 10, False, 0)
    out["same_namespace"] = engine.namespace == namespace
    out["s2v_same_keys"] = [k.digest.hex() for k in engine.keys(tokens)] == [h[:32] for h in keys]
    out["s2v_lookup"] = engine.lookup(tokens).hit_tokens
    out["s2v_loaded"] = engine.retrieve(tokens, kv, block_ids).hit_tokens
    out["s2v_bit_exact"] = bool(torch.equal(vllm_rows(kv, block_ids, n),
                                            token_rows(src, src_idx, mla).reshape(n, -1)))
    engine.close()

    # vLLM writes, SGLang reads.
    tiers = [f"disk://{work}/v2s-{layout}-{int(mla)}?capacity=64MiB"]
    engine, kv, _caches = vllm_side(tiers, mla, 10, True, 2)
    out["v2s_stored"] = engine.store(tokens, kv, block_ids, wait=True)
    engine.flush()
    engine.close()
    dst = host_pool(layout, mla, False, 3)
    dst_idx = torch.arange(5 * PAGE, (5 + pages) * PAGE)
    reader = sglang_backend(dst, layout, mla, tiers)
    out["v2s_exists"] = reader.batch_exists(keys)
    out["v2s_get"] = reader.batch_get_v1(keys, dst_idx)
    out["v2s_bit_exact"] = bool(torch.equal(token_rows(dst, dst_idx, mla).reshape(n, -1),
                                            vllm_rows(kv, block_ids, n)))
    reader.close()

    # A vLLM connector with the lmcache key scheme names chunks by its own hash chain: it never
    # meets SGLang's pages. The SGLang side's key_scheme only checks chunk_size: pages are named by
    # SGLang's hashes either way (same bytes, same keys), and a chunk_size other than the page size
    # is a startup error.
    engine, _kv, _caches = vllm_side(tiers, mla, 10, False, 0, key_scheme="lmcache")
    out["lmcache_scheme_lookup"] = engine.lookup(tokens).hit_tokens
    engine.close()
    other = sglang_backend(host_pool(layout, mla, False, 4), layout, mla, tiers, key_scheme="lmcache")
    out["lmcache_scheme_backend_exists"] = other.batch_exists(keys)
    other.close()
    try:
        sglang_backend(host_pool(layout, mla, False, 5), layout, mla, tiers, chunk_size=2 * PAGE)
        out["chunk_size_error"] = ""
    except ConfigError as exc:
        out["chunk_size_error"] = str(exc)
    return out


def identity(work: Path) -> dict[str, Any]:
    """What both engines key, compared without running either's forward pass."""
    from types import SimpleNamespace

    from sglang.srt import runtime_context
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    from lmcache_core.keys import KeyExtras, Namespace, shard_id

    tiers = [f"disk://{work}/identity?capacity=64MiB"]
    out: dict[str, Any] = {}

    def sglang_model(**runtime: Any) -> str:
        real = runtime_context.get_model
        if runtime:
            fields = {**dict(model_path="/models/tiny", revision=None, dtype="auto", quantization=None,
                             kv_cache_dtype="auto", json_model_override_args="{}"), **runtime}
            runtime_context.get_model = lambda: SimpleNamespace(**fields)  # noqa: E731
        try:
            b = sglang_backend(host_pool("page_first", False, False, 6), "page_first", False, tiers, model=MODEL)
            b.close()
            return b.model
        finally:
            runtime_context.get_model = real

    # Same `model` on both sides: one identity (name, KV format, quantization), whatever the paths.
    out["fingerprints"] = {
        "plain": [sglang_model(), connector_model(MODEL)],
        "plain_in_server": [sglang_model(dtype="float32"), connector_model(MODEL)],
        "fp8_kv": [sglang_model(kv_cache_dtype="fp8_e4m3"), connector_model(MODEL, cache_dtype="fp8")],
        "fp8_e5m2_kv": [sglang_model(kv_cache_dtype="fp8_e5m2"), connector_model(MODEL, cache_dtype="fp8_e5m2")],
        "quantized": [sglang_model(quantization="fp8"), connector_model(MODEL, quantization="fp8")],
    }
    out["fingerprints_differ"] = len({v[0] for v in out["fingerprints"].values()}) == 4  # plain twice
    # TP ranks: the SGLang backend of rank r names the shard a vLLM worker of rank r names.
    shards = {}
    for r in (0, 1):
        b = sglang_backend(host_pool("page_first", False, False, 7), "page_first", False, tiers, tp_rank=r,
                           tp_size=2)
        ns = b._engine().namespace
        shards[r] = ns == Namespace(ns.model, ns.layout, "default", "", shard_id(r, 2))
        b.close()
    out["tp_shards_match_vllm"] = [shards[0], shards[1]]
    # Per-request inputs: SGLang folds extra_key / cache_salt into its page hashes; a CacheEngine
    # with key_scheme sglang computes the same keys from the tokens and KeyExtras.
    engine, _kv, _caches = vllm_side(tiers, False, 4, False, 0)
    tokens = [random.Random(9).randrange(0, 32000) for _ in range(3 * PAGE)]
    same = {}
    for name, kw in (("extra_key", dict(extra_key="lora-7")), ("cache_salt", dict(cache_salt="s1")),
                     ("both", dict(extra_key="k", cache_salt="s"))):
        theirs = get_storage_hash_str(RadixKey(tokens, **kw), None, page_size=PAGE)
        ours = [k.digest.hex() for k in engine.keys(tokens, KeyExtras(**kw))]
        plain = [k.digest.hex() for k in engine.keys(tokens)]
        same[name] = ours == [h[:32] for h in theirs] and not set(ours) & set(plain)
    engine.close()
    out["extras_same_keys"] = same
    return out


# -- with a real vLLM engine process (test_vllm_engine_and_sglang_share_a_tier) ------------------
VLLM_PAGE = 128  # vLLM's CPU attention block size: SGLang --page-size == chunk_size == 128


def hf_kv(model_dir: str, tokens: list[int]) -> torch.Tensor:
    """The tiny model's K/V of ``tokens`` from Hugging Face: [tokens, layers, 2, heads, dim]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        cache = model(torch.tensor([tokens]), use_cache=True).past_key_values
    layers = [torch.stack([lay.keys[0], lay.values[0]]) for lay in cache.layers]  # [2, heads, T, dim]
    return torch.stack(layers).permute(3, 0, 1, 2, 4).contiguous()


def real_pool(pages: int, fill: torch.Tensor | None) -> tuple[Any, torch.Tensor]:
    """A page_first MHA host pool shaped like the tiny model (2 layers, 2 heads of 32, fp32)."""
    from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    layers, heads, dim, cap = 2, 2, 32, 4 * VLLM_PAGE
    k = tuple(torch.zeros(cap, heads, dim) for _ in range(layers))
    v = tuple(torch.zeros(cap, heads, dim) for _ in range(layers))
    ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64)  # noqa: E731
    info = MHABufferInfo(buffers=KVBuffers(k=k, v=v, k_data_ptrs=ptrs(k), v_data_ptrs=ptrs(v),
                                           layout=list(KVBufferLayout)[0]),
                         page_size=VLLM_PAGE, head_num=heads, head_dim=dim, v_head_dim=dim, dtype=torch.float32,
                         device=torch.device("cpu"))
    pool = MHATokenToKVPoolHost(info, 2.0, 0, VLLM_PAGE, "page_first", pin_memory=False, device="cpu",
                                device_capacity_tokens=cap, start_layer=0, end_layer=layers - 1)
    idx = torch.arange(VLLM_PAGE, (1 + pages) * VLLM_PAGE)  # page-aligned host slots
    if fill is not None:  # page_first buffer: (2, tokens, layers, heads, dim)
        pool.kv_buffer[:, idx] = fill[: len(idx)].permute(2, 0, 1, 3, 4)
    return pool, idx


def real_backend(pool: Any, tiers: list[str]) -> Any:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    extra = {"backend_name": "lmcache_core", "module_path": "lmcache_core.integrations.sglang",
             "class_name": "LMCacheCoreHiCacheStorage", "interface_v1": 1, "device": "cpu", "tiers": tiers,
             "key_scheme": "sglang", "chunk_size": VLLM_PAGE, "model": "tiny-llama"}
    cfg = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                               is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
                               model_name="/some/other/path", extra_config=extra)
    b = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    b.register_mem_pool_host(pool)
    return b


def sglang_writes(spec_path: str, out_path: str) -> None:
    """SGLang side before vLLM runs: pages of ``to_vllm`` (K/V from Hugging Face) into the tier."""
    from sglang.srt.mem_cache.utils import get_hash_str

    spec = json.loads(Path(spec_path).read_text())
    tokens = spec["to_vllm"]
    pages = len(tokens) // VLLM_PAGE
    keys = get_hash_str(tokens[: pages * VLLM_PAGE], None, page_size=VLLM_PAGE)
    pool, idx = real_pool(pages, hf_kv(spec["model"], tokens))
    b = real_backend(pool, spec["tiers"])
    out: dict[str, Any] = {"set": b.batch_set_v1(keys, idx)}
    b.flush()
    b.close()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    for name in ("to_vllm", "from_vllm"):  # Hugging Face greedy tokens: the reference
        ids = torch.tensor([spec[name]])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
        out[f"hf_{name}"] = gen[0, ids.shape[1]:].tolist()
    Path(out_path).write_text(json.dumps(out))


def sglang_reads(spec_path: str, out_path: str) -> None:
    """SGLang side after vLLM ran: vLLM's chunks of ``from_vllm`` found and loaded, K/V vs Hugging Face."""
    from sglang.srt.mem_cache.utils import get_hash_str

    spec = json.loads(Path(spec_path).read_text())
    tokens = spec["from_vllm"]
    pages = len(tokens) // VLLM_PAGE
    keys = get_hash_str(tokens[: pages * VLLM_PAGE], None, page_size=VLLM_PAGE)
    pool, idx = real_pool(pages, None)
    b = real_backend(pool, spec["tiers"])
    out: dict[str, Any] = {"pages": pages, "exists": b.batch_exists(keys), "get": b.batch_get_v1(keys, idx)}
    b.close()
    got = pool.kv_buffer[:, idx].permute(1, 2, 0, 3, 4)  # [tokens, layers, 2, heads, dim]
    want = hf_kv(spec["model"], tokens)[: len(idx)]
    out["max_abs_diff"] = float((got - want).abs().max())
    out["nonzero"] = bool(got.abs().sum() > 0)
    Path(out_path).write_text(json.dumps(out))


def main(out_path: str, work: str) -> None:
    _setup_imports()
    import sglang

    results: dict[str, Any] = {"sglang": sglang.__version__, "scenarios": [], "errors": []}
    try:
        results["keys"] = key_check(1234)
    except Exception as exc:  # noqa: BLE001 - recorded, asserted by the test
        results["errors"].append({"what": "keys", "error": f"{type(exc).__name__}: {exc}",
                                  "trace": traceback.format_exc()})
    try:
        results["identity"] = identity(Path(work))
    except Exception as exc:  # noqa: BLE001
        results["errors"].append({"what": "identity", "error": f"{type(exc).__name__}: {exc}",
                                  "trace": traceback.format_exc()})
    for layout, mla in (("page_first", False), ("layer_first", False), ("page_first_direct", False),
                        ("page_first", True)):
        try:
            results["scenarios"].append(cross(layout, mla, Path(work)))
        except Exception as exc:  # noqa: BLE001
            results["errors"].append({"what": f"{layout}/{'mla' if mla else 'mha'}",
                                      "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if sys.argv[1] in ("sglang-writes", "sglang-reads"):
        _setup_imports()
        (sglang_writes if sys.argv[1] == "sglang-writes" else sglang_reads)(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2])
