"""Reusable host buffers with explicit reference counts.

A gathered chunk lives in one pooled buffer. Every tier that writes it takes a
reference (``retain``) and drops it when its write completes (``release``); the
last release returns the buffer to the pool. Nothing is copied for fan-out. A
release below zero is a bug and raises, it is never silently reset. Tests
assert ``live_count()`` returns to zero.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ALIGN = 4096  # O_DIRECT and DMA friendly


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


class BufferError_(RuntimeError):
    """Reference counting misuse (a double release)."""


class PooledBuffer:
    """A 4096-aligned host byte buffer with a reference count."""

    __slots__ = ("_pool", "_backing", "tensor", "capacity", "_refs", "__weakref__")

    def __init__(self, pool: "BufferPool", backing: "torch.Tensor", tensor: "torch.Tensor") -> None:
        self._pool = pool
        self._backing = backing  # the allocation (may start before the aligned view)
        self.tensor = tensor  # 1-D uint8, aligned, len == capacity
        self.capacity = int(tensor.numel())
        self._refs = 1

    @property
    def refs(self) -> int:
        return self._refs

    def retain(self) -> "PooledBuffer":
        with self._pool._lock:
            if self._refs <= 0:
                raise BufferError_("retain() on a buffer that was already returned to the pool")
            self._refs += 1
        return self

    def release(self) -> None:
        with self._pool._lock:
            if self._refs <= 0:
                raise BufferError_("release() on a buffer with no references (double release)")
            self._refs -= 1
            done = self._refs == 0
        if done:
            self._pool._give_back(self)

    def view(self, offset: int = 0, nbytes: int | None = None) -> "torch.Tensor":
        end = self.capacity if nbytes is None else offset + nbytes
        if offset < 0 or end > self.capacity:
            raise ValueError(f"view [{offset}:{end}] outside a buffer of {self.capacity} bytes")
        return self.tensor[offset:end]

    def memoryview(self, offset: int = 0, nbytes: int | None = None) -> memoryview:
        return memoryview(self.view(offset, nbytes).numpy()).cast("B")

    @property
    def address(self) -> int:
        return int(self.tensor.data_ptr())


class BufferPool:
    """Pool of aligned host buffers, kept per size for reuse, bounded in idle bytes."""

    def __init__(self, allocate: Callable[[int], "torch.Tensor"] | None = None,
                 max_idle_bytes: int = 1 << 30) -> None:
        if allocate is None:
            import torch

            def allocate(n: int) -> "torch.Tensor":
                return torch.empty(n, dtype=torch.uint8)

        self._allocate = allocate
        self.max_idle_bytes = max_idle_bytes
        self._lock = threading.RLock()
        self._idle: OrderedDict[int, list[PooledBuffer]] = OrderedDict()
        self._idle_bytes = 0
        self._live: set[int] = set()
        self._live_bytes = 0
        self.allocations = 0  # fresh allocations, for zero-copy tests

    def acquire(self, nbytes: int) -> PooledBuffer:
        size = round_up(max(nbytes, 1))
        with self._lock:
            bucket = self._idle.get(size)
            if bucket:
                buf = bucket.pop()
                if not bucket:
                    del self._idle[size]
                self._idle_bytes -= size
                buf._refs = 1
            else:
                buf = None
        if buf is None:
            backing = self._allocate(size + ALIGN)
            shift = (-backing.data_ptr()) % ALIGN
            buf = PooledBuffer(self, backing, backing[shift : shift + size])
            with self._lock:
                self.allocations += 1
        with self._lock:
            self._live.add(id(buf))
            self._live_bytes += size
        return buf

    def _give_back(self, buf: PooledBuffer) -> None:
        with self._lock:
            self._live.discard(id(buf))
            self._live_bytes -= buf.capacity
            self._idle.setdefault(buf.capacity, []).append(buf)
            self._idle.move_to_end(buf.capacity)
            self._idle_bytes += buf.capacity
            while self._idle_bytes > self.max_idle_bytes and self._idle:
                size, bucket = next(iter(self._idle.items()))
                bucket.pop()
                self._idle_bytes -= size
                if not bucket:
                    del self._idle[size]

    def live_count(self) -> int:
        """Buffers handed out and not yet fully released (debug; tests assert 0)."""
        with self._lock:
            return len(self._live)

    def live_bytes(self) -> int:
        with self._lock:
            return self._live_bytes

    def idle_bytes(self) -> int:
        with self._lock:
            return self._idle_bytes

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0
