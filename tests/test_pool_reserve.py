"""The buffer pool's background reserve: whole-chunk buffers allocated ahead, off the caller's
thread, so a store that keeps its buffers (the memory tier) does not allocate on the engine's step."""

from __future__ import annotations

import threading
import time

import torch

from lmcache_core.memory import BufferPool

CHUNK = 1 << 20


def test_reserve_keeps_whole_chunks_ready_off_the_callers_thread() -> None:
    callers: list[str] = []

    def alloc(n: int) -> torch.Tensor:
        callers.append(threading.current_thread().name)
        time.sleep(0.002)  # a slow (pinned) allocation
        return torch.empty(n, dtype=torch.uint8)

    pool = BufferPool(alloc, max_idle_bytes=64 * CHUNK, reserve_bytes=8 * CHUNK)
    held = [pool.acquire(CHUNK)]  # first one: nothing ready yet, the caller allocates
    assert pool.sync_allocations == 1
    assert pool.wait_reserve(5)
    for _ in range(6):  # a cache filling up: every buffer is kept
        held.append(pool.acquire(CHUNK))
        pool.wait_reserve(5)
    assert pool.sync_allocations == 1, "the caller's thread allocated although the reserve was ready"
    assert any(name == "lmcache-pool-reserve" for name in callers)
    small = pool.acquire(4096)  # a partial tail chunk: allocated by the caller, reserve unchanged
    assert pool.sync_allocations == 2
    for b in held + [small]:
        b.release()
    assert pool.live_count() == 0
    assert pool.idle_bytes() <= 64 * CHUNK
    pool.close()
    assert pool.idle_bytes() == 0


def test_reserve_off_by_default_and_never_beyond_the_idle_bound() -> None:
    pool = BufferPool(max_idle_bytes=2 * CHUNK)
    b = pool.acquire(CHUNK)
    assert pool._refiller is None
    b.release()
    capped = BufferPool(max_idle_bytes=2 * CHUNK, reserve_bytes=100 * CHUNK)
    assert capped.reserve_bytes == 2 * CHUNK
    x = capped.acquire(CHUNK)
    assert capped.wait_reserve(5)
    assert capped.idle_bytes() <= 2 * CHUNK
    x.release()
    capped.close()


def test_a_failing_reserve_allocation_only_pauses_the_reserve() -> None:
    calls = {"n": 0}

    def alloc(n: int) -> torch.Tensor:
        calls["n"] += 1
        if threading.current_thread().name == "lmcache-pool-reserve":
            raise RuntimeError("out of pinned memory")
        return torch.empty(n, dtype=torch.uint8)

    pool = BufferPool(alloc, max_idle_bytes=8 * CHUNK, reserve_bytes=4 * CHUNK)
    a = pool.acquire(CHUNK)
    deadline = time.time() + 5
    while pool.reserve_bytes and time.time() < deadline:
        time.sleep(0.01)
    assert pool.reserve_bytes == 0  # paused, logged; callers still get buffers
    b = pool.acquire(CHUNK)
    a.release()
    b.release()
    pool.close()
