"""A store: a ByteStore keeps chunk images as bytes; verification and pooling come with the base."""

from __future__ import annotations

import threading
from typing import Any, ClassVar, Sequence

from lmcache_core.chunk import ChunkBuffer
from lmcache_core.keys import ChunkKey
from lmcache_core.memory import PooledBuffer
from lmcache_core.storage import ByteStore, StoreCapabilities, StoreContext, Usage, parse_url

_TABLES: dict[str, dict[ChunkKey, bytes]] = {}
_LOCK = threading.Lock()


class ExampleStore(ByteStore):
    """``example://NAME``: stores with the same NAME share one table (like clients of one server)."""

    schemes = ("example",)
    capabilities = StoreCapabilities()  # not persistent, not shared across processes
    conformance_url: ClassVar[str] = "example://conformance"  # the suite needs no server for it

    def __init__(self, context: StoreContext, table: str) -> None:
        super().__init__("example", context)
        with _LOCK:
            self._data = _TABLES.setdefault(table, {})

    @classmethod
    def from_url(cls, url: str, context: StoreContext) -> "ExampleStore":
        u = parse_url(url)
        u.check_options([])  # unknown options are a ConfigError that names them
        return cls(context, u.netloc or "default")

    def _write(self, key: ChunkKey, image: memoryview, chunk: ChunkBuffer) -> None:
        data = bytes(image)  # the one copy a byte store makes; never keep `image` itself
        with _LOCK:
            self._data[key] = data

    def _read(self, key: ChunkKey, alloc: Any) -> tuple[PooledBuffer, int] | None:
        with _LOCK:
            data = self._data.get(key)
        if data is None:
            return None
        buf = alloc(len(data))  # read straight into a pooled buffer
        buf.memoryview(0, len(data))[:] = data
        return buf, len(data)

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with _LOCK:
            return [k in self._data for k in keys]

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        with _LOCK:
            return sum(self._data.pop(k, None) is not None for k in keys)

    def usage(self) -> Usage:
        with _LOCK:
            return Usage(sum(map(len, self._data.values())), None, len(self._data))

    def clear(self) -> None:
        with _LOCK:
            self._data.clear()
