"""In-process reference transport: descriptors name buffers in a process-wide table."""

from __future__ import annotations

import itertools
import threading
from typing import Any

from ..errors import LMCacheError
from ..transport import Descriptor, Transport, TransportOptions

_TABLE: dict[int, memoryview] = {}
_IDS = itertools.count(1)
_LOCK = threading.Lock()


class LocalTransport(Transport):
    name = "local"

    def __init__(self, options: TransportOptions | str | None = None) -> None:
        self.agent = options if isinstance(options, str) else (options.agent if options else "") or "local"

    def register(self, buffer: memoryview, *, private: bool = False) -> Descriptor:
        mv = memoryview(buffer).cast("B")
        with _LOCK:
            handle = next(_IDS)
            _TABLE[handle] = mv
        return Descriptor(self.agent, handle, len(mv))

    def deregister(self, desc: Descriptor) -> None:
        with _LOCK:
            _TABLE.pop(desc.handle, None)

    def _lookup(self, desc: Descriptor) -> memoryview:
        with _LOCK:
            mv = _TABLE.get(desc.handle)
        if mv is None:
            raise LMCacheError(f"transport: descriptor {desc.handle} of {desc.agent!r} is not registered")
        return mv

    def _copy(self, dst: Descriptor, src: Descriptor) -> bool:
        d, s = self._lookup(dst), self._lookup(src)
        if len(d) < len(s):
            raise LMCacheError(f"transport: destination of {len(d)} bytes is smaller than source {len(s)}")
        d[: len(s)] = s
        return True

    def write(self, local: Descriptor, remote: Descriptor) -> Any:
        return self._copy(remote, local)

    def read(self, local: Descriptor, remote: Descriptor) -> Any:
        return self._copy(local, remote)

    def poll(self, handle: Any) -> bool:
        return bool(handle)
