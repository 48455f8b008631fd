"""Drives the SGLang HiCache backend through the real sglang 0.5.23 classes; writes JSON results.

    python sglang_driver.py OUT.json TIERS_DIR

For each host-pool layout (layer_first, page_first, page_first_direct) and for
MHA and MLA pools: SGLang's own ``StorageBackendFactory`` loads the backend
the ``dynamic`` way, SGLang's ``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost``
hold the KV on the CPU, page keys come from SGLang's ``get_hash_str`` chain.
Writer and reader are separate backend instances (separate engines, as two
servers would be) sharing a disk tier. Checked: ``batch_set_v1`` then
``batch_exists`` and ``batch_get_v1`` into other host slots (bit-exact), a
corrupted page stops the prefix there, a missing page is False.

Identity (``identity`` in the results): two TP ranks (and two PP stages) of one
config storing the same page hashes write disjoint keys and each reads back its
own bytes; MLA ranks share one writer's pages; page hashes of SGLang's own
``get_storage_hash_str`` with different ``extra_key`` / ``cache_salt`` never
meet; the model fingerprint (explicit ``model``, SGLang's ``model_name``, the
runtime context's dtype/quantization/KV format) and its startup errors.

torchvision is replaced by an inert stand-in at import (``sglang_stubs``) when
the real one is absent: SGLang's config package imports it for vision models,
and the CUDA build on PyPI would replace the CPU torch.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

L, H, D, PAGE, DEVICE_TOKENS = 3, 2, 16, 4, 64


def _setup_imports() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent (or a broken CUDA build)
        sys.path.insert(0, str(Path(__file__).with_name("sglang_stubs")))


def mha_pool(layout: str, fill: bool, seed: int, start_layer: int = 0) -> Any:
    from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    k = tuple(torch.zeros(DEVICE_TOKENS, H, D) for _ in range(L))
    v = tuple(torch.zeros(DEVICE_TOKENS, H, D) for _ in range(L))
    ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64)  # noqa: E731
    info = MHABufferInfo(buffers=KVBuffers(k=k, v=v, k_data_ptrs=ptrs(k), v_data_ptrs=ptrs(v),
                                           layout=list(KVBufferLayout)[0]),
                         page_size=PAGE, head_num=H, head_dim=D, v_head_dim=D, dtype=torch.float32,
                         device=torch.device("cpu"))
    pool = MHATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=DEVICE_TOKENS, start_layer=start_layer,
                                end_layer=start_layer + L - 1)
    if fill:
        pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def mla_pool(layout: str, fill: bool, seed: int) -> Any:
    from sglang.srt.mem_cache.device_pool_info import MLABufferInfo
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    dim = 24
    bufs = tuple(torch.zeros(DEVICE_TOKENS, 1, dim) for _ in range(L))
    info = MLABufferInfo(buffers=bufs, data_ptrs=torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64),
                         layer_indices=tuple(range(L)), device_layer_num=L, page_size=PAGE, kv_lora_rank=16,
                         qk_rope_head_dim=8, kv_cache_dim=dim, dtype=torch.float32, device=torch.device("cpu"))
    pool = MLATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=DEVICE_TOKENS, start_layer=0, end_layer=L - 1,
                                target_layer_num=L)
    if fill:
        pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def token_rows(pool: Any, indices: torch.Tensor, mla: bool) -> torch.Tensor:
    """Every layer's K and V (or latent) rows of host-pool tokens ``indices``: [n, ...]."""
    from lmcache_core.layout import PagedKV

    kv = PagedKV.from_sglang_host(pool.kv_buffer, pool.layout, mla=mla)
    idx = indices.to(torch.int64)
    blocks, offs = idx // kv.block_size, idx % kv.block_size
    rows = []
    for lp in kv.layers:
        rows.append(lp.k[blocks, offs])
        if lp.v is not None:
            rows.append(lp.v[blocks, offs])
    return torch.stack(rows, dim=1)


