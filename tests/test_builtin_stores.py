"""The shared storage contract applied to the built-in memory:// and disk:// stores."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from lmcache_core.builtin.disk_store import DiskStore
from lmcache_core.builtin.memory_store import MemoryStore
from lmcache_core.keys import ChunkKey
from lmcache_core.storage import Store, StoreContext
from lmcache_core.testing.storage_tests import StoreTests


class TestMemoryStore(StoreTests):
    large_nbytes = 8 << 20

    @pytest.fixture
    def store_factory(self) -> Callable[[StoreContext], Store]:
        return lambda ctx: MemoryStore.from_url("memory://?capacity=1GiB", ctx)

    def raw_get(self, store: Store, key: ChunkKey) -> bytes | None:
        assert isinstance(store, MemoryStore)
        chunk = store._chunks.get(key)  # the backdoor: the held buffer itself
        return None if chunk is None else bytes(chunk.image())


class TestDiskStore(StoreTests):
    large_nbytes = 32 << 20

    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> Callable[[StoreContext], Store]:
        counter = iter(range(1 << 30))
        return lambda ctx: DiskStore.from_url(f"disk://{tmp_path}/root{next(counter)}?capacity=4GiB", ctx)

    def raw_get(self, store: Store, key: ChunkKey) -> bytes | None:
        assert isinstance(store, DiskStore)
        path = store._path(key)
        return path.read_bytes() if path.exists() else None

    def raw_set(self, store: Store, key: ChunkKey, data: bytes) -> None:
        assert isinstance(store, DiskStore)
        path = store._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
