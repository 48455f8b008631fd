"""Memory and disk tiers, and the tier stack's fault handling."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmcache_core.builtin.disk_store import DiskStore
from lmcache_core.builtin.memory_store import MemoryStore
from lmcache_core.chunk import ChunkBuffer, new_chunk, seal
from lmcache_core.keys import ChunkKey, Namespace, chunk_keys
from lmcache_core.layout import ChunkGeometry
from lmcache_core.memory import BufferPool
from lmcache_core.metrics import Metrics
from lmcache_core.storage import Store, StoreCapabilities, StoreContext
from lmcache_core.tiers import TierStack

from .conftest import random_kv

G = ChunkGeometry(2, 2, 8, "float16")
NS = Namespace("m", G.signature)


def make_chunks(pool: BufferPool, n: int, tokens: int = 16, seed: int = 0) -> list[ChunkBuffer]:
    keys = chunk_keys(torch.randint(0, 1000, (n * tokens,), generator=torch.Generator().manual_seed(seed)),
                      NS, tokens)
    out = []
    for i, k in enumerate(keys):
        c = new_chunk(pool, k, G, tokens)
        c.kv().copy_(random_kv(c.kv().shape, torch.float16, seed + i))
        out.append(seal(c))
    return out


def disk(tmp_path: Path, pool: BufferPool, capacity: str = "") -> DiskStore:
    q = f"?capacity={capacity}" if capacity else ""
    return DiskStore.from_url(f"disk://{tmp_path / 'd'}{q}", StoreContext(pool))


def test_disk_survives_restart_and_keeps_lru_order(tmp_path):
    pool = BufferPool()
    chunks = make_chunks(pool, 3)
    store = disk(tmp_path, pool)
    for i, c in enumerate(chunks):
        assert store.put(c.key, c)
        os.utime(store._path(c.key), (1000 + i, 1000 + i))  # oldest first
    got = store.get(chunks[0].key)  # a hit makes chunk 0 the most recent, on disk too
    assert got is not None
    got.release()
    expected = [c.kv().clone() for c in chunks]
    size = chunks[0].nbytes
    for c in chunks:
        c.release()
    # a new process (a new store object) sees the same chunks, with their recency
    again = disk(tmp_path, pool, capacity=str(3 * size))
    assert again.usage().items == 3
    for key, exp in zip([c.key for c in chunks], expected):
        c = again.get(key)
        assert c is not None and torch.equal(c.kv(), exp)
        c.release()
    assert pool.live_count() == 0


def test_disk_lru_eviction_across_restart_uses_mtime(tmp_path):
    pool = BufferPool()
    chunks = make_chunks(pool, 3)
    size = chunks[0].nbytes
    store = disk(tmp_path, pool)
    for i, c in enumerate(chunks[:2]):
        store.put(c.key, c)
        os.utime(store._path(c.key), (1000 + i, 1000 + i))
    os.utime(store._path(chunks[0].key), (5000, 5000))  # chunk 0 used last
    restarted = disk(tmp_path, pool, capacity=str(2 * size))
    restarted.put(chunks[2].key, chunks[2])
    assert restarted.exists([c.key for c in chunks]) == [True, False, True]
    for c in chunks:
        c.release()


def test_half_written_file_is_a_miss_and_stale_temp_files_go(tmp_path):
    pool = BufferPool()
    [c] = make_chunks(pool, 1)
    store = disk(tmp_path, pool)
    store.put(c.key, c)
    path = store._path(c.key)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a crash mid-copy, or a torn file
    tmp = path.parent / ".tmp.999999999.deadbeef"  # a temp file of a dead writer
    tmp.write_bytes(b"partial")
    stack = TierStack([MemoryStore(StoreContext(pool), None), disk(tmp_path, pool)])
    assert not tmp.exists()
    assert stack.get(c.key) is None  # verified, rejected, deleted
    assert not path.exists()
    assert stack.metrics.value("lmcache_corrupt_chunks", tier="disk") == 1
    stack.close()
    c.release()
    assert pool.live_count() == 0


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_lru_never_evicts_pinned(tmp_path, kind):
    pool = BufferPool()
    chunks = make_chunks(pool, 4)
    size = chunks[0].nbytes if kind == "memory" else len(chunks[0].padded_image())
    ctx = StoreContext(pool)
    store: Store = (MemoryStore(ctx, 2 * size) if kind == "memory"
                    else DiskStore(ctx, tmp_path / "d", 2 * size))
    a, b, c, d = chunks
    store.put(a.key, a)
    store.put(b.key, b)
    store.pin([a.key])  # a is oldest but pinned
    store.put(c.key, c)  # evicts b, not a
    assert store.exists([a.key, b.key, c.key]) == [True, False, True]
    store.pin([c.key])
    assert store.put(d.key, d) is False or not store.exists([d.key])[0]  # everything pinned: refuse
    assert store.exists([a.key, c.key]) == [True, True]
    store.unpin([a.key, c.key])
    store.put(d.key, d)
    assert store.exists([a.key, d.key]) == [False, True]
    store.close()
    for x in chunks:
        x.release()
    if kind == "memory":
        assert pool.live_count() == 0


def test_memory_eviction_never_frees_a_chunk_being_read():
    pool = BufferPool()
    a, b = make_chunks(pool, 2)
    store = MemoryStore(StoreContext(pool), a.nbytes)
    store.put(a.key, a)
    reading = store.get(a.key)
    expected = a.kv().clone()
    a.release()
    store.put(b.key, b)  # evicts a from the tier while a reader holds it
    assert not store.exists([a.key])[0]
    assert torch.equal(reading.kv(), expected)
    reading.release()
    b.release()
    store.close()
    assert pool.live_count() == 0


class FlakyStore(Store):
    """A store whose every call fails while `down` (unit test of the stack's logic)."""

    capabilities = StoreCapabilities(shared=True)

    def __init__(self, pool: BufferPool) -> None:
        super().__init__("flaky", StoreContext(pool))
        self.down = False
        self.data: dict[ChunkKey, bytes] = {}
        self.calls = 0

    @classmethod
    def from_url(cls, url, context):  # pragma: no cover - not used
        raise NotImplementedError

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("server is gone")

    def put(self, key, chunk):
        self._check()
        self.data[key] = bytes(chunk.image())
        return True

    def get(self, key):
        self._check()
        return None

    def exists(self, keys):
        self._check()
        return [k in self.data for k in keys]

    def delete(self, keys):
        self._check()
        return 0

    def health(self):
        from lmcache_core.storage import Health

        return Health(not self.down, "down" if self.down else "")


def test_dead_tier_is_a_miss_then_backs_off_then_recovers(monkeypatch):
    import lmcache_core.tiers as tiers_mod

    monkeypatch.setattr(tiers_mod, "BACKOFF_START_S", 0.05)
    monkeypatch.setattr(tiers_mod, "BACKOFF_MAX_S", 0.2)
    pool = BufferPool()
    flaky = FlakyStore(pool)
    stack = TierStack([MemoryStore(StoreContext(pool), None), flaky], Metrics())
    [c] = make_chunks(pool, 1)
    flaky.down = True
    stack.put(c.key, c)
    stack.flush()
    assert stack.lookup([c.key]).hits == 1  # memory still answers
    for _ in range(5):
        assert stack.get(chunk_keys([1, 2, 3], NS, 16)[0]) is None  # misses, no exception
    assert stack.metrics.value("lmcache_errors", tier="flaky", op="put") >= 1
    calls = flaky.calls
    for _ in range(20):
        stack.lookup([chunk_keys([4], NS, 16)[0]])
    assert flaky.calls - calls <= 2  # backing off: not called per request
    flaky.down = False
    import time

    deadline = time.monotonic() + 5
    while stack.metrics.registry.get_sample_value("lmcache_tier_healthy", {"tier": "flaky"}) != 1:
        stack.lookup([chunk_keys([4], NS, 16)[0]])  # after the back-off, a call starts a background probe
        assert time.monotonic() < deadline, "the tier did not come back after its server did"
        time.sleep(0.02)
    stack.put(c.key, c)
    stack.flush()
    assert c.key in flaky.data  # came back by itself
    c.release()
    stack.close()
    assert pool.live_count() == 0


def test_full_write_queue_drops_and_counts():
    import threading

    pool = BufferPool()
    gate = threading.Event()

    class Slow(FlakyStore):
        def put(self, key, chunk):
            gate.wait(10)
            return super().put(key, chunk)

    slow = Slow(pool)
    stack = TierStack([slow], Metrics(), queue_size=2, writer_threads=1)
    chunks = make_chunks(pool, 5)
    for c in chunks:
        stack.put(c.key, c)
    assert stack.metrics.value("lmcache_dropped_stores", tier="flaky") == 3
    gate.set()
    stack.flush()
    assert len(slow.data) == 2
    for c in chunks:
        c.release()
    stack.close()
    assert pool.live_count() == 0


def test_disk_chunks_visible_to_another_process(tmp_path):
    pool = BufferPool()
    [c] = make_chunks(pool, 1)
    store = disk(tmp_path, pool)
    store.put(c.key, c)
    expected = c.kv().clone()
    c.release()
    script = textwrap.dedent(f"""
        import torch
        from lmcache_core.builtin.disk_store import DiskStore
        from lmcache_core.keys import ChunkKey
        from lmcache_core.memory import BufferPool
        from lmcache_core.storage import StoreContext
        pool = BufferPool()
        s = DiskStore.from_url("disk://{tmp_path / 'd'}", StoreContext(pool))
        c = s.get(ChunkKey.from_bytes(bytes.fromhex("{c.key.to_bytes().hex()}")))
        torch.save(c.kv().clone(), "{tmp_path / 'out.pt'}")
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
