"""CacheEngine: lookup, store and retrieve chunks of KV, whole or layer by layer.

One engine serves one chunk geometry (a model's layers, heads, dim, dtype) in
one namespace. Integrations (vLLM, SGLang, transformers, the daemon) call it
with token ids, the engine's KV cache bound as :class:`PagedKV`, and the
request's block table (or slot mapping).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from . import chunk as chunkmod
from .chunk import ChunkBuffer
from .config import Config
from .device import CodedPart, Device, Event
from .errors import ConfigError, LayoutError
from .keys import ChunkKey, KeyExtras, Namespace, chunk_keys, sglang_chunk_keys
from .layout import ChunkGeometry, PagedKV, slot_mapping
from .memory import BufferPool, round_up
from .metrics import Metrics, serve
from .plugins import PluginManager, build_stores, get_plugin_manager, resolve_device
from .storage import StoreContext
from .tiers import Presence, TierStack

if TYPE_CHECKING:
    import torch

    from .daemon.client import DaemonTiers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LookupResult:
    """How many leading tokens are cached, and which tier holds each hit chunk."""

    hit_tokens: int
    keys: tuple[ChunkKey, ...]  # the hit chunks' keys
    tiers: tuple[str, ...]  # the tier of each hit chunk
    pinned: bool = False

    @property
    def by_tier(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, tier in zip(self.keys, self.tiers):
            out[tier] = out.get(tier, 0) + key.num_tokens
        return out


@dataclass
class RetrieveResult:
    hit_tokens: int
    by_tier: dict[str, int] = field(default_factory=dict)


_OPEN_ENGINES: "weakref.WeakSet[CacheEngine]" = weakref.WeakSet()
SLAB_MIN, SLAB_MAX = 64 << 20, 1 << 30  # pinned slabs the pool carves chunk buffers from (memory.BufferPool)
AT_EXIT_FLUSH_S = 30.0  # all engines together


def slab_size(chunk_buffer: int) -> int:
    """The pinned slab for chunk buffers of ``chunk_buffer`` bytes: the smallest power of two that
    holds at least three of them, within [SLAB_MIN, SLAB_MAX]; 0 where a buffer is too large to
    carve (each is then allocated alone). A 32 MiB chunk and its header: 128 MiB holding three,
    a quarter of it unused, where alone each pinned 64 MiB. Not larger: the reserve's thread pins
    a slab at a time, and a step that arrives meanwhile waits for the driver's lock it holds
    (chunk buffers alone pinned at about 1 GB/s of buffer, twice that in pinned bytes: a 128 MiB
    slab takes about 64 ms)."""
    slab = max(SLAB_MIN, 1 << (3 * chunk_buffer - 1).bit_length())
    return slab if slab <= SLAB_MAX else 0


def _flush_at_exit() -> None:
    """``store()`` is asynchronous: a process that ends without ``close()`` still writes what
    it queued, within a bounded time, and says so when it cannot."""
    deadline = time.monotonic() + AT_EXIT_FLUSH_S
    for engine in list(_OPEN_ENGINES):
        if engine._closed:
            continue
        left = max(0.0, deadline - time.monotonic())
        try:
            if not engine.flush(left):
                logger.warning("lmcache-core: exiting with stores still queued after %.0f s; they are lost",
                               AT_EXIT_FLUSH_S)
        except Exception:  # noqa: BLE001 - never fail interpreter shutdown
            logger.exception("lmcache-core: flushing stores at exit failed")


# Before the thread pools shut down (concurrent.futures joins its workers in the same hook list,
# which runs newest first); plain atexit would run after they stopped taking work.
try:
    threading._register_atexit(_flush_at_exit)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):
    atexit.register(_flush_at_exit)


class CacheEngine:
    """The cache for one model's KV geometry. Thread-safe; close() when done (queued stores are
    also flushed at interpreter exit, for at most ``AT_EXIT_FLUSH_S``)."""

    def __init__(
        self,
        geometry: ChunkGeometry,
        config: Config | None = None,
        *,
        model: str | None = None,
        device: Device | str | None = None,
        plugins: PluginManager | None = None,
        metrics: Metrics | None = None,
        shard: str = "",
        device_index: int = 0,
        block_size: int | None = None,
    ) -> None:
        self.config = config or Config.load()
        if block_size is not None:  # the engine's KV block size, when known up front: fail at start
            self.config.check_block_size(block_size)
        logging.getLogger("lmcache_core").setLevel(self.config.log_level)
        self.geometry = geometry
        self.plugins = plugins or get_plugin_manager()
        if isinstance(device, Device):
            self.device = device
        else:
            self.device = resolve_device(device or self.config.device, self.plugins, device_index)
        self.metrics = metrics or Metrics()
        self.metrics_port = 0
        if self.config.metrics_port:
            self.serve_metrics(self.config.metrics_port)
        tenant = self.config.tenant
        self.daemon: "DaemonTiers | None" = None
        if self.config.daemon:  # the daemon owns the tiers; chunk buffers are slots of its arena
            from .daemon.client import DaemonTiers, check_tenant

            self.daemon = DaemonTiers(self.config, self.metrics, self.device,
                                      namespaces=lambda: (self.namespace, *self.peer_namespaces),
                                      geometry=geometry)
            tenant = check_tenant(self.config, self.daemon.connect())
            self.daemon.expected_tenant = tenant
            self.pool: BufferPool = self.daemon.pool
        else:
            # Pinned allocation is ~1 GB/s: on devices with pinned buffers keep a reserve of whole
            # chunks allocated ahead, off the engine's step (the memory tier keeps what it caches),
            # carved from power-of-two slabs (torch's pinned allocator rounds each allocation up).
            pinned = self.device.capabilities.pinned_memory
            whole_chunk = round_up(chunkmod.HEADER_SIZE + geometry.nbytes(self.config.chunk_size))
            self.pool = BufferPool(self.device.alloc_host, self.config.host_pool_size,
                                   reserve_bytes=self.config.host_pool_reserve if pinned else 0,
                                   slab_bytes=slab_size(whole_chunk) if pinned else 0)
        chunkmod.bind_integrity_key(self.pool, self.config.integrity_secret())  # this engine's own key
        #: kv_codec: the device's copies code the KV (fp8: half the bytes); chunk buffers, every
        #: tier and the key namespace hold that form, and reads hand it to the device still coded
        self.kv_codec = self.config.kv_codec
        self.kv_wire = "none"
        if self.kv_codec != "none":
            self.kv_wire = self._device_codec(geometry)
            if self.daemon is not None:
                self.daemon.keep_coded(self.kv_wire)
            else:
                chunkmod.keep_coded(self.pool, self.kv_wire)
        # Namespace refuses an empty model: two models must never share chunks by default.
        self.namespace = Namespace(model or self.config.model, geometry.signature, tenant, self.config.salt, shard,
                                   "" if self.kv_wire == "none" else self.kv_wire)
        #: Namespaces a lookup must also find every chunk in (the other TP ranks / PP stages,
        #: set by a scheduler that plans loads for all of them).
        self.peer_namespaces: tuple[Namespace, ...] = ()
        #: Chunks another process holds in its memory tier and will load from there (vLLM's
        #: worker, seen by the scheduler through the connector's worker metadata): a lookup
        #: counts a leading run of them as hits of tier ``hint_tier``.
        self.presence_hint: Callable[[Sequence[ChunkKey]], list[bool]] | None = None
        self.hint_tier = "memory"
        # Host bytes of chunks in flight (gathered, not yet handed to the tiers; fetched for a
        # load, not yet scattered): bounded so a slow tier or a burst never grows memory.
        self.max_inflight_bytes = self.config.max_inflight_bytes
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self.dropped_stores = 0
        self.short_loads = 0
        from .policy import make_policy

        #: load_policy: how much of a hit to load (``adaptive``: only what loads faster than it computes)
        self.policy = make_policy(self.config)
        self.tiers: "TierStack | DaemonTiers"
        if self.daemon is not None:
            self.tiers = self.daemon
        else:
            ctx = StoreContext(self.pool, self.config.to_dict(),
                               on_evict=lambda tier, n: self.metrics.evictions.labels(tier).inc(n),
                               on_write=lambda tier, n: self.metrics.bytes.labels(tier, "write").inc(n),
                               on_skip=lambda tier, n: self.metrics.skipped_writes.labels(tier).inc(n),
                               geometry=geometry)
            self.tiers = TierStack(
                build_stores(self.config.tiers, self.plugins, ctx), self.metrics,
                queue_size=self.config.store_queue_size, writer_threads=self.config.writer_threads,
                reader_threads=self.config.reader_threads, promote=self.config.promote,
            )
        self.policy.fast_tiers = frozenset(t.name for t in self.tiers.tiers if t.fast)  # in-process: a memcpy
        self._sealer = ThreadPoolExecutor(1, thread_name_prefix="lmcache-seal")
        self._sealing = 0
        self._sealing_cv = threading.Condition()
        self._closed = False
        _OPEN_ENGINES.add(self)

    def _device_codec(self, geometry: ChunkGeometry) -> str:
        from . import codecs

        chain = codecs.resolve(self.kv_codec)
        assert chain is not None
        if geometry.dtype not in chain.codecs[0].dtypes:
            raise ConfigError(f"kv_codec {self.kv_codec} codes {', '.join(chain.codecs[0].dtypes)} KV; this "
                              f"model's KV cache is {geometry.dtype}: unset kv_codec")
        return chain.wire_id

    def serve_metrics(self, port: int) -> None:
        """Serve this engine's Prometheus metrics on ``port`` (once)."""
        if not self.metrics_port:
            serve(self.metrics, port)
            self.metrics_port = port

    # -- keys and lookup ----------------------------------------------------------------
    def keys(self, tokens: Sequence[int] | Any, extras: KeyExtras | None = None, *,
             namespace: Namespace | None = None) -> list[ChunkKey]:
        """Chunk keys of ``tokens`` with the request's ``extras`` (adapter, cache salt,
        multimodal items, prompt embeddings) in this engine's namespace (or ``namespace``)."""
        ns = namespace or self.namespace
        if self.config.key_scheme == "sglang":  # SGLang's page hashes; chunk_size = SGLang page size
            if extras and (extras.adapter or extras.mm or extras.embeds):
                raise ValueError("key_scheme sglang keys tokens, extra_key and cache_salt only; this "
                                 "request has an adapter, multimodal inputs or prompt embeddings")
            return sglang_chunk_keys(tokens, ns, self.config.chunk_size,
                                     extra_key=(extras.extra_key or None) if extras else None,
                                     cache_salt=(extras.cache_salt or None) if extras else None)
        return chunk_keys(tokens, ns, self.config.chunk_size, save_partial=self.config.save_partial,
                          algorithm=self.config.hash_algorithm, extras=extras)

    def lookup(self, tokens: Sequence[int] | Any, *, pin: bool = False,
               extras: KeyExtras | None = None) -> LookupResult:
        """Longest cached prefix of ``tokens`` (whole chunks). ``pin`` protects the hit chunks
        from eviction until :meth:`release` (or a retrieve given this result) ends. With
        ``peer_namespaces`` set, a chunk counts only when every shard holds it."""
        keys = self.keys(tokens, extras)
        self.policy.begin(len(tokens))
        presence = self._presence(keys)
        hits = presence.hits
        for ns in self.peer_namespaces:
            if not hits:
                break
            hits = min(hits, self._presence(self.keys(tokens, extras, namespace=ns)[:hits]).hits)
        presence = Presence(hits, presence.tiers[:hits])
        hit_keys = tuple(keys[:hits])
        if pin and hit_keys:
            self.tiers.pin(hit_keys)
        result = LookupResult(sum(k.num_tokens for k in hit_keys), hit_keys, presence.tiers, pin and bool(hit_keys))
        self.metrics.lookups.inc()
        self.metrics.lookup_tokens.inc(len(keys) and sum(k.num_tokens for k in keys))
        return result

    def _presence(self, keys: Sequence[ChunkKey]) -> Presence:
        """Longest present prefix: first the chunks the hint says another process holds in
        memory, then the tiers for the rest."""
        hinted = 0
        if self.presence_hint is not None and keys:
            for ok in self.presence_hint(keys):
                if not ok:
                    break
                hinted += 1
        if not hinted:
            return self.tiers.lookup(keys)
        rest = self.tiers.lookup(keys[hinted:]) if hinted < len(keys) else Presence(0, ())
        return Presence(hinted + rest.hits, (self.hint_tier,) * hinted + rest.tiers)

    def release(self, lookup: LookupResult) -> None:
        if lookup.pinned:
            self.tiers.unpin(lookup.keys)

    # -- in-flight host bytes -----------------------------------------------------------
    def _reserve(self, nbytes: int) -> bool:
        with self._inflight_lock:
            if self._inflight + nbytes > self.max_inflight_bytes and nbytes:
                return False
            self._inflight += nbytes
            return True

    def _unreserve(self, nbytes: int) -> None:
        with self._inflight_lock:
            self._inflight -= nbytes
            assert self._inflight >= 0, "in-flight byte count went negative"

    def inflight_bytes(self) -> int:
        """Host bytes of chunks being stored or loaded right now (tests assert it returns to 0)."""
        with self._inflight_lock:
            return self._inflight

    def _chunk_bytes(self, num_tokens: int) -> int:
        """Bytes of a chunk's payload as buffers and tiers hold it (coded with ``kv_codec``)."""
        return chunkmod.coded_len(self.geometry, num_tokens, self.kv_wire)

    # -- device copies ------------------------------------------------------------------------
    def _gather(self, kv: PagedKV, batch: list[Any], layers: tuple[int, ...] | None) -> None:
        """Copy a batch of :meth:`_copy_batch` parts out of ``kv`` (coded with ``kv_codec``)."""
        if self.kv_wire == "none":
            self.device.gather_many(kv, batch, layers=layers)
        else:
            self.device.gather_coded(kv, batch, self.kv_codec, layers=layers)

    def _scatter(self, kv: PagedKV, batch: list[Any], layers: tuple[int, ...] | None) -> None:
        if self.kv_wire == "none":
            self.device.scatter_many(kv, batch, layers=layers)
        else:
            self.device.scatter_coded(kv, batch, self.kv_codec, layers=layers)

    def _copy_batch(self, parts: Sequence[tuple[ChunkBuffer, "torch.Tensor", int, int]]) -> list[Any]:
        """What the device copies for ``(chunk, slots, first, end)`` parts: the tokens
        ``first..end`` of each chunk's plain KV, or of its coded image."""
        if self.kv_wire == "none":
            return [(slots, c.kv(first, end)) for c, slots, first, end in parts]
        return [CodedPart(slots, c.coded(), c.num_tokens, first) for c, slots, first, end in parts]

    # -- slots ----------------------------------------------------------------------------
    @classmethod
    def _slot_ranges(cls, kv: PagedKV, block_ids: "torch.Tensor | Sequence[int] | None",
                     slots: "torch.Tensor | None", bounds: Sequence[tuple[int, int]]) -> list["torch.Tensor"]:
        """The slots of each ``(start, end)`` token range of one request: the block table is
        converted and checked once and the slots of the whole span computed in one vectorised
        step, then sliced per range (per range, a block table given as a list cost a conversion
        and a scan of every id: O(chunks x blocks), 30-120 ms of host at 32K tokens)."""
        if not bounds:
            return []
        lo, hi = min(a for a, _ in bounds), max(b for _, b in bounds)
        whole = cls._slots(kv, block_ids, slots, lo, hi)
        sizes = [b - a for a, b in bounds]
        if sum(sizes) == hi - lo and all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:])):
            return list(whole.split(sizes))  # ranges that tile the span: one C call for all views
        return [whole[a - lo:b - lo] for a, b in bounds]

    @staticmethod
    def _slots(kv: PagedKV, block_ids: "torch.Tensor | Sequence[int] | None",
               slots: "torch.Tensor | None", start: int, end: int) -> "torch.Tensor":
        """The slots of tokens ``start..end``: the engine's own int64 tensor, made outside inference
        mode. The transfer layer caches its per-batch tables by a slot tensor's identity and version
        counter, which inference tensors (vLLM runs its forward under ``torch.inference_mode``) do
        not keep; and a caller reusing its slot buffer in place cannot change a task's slots."""
        import torch

        with torch.inference_mode(False):
            return CacheEngine._own_slots(kv, block_ids, slots, start, end)

    @staticmethod
    def _own_slots(kv: PagedKV, block_ids: "torch.Tensor | Sequence[int] | None",
                   slots: "torch.Tensor | None", start: int, end: int) -> "torch.Tensor":
        import torch

        if slots is not None:
            if slots.numel() < end:
                raise LayoutError(f"slot mapping has {slots.numel()} entries, tokens up to {end} are needed")
            out = slots[start:end]
            if out.dtype.is_floating_point or out.dtype == torch.bool:
                raise LayoutError(f"slots must be integers, got a {out.dtype} tensor")
            out = out.to(torch.int64, copy=True)
            limit = kv.num_blocks * kv.block_size
            if out.numel() and (int(out.min()) < 0 or int(out.max()) >= limit):
                raise LayoutError(f"a slot is outside the KV cache's {limit} slots")
            return out
        if block_ids is None:
            raise ValueError("pass block_ids (the request's block table) or slots")
        if not isinstance(block_ids, torch.Tensor):
            ids = list(block_ids)
            kinds = set(map(type, ids))  # one pass in C (a generator of isinstance calls was half the slot time)
            if kinds - {int} and any(issubclass(k, (float, bool)) for k in kinds):
                raise LayoutError(f"block ids must be integers, got {ids[:8]}")
            block_ids = torch.as_tensor(ids, dtype=torch.int64)
        return slot_mapping(block_ids, kv.block_size, start, end, num_blocks=kv.num_blocks)

    def _check_kv(self, kv: PagedKV) -> None:
        if kv.geometry != self.geometry:
            raise LayoutError(
                f"KV cache layout {kv.geometry.signature} does not match this engine's {self.geometry.signature}"
            )
        if self.device.capabilities.accelerator and kv.kind != "hf":
            want = self.device.torch_device
            got = kv.device
            if got.type == want.type and (got.index or 0) != (want.index or 0):
                raise LayoutError(
                    f"the KV cache lives on {got} but this engine's device is {want}; create the engine "
                    f"with device_index={got.index} (each worker uses its own local device)"
                )
        if kv.kind != "hf":
            self.config.check_block_size(kv.block_size)

    # -- store ------------------------------------------------------------------------------
    def store(self, tokens: Sequence[int] | Any, kv: PagedKV, block_ids: Any = None, *,
              slots: "torch.Tensor | None" = None, wait: bool = False, extras: KeyExtras | None = None) -> int:
        """Gather the chunks of ``tokens`` not cached yet and write them to every tier.

        Returns once the KV is copied out of ``kv`` (the engine may reuse its blocks);
        checksumming and writing continue in the background unless ``wait``.
        Returns the number of tokens queued for storing.
        """
        task = self.start_store(tokens, kv, block_ids, slots=slots, extras=extras)
        try:
            task.save_all()
        except BaseException:
            task.abort()
            raise
        return task.finish(wait=wait)

    def start_store(self, tokens: Sequence[int] | Any, kv: PagedKV, block_ids: Any = None, *,
                    slots: "torch.Tensor | None" = None, extras: KeyExtras | None = None,
                    skip_tokens: int = 0) -> "LayerwiseStore":
        """Layer-by-layer store: call ``save_layer(i)`` as each layer's KV is final, then ``finish()``.
        Chunks that end at or before ``skip_tokens`` are not gathered (stored earlier).

        Past ``max_inflight_bytes`` of chunks in flight the store is dropped (counted in
        ``dropped_stores`` and the ``lmcache_dropped_stores{tier="inflight"}`` metric): a
        future miss, never a wait or unbounded memory."""
        self._check_kv(kv)
        self.policy.end_prefill(len(tokens))
        keys = self.keys(tokens, extras)
        # Only the in-process tier is asked (no I/O on the engine's step): a chunk it lacks is
        # gathered and written through again; slower tiers skip or overwrite what they hold.
        skip, pos = 0, 0
        while skip < len(keys) and pos + keys[skip].num_tokens <= skip_tokens:
            pos += keys[skip].num_tokens
            skip += 1
        present = skip + self.tiers.lookup(keys[skip:], fast_only=True).hits
        todo: list[tuple[ChunkBuffer, "torch.Tensor"]] = []
        pos += sum(k.num_tokens for k in keys[skip:present])
        # Validate every slot range before taking memory: a bad block table stores nothing.
        bounds = []
        for key in keys[present:]:
            bounds.append((pos, pos + key.num_tokens))
            pos += key.num_tokens
        ranges = list(zip(keys[present:], self._slot_ranges(kv, block_ids, slots, bounds)))
        nbytes = sum(self._chunk_bytes(k.num_tokens) for k, _ in ranges)
        if not self._reserve(nbytes):
            self.dropped_stores += 1
            self.metrics.dropped.labels("inflight").inc()
            logger.info("store of %d chunks dropped: %d bytes in flight, max_inflight_bytes is %d",
                        len(ranges), self.inflight_bytes(), self.max_inflight_bytes)
            return LayerwiseStore(self, kv, [])
        try:
            self.pool.prepare([chunkmod.HEADER_SIZE + self._chunk_bytes(k.num_tokens) for k, _ in ranges])
            for key, slot in ranges:
                todo.append((chunkmod.new_chunk(self.pool, key, self.geometry, key.num_tokens, self.kv_wire), slot))
        except BaseException as exc:
            for c, _ in todo:
                c.release()
            self.pool.unprepare()
            self._unreserve(nbytes)
            if not isinstance(exc, MemoryError):
                raise
            # no host memory (or no daemon arena slot): a dropped store, a future miss
            self.dropped_stores += 1
            self.metrics.dropped.labels("memory").inc()
            logger.info("store of %d chunks dropped: %s", len(ranges), exc)
            return LayerwiseStore(self, kv, [])
        return LayerwiseStore(self, kv, todo, nbytes)

    def _seal_and_put(self, chunks: list[ChunkBuffer], nbytes: int = 0) -> None:
        done = 0
        sealed: list[ChunkBuffer] = []
        try:
            for c in chunks:
                done += 1
                try:
                    sealed.append(chunkmod.seal(c, self.config.codec, self.pool))
                except Exception:  # noqa: BLE001
                    logger.exception("sealing chunk %s failed; not storing it", c.key)
                    c.release()
            try:  # one call for the request: one commit round trip to a daemon
                self.tiers.put_many([(s.key, s) for s in sealed])
            except Exception:  # noqa: BLE001 - a failed put is a future miss
                logger.exception("storing %d chunks failed; not storing them", len(sealed))
        except BaseException:
            for c in chunks[done:]:  # interpreter shutdown or worse: give the rest back
                c.release()
            raise
        finally:
            for s in sealed:
                s.release()
            self._unreserve(nbytes)
            with self._sealing_cv:
                self._sealing -= 1
                self._sealing_cv.notify_all()

    # -- retrieve ---------------------------------------------------------------------------
    def retrieve(self, tokens: Sequence[int] | Any, kv: PagedKV, block_ids: Any = None, *,
                 slots: "torch.Tensor | None" = None, max_tokens: int | None = None,
                 lookup: LookupResult | None = None, extras: KeyExtras | None = None,
                 skip_tokens: int = 0) -> RetrieveResult:
        """Load the cached prefix of ``tokens`` into ``kv``; returns how many tokens were loaded.

        ``max_tokens`` caps the load (an engine must compute at least one token
        itself). A chunk that fails to load ends the prefix there; nothing
        after it is used.
        """
        task = self.start_retrieve(tokens, kv, block_ids, slots=slots, max_tokens=max_tokens, lookup=lookup,
                                   layerwise=False, extras=extras, skip_tokens=skip_tokens)
        task.finish()
        return RetrieveResult(task.hit_tokens, task.by_tier)

    def start_retrieve(self, tokens: Sequence[int] | Any, kv: PagedKV, block_ids: Any = None, *,
                       slots: "torch.Tensor | None" = None, max_tokens: int | None = None,
                       lookup: LookupResult | None = None, layerwise: bool = True,
                       lookahead: int | None = None, extras: KeyExtras | None = None,
                       skip_tokens: int = 0) -> "LayerwiseRetrieve":
        """Fetch the hit chunks to host memory, then load into ``kv`` layer by layer.

        Iterate the result (or call ``wait_layer(i)``) to get each layer as it lands.
        ``layerwise=False`` loads every layer in one batched call instead (no per-layer
        events), for callers that wait for the whole cache anyway. ``lookahead``: how many
        layers a device with async copies keeps queued ahead of the one waited for
        (default ``LayerwiseRetrieve.LOOKAHEAD``; the layer count queues everything at once).
        ``skip_tokens``: the engine already holds the first tokens (its own prefix cache); chunks
        below it are neither fetched nor written, a chunk across it is written from there on.
        ``hit_tokens`` of the result counts from 0 (it covers the skipped tokens too).

        Errors (a bad block table, a tier fault) release every pin and buffer taken so far.
        Past ``max_inflight_bytes`` the load is cut short (the engine recomputes the rest).
        """
        self._check_kv(kv)
        owned_lookup = lookup is None
        if lookup is None:
            lookup = self.lookup(tokens, pin=True, extras=extras)
        parts: list[tuple[ChunkBuffer, "torch.Tensor", int, int]] = []
        reserved = 0
        try:
            keys = list(lookup.keys)
            cap = lookup.hit_tokens if max_tokens is None else min(max_tokens, lookup.hit_tokens)
            if not owned_lookup:  # a caller with its own lookup computes what is not loaded (CachedModel);
                # vLLM's worker passes none: its scheduler already counted the hit as loaded
                cap = self.policy.plan(lookup, cap, skip_tokens, self._chunk_bytes)
            first, start = 0, 0  # first chunk to fetch, its first token
            while first < len(keys) and start + keys[first].num_tokens <= skip_tokens:
                start += keys[first].num_tokens
                first += 1
            last, covered = first, start
            while last < len(keys) and covered < cap:
                covered += keys[last].num_tokens
                last += 1
            want = sum(self._chunk_bytes(k.num_tokens) for k in keys[first:last])
            while last > first and not self._reserve(want):  # bound memory: load a shorter prefix
                last -= 1
                want -= self._chunk_bytes(keys[last].num_tokens)
                self.short_loads += 1
            reserved = want
            t_fetch = time.perf_counter()
            fetched = self.tiers.get_many(keys[first:last])
            t_fetch = time.perf_counter() - t_fetch
            by_tier: dict[str, int] = {}
            pos = start
            ok = True
            for key, got in zip(keys[first:last], fetched):
                if got is None or not ok:
                    ok = False
                    if got is not None:
                        got[0].release()
                    continue
                c, tier = got
                if c.header.codec != self.kv_wire:  # a plain chunk under kv_codec's namespace, or the reverse
                    logger.warning("chunk %s is coded %s, this engine reads %s; treating as a miss", key,
                                   c.header.codec, self.kv_wire)
                    c.release()
                    ok = False
                    continue
                if c.num_tokens != key.num_tokens or c.header.geometry != self.geometry:
                    logger.warning("chunk %s has %d tokens of %s, expected %d of %s; treating as a miss",
                                   key, c.num_tokens, c.header.geometry.signature, key.num_tokens,
                                   self.geometry.signature)
                    c.release()
                    ok = False
                    continue
                n = min(c.num_tokens, cap - pos)
                off = max(0, min(skip_tokens, pos + n) - pos)  # tokens of this chunk the engine has
                parts.append((c, None, off, n))  # type: ignore[arg-type]
                by_tier[tier] = by_tier.get(tier, 0) + n - off
                pos += n
            self.policy.observe_fetch([(g[1], self._chunk_bytes(k.num_tokens))
                                       for k, g in zip(keys[first:last], fetched) if g is not None],
                                      t_fetch, len(tokens), pos)
            # Slots after the fetch: a bad block table raises here and the finally releases all.
            bounds = []
            p = start
            for _, _, off, n in parts:
                bounds.append((p + off, p + n))
                p += n
            parts = [(c, sl, off, n) for (c, _, off, n), sl in zip(parts, self._slot_ranges(kv, block_ids, slots,
                                                                                          bounds))]
        except BaseException:
            for c, _, _, _ in parts:
                c.release()
            self._unreserve(reserved)
            raise
        finally:
            if owned_lookup:
                self.release(lookup)
        for tier, n in by_tier.items():
            self.metrics.hit_tokens.labels(tier).inc(n)
        hit = pos if parts else min(skip_tokens, pos)
        return LayerwiseRetrieve(self, kv, parts, hit, by_tier, layerwise=layerwise, lookahead=lookahead,
                                 reserved=reserved)

    # -- lifecycle -----------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every store started so far is in every tier."""
        with self._sealing_cv:
            if not self._sealing_cv.wait_for(lambda: self._sealing == 0, timeout):
                return False
        return self.tiers.flush(timeout)

    def clear(self) -> None:
        for tier in self.tiers.tiers:
            try:
                try:
                    tier.store.clear(namespace=self.namespace.id)
                except TypeError:  # a plugin with the older clear() signature
                    tier.store.clear()
            except NotImplementedError:
                logger.info("tier %s cannot be cleared", tier.name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush(timeout=60)
        self._sealer.shutdown(wait=True)
        self.tiers.close()
        self.pool.close()

    def __enter__(self) -> "CacheEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LayerwiseStore:
    """A store in progress: gather layer by layer, then seal and write in the background."""

    def __init__(self, engine: CacheEngine, kv: PagedKV, todo: list[tuple[ChunkBuffer, "torch.Tensor"]],
                 reserved: int = 0) -> None:
        self.engine = engine
        self.kv = kv
        self.todo = todo
        self.reserved = reserved
        self.stream = engine.device.new_stream() if todo else None
        self.saved: list[bool] = [False] * engine.geometry.num_layers
        self._batch: list[Any] | None = None
        self._done = False
        self._copying = bool(todo)  # the pool's refiller waits while our copies run
        if self._copying:
            engine.pool.transfer_begun()

    def _copies_done(self) -> None:
        if self._copying:
            self._copying = False
            self.engine.pool.transfer_done()

    def __del__(self) -> None:  # a store dropped without finish or abort must not hold the refiller
        try:
            self._copies_done()
        except Exception:  # noqa: BLE001
            pass

    def _gather(self, layers: tuple[int, ...] | None) -> None:
        """Gather on the transfer stream, after the work queued so far on the caller's (compute)
        stream: the layer's KV is written there, maybe still running when this is called."""
        dev = self.engine.device
        written = dev.record_event()  # on the current (compute) stream
        with dev.use_stream(self.stream):
            written.wait_on_compute()  # inside use_stream: the transfer stream waits
            if self._batch is None:  # built once: the transfer keys its per-batch tables on these views
                self._batch = self.engine._copy_batch([(c, slots, 0, c.num_tokens) for c, slots in self.todo])
            self.engine._gather(self.kv, self._batch, layers)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c, _ in self.todo)

    def save_layer(self, layer: int) -> None:
        """Copy layer ``layer`` of every pending chunk out of the engine's cache (async on devices
        with streams; the engine must not overwrite those blocks before ``finish``)."""
        if self.saved[layer] or not self.todo:
            self.saved[layer] = True
            return
        self._gather((layer,))
        self.saved[layer] = True

    def save_all(self) -> None:
        """Copy every layer of every pending chunk in one batched call."""
        if self.todo and not all(self.saved):
            self._gather(None)
        self.saved = [True] * len(self.saved)

    def finish(self, wait: bool = False) -> int:
        """Wait for the copies, then seal and write. Returns the tokens stored."""
        if self._done:
            return 0
        self._done = True
        if not self.todo:
            return 0
        chunks = [c for c, _ in self.todo]
        eng = self.engine
        try:
            if not all(self.saved):
                missing = [i for i, s in enumerate(self.saved) if not s]
                raise RuntimeError(f"store finished before layers {missing} were saved; nothing was stored")
            self.engine.device.record_event(self.stream).synchronize()
            self._copies_done()
            with eng._sealing_cv:
                eng._sealing += 1
        except BaseException:
            self._copies_done()
            for c in chunks:
                c.release()
            eng._unreserve(self.reserved)
            raise
        try:
            future = eng._sealer.submit(eng._seal_and_put, chunks, self.reserved)
        except BaseException:  # the engine is closing: nothing is stored
            for c in chunks:
                c.release()
            eng._unreserve(self.reserved)
            with eng._sealing_cv:
                eng._sealing -= 1
                eng._sealing_cv.notify_all()
            raise
        if wait:
            future.result()
            eng.tiers.flush()
        return self.num_tokens

    def abort(self) -> None:
        """Give up: release the chunk buffers (after any queued copy into them is done)."""
        if not self._done:
            self._done = True
            if self.todo:
                try:
                    self.engine.device.record_event(self.stream).synchronize()
                except Exception:  # noqa: BLE001 - a device fault; the buffers go back anyway
                    logger.exception("waiting for an aborted store's copies failed")
                self._copies_done()
                for c, _ in self.todo:
                    c.release()
                self.engine._unreserve(self.reserved)


