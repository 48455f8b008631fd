"""lmcache-core as an SGLang HiCache storage backend (L3 under SGLang's host memory pool).

Enable it with::

    python -m sglang.launch_server --model-path MODEL --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
        '{"backend_name": "lmcache_core", "module_path": "lmcache_core.integrations.sglang",
          "class_name": "LMCacheCoreHiCacheStorage", "interface_v1": 1,
          "tiers": ["memory://?capacity=8GiB", "disk:///nvme/lmcache"]}'

SGLang names every page of KV by its own SHA-256 page-hash chain and hands the
backend page hashes plus host-pool token indices, never token ids. A page is
one chunk here (``chunk_size`` = SGLang's page size), stored under
``namespace/<first 16 bytes of the page hash>`` in the same chunk format as
every other lmcache-core chunk, through the same tiers (memory, disk, Redis,
S3), verified on every read. The zero-copy path ``batch_set_v1`` /
``batch_get_v1`` gathers straight from, and scatters straight into, the host
pool (layouts ``layer_first``, ``page_first``, ``page_first_direct``; MHA and
MLA). Importing this module imports SGLang; ``import lmcache_core`` does not.

What is keyed (docs/sglang.md, "What is keyed"): the page hash (tokens, and the
request's extra_key / LoRA id / cache_salt, which SGLang folds in itself), the
model identity (:func:`sglang_model_fingerprint`), the chunk layout, tenant and
salt, and the parallel shard this rank holds (:func:`sglang_shard`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, List, Mapping, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from .. import chunk as chunkmod
from ..config import Config
from ..engine import CacheEngine
from ..errors import ConfigError, LayoutError
from ..keys import ChunkKey, kv_cache_format, model_fingerprint, named_model_fingerprint, sglang_page_key, shard_id
from ..layout import PagedKV

if TYPE_CHECKING:
    from sglang.srt.mem_cache.pool_host import HostKVCache

logger = logging.getLogger(__name__)

# Keys of the extra config that belong to SGLang's dynamic loader, not to lmcache-core.
SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1", "interface_v2"})
LAYOUTS = ("layer_first", "page_first", "page_first_direct")
SET_GROUP = 64  # pages a batch_set_v1 copies out of the host pool in one call (host memory bounded)
# --kv-cache-dtype values whose bytes are all in the host pool's kv_buffer. mxfp8, nvfp4 and
# fp4_mx_block16 keep block scales in other buffers, which this backend does not store.
# The fields of SGLang's runtime "model" namespace that change the KV a checkpoint computes.
RUNTIME_MODEL_FIELDS = ("model_path", "revision", "dtype", "quantization", "kv_cache_dtype",
                        "json_model_override_args")

# Where the request inputs besides token ids enter (sglang 0.5.23): SGLang seeds every storage
# page-hash chain with the request namespace, ``storage_namespace_seed(extra_key, cache_salt)``
# in sglang/srt/mem_cache/utils.py, through ``get_storage_hash_str`` (same file). Both paths
# that reach this backend use it: backups take ``node.hash_value`` from
# ``compute_node_hash_values`` (utils.py, called by unified_cache/unified_tree_core.py), and
# prefetches hash ``RadixKey(tokens, extra_key=, cache_salt=)`` from the anchor's last hash
# (``UnifiedRadixCache.prefetch_from_storage`` in mem_cache/unified_radix_cache.py, then
# ``HiCacheController._storage_hit_query`` in managers/cache_controller.py). A LoRA adapter
# enters as part of extra_key: ``Req.__init__`` (managers/schedule_batch.py) appends
# ``lora_id`` to it. So page hashes already differ per adapter, extra_key and cache_salt, and
# this backend keys nothing per request itself. (``--lora-paths`` adapters get the
# deterministic id uuid5(name, path): like the model, an adapter is identified by its name and
# path, not by a hash of its weights; dynamically loaded adapters get a random id, so their
# pages are never shared between servers.)


def runtime_model_fields() -> dict[str, Any] | None:
    """What SGLang's runtime context says about the model (``sglang.srt.runtime_context
    .get_model()``, published by the scheduler before it builds the cache), or None outside a
    server (HiCacheStorageConfig itself carries only ``model_name``)."""
    try:
        from sglang.srt import runtime_context

        bag = runtime_context.get_model()
    except Exception as exc:  # noqa: BLE001 - ValueError "not published", or an older SGLang
        logger.debug("lmcache-core: SGLang runtime context not available (%s)", exc)
        return None
    return {name: getattr(bag, name, None) for name in RUNTIME_MODEL_FIELDS}


def _element_format(dtype: str) -> str | None:
    """The KV format the host pool's element dtype implies, None when it cannot tell (bytes)."""
    return None if dtype == "uint8" else kv_cache_format(dtype)


