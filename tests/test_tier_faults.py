"""The tier stack's fault handling, unit level: drops during back-off, background failures,
timeouts, refused writes, and the write-through of stores a tier missed while it was down."""
from __future__ import annotations

import logging
import time

import pytest

import lmcache_core.tiers as tiers_mod
from lmcache_core.builtin.memory_store import MemoryStore
from lmcache_core.memory import BufferPool
from lmcache_core.metrics import Metrics
from lmcache_core.storage import StoreContext
from lmcache_core.tiers import TierStack

from .test_tiers import FlakyStore, make_chunks


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch):
    monkeypatch.setattr(tiers_mod, "BACKOFF_START_S", 0.05)
    monkeypatch.setattr(tiers_mod, "BACKOFF_MAX_S", 0.1)


def healthy(stack: TierStack, name: str = "flaky") -> float | None:
    return stack.metrics.registry.get_sample_value("lmcache_tier_healthy", {"tier": name})


def wait_healthy(stack: TierStack, name: str = "flaky") -> None:
    deadline = time.monotonic() + 5
    while healthy(stack, name) != 1:
        assert time.monotonic() < deadline, f"tier {name} did not come back"
        stack.lookup([])
        stack.get(make_chunks(BufferPool(), 1, seed=99)[0].key)
        time.sleep(0.02)


def test_stores_skipped_during_backoff_are_counted_and_logged_once(caplog):
    pool = BufferPool()
    flaky = FlakyStore(pool)
    flaky.down = True  # health() fails at start: backing off from the first store
    stack = TierStack([MemoryStore(StoreContext(pool), None), flaky], Metrics())
    chunks = make_chunks(pool, 5)
    with caplog.at_level(logging.INFO, logger="lmcache_core.tiers"):
        for c in chunks:
            stack.put(c.key, c)
        assert stack.flush(5)
    assert stack.metrics.value("lmcache_dropped_stores", tier="flaky") == 5
    lines = [r for r in caplog.records if "dropping its stores" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    for c in chunks:
        c.release()
    stack.close()
    assert pool.live_count() == 0


class Boom(BaseException):
    """Not an Exception: what a writer thread may meet at interpreter exit."""


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), Boom("shutdown")])
def test_background_store_failure_is_logged_with_traceback_and_counted(caplog, error):
    pool = BufferPool()

    class Broken(FlakyStore):
        def put(self, key, chunk):
            raise error

    stack = TierStack([Broken(pool)], Metrics())
    [c] = make_chunks(pool, 1)
    with caplog.at_level(logging.WARNING, logger="lmcache_core.tiers"):
        stack.put(c.key, c)
        assert stack.flush(5)
    assert stack.metrics.value("lmcache_errors", tier="flaky", op="put") == 1
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[1] is error]
    assert logged and logged[0].levelno == logging.ERROR
    c.release()
    stack.close()
    assert pool.live_count() == 0


def test_store_that_cannot_be_queued_is_logged_counted_and_released(caplog):
    pool = BufferPool()
    stack = TierStack([FlakyStore(pool)], Metrics())
    stack.tiers[0].writer.shutdown(wait=True)  # as at interpreter exit: submit raises
    [c] = make_chunks(pool, 1)
    with caplog.at_level(logging.WARNING, logger="lmcache_core.tiers"):
        stack.put(c.key, c)
    assert stack.flush(1), "a store that was never queued must not be waited for"
    assert stack.metrics.value("lmcache_errors", tier="flaky", op="put") == 1
    assert stack.metrics.value("lmcache_dropped_stores", tier="flaky") == 1
    assert any(r.exc_info for r in caplog.records)
    c.release()
    stack.close()
    assert pool.live_count() == 0


