"""The tier stack: fastest tier first, write-through without copies, promotion, fault isolation.

Writes: the fastest tier (process memory) takes a counted reference at once;
every slower tier gets the same buffer through a bounded queue served by
writer threads, and the buffer is released when the last write finishes.
A full queue drops the store (counted), it never stalls the engine.

Reads: chunk ``i`` comes from the fastest tier that has it; hits from slower
tiers are verified, then promoted into the fastest tier (same buffer, no copy).

Faults: any exception from a store is a miss, counted by tier and operation,
and logged. After repeated failures a tier backs off (skipped, re-probed with
``health()`` at growing intervals) so a dead server costs nothing per request,
and comes back by itself.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

from .chunk import ChunkBuffer
from .errors import ChunkError
from .keys import ChunkKey
from .metrics import Metrics
from .storage import Store

logger = logging.getLogger(__name__)
T = TypeVar("T")

FAILURES_BEFORE_BACKOFF = 3
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass
class Tier:
    store: Store
    fast: bool  # written synchronously (holds buffers)
    writer: ThreadPoolExecutor | None = None
    queued: int = 0
    failures: int = 0
    down_until: float = 0.0
    backoff: float = BACKOFF_START_S
    probing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.store.name


@dataclass(frozen=True)
class Presence:
    """Result of a prefix lookup: how many leading chunks exist, and where each one is."""

    hits: int
    tiers: tuple[str, ...]  # tier name per hit chunk (the fastest holding it)


class TierStack:
    def __init__(self, stores: Sequence[Store], metrics: Metrics | None = None, *, queue_size: int = 64,
                 writer_threads: int = 2, reader_threads: int = 4, promote: bool = True) -> None:
        if not stores:
            raise ValueError("a tier stack needs at least one store")
        self.metrics = metrics or Metrics()
        self.queue_size = queue_size
        self.promote = promote
        self.tiers: list[Tier] = []
        for store in stores:
            fast = store.capabilities.holds_buffers
            writer = None if fast else ThreadPoolExecutor(writer_threads, thread_name_prefix=f"lmcache-w-{store.name}")
            self.tiers.append(Tier(store, fast, writer))
            self.metrics.healthy.labels(store.name).set(1)
        self._readers = ThreadPoolExecutor(reader_threads, thread_name_prefix="lmcache-r")
        self._prober = ThreadPoolExecutor(1, thread_name_prefix="lmcache-probe")
        self._idle = threading.Condition()
        self._pending = 0
        self._closed = False
        for tier in self.tiers:
            self._check_health(tier, at_start=True)

    # -- fault isolation ------------------------------------------------------------
    def _check_health(self, tier: Tier, at_start: bool = False) -> None:
        try:
            h = tier.store.health()
            ok, reason = h.ok, h.reason
        except Exception as exc:  # noqa: BLE001 - any probe failure means unhealthy
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        if ok:
            if tier.down_until:
                logger.warning("tier %s is back", tier.name)
            tier.failures, tier.down_until, tier.backoff = 0, 0.0, BACKOFF_START_S
            self.metrics.healthy.labels(tier.name).set(1)
        else:
            self._mark_down(tier, reason, at_start)

    def _mark_down(self, tier: Tier, reason: str, at_start: bool = False) -> None:
        tier.down_until = time.monotonic() + tier.backoff
        logger.warning("tier %s is unavailable%s (%s); running on the other tiers, retrying in %.1fs",
                       tier.name, " at start" if at_start else "", reason, tier.backoff)
        tier.backoff = min(tier.backoff * 2, BACKOFF_MAX_S)
        self.metrics.healthy.labels(tier.name).set(0)

    def _usable(self, tier: Tier) -> bool:
        """False while a tier backs off. When its back-off ends, a background probe calls
        ``health()``, so a hung server never holds up the engine's thread."""
        if not tier.down_until:
            return True
        if time.monotonic() < tier.down_until:
            return False
        with tier.lock:
            if tier.probing or time.monotonic() < tier.down_until:
                return False
            tier.probing = True
        try:
            self._prober.submit(self._probe, tier)
        except RuntimeError:  # shutting down
            tier.probing = False
        return False

    def _probe(self, tier: Tier) -> None:
        try:
            self._check_health(tier)
        finally:
            tier.probing = False

    def _call(self, tier: Tier, op: str, fn: Callable[[], T], default: T) -> T:
        if not self._usable(tier):
            return default
        try:
            result = fn()
        except ChunkError:
            raise
        except Exception as exc:  # noqa: BLE001 - a store failure is a miss, never a crash
            self.metrics.errors.labels(tier.name, op).inc()
            logger.warning("tier %s %s failed: %s: %s", tier.name, op, type(exc).__name__, exc)
            with tier.lock:
                tier.failures += 1
                if tier.failures >= FAILURES_BEFORE_BACKOFF and not tier.down_until:
                    self._mark_down(tier, f"{tier.failures} failures in a row")
            return default
        if tier.failures:
            tier.failures = 0
        return result

    # -- lookup ----------------------------------------------------------------------
    def lookup(self, keys: Sequence[ChunkKey], *, fast_only: bool = False) -> Presence:
        """Longest prefix of ``keys`` present in any tier, each attributed to the fastest.
        ``fast_only`` asks only the tiers that hold buffers in this process (no I/O)."""
        where: list[str | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for tier in self.tiers:
            if fast_only and not tier.fast:
                continue
            if not missing:
                break
            present = self._call(tier, "exists", lambda t=tier: t.store.exists([keys[i] for i in missing]),
                                 [False] * len(missing))
            still = []
            for i, ok in zip(missing, present):
                if ok:
                    where[i] = tier.name
                else:
                    still.append(i)
            missing = still
        hits = 0
        for w in where:
            if w is None:
                break
            hits += 1
        return Presence(hits, tuple(w for w in where[:hits] if w is not None))

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        for tier in self.tiers:
            if tier.store.capabilities.pinning:
                self._call(tier, "pin", lambda t=tier: t.store.pin(keys), None)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        for tier in self.tiers:
            if tier.store.capabilities.pinning:
                self._call(tier, "unpin", lambda t=tier: t.store.unpin(keys), None)

    # -- reads ------------------------------------------------------------------------
    def get(self, key: ChunkKey) -> tuple[ChunkBuffer, str] | None:
        """The chunk from the fastest tier that holds a valid copy (caller releases it)."""
        for i, tier in enumerate(self.tiers):
            try:
                chunk = self._call(tier, "get", lambda t=tier: t.store.get(key), None)
            except ChunkError as exc:
                self.metrics.corrupt.labels(tier.name).inc()
                logger.warning("tier %s holds a bad chunk %s (%s); deleting it", tier.name, key, exc)
                self._call(tier, "delete", lambda t=tier: t.store.delete([key]), 0)
                continue
            if chunk is None:
                continue
            self.metrics.bytes.labels(tier.name, "read").inc(chunk.header.image_len)
            if i > 0 and self.promote:
                for upper in self.tiers[:i]:
                    if upper.fast:
                        self._call(upper, "put", lambda u=upper: u.store.put(key, chunk), False)
            return chunk, tier.name
        return None

    def get_many(self, keys: Sequence[ChunkKey]) -> list[tuple[ChunkBuffer, str] | None]:
        """Fetch in parallel; results in order. Stops being useful at the first miss, but
        fetches all so a caller can decide (each result must be released)."""
        if len(keys) <= 1:
            return [self.get(k) for k in keys]
        futures = [self._readers.submit(self.get, k) for k in keys]
        return [f.result() for f in futures]

    # -- writes -------------------------------------------------------------------------
    def put(self, key: ChunkKey, chunk: ChunkBuffer) -> None:
        """Write-through to every tier. Takes no ownership: the caller still releases ``chunk``."""
        self.metrics.stored_tokens.inc(chunk.num_tokens)
        for tier in self.tiers:
            if tier.fast:
                if self._call(tier, "put", lambda t=tier: t.store.put(key, chunk), False) and \
                        not tier.store.reports_writes:
                    self.metrics.bytes.labels(tier.name, "write").inc(chunk.header.image_len)
                continue
            if not self._usable(tier):
                continue
            with tier.lock:
                if tier.queued >= self.queue_size:
                    self.metrics.dropped.labels(tier.name).inc()
                    logger.info("tier %s write queue full (%d); dropping store of %s",
                                tier.name, self.queue_size, key)
                    continue
                tier.queued += 1
            self.metrics.queued.labels(tier.name).set(tier.queued)
            chunk.retain()
            with self._idle:
                self._pending += 1
            assert tier.writer is not None
            tier.writer.submit(self._write, tier, key, chunk)

    def _write(self, tier: Tier, key: ChunkKey, chunk: ChunkBuffer) -> None:
        try:
            if self._call(tier, "put", lambda: tier.store.put(key, chunk), False) and \
                    not getattr(tier.store, "reports_writes", False):
                self.metrics.bytes.labels(tier.name, "write").inc(chunk.header.image_len)
        except Exception:  # noqa: BLE001 - ChunkError from a put is still only a failed write
            self.metrics.errors.labels(tier.name, "put").inc()
            logger.exception("tier %s put of %s failed", tier.name, key)
        finally:
            chunk.release()
            with tier.lock:
                tier.queued -= 1
            self.metrics.queued.labels(tier.name).set(tier.queued)
            with self._idle:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes finish; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return sum(self._call(t, "delete", lambda t=t: t.store.delete(keys), 0) for t in self.tiers)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush(timeout=30)
        for tier in self.tiers:
            if tier.writer is not None:
                tier.writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._prober.shutdown(wait=False, cancel_futures=True)
        for tier in self.tiers:
            try:
                tier.store.close()
            except Exception as exc:  # noqa: BLE001
                logger.warning("closing tier %s: %s", tier.name, exc)

    def by_name(self, name: str) -> Store:
        for tier in self.tiers:
            if tier.name == name:
                return tier.store
        raise KeyError(name)

    def futures_pending(self) -> int:
        with self._idle:
            return self._pending


__all__ = ["Presence", "Tier", "TierStack", "Future"]
