"""One Triton kernel for every layout: KV between paged plane views and chunk tensors.

The kernel reads only descriptors: a table of per-(layer, plane) base addresses
with one set of element strides ``(block, token, head, dim)`` shared by all
planes (true of every constructor in :mod:`lmcache_core.layout`), and a table of
chunks (base address, layer/plane/token strides, where its slots start, how many
tokens). One launch covers every selected layer, both planes and every chunk of
a batch; each program moves one token tile of one plane of one chunk at a time, and the
grid is either one program per tile or capped (the programs then loop over the tiles), so
a per-layer copy running beside the model's kernels can be held to a few SMs.

Every address is an element offset from one base tensor of the moved integer
type (all of them share the device's unified virtual address space), so a chunk
may live in device memory or in pinned host memory mapped into that space (UVA):
the same kernel then writes straight over PCIe. Offsets and strides carry
16-byte divisibility hints where they hold, so loads and stores are 16 bytes
wide. Values move as integers of the element's width, bit for bit for every dtype.

On a CPU the kernel runs under ``TRITON_INTERPRET=1`` (slowly: tests use small
shapes); :func:`kernel_available` says whether it can run for a given device.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Sequence

from .reference import Batch, check_chunk, check_slots, layer_list

if TYPE_CHECKING:
    import torch

    from lmcache_core.layout import PagedKV

logger = logging.getLogger(__name__)

try:  # Triton is optional: without it devices use the torch reference.
    import triton
    import triton.language as tl

    _TRITON_ERROR = ""
except Exception as exc:  # noqa: BLE001 - a broken Triton install must not break the import
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

TILE_BYTES = 16384  # bytes one program moves per plane: 16 KiB keeps 16-byte accesses busy
NUM_WARPS = 4  # warps per program (benchmarks/gpu_transfer.py sweeps both knobs)
_CHUNK_COLS = 6  # addr, stride_layer, stride_plane, stride_token, slot_start, n_tokens


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_available(device: "torch.device") -> tuple[bool, str]:
    """Whether the kernel can run for KV on ``device``, and why not."""
    if triton is None:
        return False, _TRITON_ERROR
    if device.type == "cpu":
        if interpreting():
            return True, "Triton interpreter (TRITON_INTERPRET=1)"
        return False, "KV on the CPU: set TRITON_INTERPRET=1 to run the kernel in the interpreter"
    if device.type != "cuda":  # torch's HIP build also reports 'cuda'
        return False, f"Triton has no backend for {device.type!r} devices here"
    return True, "Triton"


if triton is not None:

    def _kv_copy_kernel(
        base,  # any tensor of the moved integer type: every address is an element offset from it
        plane_offs,  # int64 [num_layers * P]: element offset of each (layer, plane) view from base
        layer_ids,  # int32 [n_sel]: the selected layers
        chunk_tab,  # int64 [n_chunks, 6]: offset, stride_layer, stride_plane, stride_token, slot_start, n
        slots,  # int64 [total tokens]: concatenated slots of all chunks
        s_blk,
        s_tok,
        s_head,
        s_dim,
        block_size,
        P: tl.constexpr,
        DIM: tl.constexpr,
        HIDDEN: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
        GATHER: tl.constexpr,
        VEC: tl.constexpr,  # elements per 16 bytes when every offset and stride allows it, else 1
        n_tiles,  # token tiles per chunk
        n_chunks,
        n_work,  # n_tiles * n_chunks * selected layers * P: one tile of one plane each
    ):
        # A grid of at most n_work programs, each looping over tiles n_prog apart: one program
        # per tile when the grid is full, a few resident programs when the caller caps it (a
        # layer's load beside the model's kernels must not take every SM).
        # (a while loop: the interpreter cannot take a tensor as a range bound)
        w = tl.program_id(0)
        while w < n_work:
            _move_tile(base, plane_offs, layer_ids, chunk_tab, slots, s_blk, s_tok, s_head, s_dim,
                       block_size, w % n_tiles, (w // n_tiles) % n_chunks, w // (n_tiles * n_chunks),
                       P, DIM, HIDDEN, BLOCK_T, BLOCK_H, GATHER, VEC)
            w += tl.num_programs(0)

    def _move_tile_fn(base, plane_offs, layer_ids, chunk_tab, slots, s_blk, s_tok, s_head, s_dim, block_size,
                      pid_t, c, lp, P: tl.constexpr, DIM: tl.constexpr, HIDDEN: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, GATHER: tl.constexpr, VEC: tl.constexpr):
        p = lp % P
        layer = tl.load(layer_ids + lp // P).to(tl.int64)
        row = chunk_tab + c * 6
        buf_off = tl.load(row)
        s_l = tl.load(row + 1)
        s_p = tl.load(row + 2)
        s_t = tl.load(row + 3)
        start = tl.load(row + 4)
        n = tl.load(row + 5)
        plane_off = tl.load(plane_offs + layer * P + p)
        if VEC > 1:
            buf_off = tl.multiple_of(buf_off, VEC)
            plane_off = tl.multiple_of(plane_off, VEC)
            s_l = tl.multiple_of(s_l, VEC)
            s_p = tl.multiple_of(s_p, VEC)
            s_t = tl.multiple_of(s_t, VEC)

        tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = tok < n
        slot = tl.load(slots + start + tok, mask=tmask, other=0)
        blk = slot // block_size
        off = slot - blk * block_size
        j = tl.arange(0, BLOCK_H)
        inner = (j // DIM) * s_head + (j % DIM) * s_dim
        paged = plane_off + blk[:, None] * s_blk + off[:, None] * s_tok + inner[None, :]
        chunk = buf_off + layer * s_l + p * s_p + tok.to(tl.int64)[:, None] * s_t + j[None, :]
        if BLOCK_H == HIDDEN:
            mask = tmask[:, None]
        else:
            mask = tmask[:, None] & (j < HIDDEN)[None, :]
        if GATHER:
            vals = tl.load(base + paged, mask=mask)
            tl.store(base + chunk, vals, mask=mask)
        else:
            vals = tl.load(base + chunk, mask=mask)
            tl.store(base + paged, vals, mask=mask)


_JITTED: Any = None
_move_tile: Any = None  # the jitted tile mover the kernel calls (a global: Triton resolves it by name)


def _kernel() -> Any:
    """The kernel, jitted on first use: Triton decides between compiling and interpreting
    (``TRITON_INTERPRET``) when a function is decorated, so decorate as late as possible."""
    global _JITTED, _move_tile
    if _JITTED is None:
        _move_tile = triton.jit(_move_tile_fn)
        _JITTED = triton.jit(_kv_copy_kernel)
    return _JITTED


@dataclass(frozen=True)
class PlaneTable:
    """A paged cache as the kernel sees it: plane addresses on the device plus shared strides."""

    addrs: "torch.Tensor"  # int64 [num_layers * planes] element offsets from ``base`` on the KV device
    base: "torch.Tensor"  # a one-element tensor of the moved integer type on the KV device
    strides: tuple[int, int, int, int]  # (block, token, head, dim) in elements
    aligned: bool  # every plane base 16-byte aligned and block/token/head strides multiples of VEC
    streams: set[int] = field(default_factory=set, init=False, compare=False, repr=False)  # used on (:func:`use_on`)


class _PlaneCache:
    """Plane tables per PagedKV (by identity; the cache keeps the PagedKV alive), LRU-bounded."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[int, tuple[Any, PlaneTable | None, str]] = OrderedDict()

    def get(self, kv: "PagedKV") -> tuple[PlaneTable | None, str]:
        with self._lock:
            hit = self._items.get(id(kv))
            if hit is not None and hit[0]() is kv:  # weak: a dropped cache's memory is freed
                self._items.move_to_end(id(kv))
                return hit[1], hit[2]
        table, why = _build_plane_table(kv)
        with self._lock:
            self._items[id(kv)] = (weakref.ref(kv), table, why)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return table, why