def storage_config(layout: str, mla: bool, extra: dict[str, Any], **fields: Any) -> Any:
    """SGLang's HiCacheStorageConfig for one rank (fields override tp/pp ranks, model_name...)."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    values: dict[str, Any] = dict(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                  is_mla_model=mla, enable_storage_metrics=False,
                                  is_page_first_layout=layout != "layer_first", model_name="tiny/llama")
    values.update(fields)
    return HiCacheStorageConfig(extra_config=dict(extra), **values)


def make_backend(pool: Any, layout: str, mla: bool, extra: dict[str, Any], **fields: Any) -> Any:
    """The backend as SGLang loads it (its ``dynamic`` factory), bound to ``pool``."""
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    b = StorageBackendFactory.create_backend("dynamic", storage_config(layout, mla, extra, **fields), pool)
    b.register_mem_pool_host(pool)
    return b


def extra_config(tiers: list[str], **keys: Any) -> dict[str, Any]:
    return {"backend_name": "lmcache_core", "module_path": "lmcache_core.integrations.sglang",
            "class_name": "LMCacheCoreHiCacheStorage", "interface_v1": 1, "device": "cpu", "tiers": tiers, **keys}


def scenario(layout: str, mla: bool, tiers_dir: Path) -> dict[str, Any]:
    from sglang.srt.mem_cache.utils import get_hash_str

    extra = extra_config(["memory://?capacity=64MiB", f"disk://{tiers_dir}/{layout}-{int(mla)}?capacity=256MiB"])

    def backend(pool: Any) -> Any:
        return make_backend(pool, layout, mla, extra)

    make = mla_pool if mla else mha_pool
    src_pool, dst_pool = make(layout, True, 1), make(layout, False, 2)
    writer = backend(src_pool)
    tokens = list(range(1000, 1000 + 5 * PAGE))
    keys = get_hash_str(tokens, None, page_size=PAGE)
    keys = keys if isinstance(keys, list) else [keys]
    npages = len(keys)
    src_idx = torch.arange(8 * PAGE, (8 + npages) * PAGE)  # page-aligned slots, as SGLang allocates them
    dst_idx = torch.arange(20 * PAGE, (20 + npages) * PAGE)
    out: dict[str, Any] = {"layout": layout, "mla": mla, "pages": npages, "backend_class": type(writer).__name__}
    out["set"] = writer.batch_set_v1(keys, src_idx)
    out["set_again"] = writer.batch_set_v1(keys, src_idx)  # idempotent
    writer.flush()
    out["stats_writer"] = writer.get_stats()
    writer.close()
    reader = backend(dst_pool)  # a second server: own engine and memory tier, same disk tier
    out["exists"] = reader.batch_exists(keys)
    out["exists_other"] = reader.batch_exists(get_hash_str(list(range(5, 5 + 2 * PAGE)), None, page_size=PAGE))
    out["get"] = reader.batch_get_v1(keys, dst_idx)
    out["bit_exact"] = bool(torch.equal(token_rows(dst_pool, dst_idx, mla), token_rows(src_pool, src_idx, mla)))
    untouched = torch.arange(0, 8 * PAGE)
    out["others_untouched"] = bool(token_rows(dst_pool, untouched, mla).abs().sum() == 0)
    # Corrupt page 2 on disk: the reader (fresh memory tier) must refuse it.
    ckey = reader._keys([keys[2]])[0]
    files = list((tiers_dir / f"{layout}-{int(mla)}").rglob(f"{ckey.digest.hex()}.kv"))
    out["corrupt_file_found"] = len(files) == 1
    if files:
        data = bytearray(files[0].read_bytes())
        data[4096 + 8] ^= 0x5A
        files[0].write_bytes(bytes(data))
    reader.close()
    third = backend(make(layout, False, 3))
    out["get_after_corruption"] = third.batch_get_v1(keys, dst_idx)
    out["exists_after_corruption"] = third.batch_exists(keys)
    third.close()
    out["ok"] = bool(all(out["set"]) and all(out["set_again"]) and out["exists"] == npages
                     and out["exists_other"] == 0 and all(out["get"]) and out["bit_exact"]
                     and out["others_untouched"] and out["get_after_corruption"][2] is False
                     and out["exists_after_corruption"] == 2)
    return out


def daemon_scenario(url: str) -> dict[str, Any]:
    """Two backends (two SGLang servers) through one ``lmcache serve``: the reader gets the writer's
    pages from the daemon's memory tier, bit for bit."""
    from sglang.srt.mem_cache.utils import get_hash_str

    layout = "page_first"
    extra = extra_config(["memory://?capacity=1MiB"], daemon=url)
    src_pool, dst_pool = mha_pool(layout, True, 11), mha_pool(layout, False, 12)
    writer = make_backend(src_pool, layout, False, extra)
    keys = get_hash_str(list(range(3000, 3000 + 4 * PAGE)), None, page_size=PAGE)
    keys = keys if isinstance(keys, list) else [keys]
    src_idx = torch.arange(4 * PAGE, (4 + len(keys)) * PAGE)
    dst_idx = torch.arange(12 * PAGE, (12 + len(keys)) * PAGE)
    out: dict[str, Any] = {"pages": len(keys), "set": writer.batch_set_v1(keys, src_idx)}
    writer.flush()
    out["writer_tiers"] = [t.name for t in writer._engine().tiers.tiers]
    writer.close()
    reader = make_backend(dst_pool, layout, False, extra)
    out["exists"] = reader.batch_exists(keys)
    out["get"] = reader.batch_get_v1(keys, dst_idx)
    out["bit_exact"] = bool(torch.equal(token_rows(dst_pool, dst_idx, False), token_rows(src_pool, src_idx, False)))
    reader.close()
    return out


