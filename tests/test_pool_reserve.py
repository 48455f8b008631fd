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


def test_the_reserve_waits_for_device_copies_to_finish() -> None:
    # a layer-by-layer load takes no buffer, so the quiet period alone would let the refiller
    # allocate (and take the driver's lock) beside its copies: it waits for every copy to end
    made: list[float] = []

    def alloc(n: int) -> torch.Tensor:
        made.append(time.monotonic())
        return torch.empty(n, dtype=torch.uint8)

    pool = BufferPool(alloc, max_idle_bytes=64 * CHUNK, reserve_bytes=4 * CHUNK)
    pool.quiet_s = 0.02
    pool.transfer_begun()  # a load under way
    pool.transfer_begun()  # and a store
    held = pool.acquire(CHUNK)  # wakes the refiller
    time.sleep(0.2)  # ten quiet periods
    assert len(made) == 1, "the reserve allocated while copies were under way"
    pool.transfer_done()
    time.sleep(0.1)
    assert len(made) == 1, "the reserve allocated while one copy was still under way"
    ended = time.monotonic()
    pool.transfer_done()
    assert pool.wait_reserve(5)
    assert len(made) == 1 + 4 and made[1] >= ended + pool.quiet_s * 0.9  # after the quiet period
    held.release()
    pool.close()


def test_engine_loads_and_stores_hold_the_reserve_while_they_copy(tmp_path) -> None:
    from lmcache_core import CacheEngine, ChunkGeometry, Config
    from lmcache_core.layout import PagedKV

    geom = ChunkGeometry(2, 2, 8, "float16")
    kv = PagedKV.from_vllm_flash([torch.randn(2, 8, 16, 2, 8).half() for _ in range(2)])
    cfg = Config.from_dict({"tiers": ["memory://?capacity=64MiB"], "device": "cpu", "chunk_size": 16})
    with CacheEngine(geom, cfg, model="reserve") as eng:
        tokens = list(range(100, 164))
        store = eng.start_store(tokens, kv, [0, 1, 2, 3])
        assert eng.pool._transfers == 1
        store.save_all()
        store.finish(wait=True)
        assert eng.pool._transfers == 0
        task = eng.start_retrieve(tokens, kv, [4, 5, 6, 7])
        assert eng.pool._transfers == 1
        for _ in task:
            pass
        task.finish()
        assert eng.pool._transfers == 0
        dropped = eng.start_store(list(range(200, 264)), kv, [0, 1, 2, 3])
        assert eng.pool._transfers == 1
        dropped.abort()
        assert eng.pool._transfers == 0


def test_the_reserve_carves_whole_chunk_buffers_from_power_of_two_slabs() -> None:
    # torch's pinned allocator rounds every allocation up to a power of two: a chunk buffer (a
    # 4 KiB header over a power-of-two payload) allocated alone pinned twice its size
    asked: list[tuple[int, str]] = []

    def alloc(n: int) -> torch.Tensor:
        asked.append((n, threading.current_thread().name))
        return torch.empty(n, dtype=torch.uint8)

    slab, size = 16 * CHUNK, CHUNK + 4096
    per_slab = (slab - 4096) // size  # at worst a slab's base needs a 4 KiB shift
    pool = BufferPool(alloc, max_idle_bytes=64 * CHUNK, reserve_bytes=20 * size, slab_bytes=slab)
    first = pool.acquire(size)  # nothing carved yet: the caller allocates its buffer alone
    assert asked == [(size + 4096, "MainThread")] and pool.sync_allocations == 1
    assert pool.wait_reserve(5)
    slabs = [n for n, who in asked[1:]]
    assert slabs and set(slabs) == {slab} and len(slabs) <= -(-20 // per_slab)
    assert {who for _, who in asked[1:]} == {"lmcache-pool-reserve"}
    bufs = [pool.acquire(size) for _ in range(20)]  # from the reserve: no allocation on this thread
    assert pool.sync_allocations == 1 and pool.host_allocations == 1 + len(slabs)
    spans = sorted((b.address, b.address + b.capacity) for b in bufs)
    assert all(a % 4096 == 0 for a, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "carved buffers overlap"
    for i, b in enumerate(bufs):
        b.view().fill_(i)
    assert all(int(b.view()[0]) == i and int(b.view()[-1]) == i for i, b in enumerate(bufs))
    tail = pool.acquire(4096)  # a partial chunk: alone, never in a slab it would keep pinned
    assert asked[-1] == (2 * 4096, "MainThread") and pool.sync_allocations == 2
    tail.release()
    big = pool.acquire(8 * CHUNK)  # over a third of a slab: allocated alone
    assert asked[-1] == (8 * CHUNK + 4096, "MainThread") and big.address % 4096 == 0
    for b in [first, big, *bufs]:
        b.release()
    assert pool.live_count() == 0
    made = pool.allocations
    pool.acquire(size).release()  # reused, not carved again
    assert pool.allocations == made
    pool.close()


def test_slab_size_holds_three_chunk_buffers_within_bounds() -> None:
    from lmcache_core.engine import SLAB_MAX, SLAB_MIN, slab_size

    llama8b = 4096 + 32 * 2 * 256 * 8 * 128 * 2  # a 256-token chunk of Llama-3-8B plus its header
    s = slab_size(llama8b)
    assert s == 128 << 20 and s // llama8b == 3  # alone, each pinned 64 MiB
    assert slab_size(4096 + 64 * 1024) == SLAB_MIN
    assert slab_size(SLAB_MAX) == 0  # too large to carve: allocated alone
