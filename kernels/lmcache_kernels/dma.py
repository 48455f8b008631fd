"""Copy-engine batches: many pointer-to-pointer copies in one driver call, no SMs used.

A layer-by-layer load runs beside the model's kernels. A copy kernel needs SMs, and a
large GEMM holds every SM for its whole run (its programs fill the register files), so a
kernel copy waits and the load serialises behind compute. The copy engines need no SM:
``cuMemcpyBatchAsync`` (CUDA 12.8+) queues a whole layer's copies, one per run of tokens
that is contiguous on both sides, with one call, flagged to prefer overlapping compute.

:func:`copier` returns the binding for a device (the CUDA driver through ``ctypes``, or
``memmove`` over host memory so the address arithmetic is tested on a CPU), or None and
the reason; :func:`runs` turns a chunk's slots into those runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

logger = logging.getLogger(__name__)

_SRC_ACCESS_ORDER_STREAM = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM: sources read in stream order
_LOC_DEVICE, _LOC_HOST = 1, 2  # CUmemLocationType
_PREFER_OVERLAP_WITH_COMPUTE = 1  # CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _MemLocation), ("dstLocHint", _MemLocation),
                ("flags", ctypes.c_uint)]


class HostCopier:
    """The same batch on host memory with ``memmove``, one copy at a time: what CI runs."""

    name = "memmove"

    def copy(self, dsts: "np.ndarray", srcs: "np.ndarray", sizes: "np.ndarray", stream: Any, to_device: bool,
             device_index: int = 0) -> None:
        for d, s, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
            ctypes.memmove(d, s, n)

    def copy_within(self, dsts: "np.ndarray", srcs: "np.ndarray", sizes: "np.ndarray", stream: Any,
                    device_index: int = 0) -> None:
        """Copies whose both sides are in the device's memory (here: host memory)."""
        self.copy(dsts, srcs, sizes, stream, True, device_index)


class DriverCopier:
    """``cuMemcpyBatchAsync`` through ``ctypes``: the CUDA 13 entry point (``_v2``, 8 arguments)
    where the driver has it, else the CUDA 12.8 one (9, with a failure index)."""

    name = "cuMemcpyBatchAsync"

    def __init__(self, lib: Any) -> None:
        fn = getattr(lib, "cuMemcpyBatchAsync_v2", None)
        self.v2 = fn is not None
        if fn is None:
            fn = lib.cuMemcpyBatchAsync
        p = ctypes.c_void_p
        fn.restype = ctypes.c_int
        fn.argtypes = [p, p, p, ctypes.c_size_t, p, p, ctypes.c_size_t] + ([] if self.v2 else [p]) + [p]
        self.fn = fn
        self._attrs: dict[tuple[bool, int], _MemcpyAttributes] = {}
        self._zero = (ctypes.c_size_t * 1)(0)
        self._fail = ctypes.c_size_t(0)
        self._lock = threading.Lock()
        self.plain = False  # set once the driver refused the hinted attributes

    def _attributes(self, to_device: bool | None, device_index: int, plain: bool = False) -> _MemcpyAttributes:
        """Stream-ordered sources, location hints and the overlap flag; ``plain``: no hints and
        no flag (a driver that refuses the hinted form gets this one). ``to_device`` None: both
        sides in the device's memory."""
        key = (to_device, device_index, plain)
        a = self._attrs.get(key)
        if a is None:
            host, dev = _MemLocation(_LOC_HOST, 0), _MemLocation(_LOC_DEVICE, device_index)
            if plain:
                host = dev = _MemLocation(0, 0)
            src, dst = (dev, dev) if to_device is None else (host, dev) if to_device else (dev, host)
            a = _MemcpyAttributes(_SRC_ACCESS_ORDER_STREAM, src, dst, 0 if plain else _PREFER_OVERLAP_WITH_COMPUTE)
            self._attrs[key] = a
        return a

    def copy_within(self, dsts: "np.ndarray", srcs: "np.ndarray", sizes: "np.ndarray", stream: Any,
                    device_index: int = 0) -> None:
        """Device-to-device copies on the copy engines (both sides in ``device_index``'s memory)."""
        self.copy(dsts, srcs, sizes, stream, None, device_index)

    def copy(self, dsts: "np.ndarray", srcs: "np.ndarray", sizes: "np.ndarray", stream: Any,
             to_device: bool | None, device_index: int = 0) -> None:
        n = int(sizes.shape[0])
        if n == 0:
            return
        if not stream:
            raise ValueError("cuMemcpyBatchAsync does not take the legacy default stream")
        err = 0
        for plain in ((True,) if self.plain else (False, True)):
            attrs = self._attributes(to_device, device_index, plain)
            args = [dsts.ctypes.data, srcs.ctypes.data, sizes.ctypes.data, n, ctypes.addressof(attrs),
                    ctypes.addressof(self._zero), 1]
            with self._lock:  # the failure index is one shared slot
                if not self.v2:
                    args.append(ctypes.addressof(self._fail))
                err = self.fn(*args, ctypes.c_void_p(int(stream)))
            if err == 0:
                if plain and not self.plain:
                    self.plain = True
                    logger.info("cuMemcpyBatchAsync refused location hints and the overlap flag; copying without")
                return
        raise RuntimeError(f"cuMemcpyBatchAsync of {n} copies failed with CUresult {err}")