def kv_codec_scenario(tiers_dir: Path) -> dict[str, Any]:
    """kv_codec fp8 on the backend (MHA page_first, MLA layer_first): the disk tier holds fp8 pages,
    a second backend (fresh memory tier) reads them back bit for bit what the host fp8 codec makes
    of the writer's rows, and an exact backend on the same disk finds none of them."""
    from sglang.srt.mem_cache.utils import get_hash_str

    from lmcache_core import chunk as chunkmod
    from lmcache_core.codecs import fp8

    out: dict[str, Any] = {}
    for layout, mla in (("page_first", False), ("layer_first", True)):
        disk = tiers_dir / f"kv-codec-{layout}-{int(mla)}"
        extra = extra_config(["memory://?capacity=64MiB", f"disk://{disk}?capacity=256MiB"], kv_codec="fp8")
        make = mla_pool if mla else mha_pool
        src_pool, dst_pool = make(layout, True, 31), make(layout, False, 32)
        keys = get_hash_str(list(range(7000, 7000 + 3 * PAGE)), None, page_size=PAGE)
        keys = keys if isinstance(keys, list) else [keys]
        src_idx = torch.arange(2 * PAGE, (2 + len(keys)) * PAGE)
        dst_idx = torch.arange(9 * PAGE, (9 + len(keys)) * PAGE)
        writer = make_backend(src_pool, layout, mla, extra)
        r: dict[str, Any] = {"set": writer.batch_set_v1(keys, src_idx)}
        writer.flush()
        writer.close()
        heads = [chunkmod.decode_header(f.read_bytes()[:chunkmod.HEADER_SIZE]) for f in disk.rglob("*.kv")]
        r["disk_codecs"] = sorted({h.codec for h in heads})
        r["disk_pages"] = len(heads)
        reader = make_backend(dst_pool, layout, mla, extra)
        r["get"] = reader.batch_get_v1(keys, dst_idx)
        reader.close()
        x = token_rows(src_pool, src_idx, mla)  # [n, planes, heads, dim]
        flat = x.reshape(*x.shape[:2], -1).transpose(0, 1)  # [planes, n, hidden]
        q, sc = fp8.quantize(flat, x.shape[-1])
        want = fp8.dequantize(q, sc, x.shape[-1], x.dtype).transpose(0, 1).reshape(x.shape)
        got = token_rows(dst_pool, dst_idx, mla)
        r["fp8_bit_exact"] = bool(torch.equal(got.view(torch.int32), want.view(torch.int32)))
        r["not_exact"] = not bool(torch.equal(got, x))
        exact = make_backend(make(layout, False, 33), layout, mla, {**extra, "kv_codec": "none"})
        r["exact_exists"] = exact.batch_exists(keys)
        exact.close()
        out[f"{layout}-{'mla' if mla else 'mha'}"] = r
    return out


def _digests(b: Any, keys: list[str]) -> set[bytes]:
    return {k.namespace + k.digest for k in b._keys(keys)}


