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
import time
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

    __slots__ = ("_pool", "_backing", "tensor", "capacity", "_refs", "_typed", "__weakref__")

    def __init__(self, pool: "BufferPool", backing: "torch.Tensor", tensor: "torch.Tensor") -> None:
        self._pool = pool
        self._backing = backing  # the allocation (may start before the aligned view)
        self.tensor = tensor  # 1-D uint8, aligned, len == capacity
        self.capacity = int(tensor.numel())
        self._refs = 1
        self._typed: "dict[torch.dtype, torch.Tensor] | None" = None

    def typed(self, dtype: "torch.dtype") -> "torch.Tensor":
        """The whole buffer as a 1-D tensor of ``dtype``, made once per dtype outside inference
        mode (a view made inside it could not be written outside it), for views of a chunk's
        payload in one ``as_strided`` (a chain of views and a slice cost three times as much)."""
        typed = self._typed
        if typed is None:
            typed = self._typed = {}
        t = typed.get(dtype)
        if t is None:
            import torch

            with torch.inference_mode(False):
                t = typed[dtype] = self.tensor.view(dtype)
        return t

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
    """Pool of aligned host buffers, kept per size for reuse, bounded in idle bytes.

    With ``reserve_bytes``, a background thread keeps that many bytes of idle buffers of the
    largest size asked for (a whole chunk) ready, so the caller's thread (the engine's step)
    does not pay for a fresh allocation while the cache fills up (pinned allocation runs at
    about 1 GB/s on a GPU host, 30-50x slower than the copy it serves). It refills only
    after ``quiet_s`` without a request: a pinned allocation takes the driver's lock and
    stalled a store's copies beside it (measured: 0.8 GB/s with an eager refill, 16 GB/s
    with the quiet period), and never while a device copy into or out of the pool's buffers is
    under way (:meth:`transfer_begun` / :meth:`transfer_done`: a layer-by-layer load takes no
    buffer, so the quiet period alone let the refill run beside its copies). ``sync_allocations``
    counts the allocations made on a caller's thread.

    With ``slab_bytes``, the reserve's buffers (whole chunks, up to a third of it each) are carved
    one after another out of slabs of that size, each one allocation; a caller's thread carves a
    whole-chunk buffer from what is left of the slab in use, else allocates it alone, as every
    other size (pinning a whole slab would cost its step several buffers' time). torch's pinned
    allocator rounds every allocation up to a power of two, so a whole-chunk buffer (a 4 KiB
    header over a power-of-two payload) allocated alone pins twice its size and takes twice the
    time; a power-of-two slab is pinned as asked. A slab's memory returns to the allocator when the last buffer carved
    from it is dropped, so a buffer dropped (past ``max_idle_bytes``) while a sibling lives frees
    nothing: at worst a slab stays pinned for one live buffer (128 MiB for a 32 MiB chunk, where
    alone it pins 64 MiB); buffers carved together are a request's chunks, which a tier keeps
    and evicts together. The uncarved tail of the slab in use is not counted in the idle or live
    bytes."""

    def __init__(self, allocate: Callable[[int], "torch.Tensor"] | None = None,
                 max_idle_bytes: int = 1 << 30, reserve_bytes: int = 0, slab_bytes: int = 0) -> None:
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
        self.allocations = 0  # fresh buffers (not reused), for zero-copy tests
        self.host_allocations = 0  # calls to ``allocate`` (a slab serves many fresh buffers)
        self.sync_allocations = 0  # of those calls, made on a caller's thread
        self.slab_bytes = slab_bytes
        self._slab: "torch.Tensor | None" = None  # the slab being carved, and its next free offset
        self._slab_off = 0
        self._carve = threading.Lock()  # one carver at a time (a slab is allocated outside it)
        self.reserve_bytes = min(reserve_bytes, max_idle_bytes)
        self._reserve_size = 0  # the size the refiller keeps ready
        self._refill = threading.Condition(self._lock)
        self._refiller: threading.Thread | None = None
        self._closed = False
        self._last_acquire = 0.0
        self._transfers = 0  # device copies under way (the refiller waits for none)
        #: The refiller allocates only after the pool has been quiet this long: a pinned
        #: allocation takes the driver's lock and would stall the copies of a store under way.
        self.quiet_s = 0.1

    def acquire(self, nbytes: int) -> PooledBuffer:
        size = round_up(max(nbytes, 1))
        with self._lock:
            self._last_acquire = time.monotonic()
            bucket = self._idle.get(size)
            if bucket:
                buf = bucket.pop()
                if not bucket:
                    del self._idle[size]
                self._idle_bytes -= size
                buf._refs = 1
            else:
                buf = None
            if self.reserve_bytes and size >= self._reserve_size:  # the largest (whole chunks)
                self._wake_refiller(size)
        if buf is None:
            buf = self._new(size, caller=True)
        with self._lock:
            self._live.add(id(buf))
            self._live_bytes += size
        return buf

    def prepare(self, sizes: "list[int]") -> None:
        """A hint that ``acquire`` follows for each of ``sizes`` (a pool over a daemon's arena asks
        for them in one round trip); plain pools ignore it."""

    def unprepare(self) -> None:
        """Drop what ``prepare`` set aside and ``acquire`` did not take."""

    def _new(self, size: int, caller: bool = False) -> PooledBuffer:
        # only whole-chunk buffers (the reserve's size) share slabs: a partial chunk kept long in
        # a tier would hold a whole slab pinned for its few bytes
        if self.slab_bytes and size == self._reserve_size and size <= self.slab_bytes // 3:
            buf = self._carved(size, caller)
            if buf is not None:
                return buf
        backing = self._allocate(size + ALIGN)
        shift = (-backing.data_ptr()) % ALIGN
        buf = PooledBuffer(self, backing, backing[shift : shift + size])
        self._count(caller, fresh_from_allocator=True)
        return buf

    def _carved(self, size: int, caller: bool) -> "PooledBuffer | None":
        """The next ``size`` bytes (a multiple of ALIGN) of the slab in use; only the reserve's
        thread allocates a new slab, outside the carving lock (a caller's thread allocates a lone
        buffer instead: pinning a whole slab would cost its step several times a buffer's time),
        else None."""
        with self._carve:
            buf = self._cut(size)
        if buf is None and not caller:
            slab = self._allocate(self.slab_bytes)
            with self._carve:
                self._slab, self._slab_off = slab, (-slab.data_ptr()) % ALIGN
                buf = self._cut(size)
            self._count(caller, fresh_from_allocator=True)
        elif buf is not None:
            self._count(caller, fresh_from_allocator=False)
        return buf

    def _cut(self, size: int) -> "PooledBuffer | None":
        """(Under the carving lock.) ``size`` bytes of the slab in use, if it has them."""
        slab, off = self._slab, self._slab_off
        if slab is None or off + size > slab.numel():
            return None
        self._slab_off = off + size
        return PooledBuffer(self, slab, slab[off : off + size])

    def _count(self, caller: bool, fresh_from_allocator: bool) -> None:
        with self._lock:
            self.allocations += 1
            if fresh_from_allocator:
                self.host_allocations += 1
                self.sync_allocations += caller

    # -- the background reserve ------------------------------------------------------------
    def _wake_refiller(self, size: int) -> None:
        """(Under the lock.) Keep ``reserve_bytes`` of buffers of ``size`` ready."""
        if self._closed:
            return
        self._reserve_size = size
        if self._refiller is None:
            self._refiller = threading.Thread(target=self._refill_loop, name="lmcache-pool-reserve", daemon=True)
            self._refiller.start()
        self._refill.notify()

    def _short(self) -> int:
        """(Under the lock.) Buffers of the reserve size missing from the idle reserve."""
        size = self._reserve_size
        if not size or self._closed:
            return 0
        have = len(self._idle.get(size, ()))
        room = (self.max_idle_bytes - self._idle_bytes) // size
        return max(0, min(self.reserve_bytes // size - have, room))

    def _refill_loop(self) -> None:
        while True:
            with self._lock:
                self._refill.wait_for(lambda: self._closed or (self._short() > 0 and not self._transfers))
                if self._closed:
                    return
                size = self._reserve_size
                quiet = self._last_acquire + self.quiet_s - time.monotonic()
            if quiet > 0:  # a store is taking buffers right now: wait until it is done
                time.sleep(quiet)
                continue
            try:
                buf = self._new(size)
            except Exception:  # noqa: BLE001 - out of pinned memory: the caller allocates itself
                logger.exception("pool reserve: allocating %d bytes failed; reserve paused", size)
                with self._lock:
                    self.reserve_bytes = 0
                return
            with self._lock:
                self._idle.setdefault(size, []).append(buf)
                self._idle_bytes += size

    def transfer_begun(self) -> None:
        """A device copy into or out of this pool's buffers started: the refiller allocates nothing
        until every such copy is done and ``quiet_s`` has passed."""
        with self._lock:
            self._transfers += 1

    def transfer_done(self) -> None:
        with self._lock:
            self._transfers = max(0, self._transfers - 1)
            self._last_acquire = time.monotonic()  # the quiet period counts from here
            self._refill.notify()

    def wait_reserve(self, timeout: float = 10.0) -> bool:
        """Block until the reserve is full (tests, warm-up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._short():
                    return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        """Stop the reserve thread and drop idle buffers."""
        with self._lock:
            self._closed = True
            self._refill.notify_all()
        if self._refiller is not None:
            self._refiller.join(timeout=5)
        self.clear()
        with self._carve:
            self._slab = None

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