def sglang_model_name(storage_config: HiCacheStorageConfig, config: Config) -> str:
    """The config key ``model``, else SGLang's ``model_name``; neither is a startup error."""
    name = config.model or storage_config.model_name or ""
    if not name:
        raise ConfigError(
            "lmcache-core: SGLang passed no model_name to the HiCache storage backend; set \"model\" "
            "in --hicache-storage-backend-extra-config (a name for the checkpoint, the same string on "
            "every server and vLLM connector that should share pages)"
        )
    return name


def sglang_model_fingerprint(storage_config: HiCacheStorageConfig, config: Config,
                             element_dtype: str,
                             runtime: Mapping[str, Any] | None = None) -> str:
    """The model identity of an SGLang server's pages.

    With the config key ``model`` set: :func:`named_model_fingerprint` of it (what a vLLM
    connector given the same ``model`` computes). Otherwise SGLang's ``model_name`` plus
    revision, dtype, quantization, KV cache format and ``--json-model-override-args`` from the
    runtime context. Outside a server (no runtime context) the KV format comes from the host
    pool's element dtype."""
    name = sglang_model_name(storage_config, config)
    rt = dict(runtime or {})
    kv = rt.get("kv_cache_dtype")
    if kv is None:
        kv = _element_format(element_dtype)
        if kv is None:
            raise ConfigError(
                f"lmcache-core: the host pool holds {element_dtype} KV and SGLang's runtime context is not "
                "published, so the fp8 variant is unknown; run inside an SGLang server"
            )
    if config.model:
        return named_model_fingerprint(config.model, kv_cache_dtype=kv, quantization=rt.get("quantization"))
    overrides = rt.get("json_model_override_args")
    return model_fingerprint(
        name, revision=rt.get("revision"), dtype=rt.get("dtype"),
        quantization=None if rt.get("quantization") in (None, "") else rt.get("quantization"),
        kv_cache_dtype=kv_cache_format(kv),
        overrides={"json_model_override_args": overrides} if overrides not in (None, "", "{}") else None)


def sglang_shard(storage_config: HiCacheStorageConfig, layers: tuple[int, int] | None) -> str:
    """The part of the model's KV this rank's host pool holds, as a namespace shard.

    MHA: the rank's KV heads (``tp_rank`` of ``tp_size``; SGLang gives the attention-TP rank
    and size when DP attention is on) and pipeline stage with its layers ``[start, end)``,
    through :func:`lmcache_core.keys.shard_id`, the same string a vLLM worker of that rank
    and stage uses. MLA: one TP shard. SGLang's MLA pools hold the same bytes on every TP
    rank: the latent KV comes from ``kv_a_proj_with_mqa``, a ``ReplicatedLinear`` over the
    all-reduced hidden state (sglang/srt/models/deepseek_v2.py), and SGLang lets only one rank
    write (``HiCacheStorageConfig.is_storage_writer``) while every rank reads. Decode context
    parallelism (``dcp_size``) splits each MLA page's tokens over ranks, and attention context
    parallelism (``attn_cp_size``) may place other tokens on other ranks: both are keyed when
    larger than one. ``dp_rank`` is not: DP replicas of one attention shard hold the same
    bytes and share pages."""
    mla = bool(storage_config.is_mla_model)
    tp_rank, tp_size = (0, 1) if mla else (int(storage_config.tp_rank), int(storage_config.tp_size))
    parts = [shard_id(tp_rank, tp_size, int(storage_config.pp_rank), int(storage_config.pp_size), layers)]
    for label, rank, size in (("cp", getattr(storage_config, "attn_cp_rank", 0),
                               getattr(storage_config, "attn_cp_size", 1)),
                              ("dcp", getattr(storage_config, "dcp_rank", 0),
                               getattr(storage_config, "dcp_size", 1))):
        rank, size = int(rank or 0), int(size or 1)
        if size > 1:
            if not 0 <= rank < size:
                raise ConfigError(f"lmcache-core: {label} rank {rank} of size {size} is not a valid shard")
            parts.append(f"{label}{rank}of{size}")
    return ".".join(p for p in parts if p)


def page_key(namespace: bytes, page_hash: str, num_tokens: int) -> ChunkKey:
    """The chunk key of one SGLang page: its hash (hex, SHA-256) cut to 16 bytes
    (:func:`lmcache_core.keys.sglang_page_key`, the key a vLLM connector with
    ``key_scheme: sglang`` computes from the token ids)."""
    return sglang_page_key(namespace, page_hash, num_tokens)