def tp_ranks(tiers_dir: Path) -> dict[str, Any]:
    """Two TP ranks of one tp_size-2 config store the same page hashes (each its own heads, so
    other bytes) into one disk tier; fresh readers of each rank get their own bytes back."""
    from sglang.srt.mem_cache.utils import get_hash_str

    layout = "page_first"
    tiers = [f"disk://{tiers_dir}/tp2?capacity=256MiB"]
    extra = extra_config(tiers)
    keys = get_hash_str(list(range(2000, 2000 + 3 * PAGE)), None, page_size=PAGE)
    idx = torch.arange(4 * PAGE, 7 * PAGE)
    out: dict[str, Any] = {}
    src = {r: mha_pool(layout, True, 10 + r) for r in (0, 1)}
    writers = {r: make_backend(src[r], layout, False, extra, tp_rank=r, tp_size=2) for r in (0, 1)}
    out["shards"] = [writers[r].shard for r in (0, 1)]
    out["keys_disjoint"] = not (_digests(writers[0], keys) & _digests(writers[1], keys))
    out["set"] = [writers[r].batch_set_v1(keys, idx) for r in (0, 1)]
    for w in writers.values():
        w.flush()
        w.close()
    own, other = [], []
    for r in (0, 1):
        dst = mha_pool(layout, False, 20 + r)
        reader = make_backend(dst, layout, False, extra, tp_rank=r, tp_size=2)
        out.setdefault("exists", []).append(reader.batch_exists(keys))
        out.setdefault("get", []).append(reader.batch_get_v1(keys, idx))
        reader.close()
        own.append(bool(torch.equal(token_rows(dst, idx, False), token_rows(src[r], idx, False))))
        other.append(bool(torch.equal(token_rows(dst, idx, False), token_rows(src[1 - r], idx, False))))
    out["own_bytes"], out["other_bytes"] = own, other
    single = make_backend(mha_pool(layout, False, 30), layout, False, extra)  # a TP-1 server
    out["tp1_exists"] = single.batch_exists(keys)
    single.close()
    return out


def pp_stages(tiers_dir: Path) -> dict[str, Any]:
    """Two PP stages (layers [0, L) and [L, 2L), same shape) never read each other's pages."""
    from sglang.srt.mem_cache.utils import get_hash_str

    layout = "page_first"
    extra = extra_config([f"disk://{tiers_dir}/pp2?capacity=256MiB"])
    keys = get_hash_str(list(range(3000, 3000 + 2 * PAGE)), None, page_size=PAGE)
    idx = torch.arange(2 * PAGE, 4 * PAGE)
    src = {s: mha_pool(layout, True, 40 + s, start_layer=s * L) for s in (0, 1)}
    out: dict[str, Any] = {}
    stage = {s: make_backend(src[s], layout, False, extra, pp_rank=s, pp_size=2) for s in (0, 1)}
    out["shards"] = [stage[s].shard for s in (0, 1)]
    out["keys_disjoint"] = not (_digests(stage[0], keys) & _digests(stage[1], keys))
    out["set0"] = stage[0].batch_set_v1(keys, idx)
    stage[0].flush()
    out["stage1_exists_before"] = stage[1].batch_exists(keys)
    out["set1"] = stage[1].batch_set_v1(keys, idx)
    stage[1].flush()
    for s in (0, 1):
        dst = mha_pool(layout, False, 50 + s, start_layer=s * L)
        reader = make_backend(dst, layout, False, extra, pp_rank=s, pp_size=2)
        out.setdefault("get", []).append(reader.batch_get_v1(keys, idx))
        out.setdefault("own_bytes", []).append(bool(torch.equal(token_rows(dst, idx, False),
                                                                token_rows(src[s], idx, False))))
        reader.close()
    for b in stage.values():
        b.close()
    return out


def mla_ranks(tiers_dir: Path) -> dict[str, Any]:
    """MLA pools hold the same bytes on every TP rank: one shard, rank 0 writes, rank 1 reads."""
    from sglang.srt.mem_cache.utils import get_hash_str

    layout = "page_first"
    extra = extra_config([f"disk://{tiers_dir}/mla-tp2?capacity=256MiB"])
    keys = get_hash_str(list(range(4000, 4000 + 2 * PAGE)), None, page_size=PAGE)
    idx = torch.arange(2 * PAGE, 4 * PAGE)
    src = mla_pool(layout, True, 60)
    out: dict[str, Any] = {}
    r1_src = mla_pool(layout, True, 61)
    r0 = make_backend(src, layout, True, extra, tp_rank=0, tp_size=2)
    r1 = make_backend(r1_src, layout, True, extra, tp_rank=1, tp_size=2)
    out["shards"] = [r0.shard, r1.shard]
    out["same_keys"] = _digests(r0, keys) == _digests(r1, keys)
    out["writers"] = [r0.is_writer, r1.is_writer]
    out["set_rank1"] = r1.batch_set_v1(keys, idx)  # not SGLang's writer rank: writes nothing
    r1.flush()
    out["exists_after_rank1"] = r0.batch_exists(keys)
    out["set_rank0"] = r0.batch_set_v1(keys, idx)
    r0.flush()
    r0.close()
    r1.close()
    dst = mla_pool(layout, False, 62)
    reader = make_backend(dst, layout, True, extra, tp_rank=1, tp_size=2)
    out["get_rank1"] = reader.batch_get_v1(keys, idx)
    out["bit_exact"] = bool(torch.equal(token_rows(dst, idx, True), token_rows(src, idx, True)))
    reader.close()
    return out