def _build_plane_table(kv: "PagedKV") -> tuple[PlaneTable | None, str]:
    import torch

    planes = [pl for lp in kv.layers for pl in ((lp.k,) if lp.v is None else (lp.k, lp.v))]
    strides = tuple(int(s) for s in planes[0].stride())
    for i, pl in enumerate(planes):
        if tuple(int(s) for s in pl.stride()) != strides:
            return None, (f"plane {i} has strides {tuple(pl.stride())}, plane 0 {strides}: the kernel "
                          "takes one stride set for all planes")
    elem = planes[0].element_size()
    if elem not in (1, 2, 4):
        return None, f"element size {elem} is not moved by the kernel"
    vec = 16 // elem
    base = torch.empty(256 // elem, dtype=_INT_TYPES[elem], device=kv.device)
    addrs = [int(pl.data_ptr()) for pl in planes]
    if any((a - base.data_ptr()) % elem for a in addrs):
        return None, f"plane addresses are not multiples of the element size {elem}"
    offs = [(a - base.data_ptr()) // elem for a in addrs]
    aligned = all(a % 16 == 0 for a in addrs) and strides[3] == 1 and all(s % vec == 0 for s in strides[:3])
    table = torch.tensor(offs, dtype=torch.int64).to(kv.device)
    return PlaneTable(table, base, strides, aligned), ""  # type: ignore[arg-type]


_PLANES = _PlaneCache()


def plane_table(kv: "PagedKV") -> tuple[PlaneTable | None, str]:
    """The kernel's description of ``kv``, or None and the reason the kernel cannot take it."""
    return _PLANES.get(kv)


def _int_types() -> dict[int, Any]:
    import torch

    return {1: torch.int8, 2: torch.int16, 4: torch.int32}


class _IntTypes(dict):  # resolved lazily so importing this module does not import torch
    def __missing__(self, key: int) -> Any:
        self.update(_int_types())
        return dict.__getitem__(self, key)


_INT_TYPES: dict[int, Any] = _IntTypes()


def chunk_rows(batch: Batch, elem: int) -> tuple[list[int], bool]:
    """Flattened chunk table rows for ``batch`` (absolute byte addresses in column 0, turned
    into element offsets by :func:`launch`) and whether all are 16-byte friendly."""
    rows: list[int] = []
    vec = 16 // elem
    aligned = True
    start = 0
    for slots, chunk in batch:
        st = chunk.stride()
        if st[3] != 1:
            raise ValueError(f"chunk hidden dimension must be contiguous, strides are {tuple(st)}")
        addr = int(chunk.data_ptr())
        n = int(slots.numel())
        rows += [addr, int(st[0]), int(st[1]), int(st[2]), start, n]
        aligned = aligned and addr % 16 == 0 and st[0] % vec == 0 and st[1] % vec == 0 and st[2] % vec == 0
        start += n
    return rows, aligned


def to_device(values: "list[int] | torch.Tensor", dtype: "torch.dtype", device: "torch.device") -> "torch.Tensor":
    """A small host table on ``device`` without stalling the host: pageable host-to-device
    copies wait for the stream, so accelerator copies go through pinned memory."""
    import torch

    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    if t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class Upload:
    """Where a cached table's host-to-device copy was queued (:func:`to_device` does not wait): a
    kernel on another stream waits for it, so it never reads the table before it lands."""

    __slots__ = ("event", "stream")

    def __init__(self, device: "torch.device") -> None:
        import torch

        cur = torch.cuda.current_stream(device)
        self.event, self.stream = torch.cuda.Event(), int(cur.cuda_stream)
        self.event.record(cur)

    @staticmethod
    def after(device: "torch.device") -> "Upload | None":
        """The upload just queued on ``device``'s current stream (None off CUDA: copies are done)."""
        return Upload(device) if device.type == "cuda" else None

    def wait_on(self, stream: Any) -> None:
        """``stream`` (a torch CUDA stream) waits for the upload unless it queued it itself."""
        if int(stream.cuda_stream) != self.stream:
            stream.wait_event(self.event)


def use_on(stream: Any, seen: set[int], uploads: Sequence["Upload | None"], tensors: Sequence["torch.Tensor"]
           ) -> None:
    """Once per stream: ``stream`` waits for ``uploads`` and the caching allocator learns that
    ``tensors`` are used on it (``record_stream``). ``seen`` holds the streams already done: a
    later launch on one of them is stream-ordered after the first one's waits, and a block keeps
    the streams recorded on it until it is freed (every launch did both before: five
    ``record_stream`` calls and the upload waits, a good part of a launch's host time)."""
    sid = int(stream.cuda_stream)
    if sid in seen:
        return
    for upload in uploads:
        if upload is not None:
            upload.wait_on(stream)
    for t in tensors:
        t.record_stream(stream)
    seen.add(sid)


_LAYER_IDS: OrderedDict[tuple[Any, ...], tuple["torch.Tensor", Upload | None, set[int]]] = OrderedDict()


def layer_ids(sel: Sequence[int], device: "torch.device", stream: Any = None) -> "torch.Tensor":
    """The selected layers as an int32 tensor on ``device``, cached (the same few repeat); a caller
    on another stream than the first waits for its upload and records its use there, once per
    stream (:func:`use_on`; ``stream``: the caller's current stream where it has it)."""
    import torch

    key = (str(device), tuple(sel))
    hit = _LAYER_IDS.get(key)
    if hit is None:
        t = to_device(list(sel), torch.int32, device)
        upload = Upload.after(device)
        _LAYER_IDS[key] = (t, upload, {upload.stream} if upload is not None else set())
        while len(_LAYER_IDS) > 512:
            _LAYER_IDS.popitem(last=False)
        return t
    t, upload, seen = hit
    if upload is not None:
        use_on(stream if stream is not None else torch.cuda.current_stream(device), seen, (upload,), (t,))
    return t


@dataclass(frozen=True)
class Prepared:
    """A batch as the kernel takes it, reusable for every layer of that batch."""

    tab: "torch.Tensor"  # int64 [n_chunks, 6] on the KV device
    slots: "torch.Tensor"  # int64 [total tokens] on the KV device
    n_chunks: int
    max_n: int
    aligned: bool
    ready: tuple[Upload | None, ...] = ()  # where ``tab`` and ``slots`` were queued (:class:`Upload`)
    streams: set[int] = field(default_factory=set, init=False, compare=False, repr=False)  # used on (:func:`use_on`)


def prepare(kv: "PagedKV", table: PlaneTable, batch: Batch, *, slots: "torch.Tensor | None" = None,
            rows: list[int] | None = None, rows_aligned: bool | None = None) -> Prepared:
    """Build the chunk table (and concatenated slots) of ``batch`` on the KV device.

    ``rows`` (from :func:`chunk_rows`, absolute addresses) and ``slots`` may be given
    when the caller has them (the staged path points rows at its staging ring).
    """
    import torch

    dev = kv.device
    elem = kv.layers[0].k.element_size()
    if rows is None:
        rows, rows_aligned = chunk_rows(batch, elem)
    max_n = max((int(s.numel()) for s, _ in batch), default=0)
    if slots is None:
        slots = concat_slots([s for s, _ in batch], dev)
    base_addr = int(table.base.data_ptr())
    rows = list(rows)
    for i in range(0, len(rows), _CHUNK_COLS):
        delta = rows[i] - base_addr
        if delta % elem:
            raise ValueError(f"chunk address {rows[i]:#x} is not a multiple of the element size {elem}")
        rows[i] = delta // elem
    tab = to_device(rows, torch.int64, dev)
    # one event after both: slots built here, or by the caller on this stream, came first
    return Prepared(tab, slots, len(batch), max_n, bool(rows_aligned), (Upload.after(dev),))


def upload_with_slots(rows: Any, slots: Sequence["torch.Tensor"], device: "torch.device"
                      ) -> "tuple[torch.Tensor, torch.Tensor, Upload | None]":
    """``rows`` (an int64 numpy array, the kernel's chunk tables) and ``slots`` concatenated on
    ``device`` and where that was queued: host slots go with the rows as one pinned buffer and
    one host-to-device copy (a staged batch's first layer paid one pinning, one copy and one
    event per ring group and table before); slots already on the device are concatenated there."""
    import torch

    flat = torch.from_numpy(rows.reshape(-1))
    parts, devices = _flat_slots(slots)
    if device.type == "cpu" or devices != {"cpu"}:
        return to_device(flat, torch.int64, device), concat_slots(parts, device), Upload.after(device)
    n = flat.numel()
    host = torch.empty(n + sum(map(torch.Tensor.numel, parts)), dtype=torch.int64, pin_memory=True)
    host[:n].copy_(flat)
    if len(parts) == 1:
        host[n:].copy_(parts[0])
    else:
        torch.cat(parts, out=host[n:])
    dev = host.to(device, non_blocking=True)
    return dev[:n], dev[n:], Upload.after(device)


def _flat_slots(slots: Sequence["torch.Tensor"]) -> "tuple[Sequence[torch.Tensor], set[str]]":
    """``slots`` as 1-D int64 tensors (the same list where they all are: the engine's per-chunk
    slices, checked in C-level passes instead of a reshape and a conversion per part) and the
    device types they are on."""
    import torch

    devices = {d.type for d in set(map(attrgetter("device"), slots))}
    if set(map(attrgetter("dtype"), slots)) == {torch.int64} and set(map(torch.Tensor.dim, slots)) == {1}:
        return slots, devices
    return [s.reshape(-1).to(torch.int64) for s in slots], devices


def concat_slots(slots: Sequence["torch.Tensor"], device: "torch.device") -> "torch.Tensor":
    """All slots in one int64 tensor on ``device`` (concatenated where they already are)."""
    import torch

    parts, _ = _flat_slots(slots)
    if all(p.device == device for p in parts):
        return torch.cat(list(parts)) if len(parts) > 1 else parts[0].contiguous()
    return to_device(torch.cat([p.cpu() for p in parts]), torch.int64, device)


def run(kv: "PagedKV", table: PlaneTable, prep: Prepared, layers: Sequence[int] | None, gather: bool,
        programs: int = 0) -> None:
    """Enqueue one kernel launch on the current stream for a prepared batch and a layer selection.

    ``programs``: at most this many programs (each loops over its share of the tiles); 0 for
    one program per tile, the whole device."""
    import torch

    if triton is None:
        raise RuntimeError(_TRITON_ERROR)
    sel = layer_list(kv, layers)
    if not sel or prep.max_n == 0 or prep.n_chunks == 0:
        return
    dev = kv.device
    elem = kv.layers[0].k.element_size()
    stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None
    lid = layer_ids(sel, dev, stream)
    g = kv.geometry
    block_h = triton.next_power_of_2(g.hidden)
    block_t = max(1, min(triton.next_power_of_2(prep.max_n), TILE_BYTES // (block_h * elem)))
    if interpreting():  # the interpreter pays per program, not per element
        block_t = triton.next_power_of_2(prep.max_n)
    vec = 16 // elem if (table.aligned and prep.aligned) else 1
    n_tiles = triton.cdiv(prep.max_n, block_t)
    n_work = n_tiles * prep.n_chunks * len(sel) * g.kv_planes
    grid = (min(n_work, programs) if programs > 0 else n_work,)
    sb, stok, sh, sd = table.strides
    if stream is not None:  # cached tables may come from another stream: landed, and kept alive for this one
        use_on(stream, table.streams, (), (table.addrs, table.base))
        use_on(stream, prep.streams, prep.ready, (prep.slots, prep.tab))
    _kernel()[grid](
        table.base, table.addrs, lid, prep.tab, prep.slots, sb, stok, sh, sd, kv.block_size,
        P=g.kv_planes, DIM=g.head_dim, HIDDEN=g.hidden, BLOCK_T=block_t, BLOCK_H=block_h,
        GATHER=gather, VEC=vec, n_tiles=n_tiles, n_chunks=prep.n_chunks, n_work=n_work, num_warps=NUM_WARPS,
    )


def launch(kv: "PagedKV", table: PlaneTable, batch: Batch, layers: Sequence[int] | None, gather: bool,
           *, slots: "torch.Tensor | None" = None, rows: list[int] | None = None,
           rows_aligned: bool | None = None, programs: int = 0) -> None:
    """Check, prepare and launch ``batch`` in one call (every chunk reachable from the KV device)."""
    for s, ch in batch:
        check_chunk(kv, s, ch)
    if not batch or not layer_list(kv, layers):
        return
    run(kv, table, prepare(kv, table, batch, slots=slots, rows=rows, rows_aligned=rows_aligned), layers, gather,
        programs)


def gather_batch(kv: "PagedKV", batch: Batch, layers: Sequence[int] | None = None) -> None:
    """Kernel gather of a batch whose chunks the KV device can address (device or mapped memory);
    every slot is range checked first, so the kernel never touches memory outside the cache."""
    table, why = plane_table(kv)
    if table is None:
        raise ValueError(why)
    check_slots(kv, batch)
    launch(kv, table, batch, layers, True)


def scatter_batch(kv: "PagedKV", batch: Batch, layers: Sequence[int] | None = None) -> None:
    """Kernel scatter; the inverse of :func:`gather_batch` (slots range checked first)."""
    table, why = plane_table(kv)
    if table is None:
        raise ValueError(why)
    check_slots(kv, batch)
    launch(kv, table, batch, layers, False)
