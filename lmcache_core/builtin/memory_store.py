"""The CPU-memory tier: holds counted references to chunk buffers, LRU under a byte budget."""

from __future__ import annotations

import logging
from typing import Sequence

from ..chunk import ChunkBuffer
from ..keys import ChunkKey
from ..storage import Store, StoreCapabilities, StoreContext, Usage, parse_url
from .lru import LRUIndex

logger = logging.getLogger(__name__)


class MemoryStore(Store):
    """``memory://?capacity=2GiB``. A put keeps a reference, never a copy; a get hands out
    another reference, so eviction while a reader holds the chunk frees nothing under it."""

    schemes = ("memory", "cpu")
    capabilities = StoreCapabilities(holds_buffers=True, pinning=True)

    def __init__(self, context: StoreContext, capacity: int | None, name: str = "memory") -> None:
        super().__init__(name, context)
        self._index: LRUIndex[ChunkKey] = LRUIndex(capacity)
        self._chunks: dict[ChunkKey, ChunkBuffer] = {}
        self.evictions = 0

    @classmethod
    def from_url(cls, url: str, context: StoreContext) -> "MemoryStore":
        u = parse_url(url)
        u.check_options(["capacity"])
        return cls(context, u.size_option("capacity", 2 << 30))

    def put(self, key: ChunkKey, chunk: ChunkBuffer) -> bool:
        size = chunk.nbytes
        with self._index.lock:
            if key in self._chunks:
                self._index.touch(key)
                return True
            victims = self._index.make_room(size)
            if victims is None:
                logger.debug("memory tier full of pinned chunks; not caching %s", key)
                return False
            for victim in victims:
                self._drop(victim)
            self.evictions += len(victims)
            self._chunks[key] = chunk.retain()
            self._index.add(key, size)
        if victims and self.context.on_evict:
            self.context.on_evict(self.name, len(victims))
        return True

    def _drop(self, key: ChunkKey) -> bool:
        chunk = self._chunks.pop(key, None)
        self._index.remove(key)
        if chunk is not None:
            chunk.release()
            return True
        return False

    def get(self, key: ChunkKey) -> ChunkBuffer | None:
        with self._index.lock:
            chunk = self._chunks.get(key)
            if chunk is None:
                return None
            self._index.touch(key)
            return chunk.retain()

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._index.lock:
            return [k in self._chunks for k in keys]

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        with self._index.lock:
            return sum(self._drop(k) for k in keys)

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        self._index.pin_many(keys)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        self._index.unpin_many(keys)

    def usage(self) -> Usage:
        with self._index.lock:
            return Usage(self._index.used, self._index.capacity, len(self._chunks))

    def clear(self) -> None:
        with self._index.lock:
            for k in list(self._chunks):
                self._drop(k)

    def close(self) -> None:
        self.clear()
