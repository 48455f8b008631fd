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
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from .. import chunk as chunkmod
from ..config import Config
from ..engine import CacheEngine
from ..errors import ConfigError, LayoutError
from ..keys import ChunkKey, sglang_page_key
from ..layout import PagedKV

if TYPE_CHECKING:
    from sglang.srt.mem_cache.pool_host import HostKVCache

logger = logging.getLogger(__name__)

# Keys of the extra config that belong to SGLang's dynamic loader, not to lmcache-core.
SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1", "interface_v2"})
LAYOUTS = ("layer_first", "page_first", "page_first_direct")


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
        mla = bool(storage_config.is_mla_model)
        # MHA KV is sharded over TP ranks by heads: each rank has its own keyspace. MLA KV is
        # replicated: one writer, shared keys.
        shard = "" if mla else f"tp{storage_config.tp_rank}of{storage_config.tp_size}"
        if self.config.key_scheme == "sglang" and storage_config.tp_size == 1:
            # Shared with vLLM (whose keys carry no TP salt): one rank, the namespace of a
            # vLLM connector with the same model, tenant, salt and chunk layout.
            shard = ""
        if storage_config.pp_size > 1:
            shard += f"pp{storage_config.pp_rank}of{storage_config.pp_size}"
        self._shard_salt = shard
        self.is_writer = bool(getattr(storage_config, "is_storage_writer", True))
        self.model = self.config.model or (storage_config.model_name or "unknown")
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
        salt = "/".join(p for p in (self.config.salt, self._shard_salt) if p)
        config = self.config.replace(chunk_size=self.page_size, save_partial=False, salt=salt)
        self.engine = CacheEngine(self.kv.geometry, config, model=self.model)
        logger.info("lmcache-core HiCache backend: %s layout, page %d, chunk layout %s, tiers %s",
                    layout, self.page_size, self.kv.geometry.signature, list(config.tiers))

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
        stored = set(range(present.hits))
        out: list[bool] = []
        for i, key in enumerate(ckeys):
            if i in stored:
                out.append(True)
                continue
            c = chunkmod.new_chunk(engine.pool, key, engine.geometry, self.page_size)
            try:
                engine.device.gather(self.kv, self._page_slots(host_indices, i), c.kv())
                engine.device.synchronize()
                sealed = chunkmod.seal(c, engine.config.codec, engine.pool)
            except Exception:  # noqa: BLE001 - a failed store is a future miss, never a crash
                logger.exception("lmcache-core: storing page %s failed", keys[i])
                c.release()
                out.append(False)
                continue
            try:
                engine.tiers.put(key, sealed)
            finally:
                sealed.release()
            out.append(True)
        self.stats["set_pages"] += sum(out)
        return out

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Fetch pages (verified) and scatter each into its host-pool slots; False for a miss,
        a corrupt page or a page of another layout (SGLang then stops its prefetch there)."""
        engine = self._engine()
        assert self.kv is not None
        ckeys = self._keys(keys)
        fetched = engine.tiers.get_many(ckeys)
        out: list[bool] = []
        for i, got in enumerate(fetched):
            if got is None:
                out.append(False)
                continue
            c, _tier = got
            try:
                if c.header.geometry != engine.geometry or c.num_tokens != self.page_size:
                    logger.warning("lmcache-core: page %s holds %d tokens of %s, expected %d of %s",
                                   keys[i], c.num_tokens, c.header.geometry.signature, self.page_size,
                                   engine.geometry.signature)
                    out.append(False)
                    continue
                engine.device.scatter(self.kv, self._page_slots(host_indices, i), c.kv())
                out.append(True)
            except Exception:  # noqa: BLE001
                logger.exception("lmcache-core: loading page %s failed", keys[i])
                out.append(False)
            finally:
                c.release()
        engine.device.synchronize()
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
