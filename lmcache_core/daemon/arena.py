"""The shared host arena: one memfd (or a file under a shared-memory directory) per tenant,
mapped by the daemon and every client of that tenant, carved into chunk slots.

The daemon allocates slots (:class:`ExtentAllocator`); a client gathers a store into its
slot and scatters a load out of one, so KV crosses between client and daemon without a
copy. Separate arenas per tenant are the isolation boundary: a client maps only its own
tenant's memory, so it cannot read or overwrite another tenant's chunks.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
from typing import TYPE_CHECKING, Callable

from ..memory import ALIGN, BufferPool, PooledBuffer, round_up

if TYPE_CHECKING:
    import torch


class ExtentAllocator:
    """First-fit allocator of byte ranges in ``[0, size)``, 4096-aligned, coalescing on free."""

    def __init__(self, size: int, align: int = ALIGN) -> None:
        self.size = size // align * align
        self.align = align
        self._starts: list[int] = [0] if self.size else []
        self._lens: list[int] = [self.size] if self.size else []
        self._held: dict[int, int] = {}
        self.used = 0
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> int | None:
        n = round_up(max(nbytes, 1), self.align)
        with self._lock:
            for i, length in enumerate(self._lens):
                if length >= n:
                    off = self._starts[i]
                    if length == n:
                        del self._starts[i], self._lens[i]
                    else:
                        self._starts[i] += n
                        self._lens[i] -= n
                    self._held[off] = n
                    self.used += n
                    return off
        return None

    def free(self, off: int) -> None:
        with self._lock:
            n = self._held.pop(off)  # KeyError: a double free is a bug, never ignored
            self.used -= n
            i = bisect.bisect_left(self._starts, off)
            # merge with the next extent, then the previous one
            if i < len(self._starts) and off + n == self._starts[i]:
                n += self._lens[i]
                del self._starts[i], self._lens[i]
            if i > 0 and self._starts[i - 1] + self._lens[i - 1] == off:
                self._lens[i - 1] += n
            else:
                self._starts.insert(i, off)
                self._lens.insert(i, n)

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def largest_free(self) -> int:
        with self._lock:
            return max(self._lens, default=0)


class Arena:
    """A shared mapping of ``size`` bytes: created by the daemon, attached by clients."""

    def __init__(self, fd: int, size: int, path: str = "", owner: bool = False, populate: bool = False) -> None:
        import torch

        self.fd = fd
        self.size = size
        self.path = path
        self._owner = owner
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        self._mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        self.tensor: "torch.Tensor" = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.base = int(self.tensor.data_ptr())

    @classmethod
    def create(cls, size: int, name: str, directory: str = "", populate: bool = False) -> "Arena":
        """A new arena: a memfd (passed to clients over the Unix socket), or with ``directory``
        a file there (e.g. /dev/shm, mounted into other containers) that clients open by path."""
        size = round_up(size)
        if directory:
            path = os.path.join(directory, f"lmcache-arena-{name}-{os.getpid()}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        else:
            path = ""
            fd = os.memfd_create(f"lmcache-arena-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, path, owner=True, populate=populate)
        except BaseException:
            os.close(fd)
            if path:
                os.unlink(path)
            raise

    @classmethod
    def attach(cls, fd: int | None, size: int, path: str = "") -> "Arena":
        if fd is None:
            fd = os.open(path, os.O_RDWR)
        return cls(fd, size, path)

    def view(self, offset: int, nbytes: int) -> "torch.Tensor":
        if offset < 0 or offset + nbytes > self.size:
            raise ValueError(f"slot [{offset}:{offset + nbytes}] outside the {self.size}-byte arena")
        return self.tensor[offset : offset + nbytes]

    def close(self) -> None:
        """Close the descriptor (the mapping lives on while tensors view it) and remove the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._owner and self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class ArenaPool(BufferPool):
    """A :class:`BufferPool` whose buffers are slots of an arena. ``acquire`` takes a slot
    from ``take`` (the daemon's allocator, or a client's request to the daemon); the last
    release hands it to ``give`` (free it, or tell the daemon). Nothing is kept idle."""

    def __init__(self, arena: Arena, take: Callable[[int], int | None], give: Callable[[int, int], None]) -> None:
        super().__init__(allocate=lambda n: arena.view(0, 0), max_idle_bytes=0)
        self.arena = arena
        self._take = take
        self._give = give

    def offset(self, buf: PooledBuffer) -> int:
        return buf.address - self.arena.base

    def wrap(self, offset: int, nbytes: int) -> PooledBuffer:
        """A pool buffer over an existing slot (the caller owns one reference)."""
        size = round_up(max(nbytes, 1))
        view = self.arena.view(offset, size)
        buf = PooledBuffer(self, view, view)
        with self._lock:
            self._live.add(id(buf))
            self._live_bytes += size
            self.allocations += 1
        return buf

    def acquire(self, nbytes: int) -> PooledBuffer:
        off = self._take(round_up(max(nbytes, 1)))
        if off is None:
            raise MemoryError(f"the daemon's arena has no room for {nbytes} bytes")
        return self.wrap(off, nbytes)

    def _give_back(self, buf: PooledBuffer) -> None:
        with self._lock:
            self._live.discard(id(buf))
            self._live_bytes -= buf.capacity
        self._give(self.offset(buf), buf.capacity)

    def close(self) -> None:
        with self._lock:
            self._closed = True
