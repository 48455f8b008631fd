"""KVTransfer: choose and run the path that moves a batch of chunks for one paged cache.

Four paths, chosen per call by :class:`TransferOptions` (``LMCACHE_KV_*`` env):

- ``direct``: one kernel launch reads the paged cache and writes the chunks in
  place, also when they are pinned host buffers (mapped into the device's address
  space, UVA): no staging copy, no DMA queue, one launch per layer group.
- ``staged``: a kernel gathers into a device staging ring, then the copy engines move
  each ring group to the host chunks with one ``cuMemcpyBatchAsync`` on a copy stream
  (the reverse for loads; one torch DMA per chunk where batches are unavailable or
  ``staged_copies="each"``); the kernel of group ``i + 1`` runs while group ``i`` is on
  the bus, and it touches only device memory, so it holds SMs for microseconds. With
  ``ring_copy="dma"`` the copy engines move the ring's half too (device-to-device
  batches, one copy per run of tokens contiguous in the cache), so no byte needs an SM.
- ``dma``: no kernel: the copy engines move every run of tokens that is contiguous in
  its chunk and in the cache (within a block, or across consecutive blocks where the
  layout puts them one after another), one ``cuMemcpyBatchAsync`` per call (:mod:`.dma`), so a
  layer's load takes no SM from the model's kernels; for layouts whose tokens are
  contiguous in a block (vLLM flash, FlashInfer NHD, MLA) and pinned host chunks, else
  the direct kernel, with the reason logged once.
- ``torch``: the reference (indexing ops and per-plane copies); also the fallback
  whenever the kernel cannot run, with the reason logged once.

``auto`` picks by the shape of the call, from :data:`AUTO` and the measurements in
``docs/benchmarks.md`` (``benchmarks/gpu_transfer.py`` records every variant): a call
that moves several layers of each chunk goes ``staged``, one whole-chunk copy each; a
call that moves one layer (the engine's layer-by-layer path) goes ``staged`` on an
accelerator when the layer's bytes reach ``staged_min_layer_bytes`` and the ring copies
can be batched, else (a load whose runs of tokens average ``dma_min_run_bytes``) ``dma``,
else ``direct`` with its kernel capped to ``layer_programs``
(:meth:`KVTransfer._auto_layer_call`). Everything is enqueued on the caller's current stream; work on
copy streams is joined back to it before a call returns, so an event recorded
on the current stream afterwards covers the whole transfer.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from . import dma, reference, triton_copy
from .reference import Batch, layer_list

if TYPE_CHECKING:
    import torch

    from lmcache_core.layout import PagedKV

logger = logging.getLogger(__name__)

MODES = ("auto", "direct", "staged", "dma", "torch")
PRIORITIES = ("normal", "high")
STAGED_COPIES = ("batch", "each")
RING_COPIES = ("kernel", "dma")
# Winners measured on an H100 (docs/benchmarks.md, "GPU transfer (H100)").
AUTO = {"store_layer": "direct", "load_layer": "direct", "store_many": "staged", "load_many": "staged"}


@dataclass(frozen=True)
class TransferOptions:
    """How KV moves between the device and host chunks; see the module docstring."""

    store_mode: str = "auto"
    load_mode: str = "auto"
    # Staging defaults measured on an H100 (docs/benchmarks.md): one 32 MiB chunk per ring
    # slot, four slots, DMAs alternating over two copy streams.
    copy_streams: int = 2  # copy streams the staged path spreads DMAs over
    staging_bytes: int = 32 << 20  # bytes per staging ring slot (grown to fit one chunk)
    staging_slots: int = 4  # ring depth: the kernel fills slot i+1 while slot i is copied
    # A per-layer call runs beside the model's kernels: its kernel is held to this many programs
    # (each loops over its share of the tiles), 0 for one program per tile. With 16 on a
    # high-priority stream an H200 hid 97-98% of a 4K-32K layer-by-layer load behind per-layer
    # matmuls; uncapped, the kernel's programs (waiting on PCIe reads) took the SMs and hid 8-10%
    # (docs/benchmarks.md, "Layer-wise load under compute").
    layer_programs: int = 16
    # Priority of the transfer streams the device hands out: "high" lets a layer's copy kernel
    # start ahead of compute kernels queued before it, "normal" queues it behind them.
    stream_priority: str = "high"
    # An auto per-layer load whose runs of tokens (contiguous in chunk and cache) average at
    # least this many bytes goes to the copy engines (mode "dma"); 0 never. 256 KiB lies between
    # the measured points (32 KiB runs: 22-25 GB/s, 512 KiB: 46-48 GB/s on the H200).
    dma_min_run_bytes: int = 256 << 10
    # How the staged path moves a group of chunks between the ring and host memory: "batch", one
    # copy-engine batch call (cuMemcpyBatchAsync) per group, where the binding loads; "each", one
    # torch copy per chunk, the host thread issuing every DMA (the only way until 2026-12-02).
    staged_copies: str = "batch"
    # An auto per-layer call (load or store) moving at least this many bytes of one layer goes
    # staged where its ring copies can be batched; 0 never (see KVTransfer._auto_layer_call).
    staged_min_layer_bytes: int = 16 << 20
    # How the staged path moves a group between the device ring and the paged cache: "kernel",
    # an uncapped copy kernel (a few microseconds on every SM, but it waits for SMs a large GEMM
    # holds); "dma", one copy-engine batch of device-to-device copies, one per run of tokens
    # contiguous in the cache, so no byte of the transfer needs an SM (where the ring copies
    # are batched and the layout keeps a token's heads together; else the kernel).
    ring_copy: str = "kernel"

    def __post_init__(self) -> None:
        for name in ("store_mode", "load_mode"):
            if getattr(self, name) not in MODES:
                raise ValueError(f"{name} must be one of {', '.join(MODES)}, got {getattr(self, name)!r}")
        if self.copy_streams < 1 or self.staging_slots < 1 or self.staging_bytes < 1:
            raise ValueError("copy_streams, staging_slots and staging_bytes must be positive")
        if self.layer_programs < 0:
            raise ValueError(f"layer_programs must be 0 (one program per tile) or positive, got {self.layer_programs}")
        if self.staged_min_layer_bytes < 0:
            raise ValueError(f"staged_min_layer_bytes must be 0 (never) or positive, got {self.staged_min_layer_bytes}")
        if self.dma_min_run_bytes < 0:
            raise ValueError(f"dma_min_run_bytes must be 0 (never) or positive, got {self.dma_min_run_bytes}")
        if self.staged_copies not in STAGED_COPIES:
            raise ValueError(f"staged_copies must be one of {', '.join(STAGED_COPIES)}, got {self.staged_copies!r}")
        if self.ring_copy not in RING_COPIES:
            raise ValueError(f"ring_copy must be one of {', '.join(RING_COPIES)}, got {self.ring_copy!r}")
        if self.stream_priority not in PRIORITIES:
            raise ValueError(f"stream_priority must be one of {', '.join(PRIORITIES)}, got {self.stream_priority!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "TransferOptions":
        """``LMCACHE_KV_STORE_MODE``, ``LMCACHE_KV_LOAD_MODE``, ``LMCACHE_KV_COPY_STREAMS``,
        ``LMCACHE_KV_STAGING_BYTES``, ``LMCACHE_KV_STAGING_SLOTS``, ``LMCACHE_KV_LAYER_PROGRAMS``,
        ``LMCACHE_KV_STREAM_PRIORITY``, ``LMCACHE_KV_DMA_MIN_RUN_BYTES``, ``LMCACHE_KV_STAGED_COPIES``,
        ``LMCACHE_KV_STAGED_MIN_LAYER_BYTES``, ``LMCACHE_KV_RING_COPY``; ``overrides`` win."""
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        for key, name, conv in (("STORE_MODE", "store_mode", str), ("LOAD_MODE", "load_mode", str),
                                ("COPY_STREAMS", "copy_streams", int), ("STAGING_BYTES", "staging_bytes", int),
                                ("STAGING_SLOTS", "staging_slots", int), ("LAYER_PROGRAMS", "layer_programs", int),
                                ("STREAM_PRIORITY", "stream_priority", str),
                                ("DMA_MIN_RUN_BYTES", "dma_min_run_bytes", int),
                                ("STAGED_COPIES", "staged_copies", str),
                                ("STAGED_MIN_LAYER_BYTES", "staged_min_layer_bytes", int),
                                ("RING_COPY", "ring_copy", str)):
            value = env.get(f"LMCACHE_KV_{key}")
            if value:
                try:
                    kw[name] = conv(value.strip().lower() if conv is str else value)
                except ValueError as exc:
                    raise ValueError(f"LMCACHE_KV_{key}={value!r} is not valid: {exc}") from exc
        kw.update(overrides)
        return cls(**kw)

    def mode(self, gather: bool, num_layers: int = 1) -> str:
        m = self.store_mode if gather else self.load_mode
        if m != "auto":
            return m
        return AUTO[("store" if gather else "load") + ("_many" if num_layers > 1 else "_layer")]


@dataclass
class TransferStats:
    """Counters for tests and the benchmark: which path moved how many chunks."""

    direct: int = 0
    staged: int = 0
    dma: int = 0  # chunks moved by copy-engine batches (mode "dma")
    batches: int = 0  # copy-engine batch calls
    torch: int = 0
    launches: int = 0
    dmas: int = 0
    ring_batches: int = 0  # staged groups moved between the ring and the cache by the copy engines
    fallbacks: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """What a batch shape resolved to: which chunks go which way, and the kernel's chunk table."""

    nonempty: list[int]
    table: Any  # triton_copy.PlaneTable, or None for the torch path
    near: list[int] = field(default_factory=list)
    far: list[int] = field(default_factory=list)
    dma: list[int] = field(default_factory=list)
    tab: Any = None
    aligned: bool = False
    max_n: int = 0
    ready: tuple[Any, ...] = ()  # the table's upload (triton_copy.Upload), waited for by other streams