class LayerwiseRetrieve:
    """A load in progress. Layers land in order; ``wait_layer(i)`` returns once layer ``i`` is in
    the engine's cache. Devices with async copies keep ``LOOKAHEAD`` layers queued ahead on a
    transfer stream (one batched call and one event per layer), so the first layer's compute
    can start at once and later copies overlap it; synchronous devices copy each layer when it
    is first waited for.

    The start queues only layer 0 and each ``wait_layer`` then queues at most ``RAMP`` more
    until the window is full: the device sits idle while the start runs on the host (on an H100
    host a later layer's queueing costs a few hundred microseconds, layer 0's about 1.5 ms as it
    builds a new batch's tables: docs/benchmarks.md, run O), whereas a layer queued inside a
    wait costs host time while layer 0's copy is already running. A caller passing ``lookahead``
    of the layer count or more gets everything queued by the start."""

    LOOKAHEAD = 4
    RAMP = 2

    def __init__(self, engine: CacheEngine, kv: PagedKV,
                 parts: list[tuple[ChunkBuffer, "torch.Tensor", int, int]], hit_tokens: int,
                 by_tier: dict[str, int], *, layerwise: bool = True, lookahead: int | None = None,
                 reserved: int = 0) -> None:
        self.engine = engine
        self.kv = kv
        self.parts = [p for p in parts if p[3] > p[2]]  # (chunk, slots, first, end) with tokens to write
        for c, _, first, end in parts:
            if end <= first:
                c.release()
        self.hit_tokens = hit_tokens
        self.by_tier = by_tier
        self.reserved = reserved
        self.num_layers = engine.geometry.num_layers
        self.events: list[Event | None] = [None] * self.num_layers
        self.order: list[int] = []  # layers in the order they completed (pipelining contract)
        self._queued = 0  # layers 0.._queued-1 have their copies queued (in order, never twice)
        self._released = False
        self._batch = engine._copy_batch(self.parts)  # built once
        if self.parts:  # the pool's refiller waits while our copies run (until _release)
            engine.pool.transfer_begun()
        dev = engine.device
        self.stream = dev.new_stream() if self.parts else None
        self._async = dev.capabilities.async_copy
        self.lookahead = max(1, self.LOOKAHEAD if lookahead is None else lookahead)
        # The blocks we write may still be read by work queued on the compute stream (a freed
        # request's last step): transfers start after it.
        self._after = dev.record_event() if self.parts else None
        try:
            if self.parts and not layerwise:
                with dev.use_stream(self.stream):
                    self._after.wait_on_compute()  # type: ignore[union-attr]
                    engine._scatter(kv, self._batch, None)
                    done = dev.record_event(self.stream)
                self.events = [done] * self.num_layers
                self._queued = self.num_layers
            elif self.parts and self._async:
                self._queue_through(self.num_layers - 1 if self.lookahead >= self.num_layers else 0)
        except BaseException:
            self._release()
            raise

    def _load(self, layer: int) -> None:
        dev = self.engine.device
        with dev.use_stream(self.stream):
            if self._after is not None:
                self._after.wait_on_compute()
                self._after = None
            self.engine._scatter(self.kv, self._batch, (layer,))
            self.events[layer] = dev.record_event(self.stream)

    def _queue_through(self, last: int) -> None:
        for layer in range(self._queued, min(last, self.num_layers - 1) + 1):
            self._load(layer)
            self._queued = layer + 1

    def wait_layer(self, layer: int) -> None:
        if not self.parts:
            return
        if self._async:  # the window, filled at most RAMP layers per wait (but always through `layer`)
            self._queue_through(max(layer, min(layer + self.lookahead, self._queued - 1 + self.RAMP)))
        else:
            self._queue_through(layer)
        ev = self.events[layer]
        assert ev is not None
        ev.wait_on_compute()
        if layer not in self.order:
            self.order.append(layer)

    def __iter__(self) -> Iterator[int]:
        for layer in range(self.num_layers):
            self.wait_layer(layer)
            yield layer

    def finish(self) -> None:
        """Wait for every layer and release the host chunks."""
        try:
            self._queue_through(self.num_layers - 1)
            for ev in self.events:
                if ev is not None:
                    ev.synchronize()
        finally:
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            if self.parts:
                self.engine.pool.transfer_done()
            for c, _, _, _ in self.parts:
                c.release()
            self.engine._unreserve(self.reserved)

    def __del__(self) -> None:  # a forgotten task must not leak pool buffers
        try:
            self._release()
        except Exception:  # noqa: BLE001
            pass