def request_namespaces(tiers_dir: Path) -> dict[str, Any]:
    """SGLang's own storage hashing (``get_storage_hash_str`` of a ``RadixKey``, as its radix
    tree and prefetch call it) folds extra_key (LoRA id) and cache_salt into the page hashes:
    pages of one prompt under two extra keys, a cache_salt and none are four sets of keys that
    never meet in the tier, and each reads back its own bytes."""
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    layout = "page_first"
    extra = extra_config([f"disk://{tiers_dir}/extra-key?capacity=256MiB"])
    tokens = list(range(5000, 5000 + 3 * PAGE))
    names = {"lora-a": dict(extra_key="lora-a"), "lora-b": dict(extra_key="lora-b"),
             "salt": dict(cache_salt="tenant-x"), "plain": {}}
    keys = {n: get_storage_hash_str(RadixKey(tokens, **kw), None, page_size=PAGE) for n, kw in names.items()}
    idx = torch.arange(2 * PAGE, 5 * PAGE)
    out: dict[str, Any] = {"distinct_hashes": len({h for ks in keys.values() for h in ks}) == 4 * 3}
    writer = make_backend(mha_pool(layout, True, 70), layout, False, extra)
    src = writer.mem_pool_host
    out["set_a"] = writer.batch_set_v1(keys["lora-a"], idx)
    writer.flush()
    out["exists_after_a"] = {n: writer.batch_exists(k) for n, k in keys.items()}
    writer.close()
    src_b = mha_pool(layout, True, 71)
    writer_b = make_backend(src_b, layout, False, extra)
    out["set_b"] = writer_b.batch_set_v1(keys["lora-b"], idx)
    writer_b.flush()
    writer_b.close()
    got = {}
    for name, pool_src in (("lora-a", src), ("lora-b", src_b)):
        dst = mha_pool(layout, False, 72)
        reader = make_backend(dst, layout, False, extra)
        got[name] = {"get": reader.batch_get_v1(keys[name], idx),
                     "own": bool(torch.equal(token_rows(dst, idx, False), token_rows(pool_src, idx, False)))}
        reader.close()
    out["read"] = got
    reader = make_backend(mha_pool(layout, False, 73), layout, False, extra)
    out["exists_end"] = {n: reader.batch_exists(k) for n, k in keys.items()}
    reader.close()
    return out