@dataclass
class _StageLayout:
    """How one batch fills the staging ring for runs of a given layer count (see ``_stage_layout``)."""

    groups: list[list[int]]  # chunk indices per ring slot fill
    offsets: list[list[int]]  # each chunk's byte offset in its slot
    batch: bool  # the ring's copies go as one copy-engine batch per group
    preps: dict[tuple[int, int], Any] = field(default_factory=dict)  # (group, l0 or -1) -> a table per ring slot
    # (slot, group, layers) -> copy list; slot -1: the same relative to a ring slot's base
    copies: dict[tuple[int, int, int], Any] = field(default_factory=dict)
    moves: dict[tuple[int, int, int], Any] = field(default_factory=dict)  # the same -> ring/cache copies
    cached: bool = True  # kept for later calls (False: inference-mode slots, built for this call only)


_MISS = object()
# Batches each per-batch cache keeps: one engine step can load and store this many requests
# layer by layer at once (each request is its own batch) without the caches evicting each
# other every layer; an entry costs a few small host and device tensors.
_BATCHES = 32


# Distinct batches whose keys are kept (see _Sig): a request's batch and its near/far subsets.
_SIGS = 4 * _BATCHES


class _Sig:
    """One batch as the per-batch caches see it: its keys are built once per distinct batch, not
    once per call (the engine hands the same ``(slots, chunk)`` pairs for every layer, and at 32K
    tokens walking 128 chunks for each cache's key cost more host time per layer than queueing the
    copies). :meth:`KVTransfer._sig` finds it again by every tensor's identity and version
    counter, so slots written in place, or a chunk re-pointed with ``set_``/``resize_``, make a
    new one; like every cache here, a tensor changed behind torch's back (a numpy alias,
    ``.data``) must come as a new tensor. The key methods take the batch the sig was found for.

    A sig holds its slot tensors (small) and weak references to its chunks: a chunk that dies
    drops the sig before its identity can be reused, and no sig keeps a chunk's host buffer
    alive after the pool has let it go."""

    __slots__ = ("slots", "refs", "extra", "_slots_key", "_chunks_key", "_plan_key", "_subs", "_n")

    def __init__(self, n: int) -> None:
        self._n = n
        self.extra: dict[Any, Any] = {}  # other per-batch state (the fp8 kernel's tables)
        self.slots: list[Any] = []
        self.refs: list[Any] = []
        self._slots_key: tuple[Any, ...] | None = None
        self._chunks_key: tuple[Any, ...] | None = None
        self._plan_key: tuple[Any, ...] | None = None
        self._subs: dict[tuple[int, ...], _Sig] = {}

    def slots_key(self, batch: Batch) -> tuple[Any, ...]:
        """Per pair: its slot tensor's identity and version."""
        if self._slots_key is None:
            self._slots_key = tuple((id(s), s._version) for s, _ in batch)
        return self._slots_key

    def chunks_key(self, batch: Batch) -> tuple[Any, ...]:
        """Per pair: its slot tensor's identity and version, its chunk's address and strides."""
        if self._chunks_key is None:
            self._chunks_key = tuple((id(s), s._version, int(c.data_ptr()), tuple(c.stride())) for s, c in batch)
        return self._chunks_key

    def plan_key(self, batch: Batch) -> tuple[Any, ...]:
        if self._plan_key is None:
            self._plan_key = _plan_content(batch)
        return self._plan_key

    def subset(self, idx: Sequence[int]) -> "_Sig":
        """The sig of ``batch[i] for i in idx`` (valid exactly as long as this one)."""
        if len(idx) == self._n and idx[0] == 0 and idx[-1] == self._n - 1:  # indices are increasing
            return self
        key = tuple(idx)
        sub = self._subs.get(key)
        if sub is None:
            if len(self._subs) >= 8:
                self._subs.clear()
            sub = self._subs[key] = _Sig(len(idx))
        return sub


def _plan_content(batch: Batch) -> tuple[Any, ...]:
    """What a plan depends on: per pair, its slot count and its chunk's address, shape, strides
    and dtype (not the slot values: fresh slot tensors of the same sizes share a plan)."""
    return tuple((int(s.numel()), int(c.data_ptr()), tuple(c.shape), tuple(c.stride()), c.dtype) for s, c in batch)


def _out_of_memory(exc: BaseException) -> bool:
    """A device (or host) allocation failed: torch.OutOfMemoryError, MemoryError."""
    import torch

    return isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError)))


class _RingUnavailable(RuntimeError):
    """The staging ring could not be allocated (device memory); not a kernel fault."""


def _weak(obj: Any) -> Any:
    """A weak reference to ``obj`` (None stays None): caches name the paged cache they were
    built for without keeping its device memory alive after the engine drops it."""
    return None if obj is None else weakref.ref(obj)


def _alive(ref: Any) -> Any:
    return None if ref is None else ref()


