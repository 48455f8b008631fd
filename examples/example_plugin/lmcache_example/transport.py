"""A transport: register buffers, copy between descriptors, report failures from poll/write."""

from __future__ import annotations

import itertools
import threading
from typing import Any

from lmcache_core.errors import LMCacheError
from lmcache_core.transport import Descriptor, Transport

_BUFFERS: dict[int, memoryview] = {}
_IDS = itertools.count(1)
_LOCK = threading.Lock()


class ExampleTransport(Transport):
    name = "example"

    def register(self, buffer: memoryview) -> Descriptor:
        mv = memoryview(buffer).cast("B")
        with _LOCK:
            handle = next(_IDS)
            _BUFFERS[handle] = mv
        return Descriptor("example", handle, len(mv))

    def deregister(self, desc: Descriptor) -> None:
        with _LOCK:
            _BUFFERS.pop(desc.handle, None)

    def _buffer(self, desc: Descriptor) -> memoryview:
        with _LOCK:
            mv = _BUFFERS.get(desc.handle)
        if mv is None:
            raise LMCacheError(f"example transport: descriptor {desc.handle} is not registered")
        return mv

    def _copy(self, dst: Descriptor, src: Descriptor) -> bool:
        d, s = self._buffer(dst), self._buffer(src)
        if len(d) < len(s):
            raise LMCacheError(f"example transport: {len(s)} bytes do not fit a {len(d)}-byte destination")
        d[: len(s)] = s
        return True

    def write(self, local: Descriptor, remote: Descriptor) -> Any:
        return self._copy(remote, local)

    def read(self, local: Descriptor, remote: Descriptor) -> Any:
        return self._copy(local, remote)

    def poll(self, handle: Any) -> bool:
        return bool(handle)