class LMCacheCoreHiCacheStorage(HiCacheStorage):
    """SGLang HiCache storage backed by a :class:`~lmcache_core.engine.CacheEngine`."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        extra = dict(storage_config.extra_config or {})
        if not int(extra.get("interface_v1", 0) or 0):
            logger.warning("lmcache-core: set \"interface_v1\": 1 in the extra config; only the zero-copy "
                           "batch_get_v1/batch_set_v1 path is implemented")
        overrides = {k: v for k, v in extra.items() if k not in SGLANG_KEYS}
        try:
            self.config = Config.load(overrides=overrides)
        except ConfigError as exc:
            raise ConfigError(f"--hicache-storage-backend-extra-config: {exc}") from exc
        self.storage_config = storage_config
        self.engine: CacheEngine | None = None
        self.kv: PagedKV | None = None
        self.page_size = 0
        self.mem_pool_host: Any = None
        sglang_model_name(storage_config, self.config)  # a missing model is a startup error
        self.is_writer = bool(getattr(storage_config, "is_storage_writer", True))
        self.model = ""  # the fingerprint, once the host pool says the KV dtype
        self.shard = ""
        self.stats = {"set_pages": 0, "get_pages": 0, "get_misses": 0, "exists_pages": 0}

    # -- binding the host pool ------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: "HostKVCache") -> None:
        """Bind the host pool's buffer as a :class:`PagedKV` and start the engine."""
        super().register_mem_pool_host(mem_pool_host)
        layout = getattr(mem_pool_host, "layout", None)
        if layout not in LAYOUTS:
            raise LayoutError(
                f"lmcache-core: SGLang host pool layout {layout!r} is not supported; use "
                f"--hicache-mem-layout {' or '.join(LAYOUTS)}"
            )
        buffer = getattr(mem_pool_host, "kv_buffer", None)
        if not isinstance(buffer, torch.Tensor):
            raise LayoutError(f"lmcache-core: host pool {type(mem_pool_host).__name__} has no kv_buffer tensor")
        self.kv = PagedKV.from_sglang_host(buffer, layout, mla=bool(self.storage_config.is_mla_model))
        self.page_size = int(mem_pool_host.page_size)
        if self.config.key_scheme == "sglang" and self.config.chunk_size != self.page_size:
            raise ConfigError(
                f"lmcache-core: key_scheme sglang needs chunk_size equal to SGLang's page size: "
                f"--page-size is {self.page_size}, chunk_size is {self.config.chunk_size}; set "
                f"\"chunk_size\": {self.page_size} here and in the vLLM connector that shares the tiers"
            )
        self.model = sglang_model_fingerprint(self.storage_config, self.config, self.kv.geometry.dtype,
                                              runtime_model_fields())
        start, end = int(getattr(mem_pool_host, "start_layer", 0)), getattr(mem_pool_host, "end_layer", None)
        layers = (start, int(end) + 1) if end is not None else None  # SGLang's end_layer is inclusive
        self.shard = sglang_shard(self.storage_config, layers)
        config = self.config.replace(chunk_size=self.page_size, save_partial=False)
        self.engine = CacheEngine(self.kv.geometry, config, model=self.model, shard=self.shard)
        logger.info("lmcache-core HiCache backend: %s layout, page %d, chunk layout %s, model %r, shard %r, "
                    "tiers %s", layout, self.page_size, self.kv.geometry.signature, self.model, self.shard,
                    list(config.tiers))

    def _engine(self) -> CacheEngine:
        if self.engine is None or self.kv is None:
            raise RuntimeError("lmcache-core: register_mem_pool_host() must be called before any transfer")
        return self.engine

    def _keys(self, keys: List[str]) -> list[ChunkKey]:
        ns = self._engine().namespace.id
        return [page_key(ns, k, self.page_size) for k in keys]

    def _page_slots(self, host_indices: torch.Tensor, i: int) -> torch.Tensor:
        """Host-pool token indices of page ``i`` of a batch (the pool's slots)."""
        return host_indices[i * self.page_size : (i + 1) * self.page_size].to(torch.int64)

    # -- the zero-copy interface -----------------------------------------------------------------
    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """How many leading pages of ``keys`` are stored (in any tier)."""
        if not keys:
            return 0
        hits = self._engine().tiers.lookup(self._keys(keys)).hits
        self.stats["exists_pages"] += hits
        return hits

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Gather each page from the host pool into one chunk and write it to every tier.

        Pages already stored are skipped (True). Writes to slow tiers complete in
        the background; the host pool pages are free again when this returns.
        """
        engine = self._engine()
        assert self.kv is not None
        if not self.is_writer:
            return [True] * len(keys)
        ckeys = self._keys(keys)
        present = engine.tiers.lookup(ckeys)
        out: list[bool] = [True] * present.hits + [False] * (len(ckeys) - present.hits)
        for start in range(present.hits, len(ckeys), SET_GROUP):  # host memory bounded per group
            self._set_group(engine, ckeys, keys, host_indices, range(start, min(start + SET_GROUP, len(ckeys))), out)
        self.stats["set_pages"] += sum(out)
        return out

    def _set_group(self, engine: CacheEngine, ckeys: list[ChunkKey], keys: List[str], host_indices: torch.Tensor,
                   idx: range, out: list[bool]) -> None:
        """Store pages ``idx``: one batched copy out of the host pool (coded with ``kv_codec``),
        then seal and write each; a failure is a miss of those pages, never an error."""
        todo: list[tuple[int, chunkmod.ChunkBuffer, torch.Tensor]] = []
        try:
            for i in idx:
                c = chunkmod.new_chunk(engine.pool, ckeys[i], engine.geometry, self.page_size, engine.kv_wire)
                todo.append((i, c, self._page_slots(host_indices, i)))
            engine._gather(self.kv, engine._copy_batch([(c, s, 0, c.num_tokens) for _, c, s in todo]), None)
            engine.device.synchronize()
        except Exception:  # noqa: BLE001 - a failed store is a future miss, never a crash
            logger.exception("lmcache-core: storing %d pages from %s failed", len(idx), keys[idx[0]])
            for _, c, _ in todo:
                c.release()
            return
        for i, c, _ in todo:  # kv_codec: the payload is coded already and no host codec applies
            try:
                sealed = chunkmod.seal(c, engine.config.codec, engine.pool)
            except Exception:  # noqa: BLE001
                logger.exception("lmcache-core: storing page %s failed", keys[i])
                c.release()
                continue
            try:
                engine.tiers.put(ckeys[i], sealed)
                out[i] = True
            finally:
                sealed.release()

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Fetch pages (verified) and scatter them into their host-pool slots in one batched
        device call; False for a miss, a corrupt page or a page of another layout or codec
        (SGLang then stops its prefetch there)."""
        engine = self._engine()
        assert self.kv is not None
        ckeys = self._keys(keys)
        fetched = engine.tiers.get_many(ckeys)
        out: list[bool] = [False] * len(fetched)
        good: list[tuple[int, chunkmod.ChunkBuffer]] = []
        for i, got in enumerate(fetched):
            if got is None:
                continue
            c, _tier = got
            if c.header.geometry != engine.geometry or c.num_tokens != self.page_size:
                logger.warning("lmcache-core: page %s holds %d tokens of %s, expected %d of %s",
                               keys[i], c.num_tokens, c.header.geometry.signature, self.page_size,
                               engine.geometry.signature)
                c.release()
            elif c.header.codec != engine.kv_wire:  # a plain page under kv_codec's namespace, or the reverse
                logger.warning("lmcache-core: page %s is coded %s, this backend reads %s; a miss", keys[i],
                               c.header.codec, engine.kv_wire)
                c.release()
            else:
                good.append((i, c))
        try:
            if good:
                parts = [(c, self._page_slots(host_indices, i), 0, c.num_tokens) for i, c in good]
                engine._scatter(self.kv, engine._copy_batch(parts), None)
                engine.device.synchronize()
                for i, _ in good:
                    out[i] = True
        except Exception:  # noqa: BLE001 - a failed load is a miss of those pages, never a crash
            logger.exception("lmcache-core: loading %d pages from %s failed", len(good), keys[good[0][0]])
        finally:
            for _, c in good:
                c.release()
        self.stats["get_pages"] += sum(out)
        self.stats["get_misses"] += len(out) - sum(out)
        return out

    # -- the legacy (copying) interface: not offered ------------------------------------------------
    def _legacy(self) -> None:
        raise NotImplementedError(
            "lmcache-core implements SGLang's zero-copy interface only: add \"interface_v1\": 1 to "
            "--hicache-storage-backend-extra-config"
        )

    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        self._legacy()
        return None

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None] | int:
        self._legacy()
        return []

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        self._legacy()
        return False

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        self._legacy()
        return False

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- housekeeping ---------------------------------------------------------------------------------
    def clear(self) -> None:
        if self.engine is not None:
            self.engine.clear()

    def get_stats(self) -> dict[str, int]:
        out, self.stats = self.stats, dict.fromkeys(self.stats, 0)
        return out

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every page set so far is in every tier (tests, shutdown)."""
        return self.engine.flush(timeout) if self.engine is not None else True

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
