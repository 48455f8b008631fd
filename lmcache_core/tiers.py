"""The tier stack: fastest tier first, write-through without copies, promotion, fault isolation.

Writes: the fastest tier (process memory) takes a counted reference at once;
every slower tier gets the same buffer through a bounded queue served by
writer threads, and the buffer is released when the last write finishes.
A full queue drops the store (counted), it never stalls the engine.

Reads: chunk ``i`` comes from the fastest tier that has it; hits from slower
tiers are verified, then promoted into the fastest tier (same buffer, no copy).

Codecs: a slow tier may name a codec chain (``disk:///x?codec=lossless``); its writer threads
code each chunk before the store sees it, and reads decode and verify it (a chunk that does
not decode or authenticate is a corrupt chunk: counted, deleted, a miss). A lossy chain's
chunks live under their own namespace (:func:`lmcache_core.codecs.lossy_namespace`), so an
exact tier or another engine never reads them as exact; a hit from a lossy tier is not
promoted, and a later store of the same key (KV the engine got from that hit) goes to the
lossy tiers only.

Faults: any exception from a store is a miss, counted by tier and operation,
and logged. After repeated failures, or at once after a timeout, a tier backs
off (skipped, re-probed with ``health()`` at growing intervals) so a dead or
hung server costs nothing per request, and comes back by itself. A write the
server refuses while it still answers (out of memory, read-only) is a dropped
store, not a tier-down event: reads go on. Stores a backed-off tier missed are
remembered (bounded) and written through when a later store finds the chunk in
the memory tier.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

from . import codecs
from .chunk import ChunkBuffer, encode_chunk, encode_coded
from .errors import ChunkError, ConfigError
from .keys import ChunkKey
from .metrics import Metrics
from .storage import Store

logger = logging.getLogger(__name__)
T = TypeVar("T")

FAILURES_BEFORE_BACKOFF = 3
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
MISSED_MAX = 16384  # per tier: keys of stores it missed while backing off, written through later
LOSSY_NS_MAX = 1024  # per tier: cached lossy namespace ids
REFUSED_LOG_S = 30.0  # at most one log line per tier per this many seconds for refused writes

# What a store failure means for the tier (``Store.classify_error`` may say; see ``fault_kind``).
TIMEOUT = "timeout"  # the server did not answer in time: back off at once
REFUSED = "refused"  # the server answered with an error (out of memory, read-only): the tier is up
ERROR = "error"  # anything else: back off after FAILURES_BEFORE_BACKOFF in a row


def fault_kind(store: Store, exc: BaseException) -> str:
    """``TIMEOUT``, ``REFUSED`` or ``ERROR`` for an exception ``store`` raised. A store may
    define ``classify_error(exc) -> str | None`` (its client's timeout and error-reply types);
    otherwise a builtin ``TimeoutError`` is a timeout and everything else an error."""
    classify = getattr(store, "classify_error", None)
    if classify is not None:
        try:
            kind = classify(exc)
        except Exception:  # noqa: BLE001 - a broken classifier must not hide the failure
            logger.exception("tier %s classify_error failed", store.name)
            kind = None
        if kind in (TIMEOUT, REFUSED, ERROR):
            return kind
    return TIMEOUT if isinstance(exc, TimeoutError) else ERROR


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
    drop_logged: bool = False  # a skipped store was logged in this back-off period
    refused_logged_at: float = 0.0
    #: chunks whose store this tier missed while backing off (oldest first, at most MISSED_MAX)
    missed: OrderedDict[ChunkKey, None] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    chain: "codecs.Chain | None" = None  # what the writer threads code chunks with (codec= option)
    lossy_ns: dict[bytes, bytes] = field(default_factory=dict)  # exact namespace id -> lossy one

    @property
    def name(self) -> str:
        return self.store.name

    @property
    def lossy(self) -> bool:
        return self.chain is not None and not self.chain.lossless

    def key(self, key: ChunkKey) -> ChunkKey:
        """The key this tier keeps ``key`` under (its own namespace for a lossy codec)."""
        if not self.lossy:
            return key
        assert self.chain is not None
        ns = self.lossy_ns.get(key.namespace)
        if ns is None:
            ns = codecs.lossy_namespace(key.namespace, self.chain)
            if len(self.lossy_ns) < LOSSY_NS_MAX:
                self.lossy_ns[key.namespace] = ns
        return ChunkKey(ns, key.digest, key.num_tokens)

    def keys(self, keys: Sequence[ChunkKey]) -> list[ChunkKey]:
        return list(keys) if not self.lossy else [self.key(k) for k in keys]


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
            self.tiers.append(Tier(store, fast, writer, chain=self._chain(store, fast)))
            self.metrics.healthy.labels(store.name).set(1)
        #: keys last served by a lossy tier (oldest first, bounded): their KV in the engine is not
        #: exact, so a store of them goes to lossy tiers only
        self._lossy_served: OrderedDict[ChunkKey, None] = OrderedDict()
        self._lossy_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(reader_threads, thread_name_prefix="lmcache-r")
        self._prober = ThreadPoolExecutor(1, thread_name_prefix="lmcache-probe")
        self._idle = threading.Condition()
        self._pending = 0
        self._closed = False
        for tier in self.tiers:
            self._check_health(tier, at_start=True)

    @staticmethod
    def _chain(store: Store, fast: bool) -> "codecs.Chain | None":
        spec = getattr(store, "codec", "") or ""
        if not spec:
            return None
        if fast:
            raise ConfigError(f"tier {store.name}: codec={spec} on a tier that keeps buffers in place; the "
                              f"memory tier holds exact chunks, put codec= on disk or remote tiers")
        options = dict(getattr(store.context, "options", {}) or {})
        chain = codecs.resolve(spec, options)
        if chain is not None and any(getattr(c, "encrypts", False) for c in chain.codecs):
            from .codecs.aesgcm import bind_secret, read_secret

            path = getattr(store, "codec_key_file", "")
            if not path:
                raise ConfigError(f"tier {store.name}: codec={spec} encrypts and needs a secret; add "
                                  f"codec_key_file=/path/to/a/file of at least 16 random bytes to its URL")
            bind_secret(store.context.pool, read_secret(path))
        return chain

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
        tier.drop_logged = False
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
        except BaseException:  # noqa: BLE001 - on the probe thread nobody else would see it
            logger.exception("tier %s background health probe failed", tier.name)
            self.metrics.errors.labels(tier.name, "health").inc()
        finally:
            tier.probing = False

    def _failed(self, tier: Tier, op: str, exc: BaseException, background: bool = False) -> str:
        """Count and log one failed store call; a timeout backs the tier off at once, other
        errors after FAILURES_BEFORE_BACKOFF in a row, a refusal never. Call it from the
        ``except`` block (background failures are logged with their traceback)."""
        kind = fault_kind(tier.store, exc)
        self.metrics.errors.labels(tier.name, op).inc()
        if kind == REFUSED:  # the server answers: not a tier-down event
            now = time.monotonic()
            with tier.lock:
                tier.failures = 0
                quiet = now - tier.refused_logged_at < REFUSED_LOG_S and tier.refused_logged_at > 0
                if not quiet:
                    tier.refused_logged_at = now
            if not quiet:
                logger.warning("tier %s refused %s: %s: %s (the tier stays in use; such refusals are "
                               "logged at most every %.0fs and counted in lmcache_errors)", tier.name, op,
                               type(exc).__name__, exc, REFUSED_LOG_S)
            return kind
        if background:
            logger.exception("tier %s background %s failed: %s: %s", tier.name, op, type(exc).__name__, exc)
        else:
            logger.warning("tier %s %s failed: %s: %s", tier.name, op, type(exc).__name__, exc)
        with tier.lock:
            tier.failures += 1
            if not tier.down_until and (kind == TIMEOUT or tier.failures >= FAILURES_BEFORE_BACKOFF):
                self._mark_down(tier, f"{op} timed out" if kind == TIMEOUT else f"{tier.failures} failures in a row")
        return kind

    def _call(self, tier: Tier, op: str, fn: Callable[[], T], default: T) -> T:
        if not self._usable(tier):
            return default
        try:
            result = fn()
        except ChunkError:
            raise
        except Exception as exc:  # noqa: BLE001 - a store failure is a miss, never a crash
            self._failed(tier, op, exc)
            return default
        if tier.failures:
            tier.failures = 0
        return result

    def _dropped(self, tier: Tier, key: ChunkKey, why: str, remember: bool) -> None:
        """A store ``tier`` did not take: counted in ``lmcache_dropped_stores{tier}``, logged once
        per back-off period; with ``remember`` it is written through by a later store (see
        ``_write_behind``)."""
        self.metrics.dropped.labels(tier.name).inc()
        with tier.lock:
            first = not tier.drop_logged
            tier.drop_logged = True
            if remember:
                self._remember(tier, key)
        if first:
            logger.warning("tier %s %s: dropping its stores until it is back (counted in "
                           "lmcache_dropped_stores{tier=\"%s\"}; chunks still in memory are written "
                           "through later)", tier.name, why, tier.name)

    # -- lookup ----------------------------------------------------------------------
    def lookup(self, keys: Sequence[ChunkKey], *, fast_only: bool = False) -> Presence:
        """Longest prefix of ``keys`` present in any tier, each attributed to the fastest.
        ``fast_only`` asks only the tiers that hold buffers in this process (no I/O).
        Each tier is asked once about every key the faster tiers lack; a tier that has all
        or none of them costs no per-key Python work here."""
        n = len(keys)
        where: list[str | None] = [None] * n
        missing: list[int] | None = None if n else []  # indices no tier has yet; None: all of them
        for tier in self.tiers:
            if fast_only and not tier.fast:
                continue
            if missing is not None and not missing:
                break
            ask = keys if missing is None else [keys[i] for i in missing]
            present = self._call(tier, "exists", lambda t=tier, a=ask: t.store.exists(t.keys(a)), [False] * len(ask))
            if not isinstance(present, list):
                present = list(present)
            if len(present) == len(ask):
                if all(present):
                    if missing is None:
                        where = [tier.name] * n
                    else:
                        for i in missing:
                            where[i] = tier.name
                    missing = []
                    continue
                if not any(present):
                    continue
            still = []  # a short answer: zip leaves its tail out, those keys stay misses (where: None)
            for i, ok in zip(range(n) if missing is None else missing, present):
                if ok:
                    where[i] = tier.name
                else:
                    still.append(i)
            missing = still
        hits = where.index(None) if None in where else n  # the first index no tier has
        if fast_only and hits:
            self._write_behind(keys[:hits])
        return Presence(hits, tuple(where[:hits]))  # type: ignore[arg-type]

    @staticmethod
    def _remember(tier: Tier, key: ChunkKey) -> None:
        """Note that ``tier`` lacks ``key`` (caller holds ``tier.lock``); the oldest go past MISSED_MAX."""
        tier.missed[key] = None
        tier.missed.move_to_end(key)
        while len(tier.missed) > MISSED_MAX:
            tier.missed.popitem(last=False)

    def _write_behind(self, keys: Sequence[ChunkKey]) -> None:
        """Queue writes of ``keys`` (held by a fast tier) to each slower tier that missed their
        store while it backed off and is usable again. A store asks only the fast tiers what is
        cached (``lookup(fast_only=True)``), so without this such a tier would never get them."""
        for tier in self.tiers:
            if tier.fast or not tier.missed:
                continue
            with tier.lock:
                due = [k for k in keys if k in tier.missed]
            if not due or not self._usable(tier):
                continue
            for key in due:
                chunk = self._fast_get(key)
                with tier.lock:
                    tier.missed.pop(key, None)
                if chunk is None:  # evicted meanwhile: the store gathers and writes it again
                    continue
                try:
                    self._enqueue(tier, key, chunk)
                finally:
                    chunk.release()

    def _fast_get(self, key: ChunkKey) -> ChunkBuffer | None:
        for tier in self.tiers:
            if not tier.fast:
                continue
            try:
                chunk = self._call(tier, "get", lambda t=tier: t.store.get(key), None)
            except ChunkError:
                continue
            if chunk is not None:
                return chunk
        return None

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        for tier in self.tiers:
            if tier.store.capabilities.pinning:
                self._call(tier, "pin", lambda t=tier: t.store.pin(t.keys(keys)), None)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        for tier in self.tiers:
            if tier.store.capabilities.pinning:
                self._call(tier, "unpin", lambda t=tier: t.store.unpin(t.keys(keys)), None)

    # -- reads ------------------------------------------------------------------------
    def get(self, key: ChunkKey) -> tuple[ChunkBuffer, str] | None:
        """The chunk from the fastest tier that holds a valid copy (caller releases it)."""
        for i, tier in enumerate(self.tiers):
            tkey = tier.key(key)
            try:
                chunk = self._call(tier, "get", lambda t=tier: t.store.get(tkey), None)
            except ChunkError as exc:
                self.metrics.corrupt.labels(tier.name).inc()
                logger.warning("tier %s holds a bad chunk %s (%s); deleting it", tier.name, tkey, exc)
                self._call(tier, "delete", lambda t=tier: t.store.delete([tkey]), 0)
                continue
            if chunk is None:
                continue
            self.metrics.bytes.labels(tier.name, "read").inc(chunk.header.image_len)
            if tier.lossy:  # never promoted into exact tiers; the engine's copy is not exact either
                with self._lossy_lock:
                    self._lossy_served[key] = None
                    self._lossy_served.move_to_end(key)
                    while len(self._lossy_served) > MISSED_MAX:
                        self._lossy_served.popitem(last=False)
                return chunk, tier.name
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
        # What the in-process tier holds is a reference: taken inline (a thread hop per chunk
        # costs more than the lookup); the rest is read in parallel.
        out: list[tuple[ChunkBuffer, str] | None] = [None] * len(keys)
        first = self.tiers[0] if self.tiers and self.tiers[0].fast and not self.tiers[0].lossy else None
        rest: list[int] = []
        nbytes = 0
        for i, k in enumerate(keys):
            chunk = None
            if first is not None and self._usable(first):
                try:
                    chunk = first.store.get(first.key(k))
                except Exception:  # noqa: BLE001 - left to the full path, which counts and deletes
                    chunk = None
            if chunk is not None:
                nbytes += chunk.header.image_len
                out[i] = (chunk, first.name)  # type: ignore[union-attr]
            else:
                rest.append(i)
        if nbytes:
            self.metrics.bytes.labels(first.name, "read").inc(nbytes)  # type: ignore[union-attr]
        futures = [(i, self._readers.submit(self.get, keys[i])) for i in rest]
        for i, f in futures:
            out[i] = f.result()
        return out

    # -- writes -------------------------------------------------------------------------
    def put(self, key: ChunkKey, chunk: ChunkBuffer) -> None:
        """Write-through to every tier. Takes no ownership: the caller still releases ``chunk``."""
        self.metrics.stored_tokens.inc(chunk.num_tokens)
        with self._lossy_lock:
            inexact = key in self._lossy_served
        for tier in self.tiers:
            if inexact and not tier.lossy:
                continue  # KV the engine loaded from a lossy tier is never stored as exact
            if tier.fast:
                if self._call(tier, "put", lambda t=tier: t.store.put(key, chunk), False) and \
                        not tier.store.reports_writes:
                    self.metrics.bytes.labels(tier.name, "write").inc(chunk.header.image_len)
                continue
            if not self._usable(tier):
                self._dropped(tier, key, "is backing off", remember=True)
                continue
            self._enqueue(tier, key, chunk)

    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkBuffer]]) -> None:
        """:meth:`put` for each item, in order (one failed put does not stop the rest)."""
        for key, chunk in items:
            try:
                self.put(key, chunk)
            except Exception:  # noqa: BLE001 - one failed put is one future miss
                logger.exception("storing chunk %s failed; not storing it", key)

    def _enqueue(self, tier: Tier, key: ChunkKey, chunk: ChunkBuffer) -> bool:
        """Queue a write of ``chunk`` to the slow ``tier`` (bounded); False if dropped."""
        with tier.lock:
            tier.missed.pop(key, None)
            if tier.queued >= self.queue_size:
                self.metrics.dropped.labels(tier.name).inc()
                logger.info("tier %s write queue full (%d); dropping store of %s",
                            tier.name, self.queue_size, key)
                return False
            tier.queued += 1
        self.metrics.queued.labels(tier.name).set(tier.queued)
        chunk.retain()
        with self._idle:
            self._pending += 1
        assert tier.writer is not None
        try:
            tier.writer.submit(self._write, tier, key, chunk)
        except BaseException:  # noqa: BLE001 - e.g. the pool stopped at interpreter exit
            self.metrics.errors.labels(tier.name, "put").inc()
            self.metrics.dropped.labels(tier.name).inc()
            logger.exception("tier %s: could not queue the store of %s; dropped", tier.name, key)
            self._done(tier, chunk)
            return False
        return True

    def _write(self, tier: Tier, key: ChunkKey, chunk: ChunkBuffer) -> None:
        """Writer thread: one queued store. Every failure is logged and counted here (nobody
        reads this future)."""
        try:
            if not self._usable(tier):
                self._dropped(tier, key, "is backing off", remember=True)
                return
            coded = self._code(tier, key, chunk)
            if coded is None:
                return
            tkey, tchunk = coded
            try:
                try:
                    ok = tier.store.put(tkey, tchunk)
                finally:
                    if tchunk is not chunk:
                        tchunk.release()
            except Exception as exc:  # noqa: BLE001 - a ChunkError from a put is still only a failed write
                if self._failed(tier, "put", exc, background=True) == REFUSED:
                    self._dropped(tier, key, f"refused a write ({type(exc).__name__}: {exc})", remember=False)
                else:
                    with tier.lock:
                        self._remember(tier, key)
                return
            if tier.failures:
                tier.failures = 0
            if ok and not getattr(tier.store, "reports_writes", False):
                self.metrics.bytes.labels(tier.name, "write").inc(tchunk.header.image_len)
        except BaseException:  # noqa: BLE001 - even at interpreter exit, a lost store leaves a line
            self.metrics.errors.labels(tier.name, "put").inc()
            logger.exception("tier %s background put of %s failed", tier.name, key)
        finally:
            self._done(tier, chunk)

    def _code(self, tier: Tier, key: ChunkKey, chunk: ChunkBuffer) -> tuple[ChunkKey, ChunkBuffer] | None:
        """``(key, chunk)`` as ``tier`` keeps them: coded by its chain (a new buffer the caller
        releases), or as given. None when coding failed: a dropped store, counted and logged;
        the tier itself is fine."""
        if tier.chain is None:
            return key, chunk
        tkey = tier.key(key)
        try:
            if chunk.header.codec != "none":  # coded on the device (kv_codec): only encryption applies
                return key, encode_coded(chunk, tier.chain, tier.store.context.pool)
            return tkey, encode_chunk(chunk, tier.chain, tier.store.context.pool, tkey)
        except Exception as exc:  # noqa: BLE001 - a chunk the codec cannot take is one dropped store
            self.metrics.errors.labels(tier.name, "encode").inc()
            self._dropped(tier, key, f"cannot code chunks with {tier.chain.name} ({type(exc).__name__}: {exc})",
                          remember=False)
            return None

    def _done(self, tier: Tier, chunk: ChunkBuffer) -> None:
        try:
            chunk.release()
        except BaseException:  # noqa: BLE001
            self.metrics.errors.labels(tier.name, "put").inc()
            logger.exception("tier %s: releasing a written chunk failed", tier.name)
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
        return sum(self._call(t, "delete", lambda t=t: t.store.delete(t.keys(keys)), 0) for t in self.tiers)

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