def identity(tiers_dir: Path) -> dict[str, Any]:
    """Model fingerprints and shard strings, and the startup errors."""
    from types import SimpleNamespace

    from sglang.srt import runtime_context

    from lmcache_core.errors import ConfigError
    from lmcache_core.integrations.sglang import named_model_fingerprint, sglang_shard
    from lmcache_core.keys import model_fingerprint

    layout = "page_first"
    tiers = [f"disk://{tiers_dir}/identity?capacity=64MiB"]
    out: dict[str, Any] = {}

    def model_of(extra: dict[str, Any], **fields: Any) -> str:
        b = make_backend(mha_pool(layout, False, 80), layout, False, extra, **fields)
        b.close()
        return b.model

    try:
        make_backend(mha_pool(layout, False, 80), layout, False, extra_config(tiers), model_name=None)
        out["missing_model_error"] = ""
    except ConfigError as exc:
        out["missing_model_error"] = str(exc)
    out["from_model_name"] = model_of(extra_config(tiers)) == model_fingerprint("tiny/llama", kv_cache_dtype="auto")
    out["explicit"] = model_of(extra_config(tiers, model="tiny-llama"), model_name="/other/path") == \
        named_model_fingerprint("tiny-llama", kv_cache_dtype="auto")
    out["explicit_ignores_model_name"] = model_of(extra_config(tiers, model="tiny-llama"), model_name="/a") == \
        model_of(extra_config(tiers, model="tiny-llama"), model_name="/b")
    # Inside a server SGLang's runtime context says dtype, quantization and KV cache format.
    real_get_model = runtime_context.get_model
    fields = dict(model_path="tiny/llama", revision=None, dtype="bfloat16", quantization=None,
                  kv_cache_dtype="auto", json_model_override_args="{}")
    seen: dict[str, str] = {}
    try:
        for name, change in (("base", {}), ("quantized", {"quantization": "fp8"}), ("revision", {"revision": "r2"}),
                             ("fp16", {"dtype": "float16"}), ("override", {"json_model_override_args": '{"a": 1}'}),
                             ("fp8_e4m3", {"kv_cache_dtype": "fp8_e4m3"}), ("fp8_e5m2", {"kv_cache_dtype": "fp8_e5m2"})):
            runtime_context.get_model = lambda f={**fields, **change}: SimpleNamespace(**f)  # noqa: E731
            seen[name] = model_of(extra_config(tiers))
        runtime_context.get_model = lambda: SimpleNamespace(**{**fields, "quantization": "fp8"})  # noqa: E731
        out["explicit_keeps_quantization"] = model_of(extra_config(tiers, model="tiny-llama")) == \
            named_model_fingerprint("tiny-llama", kv_cache_dtype="auto", quantization="fp8")
        runtime_context.get_model = lambda: SimpleNamespace(**{**fields, "kv_cache_dtype": "nvfp4"})  # noqa: E731
        try:
            model_of(extra_config(tiers))
            out["nvfp4_error"] = ""
        except ConfigError as exc:
            out["nvfp4_error"] = str(exc)
    finally:
        runtime_context.get_model = real_get_model
    out["runtime_fingerprints_distinct"] = len(set(seen.values())) == len(seen)
    out["runtime_fingerprints"] = seen
    # Shard strings: what each rank keys (the DCP config needs MLA and a DCP-aligned page).
    cfg = lambda mla=False, **f: storage_config(layout, mla, {}, **f)  # noqa: E731
    out["shard_strings"] = {
        "tp1": sglang_shard(cfg(), (0, L)),
        "tp2r1": sglang_shard(cfg(tp_rank=1, tp_size=2), (0, L)),
        "tp2r1pp2s1": sglang_shard(cfg(tp_rank=1, tp_size=2, pp_rank=1, pp_size=2), (3, 6)),
        "mla_tp4r3": sglang_shard(cfg(True, tp_rank=3, tp_size=4), (0, L)),
        "mla_tp4r3pp2s1": sglang_shard(cfg(True, tp_rank=3, tp_size=4, pp_rank=1, pp_size=2), (3, 6)),
        "mla_dcp2r1": sglang_shard(cfg(True, tp_rank=3, tp_size=4, dcp_size=2, dcp_rank=1, logical_page_size=8),
                                   (0, L)),
        "tp2r0cp2r1": sglang_shard(cfg(tp_rank=0, tp_size=2, attn_cp_rank=1, attn_cp_size=2), (0, L)),
        "dp_rank3": sglang_shard(cfg(tp_rank=1, tp_size=2, dp_rank=3), (0, L)),
    }
    return out


def main(out_path: str, tiers_dir: str) -> None:
    _setup_imports()
    import sglang

    results: dict[str, Any] = {"sglang": sglang.__version__, "torch": torch.__version__, "scenarios": [],
                               "errors": []}
    for mla in (False, True):
        for layout in ("layer_first", "page_first", "page_first_direct"):
            try:
                results["scenarios"].append(scenario(layout, mla, Path(tiers_dir)))
            except Exception as exc:  # noqa: BLE001 - recorded, asserted by the test
                results["errors"].append({"layout": layout, "mla": mla, "error": f"{type(exc).__name__}: {exc}",
                                          "trace": traceback.format_exc()})
    results["identity"] = {}
    for name, fn in (("tp_ranks", tp_ranks), ("pp_stages", pp_stages), ("mla_ranks", mla_ranks),
                     ("request_namespaces", request_namespaces), ("identity", identity)):
        try:
            results["identity"][name] = fn(Path(tiers_dir))
        except Exception as exc:  # noqa: BLE001
            results["errors"].append({"what": name, "error": f"{type(exc).__name__}: {exc}",
                                      "trace": traceback.format_exc()})
    try:
        results["kv_codec"] = kv_codec_scenario(Path(tiers_dir))
    except Exception as exc:  # noqa: BLE001
        results["errors"].append({"what": "kv_codec", "error": f"{type(exc).__name__}: {exc}",
                                  "trace": traceback.format_exc()})
    if os.environ.get("LMCACHE_TEST_DAEMON_URL"):
        try:
            results["daemon"] = daemon_scenario(os.environ["LMCACHE_TEST_DAEMON_URL"])
        except Exception as exc:  # noqa: BLE001
            results["errors"].append({"what": "daemon", "error": f"{type(exc).__name__}: {exc}",
                                      "trace": traceback.format_exc()})
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
