"""The dummy store: chunk images as bytes in a process-wide table, with switchable defects.

``LMCACHE_DUMMY_STORAGE_DEFECT`` (read when a store is created) picks at most one:

- ``keep-view``: keeps the caller's image memoryview instead of copying it (zero-copy:
  "the store does not keep the buffer");
- ``mutate``: scribbles on the caller's image after copying it (zero-copy: "does not mutate");
- ``leak``: takes a reference to the caller's buffer and never drops it (no leak);
- ``pool-copy``: copies the image through a fresh pool buffer before storing it
  (zero-copy: "not copied per tier", by allocation count);
- ``no-verify``: returns what it holds without checking header and checksum
  (chunk: "a corrupted payload is a miss");
- ``lose-writes``: acknowledges every second write but drops it (storage semantics).

Unset or empty: a correct store.
"""

from __future__ import annotations

import os
import threading
from typing import Any, ClassVar, Sequence

from lmcache_core.chunk import HEADER_SIZE, ChunkBuffer, ChunkHeader, decode_header
from lmcache_core.keys import ChunkKey
from lmcache_core.memory import PooledBuffer
from lmcache_core.storage import ByteStore, StoreCapabilities, StoreContext, Usage, parse_url

DEFECT_ENV = "LMCACHE_DUMMY_STORAGE_DEFECT"
DEFECTS = ("keep-view", "mutate", "leak", "pool-copy", "no-verify", "lose-writes")

_TABLES: dict[str, dict[ChunkKey, Any]] = {}
_LOCK = threading.Lock()


class DummyStore(ByteStore):
    """``dummy://NAME``: bytes in process memory, shared by the stores of one NAME."""

    schemes = ("dummy",)
    capabilities = StoreCapabilities()
    conformance_url: ClassVar[str] = "dummy://conformance"  # lets the suite run it without a server

    def __init__(self, context: StoreContext, table: str, defect: str) -> None:
        super().__init__("dummy", context)
        if defect and defect not in DEFECTS:
            raise ValueError(f"{DEFECT_ENV}={defect!r} is not a known defect; use one of {', '.join(DEFECTS)}")
        self.defect = defect
        with _LOCK:
            self._data = _TABLES.setdefault(table, {})
        self._writes = 0
        self._leaked: list[PooledBuffer] = []

    @classmethod
    def from_url(cls, url: str, context: StoreContext) -> "DummyStore":
        u = parse_url(url)
        u.check_options([])
        return cls(context, u.netloc or "default", os.environ.get(DEFECT_ENV, "").strip())

    def _write(self, key: ChunkKey, image: memoryview, chunk: ChunkBuffer) -> None:
        self._writes += 1
        if self.defect == "lose-writes" and self._writes % 2 == 0:
            return
        if self.defect == "keep-view":
            value: Any = image
        elif self.defect == "pool-copy":
            tmp = self.context.pool.acquire(len(image))
            try:
                tmp.memoryview(0, len(image))[:] = image
                value = bytes(tmp.memoryview(0, len(image)))
            finally:
                tmp.release()
        else:
            value = bytes(image)
        if self.defect == "mutate":
            image[HEADER_SIZE] ^= 0x01
        if self.defect == "leak":
            self._leaked.append(chunk.buf.retain())
        with _LOCK:
            self._data[key] = value

    def _read(self, key: ChunkKey, alloc: Any) -> tuple[PooledBuffer, int] | None:
        with _LOCK:
            value = self._data.get(key)
        if value is None:
            return None
        buf = alloc(len(value))
        buf.memoryview(0, len(value))[:] = value
        return buf, len(value)

    def get(self, key: ChunkKey) -> ChunkBuffer | None:
        if self.defect != "no-verify":
            return super().get(key)
        got = self._read(key, self.context.pool.acquire)
        if got is None:
            return None
        buf, _ = got
        try:
            header = decode_header(buf.memoryview(0, HEADER_SIZE))
        except Exception:
            buf.release()
            raise
        return ChunkBuffer(buf, ChunkHeader(key, header.geometry, header.num_tokens, header.codec,
                                            header.payload_len, header.stored_len, header.checksum))

    # -- the conformance backdoor (SupportsRawAccess): the table, around the store's logic -----------
    def raw_get(self, key: ChunkKey) -> bytes | None:
        with _LOCK:
            value = self._data.get(key)
        return None if value is None else bytes(value)

    def raw_set(self, key: ChunkKey, data: bytes) -> None:
        with _LOCK:
            self._data[key] = bytes(data)

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with _LOCK:
            return [k in self._data for k in keys]

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        with _LOCK:
            return sum(self._data.pop(k, None) is not None for k in keys)

    def usage(self) -> Usage:
        with _LOCK:
            return Usage(sum(len(v) for v in self._data.values()), None, len(self._data))

    def clear(self) -> None:
        with _LOCK:
            self._data.clear()