def test_failing_background_probe_is_logged_and_counted(caplog):
    pool = BufferPool()

    class BadProbe(FlakyStore):
        def health(self):
            if self.down:
                raise Boom("probe thread killed")
            return super().health()

    store = BadProbe(pool)
    stack = TierStack([store], Metrics())
    store.down = True
    stack._mark_down(stack.tiers[0], "test")
    time.sleep(0.1)
    with caplog.at_level(logging.WARNING, logger="lmcache_core.tiers"):
        stack.lookup([make_chunks(pool, 1)[0].key])  # starts the probe
        deadline = time.monotonic() + 5
        while not stack.metrics.value("lmcache_errors", tier="flaky", op="health"):
            assert time.monotonic() < deadline, "the probe's failure was not counted"
            time.sleep(0.02)
    assert any(r.exc_info and isinstance(r.exc_info[1], Boom) for r in caplog.records)
    stack.close()


def test_one_timeout_backs_the_tier_off_at_once():
    pool = BufferPool()

    class Hung(FlakyStore):
        def exists(self, keys):
            self.calls += 1
            raise TimeoutError("Timeout reading from socket")

    hung = Hung(pool)
    stack = TierStack([hung], Metrics())
    [c] = make_chunks(pool, 1)
    stack.lookup([c.key])
    assert healthy(stack) == 0, "one timeout must start the back-off"
    for _ in range(10):
        stack.lookup([c.key])
    assert hung.calls == 1
    c.release()
    stack.close()


def test_refused_write_is_a_dropped_store_and_reads_go_on():
    pool = BufferPool()

    class Full(FlakyStore):
        def classify_error(self, exc):
            return "refused" if "OOM" in str(exc) else None

        def put(self, key, chunk):
            raise RuntimeError("OOM command not allowed when used memory > 'maxmemory'")

    full = Full(pool)
    stack = TierStack([full], Metrics())
    chunks = make_chunks(pool, 6)
    for c in chunks:
        stack.put(c.key, c)
        assert stack.flush(5)
    assert stack.metrics.value("lmcache_dropped_stores", tier="flaky") == 6
    assert stack.metrics.value("lmcache_errors", tier="flaky", op="put") == 6
    assert healthy(stack) == 1
    calls = full.calls
    assert stack.get(chunks[0].key) is None
    assert full.calls == calls + 1, "reads must still reach a tier that refuses writes"
    assert not stack.tiers[0].missed, "a refused store is not retried by later stores"
    for c in chunks:
        c.release()
    stack.close()


def test_chunk_stored_during_backoff_is_written_through_by_a_later_store():
    pool = BufferPool()
    flaky = FlakyStore(pool)
    stack = TierStack([MemoryStore(StoreContext(pool), None), flaky], Metrics())
    flaky.down = True
    chunks = make_chunks(pool, 3)
    for c in chunks:
        stack.put(c.key, c)  # the first puts fail, then the tier backs off
    assert stack.flush(5)
    flaky.down = False
    wait_healthy(stack)
    assert not flaky.data
    assert stack.lookup([c.key for c in chunks], fast_only=True).hits == 3  # the store's question
    assert stack.flush(5)
    assert set(flaky.data) == {c.key for c in chunks}
    assert not stack.tiers[1].missed
    calls = flaky.calls
    stack.lookup([c.key for c in chunks], fast_only=True)  # written once, not on every store
    assert stack.flush(5) and flaky.calls == calls
    for c in chunks:
        c.release()
    stack.close()
    assert pool.live_count() == 0


def test_missed_stores_are_bounded(monkeypatch):
    monkeypatch.setattr(tiers_mod, "MISSED_MAX", 4)
    pool = BufferPool()
    flaky = FlakyStore(pool)
    flaky.down = True
    stack = TierStack([MemoryStore(StoreContext(pool), None), flaky], Metrics())
    chunks = make_chunks(pool, 10)
    for c in chunks:
        stack.put(c.key, c)
    assert list(stack.tiers[1].missed) == [c.key for c in chunks[-4:]]  # the newest
    for c in chunks:
        c.release()
    stack.close()
