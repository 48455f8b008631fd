"""The worker half of the vLLM connector, free of vLLM imports.

Per engine step vLLM binds a :class:`StepPlan`, then (in the forward pass)
calls ``wait_layer`` before each attention layer and ``save_layer`` after it,
then ``wait_for_save``, ``get_finished`` and ``load_errors``. This class maps
those calls onto :class:`CacheEngine` layer-wise loads and stores:

- synchronous loads fetch the hit chunks to host memory when the step starts
  and land layer ``i`` when layer ``i`` is about to run (on devices with async
  copies, all layers are queued on a transfer stream at once);
- asynchronous loads run on a thread while the batch goes on; the request is
  reported through ``get_finished`` when its KV is in place;
- stores gather layer ``i`` right after layer ``i`` ran; sealing and writing
  happen in the background, and a request whose store may still read its
  blocks is reported through ``get_finished`` only after the copies are done,
  so vLLM keeps those blocks until then (``request_finished`` said so);
- a load that comes up short (a chunk evicted or corrupt since the lookup)
  reports the affected block ids, so vLLM's ``kv_load_failure_policy`` can
  recompute them;
- loads write only the tokens beyond what vLLM already holds (``start``);
- nothing here raises into vLLM's forward pass: a failing load becomes load
  errors (its blocks recomputed), a failing store a dropped store, and every
  error path gives back its pins and buffers.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ...layout import PagedKV
from .common import LoadSpec, SaveSpec, StepPlan

if TYPE_CHECKING:
    import torch

    from ...engine import CacheEngine, LayerwiseRetrieve, LayerwiseStore

logger = logging.getLogger(__name__)

STAT_KEYS = ("load_requests", "loaded_tokens", "load_failed_tokens", "load_seconds",
             "store_requests", "stored_tokens", "store_seconds", "store_errors", "dropped_stores")


@dataclass
class _Stats:
    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0.0))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **inc: float) -> None:
        with self.lock:
            for k, v in inc.items():
                self.values[k] += v

    def take(self) -> dict[str, float]:
        with self.lock:
            out = self.values
            self.values = dict.fromkeys(STAT_KEYS, 0.0)
        return out


class VLLMWorker:
    """Loads and stores of one vLLM worker's KV cache, layer by layer."""

    def __init__(self, engine: "CacheEngine", kv: PagedKV, layer_names: Sequence[str], *,
                 async_save: bool = True) -> None:
        self.engine = engine
        self.kv = kv
        self.layer_names = list(layer_names)
        self.layer_index = {name: i for i, name in enumerate(self.layer_names)}
        self.async_save = async_save
        self.plan = StepPlan()
        self._loads: list[tuple[LoadSpec, "LayerwiseRetrieve"]] = []
        self._stores: list[tuple[SaveSpec, "LayerwiseStore"]] | None = None
        self._store_started = 0.0
        self._lock = threading.Condition()
        self._save_reqs: set[str] = set()  # requests whose stores the scheduler may wait for
        self._pending_saves: dict[str, int] = {}
        self._finished: set[str] = set()  # finished by vLLM, stores maybe still running
        self._recv_done: set[str] = set()
        self._recv_inflight: set[str] = set()
        self._errors: set[int] = set()
        self._stats = _Stats()
        fast = engine.tiers.tiers[0].store if engine.tiers.tiers else None
        self._memory = fast if hasattr(fast, "open_journal") else None
        self._journal = self._memory.open_journal() if self._memory is not None else None  # type: ignore[union-attr]
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="lmcache-vllm-load")
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="lmcache-vllm-save")
        self._closed = False

    # -- per step ------------------------------------------------------------------------------
    def bind(self, plan: StepPlan) -> None:
        """Take this step's plan (before the forward pass)."""
        self.plan = plan
        self._stores = None
        with self._lock:
            for spec in plan.saves:
                self._save_reqs.add(spec.req_id)

    def _retrieve_args(self, spec: LoadSpec) -> dict[str, Any]:
        import torch

        return {"block_ids": torch.as_tensor(spec.block_ids, dtype=torch.int64), "max_tokens": spec.end,
                "skip_tokens": spec.start, "extras": spec.extras}

    def start_load(self) -> None:
        """Start this step's loads: async ones on a thread, sync ones fetched to host now."""
        for spec in self.plan.loads:
            if spec.is_async:
                with self._lock:
                    self._recv_inflight.add(spec.req_id)
                self._loader.submit(self._async_load, spec, self.plan.null_block)
                continue
            t0 = time.perf_counter()
            try:
                task = self.engine.start_retrieve(spec.token_ids, self.kv, **self._retrieve_args(spec))
            except Exception:  # noqa: BLE001 - a failed load is recomputed, never a crash
                logger.exception("lmcache-core: load of request %s failed", spec.req_id)
                self._record_load(spec, 0, time.perf_counter() - t0)
                continue
            self._loads.append((spec, task))
            self._stats.add(load_seconds=time.perf_counter() - t0)

    def _async_load(self, spec: LoadSpec, null_block: int) -> None:
        t0 = time.perf_counter()
        loaded = 0
        try:
            loaded = self.engine.retrieve(spec.token_ids, self.kv, **self._retrieve_args(spec)).hit_tokens
        except Exception:  # noqa: BLE001
            logger.exception("lmcache-core: async load of request %s failed", spec.req_id)
        finally:
            self._record_load(spec, loaded, time.perf_counter() - t0, null_block)
            with self._lock:
                self._recv_inflight.discard(spec.req_id)
                self._recv_done.add(spec.req_id)

    def _record_load(self, spec: LoadSpec, loaded: int, seconds: float, null_block: int | None = None) -> None:
        """Count a finished load; a short one marks the blocks it did not fill as failed."""
        failed = max(0, spec.end - max(loaded, spec.start))
        self._stats.add(load_requests=1, loaded_tokens=max(0, min(loaded, spec.end) - spec.start),
                        load_failed_tokens=failed, load_seconds=seconds)
        if failed:
            bs = self.kv.block_size
            first = max(loaded, spec.start) // bs
            last = (spec.end - 1) // bs
            bad = set(spec.block_ids[first : last + 1])
            bad.discard(self.plan.null_block if null_block is None else null_block)
            logger.warning("lmcache-core: request %s loaded %d of %d promised tokens; %d block(s) to recompute",
                           spec.req_id, max(loaded, spec.start) - spec.start, spec.num_tokens, len(bad))
            with self._lock:
                self._errors |= bad
        else:
            logger.info("lmcache-core: request %s loaded %d tokens", spec.req_id, spec.num_tokens)

    def wait_layer(self, name: str) -> None:
        """Block until layer ``name`` of every sync load is in the engine's cache. A load that
        fails here is given up: its blocks are reported for recompute, its buffers released."""
        i = self.layer_index.get(name)
        if i is None or not self._loads:
            return
        failed = []
        for n, (spec, task) in enumerate(self._loads):
            try:
                task.wait_layer(i)
            except Exception:  # noqa: BLE001 - never into vLLM's forward pass
                logger.exception("lmcache-core: load of request %s failed at layer %s", spec.req_id, name)
                failed.append(n)
        for n in reversed(failed):
            spec, task = self._loads.pop(n)
            self._give_up_load(spec, task)

    def _give_up_load(self, spec: LoadSpec, task: "LayerwiseRetrieve") -> None:
        try:
            task.finish()  # waits for queued copies, then releases the host chunks
        except Exception:  # noqa: BLE001
            logger.exception("lmcache-core: releasing the failed load of request %s", spec.req_id)
            task._release()
        self._record_load(spec, 0, 0.0)

    def save_layer(self, name: str) -> None:
        """Gather layer ``name`` of this step's stores (its KV is final once the layer ran)."""
        i = self.layer_index.get(name)
        if i is None or not self.plan.saves:
            return
        if self._stores is None:
            self._store_started = time.perf_counter()
            self._stores = []
            for spec in self.plan.saves:
                before = self.engine.dropped_stores
                try:
                    task = self.engine.start_store(spec.token_ids, self.kv, spec.block_ids, extras=spec.extras,
                                                   skip_tokens=spec.start)
                except Exception:  # noqa: BLE001 - a failed store is a future miss
                    logger.exception("lmcache-core: store of request %s failed", spec.req_id)
                    self._stats.add(store_errors=1)
                    continue
                if self.engine.dropped_stores != before:
                    self._stats.add(dropped_stores=1)
                self._stores.append((spec, task))
        failed = []
        for n, (spec, task) in enumerate(self._stores):
            try:
                task.save_layer(i)
            except Exception:  # noqa: BLE001 - a failed store is a future miss, never a crash
                logger.exception("lmcache-core: store of request %s failed at layer %s", spec.req_id, name)
                failed.append(n)
        for n in reversed(failed):
            spec, task = self._stores.pop(n)
            self._stats.add(store_errors=1)
            try:
                task.abort()
            except Exception:  # noqa: BLE001
                logger.exception("lmcache-core: aborting the store of request %s", spec.req_id)

    def wait_for_save(self) -> None:
        """End of step: settle sync loads, hand stores to the background writer."""
        loads, self._loads = self._loads, []
        for spec, task in loads:
            try:
                task.finish()
                self._record_load(spec, task.hit_tokens, 0.0)
            except Exception:  # noqa: BLE001
                logger.exception("lmcache-core: load of request %s failed", spec.req_id)
                self._record_load(spec, 0, 0.0)
        stores, self._stores = self._stores or [], None
        for spec, task in stores:
            if not all(task.saved):
                try:
                    task.abort()  # a step without a forward pass (dummy run): nothing to store
                except Exception:  # noqa: BLE001
                    logger.exception("lmcache-core: aborting the store of request %s", spec.req_id)
                continue
            with self._lock:
                self._pending_saves[spec.req_id] = self._pending_saves.get(spec.req_id, 0) + 1
            if self.async_save:
                self._saver.submit(self._finish_store, spec, task)
            else:
                self._finish_store(spec, task)

    def _finish_store(self, spec: SaveSpec, task: "LayerwiseStore") -> None:
        tokens = 0
        try:
            tokens = task.finish()
        except Exception:  # noqa: BLE001
            logger.exception("lmcache-core: store of request %s failed", spec.req_id)
            self._stats.add(store_errors=1)
        finally:
            self._stats.add(store_requests=1, stored_tokens=tokens,
                            store_seconds=time.perf_counter() - self._store_started)
            with self._lock:
                n = self._pending_saves.get(spec.req_id, 1) - 1
                if n <= 0:
                    self._pending_saves.pop(spec.req_id, None)
                else:
                    self._pending_saves[spec.req_id] = n
                self._lock.notify_all()

    def wait_requests(self, req_ids: Sequence[str], timeout: float | None = None) -> bool:
        """Block until no store of ``req_ids`` still reads their blocks (preemption)."""
        wanted = set(req_ids)
        with self._lock:
            return self._lock.wait_for(lambda: not wanted & set(self._pending_saves), timeout)

    def get_finished(self, finished_req_ids: Sequence[str]) -> tuple[set[str], set[str]]:
        """``(sending, recving)``: finished requests whose stores are done, async loads done."""
        with self._lock:
            self._finished |= set(finished_req_ids) & self._save_reqs
            sending = {r for r in self._finished if r not in self._pending_saves}
            self._finished -= sending
            self._save_reqs -= sending
            recving, self._recv_done = self._recv_done, set()
        return sending, recving

    def load_errors(self) -> set[int]:
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

    def presence_update(self) -> tuple[list[bytes], list[bytes], list[bytes]] | None:
        """``(added, removed, reset namespaces)`` of this worker's memory tier since the last call,
        for the scheduler's :class:`PresenceMirror`; None when nothing changed."""
        if self._journal is None:
            return None
        added, removed, reset = self._journal.drain()
        resets: list[bytes] = []
        if reset:  # the journal overflowed: send the whole content again
            resets = [self.engine.namespace.id]
            added = [k.to_bytes() for k in self._memory.snapshot_keys()]  # type: ignore[union-attr]
            removed = []
        if not (added or removed or resets):
            return None
        return added, removed, resets

    def take_stats(self) -> dict[str, float]:
        return self._stats.take()

    def close(self, timeout: float = 60.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._loader.shutdown(wait=True)
        self._saver.shutdown(wait=True)
        self.engine.flush(timeout)

    def describe(self) -> dict[str, Any]:
        return {"layout": self.kv.kind, "block_size": self.kv.block_size,
                "geometry": self.kv.geometry.signature, "layers": len(self.layer_names),
                "device": self.engine.device.name}
