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

torchvision is replaced by an inert stand-in at import (``sglang_stubs``) when
the real one is absent: SGLang's config package imports it for vision models,
and the CUDA build on PyPI would replace the CPU torch.
"""

from __future__ import annotations

import json
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


def mha_pool(layout: str, fill: bool, seed: int) -> Any:
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
                                device_capacity_tokens=DEVICE_TOKENS, start_layer=0, end_layer=L - 1)
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


def scenario(layout: str, mla: bool, tiers_dir: Path) -> dict[str, Any]:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from sglang.srt.mem_cache.utils import get_hash_str

    extra = {"backend_name": "lmcache_core", "module_path": "lmcache_core.integrations.sglang",
             "class_name": "LMCacheCoreHiCacheStorage", "interface_v1": 1, "device": "cpu",
             "tiers": ["memory://?capacity=64MiB", f"disk://{tiers_dir}/{layout}-{int(mla)}?capacity=256MiB"]}

    def backend(pool: Any) -> Any:
        cfg = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                   is_mla_model=mla, enable_storage_metrics=False,
                                   is_page_first_layout=layout != "layer_first", model_name="tiny/llama",
                                   extra_config=dict(extra))
        b = StorageBackendFactory.create_backend("dynamic", cfg, pool)
        b.register_mem_pool_host(pool)
        return b

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
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
