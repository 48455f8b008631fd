"""The tier stack over a real redis-server: a hung server (SIGSTOP), a full one (noeviction), a restart."""

from __future__ import annotations

import os
import signal
import time

from lmcache_core.builtin.memory_store import MemoryStore
from lmcache_core.memory import BufferPool
from lmcache_core.metrics import Metrics
from lmcache_core.storage import StoreContext
from lmcache_core.testing.fixtures import ServerFactory
from lmcache_core.testing.storage_tests import assert_chunk_is, make_chunk, make_key
from lmcache_core.tiers import TierStack
from lmcache_storage_redis.store import RedisStore

TIMEOUT = 1.0


def healthy(stack: TierStack, name: str) -> float | None:
    return stack.metrics.registry.get_sample_value("lmcache_tier_healthy", {"tier": name})


def stack_for(url: str, pool: BufferPool) -> tuple[TierStack, RedisStore]:
    remote = RedisStore.from_url(url, StoreContext(pool))
    return TierStack([MemoryStore(StoreContext(pool), None), remote], Metrics()), remote


def test_hung_server_costs_one_timeout_and_backs_off_at_once(server_factory: ServerFactory) -> None:
    """SIGSTOP: the first lookup, get and store each wait about ``timeout`` (no retry on a new
    connection), the first timeout backs the tier off, and later calls skip it at once."""
    server = server_factory.redis()
    pool = BufferPool()
    stack, remote = stack_for(f"{server.url}?timeout={TIMEOUT}&connect_timeout=0.5", pool)
    chunk = make_chunk(pool, make_key(1))
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert stack.lookup([make_key(2)]).hits == 0
        first = time.monotonic() - t0
        assert first < TIMEOUT + 0.5, f"lookup on a hung server took {first:.2f}s, timeout is {TIMEOUT}s"
        assert healthy(stack, "redis") == 0, "one timeout must back the tier off"
        t0 = time.monotonic()
        for i in range(20):
            assert stack.get(make_key(100 + i)) is None
            stack.lookup([make_key(200 + i)])
        stack.put(chunk.key, chunk)
        assert stack.flush(5)
        assert time.monotonic() - t0 < 0.5, "a backed-off tier must be skipped"
        assert stack.metrics.value("lmcache_dropped_stores", tier="redis") == 1
        # Each direct call also waits one timeout, never two or three.
        for call in (lambda: remote.get(make_key(3)), lambda: remote.exists([make_key(3)]),
                     lambda: remote.put(chunk.key, chunk), remote.health):
            t0 = time.monotonic()
            try:
                call()
            except Exception as exc:  # noqa: BLE001
                assert remote.classify_error(exc) == "timeout", exc
            took = time.monotonic() - t0
            assert took < TIMEOUT + 0.5, f"a call on a hung server took {took:.2f}s, timeout is {TIMEOUT}s"
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    chunk.release()
    stack.close()
    assert pool.live_count() == 0


def test_full_server_refuses_writes_but_keeps_serving_reads(server_factory: ServerFactory) -> None:
    """maxmemory + noeviction: OOM write errors are dropped stores; the tier stays up and reads go on."""
    server = server_factory.redis(maxmemory="2mb", maxmemory_policy="noeviction")
    pool = BufferPool()
    stack, remote = stack_for(f"{server.url}?timeout=2", pool)
    first = make_chunk(pool, make_key(0))
    stack.put(first.key, first)
    assert stack.flush(10)
    n = 0
    while stack.metrics.value("lmcache_errors", tier="redis", op="put") < 5:
        n += 1
        assert n < 2000, "the server never refused a write"
        assert healthy(stack, "redis") == 1, "refused writes must not back the tier off"
        c = make_chunk(pool, make_key(n))
        c_key = c.key
        stack.put(c_key, c)
        c.release()
        assert stack.flush(10)
        stack.tiers[0].store.delete([c_key])  # keep the memory tier out of the way
    assert healthy(stack, "redis") == 1, "refused writes must not back the tier off"
    assert stack.metrics.value("lmcache_dropped_stores", tier="redis") >= 5
    stack.tiers[0].store.delete([first.key])
    got = stack.get(first.key)  # served by redis, though it refuses writes
    assert got is not None and got[1] == "redis"
    assert_chunk_is(got[0], first.key)
    got[0].release()
    assert stack.lookup([first.key]).tiers == ("memory",)  # promoted
    first.release()
    stack.close()
    assert pool.live_count() == 0