class _Memo:
    """The last few results per batch key (the engine repeats one batch for every layer). Each
    entry keeps its slot tensors alive, so no id in its key can be reused by another object
    while it is held, and names the PagedKV it was computed for by a weak reference checked by
    identity (a cache the engine dropped is freed; its entries never match another)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: list[tuple[tuple[Any, ...], Any, list[Any], Any]] = []

    def get(self, key: tuple[Any, ...] | None, kv: Any = None) -> Any:
        if key is not None:
            for k, ref, _, value in self._items:
                if k == key and _alive(ref) is kv:
                    return value
        return _MISS

    def put(self, key: tuple[Any, ...] | None, kv: Any, batch: Batch, value: Any) -> None:
        if key is not None:
            self._items.insert(0, (key, _weak(kv), [s for s, _ in batch], value))
            del self._items[self._size:]

    def clear(self) -> None:
        self._items.clear()


class _Streams:
    """The few stream operations the staged path needs, for torch.cuda-like modules or none."""

    def __init__(self, backend: Any, device: "torch.device") -> None:
        self.backend = backend
        self.device = device

    def current(self) -> Any:
        return None if self.backend is None else self.backend.current_stream(self.device)

    def new(self) -> Any:
        return None if self.backend is None else self.backend.Stream(self.device)

    def record(self, stream: Any) -> Any:
        if self.backend is None:
            return None
        ev = self.backend.Event()
        ev.record(stream)
        return ev

    @staticmethod
    def wait(stream: Any, event: Any) -> None:
        if stream is not None and event is not None:
            stream.wait_event(event)

    def use(self, stream: Any) -> Any:
        import contextlib

        return contextlib.nullcontext() if self.backend is None else self.backend.stream(stream)


class KVTransfer:
    """Moves batches of chunks between one device's paged caches and host or device chunks.

    ``backend`` is ``torch.cuda`` (CUDA and ROCm builds), ``torch.npu``, or None for
    synchronous devices. Thread-safe: the staging ring is used under a lock.
    """

    def __init__(self, device: "torch.device", options: TransferOptions | None = None,
                 backend: Any = None) -> None:
        self.device = device
        self.options = options or TransferOptions.from_env()
        self.streams = _Streams(backend, device)
        self.kernel_ok, self.kernel_reason = triton_copy.kernel_available(device)
        self.stats = TransferStats()
        self._lock = threading.Lock()
        self._mapped: tuple[bool, str] | None = None
        self._ring: list["torch.Tensor"] = []
        self._ring_free: list[Any] = []
        self._next_slot = 0
        self._ring_gen = 0
        self._layouts = _Memo(_BATCHES)
        #: a staged batch's kernel tables on the device, by everything they are computed from
        #: (addresses and sizes, no tensor identity): later requests of the same shape reuse them
        #: and upload only their slots (:meth:`_stage_preps`)
        self._stage_tabs: OrderedDict[tuple[Any, ...], tuple["torch.Tensor", Any, bool]] = OrderedDict()
        self._ring_failed: tuple[int, str] | None = None  # (slot bytes, why) of a ring that could not be allocated
        self._copy_streams: list[Any] = []
        self._plans: list[tuple[tuple[Any, ...], Any, _Plan]] = []
        self._slot_cache = _Memo(_BATCHES)
        self._checked = _Memo(_BATCHES)
        self._warned: set[str] = set()
        self._copier: Any = None
        self._copier_why = ""
        self._runs = _Memo(_BATCHES)
        self._auto = _Memo(_BATCHES)
        self._dma_broken = ""
        self._dma_stream: Any = None
        self._side_lock = threading.Lock()
        self._sigs: dict[tuple[Any, ...], _Sig] = {}
        self._sig_lock = threading.RLock()  # RLock: a weak-reference callback may run inside it

    # -- public --------------------------------------------------------------------------
    def gather(self, kv: "PagedKV", batch: Batch, layers: Sequence[int] | None = None) -> None:
        """Copy ``kv`` at each pair's slots into its chunk (``[L, P, T, hidden]``)."""
        self._run(kv, batch, layers, True)

    def scatter(self, kv: "PagedKV", batch: Batch, layers: Sequence[int] | None = None) -> None:
        """Copy each pair's chunk into ``kv`` at its slots."""
        self._run(kv, batch, layers, False)

    def check_slots(self, kv: "PagedKV", batch: Batch, sig: Any = _MISS) -> None:
        """Range check every slot of ``batch`` against ``kv`` (LayoutError), once per batch: the
        result is cached by the slot tensors' identity and version, so the engine's per-layer
        calls with one batch pay for one vectorised min/max, not one per layer. ``sig``: the
        batch's :meth:`_sig`, where the caller has it."""
        key = self._key(self._sig(batch) if sig is _MISS else sig, batch, kv.num_blocks * kv.block_size)
        if self._checked.get(key) is not _MISS:
            return
        reference.check_slots(kv, batch)
        self._checked.put(key, None, batch, True)

    def mapped_host(self) -> tuple[bool, str]:
        """Whether kernels on this device can address pinned host memory (probed once)."""
        if self._mapped is None:
            self._mapped = self._probe_mapped()
        return self._mapped

    def describe(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel_ok, "kernel_reason": self.kernel_reason,
            "store_mode": self._describe_mode(True), "load_mode": self._describe_mode(False),
            "copy_streams": self.options.copy_streams, "staging_bytes": self.options.staging_bytes,
            "staging_slots": self.options.staging_slots, "layer_programs": self.options.layer_programs,
            "stream_priority": self.options.stream_priority, "dma_min_run_bytes": self.options.dma_min_run_bytes,
            "staged_copies": self.options.staged_copies,
            "staged_min_layer_bytes": self.options.staged_min_layer_bytes,
            "ring_copy": self.options.ring_copy,
            "mapped_host": self._mapped[0] if self._mapped else None,
        }

    def _describe_mode(self, gather: bool) -> str:
        o = self.options
        per_layer = o.mode(gather, 1)
        if (o.store_mode if gather else o.load_mode) == "auto" and per_layer == "direct":
            choices = []
            if o.staged_min_layer_bytes and o.staged_copies == "batch" and self._ring_failed is None:
                choices.append(f"staged from {o.staged_min_layer_bytes >> 20} MiB a layer")
            if not gather and o.dma_min_run_bytes:
                choices.append(f"dma for runs of {o.dma_min_run_bytes >> 10} KiB")
            per_layer = ", ".join(choices + [f"else direct ({o.layer_programs or 'uncapped'} programs)"])
        return f"{per_layer} per layer; {o.mode(gather, 2)} for several"

    # -- per-batch keys ----------------------------------------------------------------------
    def _sig(self, batch: Batch) -> "_Sig | None":
        """The batch's :class:`_Sig`, found by every tensor's identity and version (one pass over
        the pairs); None for inference-mode tensors, which keep no version counter (their results
        are computed afresh every call)."""
        try:
            key = tuple([(id(s), s._version, id(c), c._version) for s, c in batch])
        except RuntimeError:  # an inference-mode tensor: no version counter
            key = self._inference_key(batch)
            if key is None:
                return None
        with self._sig_lock:
            sig = self._sigs.get(key)
            if sig is not None:
                return sig
            sig = _Sig(len(batch))
            forget = self._forget_sig(key)
            try:
                sig.refs = [weakref.ref(c, forget) for _, c in batch]
            except TypeError:  # a chunk type without weak references: not cached
                return None
            sig.slots = [s for s, _ in batch]
            self._sigs[key] = sig
            if len(self._sigs) > _SIGS:
                del self._sigs[next(iter(self._sigs))]
        return sig

    @staticmethod
    def _inference_key(batch: Batch) -> tuple[Any, ...] | None:
        """The sig key of a batch with inference-mode chunks (vLLM's forward runs under
        ``torch.inference_mode``, so pool buffers allocated there are inference tensors): such a
        chunk keeps no version counter, so its address, strides and shape stand in for it,
        read every call. None when a slot tensor keeps none (slots are read as values)."""
        try:
            return tuple([(id(s), s._version, id(c), int(c.data_ptr()), tuple(c.stride()), tuple(c.shape))
                          if c.is_inference() else (id(s), s._version, id(c), c._version) for s, c in batch])
        except RuntimeError:
            return None

    def _forget_sig(self, key: tuple[Any, ...]) -> Any:
        """A weak-reference callback: one of the sig's chunks died, its identity may be reused."""
        sigs, lock = self._sigs, self._sig_lock

        def forget(_ref: Any) -> None:
            with lock:
                sigs.pop(key, None)

        return forget

    @staticmethod
    def _key(sig: "_Sig | None", batch: Batch, *head: Any, chunks: bool = False) -> tuple[Any, ...] | None:
        """A per-batch cache key: ``head`` and the slot (``chunks``: and chunk) key of ``batch``,
        whose sig ``sig`` is; None (not cached) without a sig."""
        if sig is None:
            return None
        return head + (sig.chunks_key(batch) if chunks else sig.slots_key(batch),)

    @staticmethod
    def _subset(batch: Batch, sig: "_Sig | None", idx: list[int]) -> "tuple[Batch, _Sig | None]":
        """``batch[i] for i in idx`` and its sig (kept on the batch's: no key walk per call)."""
        items = batch if len(idx) == len(batch) and idx[0] == 0 and idx[-1] == len(batch) - 1 \
            else [batch[i] for i in idx]
        return items, (None if sig is None else sig.subset(idx))

    # -- dispatch --------------------------------------------------------------------------
    def _run(self, kv: "PagedKV", batch: Batch, layers: Sequence[int] | None, gather: bool) -> None:
        sel = layer_list(kv, layers)
        if not batch or not sel:
            return
        sig = self._sig(batch)  # every cache below keys on it: built once per batch, not per layer
        self.check_slots(kv, batch, sig)  # before any path: no kernel or index op sees a bad slot
        mode = self.options.mode(gather, len(sel))
        if mode == "direct":
            mode = self._auto_layer_call(kv, batch, sel, gather, sig) or mode
        plan = self._plan(kv, batch, mode, sig)
        if plan is None:
            return
        if plan.table is None:
            self._reference(kv, [batch[i] for i in plan.nonempty], sel, gather)
            return
        try:
            self._launch_near(kv, plan, batch, sel, gather, sig)
            if plan.far:
                far, fsig = self._subset(batch, sig, plan.far)
                try:
                    self._staged(kv, plan.table, far, sel, gather, fsig)
                except _RingUnavailable:  # no device memory for the ring: the kernel in place, or torch
                    self._direct_or_reference(kv, far, sel, gather, fsig)
            if plan.dma:
                items, dsig = self._subset(batch, sig, plan.dma)
                try:
                    self._dma(kv, plan.table, items, sel, gather, dsig)
                except Exception as exc:  # noqa: BLE001 - the copy engines' fault is not the kernel's
                    self._disable_dma(f"{type(exc).__name__}: {exc}")
                    self._join_copy_streams()  # a partly queued batch on the side stream lands first
                    self._reference(kv, items, sel, gather)
        except Exception as exc:  # noqa: BLE001 - a kernel failure falls back, the engine keeps going
            if _out_of_memory(exc):  # a table or slot upload found no device memory: this call only
                self._join_copy_streams()
                if "out of memory" not in self._warned:
                    self._warned.add("out of memory")
                    logger.warning("KV transfer on %s ran out of device memory (%s); that call used the "
                                   "torch path", self.device, exc)
                self._reference(kv, [batch[i] for i in plan.nonempty], sel, gather)
                return
            self.kernel_ok, self.kernel_reason = False, f"{type(exc).__name__}: {exc}"
            self._plans.clear()
            logger.warning("KV kernel failed on %s (%s); using the torch path from now on",
                           self.device, self.kernel_reason)
            # copies already queued on the copy streams (a staged store's D2H into the chunks)
            # must land before the torch path writes the same chunks, or they would overwrite it
            self._join_copy_streams()
            self._reference(kv, [batch[i] for i in plan.nonempty], sel, gather)

    def _launch_near(self, kv: "PagedKV", plan: "_Plan", batch: Batch, sel: list[int], gather: bool,
                     sig: "_Sig | None") -> None:
        """One kernel launch for the plan's chunks the kernel reaches in place."""
        if plan.near:
            near, nsig = self._subset(batch, sig, plan.near)
            slots, uploaded = self._slots(near, nsig)
            prep = triton_copy.Prepared(plan.tab, slots, len(near), plan.max_n, plan.aligned,
                                        plan.ready + (uploaded,))
            triton_copy.run(kv, plan.table, prep, sel, gather, self._programs(sel))
            self.stats.direct += len(near)
            self.stats.launches += 1

    def _auto_layer_call(self, kv: "PagedKV", batch: Batch, sel: list[int], gather: bool,
                         sig: "_Sig | None") -> str | None:
        """Where an ``auto`` per-layer call goes instead of the capped kernel, on an accelerator
        with pinned host chunks the copy engines can take (None: the kernel).

        ``staged`` when the layer's bytes in the batch reach ``staged_min_layer_bytes`` and the
        ring copies go as copy-engine batches: the copy engines move each chunk's layer between
        host memory and a device ring and an uncapped kernel moves it between the ring and the
        cache in a few microseconds, so a call beside the model's kernels holds no SM while the
        bytes cross PCIe (H200, 2026-12-02 late run: per-layer loads 96-99% of the H2D ceiling from 4K
        tokens of Llama-3-8B, stores 89-95%, a store beside a load 92-96% of the bidirectional
        ceiling at 16K-32K). Below that size the per-layer issue cost dominates (1K tokens: 25
        GB/s staged, 43 direct). Else, for a load, ``dma`` when its runs of tokens average
        ``dma_min_run_bytes`` or more (whole-chunk runs: 46-48 GB/s beside large GEMMs that starve
        a kernel; 32 KiB runs: 22-25). Decided once per batch."""
        o = self.options
        if len(sel) != 1 or (o.store_mode if gather else o.load_mode) != "auto":
            return None
        if self.streams.backend is None or not self.kernel_ok:
            return None
        key = self._key(sig, batch, gather, o.dma_min_run_bytes, o.staged_copies, o.staged_min_layer_bytes,
                        self._ring_failed is None, chunks=True)
        got = self._auto.get(key, kv)
        if got is _MISS:
            got = self._decide_layer_call(kv, batch, gather, sig)
            self._auto.put(key, kv, batch, got)
        return got

    def _decide_layer_call(self, kv: "PagedKV", batch: Batch, gather: bool, sig: "_Sig | None") -> str | None:
        o = self.options
        items = [(s, c) for s, c in batch if int(s.numel()) > 0]
        sig = sig if len(items) == len(batch) else None  # the sig of ``items`` where they are the batch
        if not items or not self._chunks_dma_ok(kv, items, sig):
            return None
        layer_bytes = kv.geometry.bytes_per_token // kv.geometry.num_layers * sum(int(s.numel()) for s, _ in items)
        if 0 < o.staged_min_layer_bytes <= layer_bytes and self._ring_failed is None \
                and triton_copy.plane_table(kv)[0] is not None and self._copier_ok(kv, items, sig):
            return "staged"
        if not gather and o.dma_min_run_bytes > 0 and self._dma_unusable(kv) is None:
            size = self._run_table(kv, items, self._sig(items))[2]
            if size.size and float(size.mean()) >= o.dma_min_run_bytes:
                return "dma"
        return None

    def _programs(self, sel: list[int]) -> int:
        """The kernel's program cap for a call moving layers ``sel`` (per-layer calls only)."""
        return self.options.layer_programs if len(sel) == 1 else 0

    def _fallback(self, why: str) -> None:
        if why not in self._warned:
            self._warned.add(why)
            logger.info("KV transfer uses the torch path: %s", why)
            self.stats.fallbacks.append(why)

    def _reference(self, kv: "PagedKV", items: Batch, sel: list[int], gather: bool) -> None:
        (reference.gather_batch if gather else reference.scatter_batch)(kv, items, sel, checked=True)
        self.stats.torch += len(items)

    def _plan(self, kv: "PagedKV", batch: Batch, mode: str, sig: "_Sig | None") -> "_Plan | None":
        """Checks, path choice and the kernel's chunk table for a batch, cached by the chunks'
        addresses, shapes and strides and the slot counts (not the slot values): the engine
        repeats one batch for every layer, with fresh views of the same buffers."""
        key = (id(kv), mode, self.kernel_ok, sig.plan_key(batch) if sig is not None else _plan_content(batch))
        for k, ref, plan in self._plans:
            if k == key and ref() is kv:  # the id in the key is that of a live cache
                return plan
        nonempty = [i for i, (s, _) in enumerate(batch) if int(s.numel()) > 0]
        if not nonempty:
            return None
        for i in nonempty:
            reference.check_chunk(kv, *batch[i])
        table = None
        if mode != "torch":
            if not self.kernel_ok:
                self._fallback(f"kernel unavailable on {self.device}: {self.kernel_reason}")
            else:
                table, why = triton_copy.plane_table(kv)
                if table is None:
                    self._fallback(f"{kv.kind}: {why}")
        plan = _Plan(nonempty, table)
        if table is not None:
            plan.near, plan.far, plan.dma = self._split(kv, batch, nonempty, mode)
            if plan.near:
                near = [batch[i] for i in plan.near]
                rows, aligned = triton_copy.chunk_rows(near, kv.layers[0].k.element_size())
                prep = triton_copy.prepare(kv, table, near, rows=rows, rows_aligned=aligned,
                                           slots=near[0][0])  # slots are supplied per call
                plan.tab, plan.aligned, plan.ready = prep.tab, prep.aligned, prep.ready
                plan.max_n = max(int(s.numel()) for s, _ in near)
        self._plans.insert(0, (key, weakref.ref(kv), plan))
        del self._plans[_BATCHES:]
        return plan

    def _split(self, kv: "PagedKV", batch: Batch, idx: list[int], mode: str
               ) -> tuple[list[int], list[int], list[int]]:
        """Indices of chunks the kernel reaches in place (``near``), of those to stage (``far``) and
        of those the copy engines move run by run (``dma``)."""
        near: list[int] = []
        far: list[int] = []
        by_dma: list[int] = []
        if mode == "dma":  # host chunks to the copy engines, the rest as ``direct`` would take them
            why = self._dma_unusable(kv)
            host = [i for i in idx if batch[i][1].device.type == "cpu"]
            pinned: dict[int, bool] = {}
            if why is None and all(self._dma_chunk_ok(kv, batch[i][1], pinned) for i in host):
                by_dma, idx = host, [i for i in idx if batch[i][1].device.type != "cpu"]
            else:
                why = why or "chunks not pinned or not token-major"
                if why not in self._warned:
                    self._warned.add(why)
                    logger.info("KV copy-engine batches unusable here (%s): the direct kernel moves the chunks", why)
                    self.stats.fallbacks.append(why)
            mode = "direct"
        for i in idx:
            c = batch[i][1]
            if kv.device.type == "cpu" and c.device.type == "cpu":
                # host KV (the interpreter): 'staged' still goes through the ring so CI tests it
                (far if mode == "staged" else near).append(i)
            elif c.device == kv.device:
                near.append(i)
            elif c.device.type == "cpu":
                if mode == "direct" and c.is_pinned() and self.mapped_host()[0]:
                    near.append(i)
                else:
                    far.append(i)
            else:
                raise ValueError(f"chunk on {c.device} cannot be moved to or from KV on {kv.device}")
        return near, far, by_dma

    @staticmethod
    def _dma_chunk_ok(kv: "PagedKV", c: "torch.Tensor", pinned: dict[int, bool]) -> bool:
        """A chunk the copy engines can take: host memory, pinned (or KV on the host too), and
        token-major (each token's hidden vector contiguous, tokens one after another). ``pinned``
        keeps the answer per allocation (a storage is pinned as a whole) for one call: each
        ``is_pinned`` is a driver query, and every storage stays alive while the call holds its
        chunks, so no address is reused within it."""
        if c.device.type != "cpu" or c.stride(3) != 1 or c.stride(2) != kv.geometry.hidden:
            return False
        if kv.device.type == "cpu":
            return True
        base = c.untyped_storage().data_ptr()
        hit = pinned.get(base)
        if hit is None:
            hit = pinned[base] = c.is_pinned()
        return hit

    def _disable_dma(self, why: str) -> None:
        """Copy-engine batches failed: never again in this process (the kernel paths stay)."""
        self._dma_broken = why
        self._plans.clear()
        self._auto.clear()
        self._layouts.clear()
        logger.warning("KV copy-engine batches failed on %s (%s); the kernel moves those chunks from now on",
                       self.device, why)

    def _dma_unusable(self, kv: "PagedKV") -> str | None:
        """Why copy-engine batches cannot move ``kv``'s chunks (None when they can)."""
        if self._dma_broken:
            return f"they failed earlier ({self._dma_broken})"
        if self._copier is None:
            self._copier, self._copier_why = dma.copier(self.device)
        if self._copier is None:
            return self._copier_why
        table, why = triton_copy.plane_table(kv)
        if table is None:
            return why
        g = kv.geometry
        s_blk, s_tok, s_head, s_dim = table.strides
        if not (s_dim == 1 and s_head == g.head_dim and s_tok == g.hidden):
            return (f"{kv.kind}: a token's heads are not contiguous in a block (strides block {s_blk}, token "
                    f"{s_tok}, head {s_head}, dim {s_dim}), so a run of tokens is not one copy")
        return None

    def _slots(self, items: Batch, sig: "_Sig | None") -> "tuple[torch.Tensor, Any]":
        """The batch's slots concatenated on the KV device and where that was queued
        (:class:`triton_copy.Upload`: a kernel on another stream waits for it); cached by identity
        and version (inference-mode tensors keep no version counter and are concatenated afresh)."""
        key = self._key(sig, items)
        hit = self._slot_cache.get(key)
        if hit is _MISS:
            dev_slots = triton_copy.concat_slots([s for s, _ in items], self.device)
            hit = (dev_slots, triton_copy.Upload.after(self.device))
            self._slot_cache.put(key, None, items, hit)
        return hit

    # -- staged ------------------------------------------------------------------------------
    def _ensure_ring(self, nbytes: int) -> None:
        """A ring whose slots hold ``nbytes``; :class:`_RingUnavailable` when the device has no
        memory for it (an out-of-memory error; remembered: no later call of that size or more
        tries again, auto per-layer calls stop choosing ``staged``; the kernel stays in use)."""
        import torch

        size = max(self.options.staging_bytes, nbytes)
        if self._ring and self._ring[0].numel() >= size:
            return
        if self._ring_failed and size >= self._ring_failed[0]:
            raise _RingUnavailable(self._ring_failed[1])
        if self._ring and self.streams.current() is not None:
            self.streams.backend.synchronize(self.device)  # old ring slots may still be in use
        self._ring = []  # the old ring goes first: the new one may need its memory
        self._ring_gen += 1  # cached layouts point into the old ring
        self._layouts.clear()
        try:
            self._ring = [torch.empty(size, dtype=torch.uint8, device=self.device)
                          for _ in range(self.options.staging_slots)]
        except Exception as exc:  # noqa: BLE001 - only a memory error means "no ring"; others are faults
            if not _out_of_memory(exc):
                raise
            why = f"{self.options.staging_slots} staging slots of {size} bytes: {type(exc).__name__}: {exc}"
            self._ring, self._ring_failed = [], (size, why)
            self._auto.clear()
            logger.warning("KV staging ring unavailable on %s (%s); staged chunks go through the kernel in "
                           "place where it reaches them (else torch), per-layer calls through the kernel",
                           self.device, why)
            self.stats.fallbacks.append(f"staging ring: {why}")
            raise _RingUnavailable(why) from exc
        self._ring_free = [None] * len(self._ring)
        if not self._copy_streams:
            self._copy_streams = [self.streams.new() for _ in range(self.options.copy_streams)]

    def _direct_or_reference(self, kv: "PagedKV", items: Batch, sel: list[int], gather: bool,
                             sig: "_Sig | None") -> None:
        """``items`` as ``direct`` takes them (the kernel in place where it reaches them: host KV,
        pinned chunks the device maps), the rest through torch: the staging ring is unavailable."""
        plan = self._plan(kv, items, "direct", sig)
        if plan is None:
            return
        if plan.table is None:
            self._reference(kv, [items[i] for i in plan.nonempty], sel, gather)
            return
        self._launch_near(kv, plan, items, sel, gather, sig)
        if plan.far:
            self._reference(kv, [items[i] for i in plan.far], sel, gather)

    def _join_copy_streams(self) -> None:
        """The current stream waits for everything queued on the copy streams (best effort: on a
        failed device the wait may fail too, and then nothing else would run either)."""
        cur = self.streams.current()
        for cs in self._copy_streams + ([self._dma_stream] if self._dma_stream is not None else []):
            try:
                self.streams.wait(cur, self.streams.record(cs))
            except Exception as exc:  # noqa: BLE001 - the fallback goes on regardless
                logger.warning("KV transfer could not join a copy stream on %s: %s", self.device, exc)

    def _staged(self, kv: "PagedKV", table: Any, items: Batch, sel: list[int], gather: bool,
                sig: "_Sig | None") -> None:
        runs: list[list[int]] = []
        for l in sel:  # contiguous layer runs: each run stages [n_layers, P, n, hidden] per chunk
            if runs and l == runs[-1][-1] + 1:
                runs[-1].append(l)
            else:
                runs.append([l])
        nls = sorted({len(r) for r in runs})
        with self._lock:
            # layouts kept for this ring were laid out in it: the ring is large enough for them
            lays = [self._layouts.get(self._key(sig, items, nl, self._ring_gen, chunks=True), kv) for nl in nls]
            if any(lay is _MISS for lay in lays):
                # the ring is sized for the longest run before any copy is queued (a new ring
                # drops every kept layout, so all of them are laid out afresh)
                self._ensure_ring(max(self._stage_bytes(kv, items, nls[-1])))
                lays = [self._stage_layout(kv, items, nl, sig) for nl in nls]
            by_nl = dict(zip(nls, lays))
            cur = self.streams.current()  # asked once: torch's lookup costs host time per group
            for run in runs:
                lay = by_nl[len(run)]
                for gi in range(len(lay.groups)):
                    self._stage_group(kv, table, items, lay, gi, run, gather, cur)
            self.stats.staged += len(items)
            if gather:  # later events on the current stream must cover the DMAs
                for cs in self._copy_streams:
                    self.streams.wait(cur, self.streams.record(cs))

    @staticmethod
    def _stage_bytes(kv: "PagedKV", items: Batch, nl: int) -> list[int]:
        """Ring bytes of each chunk's ``[nl, P, n, hidden]`` block."""
        g = kv.geometry
        elem = kv.layers[0].k.element_size()
        return [nl * g.kv_planes * int(s.numel()) * g.hidden * elem for s, _ in items]

    def _stage_layout(self, kv: "PagedKV", items: Batch, nl: int, sig: "_Sig | None") -> "_StageLayout":
        """How ``items`` fill the ring for runs of ``nl`` layers (groups of chunks per slot, each
        chunk's offset in its slot), with the kernel tables and copy lists built on first use;
        cached per batch (the engine repeats one batch for every layer)."""
        key = self._key(sig, items, nl, self._ring_gen, chunks=True)
        lay = self._layouts.get(key, kv)
        if lay is not _MISS:
            return lay
        per_item = self._stage_bytes(kv, items, nl)  # the ring holds the largest (sized by _staged)
        cap = self._ring[0].numel()
        lay = _StageLayout([], [], bool(self._copier_ok(kv, items, sig)), cached=key is not None)
        used = cap
        for i, nbytes in enumerate(per_item):
            if used + nbytes > cap:
                lay.groups.append([])
                lay.offsets.append([])
                used = 0
            lay.groups[-1].append(i)
            lay.offsets[-1].append(used)
            used += (nbytes + 255) // 256 * 256
        self._layouts.put(key, kv, items, lay)
        return lay

    def _copier_ok(self, kv: "PagedKV", items: Batch, sig: "_Sig | None" = None) -> bool:
        """Whether the ring's copies can go as one copy-engine batch per group (``staged_copies``
        is ``batch``, the binding loads, every chunk pinned host memory in token-major order)."""
        if self.options.staged_copies != "batch" or self._dma_broken:
            return False
        if self._copier is None:
            self._copier, self._copier_why = dma.copier(self.device)
        return self._copier is not None and self._chunks_dma_ok(kv, items, sig)

    def _chunks_dma_ok(self, kv: "PagedKV", items: Batch, sig: "_Sig | None") -> bool:
        """:meth:`_dma_chunk_ok` for every chunk of ``items``, kept on their sig (``items``' own):
        a batch's first layer asked it up to three times, one ``is_pinned`` driver query per
        chunk each time."""
        key = ("dma_ok", kv.device.type, kv.geometry.hidden)  # all the answer depends on besides the chunks
        if sig is not None:
            hit = sig.extra.get(key)
            if hit is not None:
                return hit
        pinned: dict[int, bool] = {}  # per allocation: chunks carved from one pool slab share it
        ok = all(self._dma_chunk_ok(kv, c, pinned) for _, c in items)
        if sig is not None:
            sig.extra[key] = ok
        return ok

    def _stage_group(self, kv: "PagedKV", table: Any, items: Batch, lay: "_StageLayout", gi: int,
                     run: list[int], gather: bool, cur: Any) -> None:
        slot_i = self._next_slot % len(self._ring)
        self._next_slot += 1
        cs = self._copy_streams[slot_i % len(self._copy_streams)] if self._copy_streams else None
        l0, nl = run[0], len(run)
        group = [items[k] for k in lay.groups[gi]]
        # a per-layer table gives the chunk a layer stride of 0, so one table serves every layer;
        # the tables of every group and ring slot are built (one upload) the first time a group
        # is moved, only this group's and slot's where the layout is not kept (inference-mode
        # slots: no batch key)

        def move() -> None:
            """The group between the ring slot and the cache on ``cur``: copy engines or kernel."""
            if self._ring_dma(kv, lay, gi, group, slot_i, run, gather, cur):
                return
            first = l0 if nl > 1 else -1
            preps = lay.preps.get((gi, first))
            if preps is not None:
                prep = preps[slot_i]
            elif lay.cached:  # every group's tables for every ring slot, in one upload
                built = self._stage_preps(kv, table, items, lay, range(len(lay.groups)), range(len(self._ring)),
                                          l0, nl)
                for g_i, tabs in enumerate(built):
                    lay.preps[(g_i, first)] = tabs
                prep = built[gi][slot_i]
            else:
                prep = self._stage_preps(kv, table, items, lay, [gi], [slot_i], l0, nl)[0][0]
            # the kernel only touches device memory: a few microseconds on every SM (programs 0)
            triton_copy.run(kv, table, prep, run, gather, 0)
            self.stats.launches += 1

        if gather:
            self.streams.wait(cur, self._ring_free[slot_i])
            move()
            self.streams.wait(cs, self.streams.record(cur))
            self._ring_copies(kv, lay, gi, group, slot_i, run, True, cs)
            self._ring_free[slot_i] = self.streams.record(cs)
        else:
            self.streams.wait(cs, self._ring_free[slot_i])
            self._ring_copies(kv, lay, gi, group, slot_i, run, False, cs)
            self.streams.wait(cur, self.streams.record(cs))
            move()
            self._ring_free[slot_i] = self.streams.record(cur)

    def _stage_preps(self, kv: "PagedKV", table: Any, items: Batch, lay: "_StageLayout", groups: Iterable[int],
                     ring_slots: Iterable[int], l0: int, nl: int) -> list[list[Any]]:
        """The kernel's tables of ``items``' ``groups`` of ``lay``, per group one per ring slot of
        ``ring_slots``: each group's chunks lie in the slot as ``[nl, P, n, hidden]`` views at
        its offsets. Built with numpy and uploaded with the groups' slots as one buffer (one
        pinned copy, one event); each table's slot column points into that one slot tensor. The
        tables are kept by the numbers they are computed from, so a later batch of the same shape
        (the same chunk sizes in the same ring places) uploads only its slots."""
        import numpy as np

        g = kv.geometry
        elem = kv.layers[0].k.element_size()
        groups, ring_slots = list(groups), list(ring_slots)
        idx = [k for gi in groups for k in lay.groups[gi]]
        ns = np.fromiter((int(items[k][0].numel()) for k in idx), dtype=np.int64, count=len(idx))
        offs = np.fromiter((o for gi in groups for o in lay.offsets[gi]), dtype=np.int64, count=len(idx))
        bases = np.fromiter((int(self._ring[ri].data_ptr()) for ri in ring_slots), dtype=np.int64,
                            count=len(ring_slots))
        slots_of = [items[k][0] for k in idx]
        key = (int(table.base.data_ptr()), elem, g.kv_planes, g.hidden, l0 if nl > 1 else -1, nl, bases.tobytes(),
               offs.tobytes(), ns.tobytes())  # all the rows depend on (l0 only through a layer stride)
        hit = self._stage_tabs.get(key)
        if hit is not None:  # the same shape as an earlier batch: its tables, and this batch's slots
            self._stage_tabs.move_to_end(key)
            tab, tab_ready, aligned = hit
            _, slots, ready = triton_copy.upload_with_slots(np.empty((0, 6), dtype=np.int64), slots_of, self.device)
            readies: tuple[Any, ...] = (tab_ready, ready)
        else:
            rows, aligned = self._stage_rows(kv, table, bases, offs, ns, l0, nl)
            tab, slots, ready = triton_copy.upload_with_slots(rows, slots_of, self.device)
            readies = (ready,)
            self._stage_tabs[key] = (tab, ready, aligned)
            while len(self._stage_tabs) > _BATCHES:
                self._stage_tabs.popitem(last=False)
        out: list[list[Any]] = []
        first = 0
        for gi in groups:
            m = len(lay.groups[gi])
            max_n = int(ns[first:first + m].max()) if m else 0
            out.append([triton_copy.Prepared(tab[(r * len(idx) + first) * 6:(r * len(idx) + first + m) * 6], slots,
                                             m, max_n, aligned, readies)
                        for r in range(len(ring_slots))])
            first += m
        return out

    @staticmethod
    def _stage_rows(kv: "PagedKV", table: Any, bases: Any, offs: Any, ns: Any, l0: int, nl: int) -> tuple[Any, bool]:
        """The kernel table rows ``[ring slots, chunks, 6]`` of chunks of ``ns`` tokens at ring
        offsets ``offs`` in the ring slots at ``bases``, and whether every address is 16-byte
        aligned: a function of these numbers alone."""
        import numpy as np

        g = kv.geometry
        elem = kv.layers[0].k.element_size()
        s_l = g.kv_planes * ns * g.hidden if nl > 1 else np.zeros_like(ns)
        addr = bases[:, None] + (offs - l0 * s_l * elem)[None, :]  # [ring slots, chunks], bytes
        delta = addr - int(table.base.data_ptr())
        if (delta % elem).any():
            raise ValueError(f"a staging ring address is not a multiple of the element size {elem}")
        rows = np.empty(addr.shape + (6,), dtype=np.int64)
        rows[..., 0] = delta // elem
        rows[..., 1] = s_l
        rows[..., 2] = ns * g.hidden
        rows[..., 3] = g.hidden
        rows[..., 4] = np.cumsum(ns) - ns  # where each chunk's slots start in the uploaded slot tensor
        rows[..., 5] = ns
        return rows, bool((addr % 16 == 0).all()) and g.hidden % (16 // elem) == 0

    def _ring_copies(self, kv: "PagedKV", lay: "_StageLayout", gi: int, group: Batch, slot_i: int,
                     run: list[int], gather: bool, cs: Any) -> None:
        """The copy-stream half of a group: chunks to the ring (load) or back (store) on ``cs``, one
        copy-engine batch when :meth:`_copier_ok` said so (issued on ``cs`` by handle), else one
        torch DMA per contiguous block (with ``cs`` made current for them)."""
        l0, nl = run[0], len(run)
        g = kv.geometry
        elem = kv.layers[0].k.element_size()
        if lay.batch and not self._dma_broken:
            ck = (slot_i, gi, nl)
            tab = lay.copies.get(ck)
            if tab is None:  # the group's copies relative to a ring slot's base, built once for all slots
                rel = lay.copies.get((-1, gi, nl))
                if rel is None:
                    rel = lay.copies[(-1, gi, nl)] = self._ring_table(kv, group, lay.offsets[gi], nl)
                tab = lay.copies[ck] = (rel[0], rel[1] + int(self._ring[slot_i].data_ptr()), rel[2], rel[3])
            chunk0, ring, size, st_l = tab
            chunk = chunk0 + l0 * st_l
            dsts, srcs = (chunk, ring) if gather else (ring, chunk)
            try:
                if isinstance(self._copier, dma.DriverCopier):
                    with self.streams.backend.device(self.device):
                        self._copier.copy(dsts.view("uint64"), srcs.view("uint64"), size.view("uint64"),
                                          cs.cuda_stream, not gather, self.device.index or 0)
                else:
                    self._copier.copy(dsts.view("uint64"), srcs.view("uint64"), size.view("uint64"), 0,
                                      not gather, self.device.index or 0)
            except Exception as exc:  # noqa: BLE001 - the copy engines' fault: the same copies one by one
                self._disable_dma(f"{type(exc).__name__}: {exc}")
            else:
                self.stats.dmas += int(size.shape[0])
                self.stats.batches += 1
                return
        ring = self._ring[slot_i]
        dtype = kv.layers[0].k.dtype
        with self.streams.use(cs):
            for (s, chunk), off in zip(group, lay.offsets[gi]):
                n = int(s.numel())
                count = nl * g.kv_planes * n * g.hidden
                view = ring[off: off + count * elem].view(dtype).view(nl, g.kv_planes, n, g.hidden)
                part = chunk[l0: l0 + nl, :, :n]
                self._copy(part, view) if gather else self._copy(view, part)

    def _ring_dma(self, kv: "PagedKV", lay: "_StageLayout", gi: int, group: Batch, slot_i: int,
                  run: list[int], gather: bool, cur: Any) -> bool:
        """With ``ring_copy="dma"``: the group between its ring slot and the cache as one
        copy-engine batch on ``cur`` (device to device, one copy per run of tokens per layer and
        plane), True once queued; False where the kernel must move it (the option is off, the
        ring copies are not batched, the layout splits a token's heads, the copy engines failed)."""
        import numpy as np

        if self.options.ring_copy != "dma" or not lay.batch or self._dma_broken:
            return False
        ck = (slot_i, gi, len(run))
        tab = lay.moves.get(ck)
        if tab is None:
            tab = lay.moves[ck] = self._ring_move_table(kv, group, lay.offsets[gi], slot_i, len(run))
        if tab is False:
            return False
        ring, rel, size, plane, planes = tab
        dev = rel + planes[run[0] * kv.geometry.kv_planes + plane]
        dsts, srcs = (ring, dev) if gather else (dev, ring)
        try:
            self._issue_batch(cur, lambda handle: self._copier.copy_within(
                dsts.view(np.uint64), srcs.view(np.uint64), size.view(np.uint64), handle, self.device.index or 0))
        except Exception as exc:  # noqa: BLE001 - the copy engines' fault: the kernel moves it
            self._disable_dma(f"{type(exc).__name__}: {exc}")
            return False
        self.stats.ring_batches += 1
        self.stats.batches += 1
        self.stats.dmas += int(size.shape[0])
        return True

    def _ring_move_table(self, kv: "PagedKV", group: Batch, offsets: list[int], slot_i: int, nl: int) -> Any:
        """For a group laid in ring slot ``slot_i`` as ``[nl, P, n, hidden]`` per chunk: per copy,
        its ring address, its byte offset from its cache plane's base, its bytes and which of the
        run's ``nl * P`` planes it is in, plus every plane's base address (one run of tokens per
        copy, contiguous in the cache); False where a token's heads are not contiguous there."""
        import numpy as np

        if self._dma_unusable(kv) is not None:
            return False
        base = int(self._ring[slot_i].data_ptr())
        row = kv.geometry.hidden * kv.layers[0].k.element_size()
        cols: list[list[Any]] = [[], [], [], []]
        for (s, _), off in zip(group, offsets):
            n = int(s.numel())
            starts, rel, nbytes = self._cache_runs(kv, s)
            for j in range(nl * kv.geometry.kv_planes):  # plane j of the run: layer j // P, plane j % P
                cols[0].append(base + off + (j * n + starts) * row)
                cols[1].append(rel)
                cols[2].append(nbytes)
                cols[3].append(np.full(starts.shape, j, dtype=np.int64))
        return tuple(np.concatenate(col).astype(np.int64) for col in cols) + (self._plane_bases(kv),)

    def _issue_batch(self, cur: Any, issue: Any) -> None:
        """``issue(stream handle)`` queued in stream order on ``cur``: on its handle, or, for the
        legacy default stream (which the batch call refuses), on a side stream joined to it both
        ways; with the device's context current for the driver."""
        handle = getattr(cur, "cuda_stream", 0) if cur is not None else 0
        if not isinstance(self._copier, dma.DriverCopier):
            issue(handle)
            return
        with self.streams.backend.device(self.device):  # the driver copies in the current context
            if handle:
                issue(handle)
                return
            with self._side_lock:  # not self._lock: the staged path holds that one here
                if self._dma_stream is None:
                    self._dma_stream = self.streams.new()
            side = self._dma_stream
            self.streams.wait(side, self.streams.record(cur))
            issue(side.cuda_stream)
            self.streams.wait(cur, self.streams.record(side))

    @staticmethod
    def _ring_table(kv: "PagedKV", group: Batch, offsets: list[int], nl: int) -> Any:
        """Per copy of a group at layer 0: its chunk-side byte address, its byte offset in a ring
        slot, its bytes and its chunk's layer stride in bytes (one copy per chunk when the chunk's
        ``[nl, P, n]`` block is contiguous, else one per (layer, plane))."""
        import numpy as np

        g = kv.geometry
        elem = kv.layers[0].k.element_size()
        cols: list[list[int]] = [[], [], [], []]
        for (s, c), off in zip(group, offsets):
            n = int(s.numel())
            st = c.stride()
            row = n * g.hidden * elem  # one (layer, plane) block of the chunk, contiguous (token-major)
            if st[1] * elem == row and (nl == 1 or st[0] * elem == g.kv_planes * row):
                pieces = [(0, 0, nl * g.kv_planes * row)]
            else:
                pieces = [((l * st[0] + p * st[1]) * elem, (l * g.kv_planes + p) * row, row)
                          for l in range(nl) for p in range(g.kv_planes)]
            for c_off, r_off, size in pieces:
                cols[0].append(int(c.data_ptr()) + c_off)
                cols[1].append(off + r_off)
                cols[2].append(size)
                cols[3].append(st[0] * elem)
        return tuple(np.asarray(col, dtype=np.int64) for col in cols)

    # -- copy-engine batches ------------------------------------------------------------------
    def _run_table(self, kv: "PagedKV", items: Batch, sig: "_Sig | None") -> Any:
        """Per run of tokens (contiguous in its chunk and in one block): its chunk-side byte
        address at layer 0 plane 0, its byte offset from a plane's base, its bytes, and its
        chunk's layer and plane strides in bytes. Cached by the slot tensors' identity and
        version and the chunks' addresses (the engine repeats one batch for every layer): like
        every cache here keyed by ``_version``, slots changed behind torch's back (through a
        numpy alias or ``.data``) must come in a new tensor."""
        import numpy as np

        key = self._key(sig, items, chunks=True)
        tab = self._runs.get(key, kv)
        if tab is not _MISS:
            return tab
        elem = kv.layers[0].k.element_size()
        cols: list[list[Any]] = [[], [], [], [], []]
        for s, c in items:
            starts, rel, nbytes = self._cache_runs(kv, s)
            st = c.stride()
            cols[0].append(int(c.data_ptr()) + starts * (st[2] * elem))
            cols[1].append(rel)
            cols[2].append(nbytes)
            cols[3].append(np.full(starts.shape, st[0] * elem, dtype=np.int64))
            cols[4].append(np.full(starts.shape, st[1] * elem, dtype=np.int64))
        tab = tuple(np.concatenate(col).astype(np.int64) for col in cols) + (self._plane_bases(kv),)
        self._runs.put(key, kv, items, tab)
        return tab

    @staticmethod
    def _cache_runs(kv: "PagedKV", slots: "torch.Tensor") -> Any:
        """A chunk's runs of tokens contiguous in the cache (within a block, or on into the next
        where the layout puts block ``b + 1`` after block ``b``): each run's first token in the
        chunk, its byte offset from a plane's base and its bytes."""
        import torch

        table, _ = triton_copy.plane_table(kv)
        s_blk, s_tok = table.strides[0], table.strides[1]
        across = s_blk == kv.block_size * s_tok  # blocks follow each other: a run may cross into the next
        starts, blk, off, lens = dma.runs(slots.reshape(-1).to(device="cpu", dtype=torch.int64).numpy(),
                                          kv.block_size, across)
        elem = kv.layers[0].k.element_size()
        return starts, (blk * s_blk + off * s_tok) * elem, lens * (kv.geometry.hidden * elem)

    @staticmethod
    def _plane_bases(kv: "PagedKV") -> Any:
        """Every layer's plane base addresses, layer-major (K then V; MLA: one plane a layer)."""
        import numpy as np

        return np.array([int(pl.data_ptr()) for lp in kv.layers for pl in ((lp.k,) if lp.v is None else (lp.k, lp.v))],
                        dtype=np.int64)

    def _dma(self, kv: "PagedKV", table: Any, items: Batch, sel: list[int], gather: bool,
             sig: "_Sig | None") -> None:
        """Every selected layer and plane of ``items`` in one copy-engine batch on the current stream."""
        import numpy as np

        host0, rel, size, st_l, st_p, planes = self._run_table(kv, items, sig)
        P = kv.geometry.kv_planes
        ls = np.repeat(np.asarray(sel, dtype=np.int64), P)
        ps = np.tile(np.arange(P, dtype=np.int64), len(sel))
        host = (host0[None, :] + ls[:, None] * st_l[None, :] + ps[:, None] * st_p[None, :]).ravel()
        dev = (rel[None, :] + planes[ls * P + ps][:, None]).ravel()
        sizes = np.tile(size, len(sel) * P)
        dsts, srcs = (host, dev) if gather else (dev, host)
        self._issue_batch(self.streams.current(), lambda stream: self._copier.copy(
            dsts.view(np.uint64), srcs.view(np.uint64), sizes.view(np.uint64), stream, not gather,
            self.device.index or 0))
        self.stats.dma += len(items)
        self.stats.batches += 1
        self.stats.dmas += int(sizes.shape[0])

    def _copy(self, dst: "torch.Tensor", src: "torch.Tensor") -> None:
        """One DMA when both sides are contiguous, else one per (layer, plane) row block."""
        if dst.is_contiguous() and src.is_contiguous():
            dst.copy_(src, non_blocking=True)
            self.stats.dmas += 1
            return
        for l in range(dst.shape[0]):
            for p in range(dst.shape[1]):
                dst[l, p].copy_(src[l, p], non_blocking=True)
                self.stats.dmas += 1

    # -- probes ----------------------------------------------------------------------------
    def _probe_mapped(self) -> tuple[bool, str]:
        """Write through a kernel into a small pinned buffer and read it back."""
        import torch

        from lmcache_core.layout import PagedKV

        if self.device.type == "cpu":
            return True, "host memory"
        if not self.kernel_ok:
            return False, self.kernel_reason
        try:
            src = torch.arange(4 * 16 * 64, dtype=torch.int16, device=self.device).view(4, 16, 64)
            kv = PagedKV.from_mla([src.view(torch.float16)])
            host = torch.full((1, 1, 16, 64), -1, dtype=torch.float16).pin_memory()
            slots = torch.arange(16, 32, dtype=torch.int64)
            table, why = triton_copy.plane_table(kv)
            if table is None:
                return False, why
            triton_copy.launch(kv, table, [(slots, host)], None, True,
                               slots=slots.to(self.device))
            self.streams.backend.synchronize(self.device)
            ok = torch.equal(host.view(torch.int16)[0, 0], src[1].cpu())
            return (True, "kernels write pinned host memory through UVA") if ok else \
                (False, "a kernel write to pinned host memory did not arrive")
        except Exception as exc:  # noqa: BLE001
            return False, f"mapped pinned memory is not usable from kernels: {type(exc).__name__}: {exc}"