_DRIVER: tuple[Any, str] | None = None
_DRIVER_LOCK = threading.Lock()


def _driver() -> tuple[Any, str]:
    global _DRIVER
    with _DRIVER_LOCK:
        if _DRIVER is None:
            _DRIVER = _load_driver()
        return _DRIVER


def _load_driver() -> tuple[Any, str]:
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        return None, f"the CUDA driver library is not loadable ({exc})"
    version = ctypes.c_int(0)
    try:
        lib.cuDriverGetVersion(ctypes.byref(version))
    except AttributeError:
        return None, "the CUDA driver has no cuDriverGetVersion"
    if version.value < 12080:
        return None, f"the CUDA driver is {version.value // 1000}.{version.value % 1000 // 10}; batched copies need 12.8"
    try:
        return DriverCopier(lib), f"cuMemcpyBatchAsync (driver {version.value // 1000}.{version.value % 1000 // 10})"
    except AttributeError:
        return None, "the CUDA driver exports no cuMemcpyBatchAsync"


def copier(device: "torch.device") -> tuple[Any, str]:
    """The batch-copy binding for KV on ``device`` and why it was chosen, or (None, why not)."""
    if device.type == "cpu":
        return HostCopier(), "host memory (memmove)"
    import torch

    if device.type != "cuda" or torch.version.hip is not None:
        return None, f"batched copy-engine transfers are implemented for CUDA, not {device.type}" + (
            " (HIP)" if device.type == "cuda" else "")
    return _driver()


def runs(slots: "np.ndarray", block_size: int, across_blocks: bool = False
         ) -> tuple["np.ndarray", "np.ndarray", "np.ndarray", "np.ndarray"]:
    """Split a chunk's slots into runs of consecutive tokens at consecutive slots, each within
    one block, or, with ``across_blocks`` (a layout whose block ``b + 1`` follows block ``b`` in
    memory), running on into the next block when the slots go on.

    Returns (first token of each run in the chunk, its block, its offset in the block, its
    length in tokens)."""
    import numpy as np

    n = int(slots.shape[0])
    blk = slots // block_size
    off = slots - blk * block_size
    brk = np.ones(n, dtype=bool)
    if n > 1:
        brk[1:] = (slots[1:] != slots[:-1] + 1) if across_blocks else \
            (blk[1:] != blk[:-1]) | (off[1:] != off[:-1] + 1)
    starts = np.flatnonzero(brk)
    lens = np.diff(np.append(starts, n))
    return starts, blk[starts], off[starts], lens