def test_chunks_stored_during_backoff_reach_the_server_after_it_returns(server_factory: ServerFactory) -> None:
    """Stored while redis was down and still held by the memory tier: the next store of the same
    chunks (which only asks the memory tier) writes them through once redis is back."""
    import lmcache_core.tiers as tiers_mod

    server = server_factory.redis()
    pool = BufferPool()
    stack, remote = stack_for(f"{server.url}?timeout=1&connect_timeout=0.5", pool)
    old = tiers_mod.BACKOFF_START_S
    tiers_mod.BACKOFF_START_S = 0.1
    try:
        stack.tiers[1].backoff = 0.1
        server.kill()
        chunks = [make_chunk(pool, make_key(i)) for i in range(4)]
        keys = [c.key for c in chunks]
        for c in chunks:
            stack.put(c.key, c)
            c.release()
        assert stack.flush(10)
        server.start()
        deadline = time.monotonic() + 10
        while healthy(stack, "redis") != 1:
            assert time.monotonic() < deadline, "redis did not come back"
            stack.lookup([make_key(99)])
            time.sleep(0.05)
        assert remote.exists(keys) == [False] * 4
        assert stack.lookup(keys, fast_only=True).hits == 4  # what a store asks
        assert stack.flush(10)
        assert remote.exists(keys) == [True] * 4
        for k in keys:
            got = remote.get(k)
            assert_chunk_is(got, k)
            assert got is not None
            got.release()
    finally:
        tiers_mod.BACKOFF_START_S = old
    stack.close()
    assert pool.live_count() == 0


def test_engine_writes_through_what_memory_held_while_redis_was_down(server_factory: ServerFactory) -> None:
    """The issue's reproduction through the engine: store while redis is down, redis comes back,
    the same tokens are stored again (all of them hit the memory tier, so nothing is gathered);
    a second engine (another process's view) then gets every token from redis."""
    import torch

    from lmcache_core.testing.fault_tests import CHUNK, engine_for, kv_for, retrieve_into_zeros

    server = server_factory.redis()
    url = f"{server.url}?timeout=1&connect_timeout=0.5"
    tokens = [7_000 + t for t in range(CHUNK * 6)]
    kv, layers = kv_for(tokens, seed=5)
    server.kill()
    a = engine_for(["memory://?capacity=64MiB", url])  # redis down at start: backing off
    try:
        a.store(tokens, kv, slots=torch.arange(len(tokens)))
        assert a.flush(30)
        assert a.metrics.value("lmcache_dropped_stores", tier="redis") == 6
        server.start()
        t = next(t for t in a.tiers.tiers if t.name == "redis")
        t.down_until = time.monotonic()  # skip the rest of the back-off; the probe still decides
        deadline = time.monotonic() + 10
        while healthy(a.tiers, "redis") != 1:
            assert time.monotonic() < deadline, "redis did not come back"
            a.lookup([1 + t for t in tokens[:CHUNK]])  # a memory miss asks redis: starts the probe
            time.sleep(0.05)
        a.store(tokens, kv, slots=torch.arange(len(tokens)))  # finds all 6 chunks in memory
        assert a.flush(30)
        b = engine_for(["memory://?capacity=64MiB", url])
        try:
            hits, by_tier = retrieve_into_zeros(b, tokens, layers)
            assert hits == len(tokens) and by_tier == {"redis": hits}, by_tier
        finally:
            b.close()
    finally:
        a.close()
