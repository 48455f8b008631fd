"""fp8 fused into the copy: quantise inside the gather, dequantise inside the scatter.

The chunk side is the stored form of the ``fp8`` codec (:mod:`lmcache_core.codecs.fp8`): per
layer, the e4m3 bytes ``[planes, tokens, heads * dim]`` then one bf16 scale per (plane, token,
head). A gather reads the paged cache, takes each head's ``amax``, and writes e4m3 and scales;
a scatter reads them and writes ``e4m3 * scale`` in the KV dtype. Half the bytes cross PCIe
(plus 2 per head and token), the host stores what crossed, and any tier reads it with the host
codec. One launch per layer selection covers every chunk of a batch (a chunk table, as in
:mod:`.triton_copy`); chunks may lie in device memory or in pinned host memory the device maps.

:func:`gather_ref` / :func:`scatter_ref` are the torch reference (the CPU path); the kernels
match them bit for bit (IEEE division, round-to-nearest-even conversions, the same clamp, the
sign of a value that rounds to zero).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from lmcache_core.codecs.fp8 import FP8_MAX, decode_from, encode_into, image_views

from .reference import layer_list
from .triton_copy import Upload, interpreting, layer_ids, plane_table, to_device, triton

if TYPE_CHECKING:
    import torch

    from lmcache_core.layout import PagedKV

logger = logging.getLogger(__name__)

#: one chunk of a batch: its slots and its fp8 image (uint8, ``encoded_len`` bytes, layer-major)
Batch = Sequence[tuple["torch.Tensor", "torch.Tensor"]]
#: a chunk table row: byte offset of the image from the uint8 base, tokens copied, where their
#: slots start in the concatenated slots, tokens the image holds, the image's first token copied
_COLS = 5
#: where :func:`gather_coded` / :func:`scatter_coded` run the kernel for images in host memory:
#: ``auto`` stages them in device memory on accelerators (the copy engines move the fp8 bytes;
#: a kernel reading pinned memory through SMs is slower than the link), ``always`` stages on
#: every device (the tests run the staging on a CPU), ``never`` maps them
STAGE = "auto"

if triton is not None:
    import triton.language as tl

    # globals a @triton.jit body reads must be constexpr objects (the compiler refuses others)
    _SUBNORMAL_MAGIC = tl.constexpr(1.5 * 2.0**14)  # fp32 add rounds to a multiple of 2**-9
    _F16_MAGIC = tl.constexpr(1.5 * 2.0**-1)  # fp32 add rounds to a multiple of 2**-24
    _FP8_MAX = tl.constexpr(FP8_MAX)

    @triton.jit
    def _round_subnormal(x, magic: tl.constexpr):
        """``x`` (fp32) rounded to nearest-even on the grid of ``magic``'s ulp, with the sign of
        ``x`` kept: a negative value that rounds to zero gives -0.0, as torch's conversion does
        (the magic add alone would give +0.0)."""
        a = (tl.abs(x) + magic) - magic
        b = x.to(tl.int32, bitcast=True)
        return (a.to(tl.int32, bitcast=True) | ((b >> 31) << 31)).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_bits(x, drop: tl.constexpr):
        """``x`` (fp32) rounded to nearest-even with its low ``drop`` mantissa bits cleared."""
        b = x.to(tl.int32, bitcast=True)
        b = b + ((1 << (drop - 1)) - 1) + ((b >> drop) & 1)
        b = b & (-(1 << drop))
        return b.to(tl.float32, bitcast=True)

    def _fp8_kernel(
        kbase,  # KV-dtype tensor: paged plane addresses are element offsets from it
        qbase,  # uint8 tensor: image byte offsets are from it
        sbase,  # bfloat16 tensor at the same address as qbase (scales: 2-byte offsets)
        plane_offs, layer_ids_, tab, slots,
        s_blk, s_tok, s_head, s_dim, block_size,
        shift, mult, l_first, c_first,  # see _launch
        P: tl.constexpr, HEADS: tl.constexpr, HP2: tl.constexpr, DIM: tl.constexpr,
        BLOCK_T: tl.constexpr, GATHER: tl.constexpr, DROP: tl.constexpr, KV_MAX: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        c = tl.program_id(1) + c_first
        lp = tl.program_id(2)
        p = lp % P
        layer = tl.load(layer_ids_ + lp // P).to(tl.int64)
        img = shift + mult * tl.load(tab + c * 5)
        n = tl.load(tab + c * 5 + 1)
        start = tl.load(tab + c * 5 + 2)
        big_n = tl.load(tab + c * 5 + 3)  # tokens of the image (n of them from t0 are copied)
        t0 = tl.load(tab + c * 5 + 4)
        hidden = HEADS * DIM
        llen = P * big_n * (hidden + 2 * HEADS)  # bytes of one layer of the image
        at = img + (layer - l_first) * llen  # the layer's bytes
        q0 = at + (p * big_n + t0) * hidden
        s0 = (at + P * big_n * hidden) // 2 + (p * big_n + t0) * HEADS
        tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = tok < n
        slot = tl.load(slots + start + tok, mask=tmask, other=0)
        blk = slot // block_size
        off = slot - blk * block_size
        h = tl.arange(0, HP2)
        d = tl.arange(0, DIM)
        plane_off = tl.load(plane_offs + layer * P + p)
        paged = (plane_off + blk[:, None, None] * s_blk + off[:, None, None] * s_tok
                 + h[None, :, None] * s_head + d[None, None, :] * s_dim)
        t64 = tok.to(tl.int64)
        qoff = q0 + t64[:, None, None] * hidden + h[None, :, None] * DIM + d[None, None, :]
        soff = s0 + t64[:, None] * HEADS + h[None, :]
        mask = tmask[:, None, None] & (h < HEADS)[None, :, None]
        smask = tmask[:, None] & (h < HEADS)[None, :]
        if GATHER:
            x = tl.load(kbase + paged, mask=mask, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(x), axis=2)
            scale = _round_bits(tl.div_rn(amax, _FP8_MAX), 16)  # to bf16, nearest-even
            scale = tl.where(scale > 0, scale, 1.0)
            y = tl.div_rn(x, scale[:, :, None])
            y = tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX)
            # round to e4m3 here (nearest-even, as torch does), so the conversion below is exact on
            # every backend: the Triton interpreter rounds ties away from zero
            y = tl.where(tl.abs(y) < 0.015625, _round_subnormal(y, _SUBNORMAL_MAGIC), _round_bits(y, 20))
            q = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
            tl.store(qbase + qoff, q, mask=mask)
            tl.store(sbase + soff, scale.to(tl.bfloat16), mask=smask)
        else:
            q = tl.load(qbase + qoff, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            scale = tl.load(sbase + soff, mask=smask, other=1.0).to(tl.float32)
            x = q * scale[:, :, None]  # exact: 4 x 8 significant bits (or past the float32 range)
            # saturate to the KV dtype's finite range, as the reference does: a scale rounded up
            # from amax / 448 near the dtype's largest value would otherwise decode to infinity
            x = tl.minimum(tl.maximum(x, -KV_MAX), KV_MAX)
            # nearest-even to the KV dtype here too (see above); float16 subnormals (below
            # 2**-14) are multiples of 2**-24, where rounding the mantissa alone would round twice
            if DROP == 13:
                x = tl.where(tl.abs(x) < 6.103515625e-05, _round_subnormal(x, _F16_MAGIC), _round_bits(x, 13))
            elif DROP > 0:
                x = _round_bits(x, DROP)
            tl.store(kbase + paged, x.to(kbase.dtype.element_ty), mask=mask)


_JITTED: Any = None
#: Triton's CUDA backend makes libdevice flush subnormals (``enable_reflect_ftz``), so its
#: ``div_rn`` differs from torch's division (and the host codec) on subnormal KV; run H on the
#: H200 (2026-12-04) found images differing from the reference on random-bit KV, which has them
_IEEE: dict[str, Any] = {"enable_reflect_ftz": False}


def _kernel() -> Any:
    global _JITTED
    if _JITTED is None:
        _JITTED = triton.jit(_fp8_kernel)  # decorated late: TRITON_INTERPRET is read when jitting
    return _JITTED


def _check_dtype(kv: "PagedKV") -> None:
    g = kv.geometry
    if g.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"fp8 gather/scatter takes float32, float16 or bfloat16 KV, not {g.dtype}")


def _check_image(kv: "PagedKV", img: "torch.Tensor", big_n: int, first: int, n: int) -> None:
    from lmcache_core.codecs.fp8 import encoded_len

    g = kv.geometry
    if img.dtype.itemsize != 1 or img.dim() != 1 or int(img.numel()) != encoded_len(g, big_n):
        raise ValueError(f"an fp8 image of {big_n} tokens is {encoded_len(g, big_n)} bytes (uint8, 1-D), "
                         f"got {tuple(img.shape)} of {img.dtype}")
    if int(img.data_ptr()) % 2:
        raise ValueError("an fp8 image must start at an even address (its scales are bf16)")
    if first < 0 or first + n > big_n:
        raise ValueError(f"{n} slots from token {first} do not fit an fp8 image of {big_n} tokens")


def _run(kv: "PagedKV", batch: Batch, layers: Sequence[int] | None, gather: bool, checked: bool) -> None:
    """The ``(slots, image)`` API: whole images of ``len(slots)`` tokens, addressed where they are."""
    _coded(kv, [(slots, img, int(slots.numel()), 0) for slots, img in batch], layers, gather, checked, "never")


@dataclass(frozen=True)
class _Plan:
    """A batch of parts as the kernel takes it, built (and checked) once per batch and direction:
    the engine hands the same parts for every layer, and rebuilding the table, the slots and the
    staging addresses per layer cost more host time than queueing the copies."""

    tab: "torch.Tensor"  # int64 [chunks * 5] on the KV device (_COLS; column 0 as _plan says)
    slots: "torch.Tensor"  # int64, every part's slots concatenated, on the KV device
    max_n: int
    lens: "np.ndarray"  # uint64 per chunk: bytes of one layer of its image
    offs: "np.ndarray"  # uint64 per chunk: where its layer starts in one staged layer (sum of lens before)
    addrs: "np.ndarray"  # uint64 per chunk: the image's address
    layer_bytes: int  # one staged layer of every chunk
    pinned: bool  # every image is pinned host memory (the copy-engine batch takes it)
    ready: Any  # the tables' upload (triton_copy.Upload; None off CUDA)


#: the uint8 tensor image offsets are counted from, per device (any fixed address will do)
_QBASE: dict[str, "torch.Tensor"] = {}


def _qbase(dev: "torch.device") -> "torch.Tensor":
    import torch

    t = _QBASE.get(str(dev))
    if t is None:
        t = _QBASE[str(dev)] = torch.empty(256, dtype=torch.uint8, device=dev)
    return t


def _plan(kv: "PagedKV", parts: Sequence[Any], gather: bool, staged: bool, cache: dict | None) -> _Plan:
    """The checked plan of ``parts``, from ``cache`` (the batch's, kept by the caller for exactly as
    long as the parts' tensors are the same) where it has one. Column 0 of the table is, staged,
    the chunk's offset in a staged layer; else its image's offset from :func:`_qbase`."""
    import torch

    from lmcache_core.codecs.fp8 import layer_len

    dev = kv.device
    key = (gather, staged, str(dev), tuple((p[2], p[3]) for p in parts))
    plan = cache.get(key) if cache is not None else None
    if plan is not None:
        return plan
    g = kv.geometry
    for slots, img, big_n, first in parts:
        n = int(slots.numel())
        if gather and (first or n != big_n):
            raise ValueError(f"an fp8 gather writes whole chunks: {n} slots from token {first} of a "
                             f"{big_n}-token image")
        _check_image(kv, img, big_n, first, n)
    lens = np.array([layer_len(g, p[2]) for p in parts], dtype=np.uint64)
    offs = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.uint64)
    addrs = np.array([int(p[1].data_ptr()) for p in parts], dtype=np.uint64)
    q0 = int(_qbase(dev).data_ptr())
    rows: list[int] = []
    start = 0
    for (slots, img, big_n, first), off in zip(parts, offs.tolist()):
        n = int(slots.numel())
        rows += [off if staged else int(img.data_ptr()) - q0, n, start, big_n, first]
        start += n
    from .triton_copy import concat_slots

    tab = to_device(rows, torch.int64, dev)
    sl = concat_slots([p[0] for p in parts], dev)
    pinned = all(p[1].device.type == "cpu" and p[1].is_pinned() for p in parts)
    plan = _Plan(tab, sl, max((int(p[0].numel()) for p in parts), default=0), lens, offs, addrs,
                 int(lens.sum()), pinned, Upload.after(dev))
    if cache is not None:
        if len(cache) >= 8:
            cache.clear()
        cache[key] = plan
    return plan


def _launch(kv: "PagedKV", plan: _Plan, sel: Sequence[int], gather: bool, shift: int = 0, mult: int = 1,
            l_first: int = 0, chunks: tuple[int, int] | None = None) -> None:
    """One kernel launch over the plan's chunks ``chunks`` (all by default) and the layers ``sel``.
    The kernel finds layer ``l`` of chunk ``c`` at ``shift + mult * tab[c, 0] + (l - l_first) *
    (its layer's bytes)`` from :func:`_qbase`: the image itself (shift 0, mult 1, l_first 0), or a
    staged group of ``mult`` layers from ``l_first`` (see :func:`_coded`)."""
    import torch

    c0, c1 = chunks if chunks is not None else (0, len(plan.lens))
    if c1 <= c0 or not sel or plan.max_n == 0:
        return
    table, why = plane_table(kv)
    if table is None:
        raise ValueError(why)
    dev = kv.device
    g = kv.geometry
    qbase = _qbase(dev)
    sbase = qbase.view(torch.bfloat16)
    kbase = table.base.view(torch_dtype(g.dtype))
    hp2 = triton.next_power_of_2(g.num_heads)
    max_n = plan.max_n
    block_t = triton.next_power_of_2(max_n) if interpreting() else max(1, min(triton.next_power_of_2(max_n),
                                                                                   4096 // (hp2 * g.head_dim)))
    sb, stok, sh, sd = table.strides
    grid = (triton.cdiv(max_n, block_t), c1 - c0, len(sel) * g.kv_planes)
    lid = layer_ids(sel, dev)
    if dev.type == "cuda":
        stream = torch.cuda.current_stream(dev)
        if plan.ready is not None:
            plan.ready.wait_on(stream)  # the tables may have been copied up on another stream
        for t in (table.addrs, table.base, plan.tab, plan.slots, lid):
            t.record_stream(stream)
    args = (kbase, qbase, sbase, table.addrs, lid, plan.tab, plan.slots, sb, stok, sh, sd, kv.block_size,
            shift, mult, l_first, c0)
    meta = dict(P=g.kv_planes, HEADS=g.num_heads, HP2=hp2, DIM=g.head_dim, BLOCK_T=block_t, GATHER=gather,
                DROP={"bfloat16": 16, "float16": 13}.get(g.dtype, 0), KV_MAX=kv_max(g.dtype), num_warps=4)
    global _IEEE
    ieee = _IEEE if dev.type == "cuda" and not interpreting() and getattr(torch.version, "hip", None) is None else {}
    try:
        _kernel()[grid](*args, **meta, **ieee)
    except KeyError:  # a Triton without the option: its libdevice flushes subnormals
        if not ieee:
            raise
        _IEEE = {}
        _kernel()[grid](*args, **meta)


def _runs(sel: Sequence[int]) -> list[tuple[int, int]]:
    """``sel`` as runs ``[first, last + 1)`` of consecutive layers, in order."""
    out: list[tuple[int, int]] = []
    for layer in sel:
        if out and out[-1][1] == layer:
            out[-1] = (out[-1][0], layer + 1)
        else:
            out.append((layer, layer + 1))
    return out


#: a staged call is pipelined in at most this many groups of at least GROUP_BYTES of image each;
#: the copy engines move one group while the kernel codes the next, so only one group's kernel
#: time is not hidden behind the link
GROUPS = 8
GROUP_BYTES = 16 << 20
#: what a group of a call over several layers is: ``"chunks"``, runs of chunks with every layer of
#: the call (a chunk's layers are one range of its image: one copy per chunk, as large as copies
#: get), falling back to runs of layers when there are fewer chunks than groups; ``"layers"``, runs
#: of layers of every chunk (a copy per chunk per group: 2 MiB pieces for Llama-3-8B's 256-token
#: chunks, which ran at 91% of the H2D ceiling in runs I-J). A call of one layer is cut in runs of
#: chunks either way.
GROUP_ORDER = "chunks"


def _groups(plan: _Plan, l0: int, l1: int) -> list[tuple[int, int, int, int]]:
    """A run of layers ``l0..l1`` split into ``(layer_a, layer_b, chunk_a, chunk_b)`` groups."""
    n_chunks = len(plan.lens)
    total = (l1 - l0) * plan.layer_bytes
    want = max(1, min(GROUPS, total // max(1, GROUP_BYTES)))
    if l1 - l0 > 1 and (GROUP_ORDER == "layers" or n_chunks < want):
        if l1 - l0 >= want:
            step = -(-(l1 - l0) // want)
            return [(a, min(a + step, l1), 0, n_chunks) for a in range(l0, l1, step)]
        return [(a, a + 1, 0, n_chunks) for a in range(l0, l1)]  # fewer layers than groups: one each
    # runs of chunks of about 1 / want of the bytes each (every chunk's share is the same per layer)
    per = plan.layer_bytes // want
    cut = np.searchsorted(plan.offs + plan.lens, np.arange(1, want, dtype=np.uint64) * np.uint64(per),
                          side="left") + 1
    bounds = sorted({0, n_chunks, *(int(c) for c in cut if 0 < c < n_chunks)})
    return [(l0, l1, a, b) for a, b in zip(bounds, bounds[1:])]


class _Side:
    """Where a staged call's copies run. On CUDA, a call of several groups copies on a stream of
    its own (one per direction and device), so the copy engines move one group while the kernel
    codes the next on the caller's stream; a call of one group (and any call off CUDA) copies in
    order on the caller's stream, where the cross-stream events would cost more than they hide
    (unless that is the legacy default stream, which takes no copy-engine batch).
    Images a load reads must be complete when the call is made, or written by an earlier gather
    of this module on the same device: loads wait for every such copy not yet done."""

    streams: dict[tuple[str, bool], Any] = {}
    #: per device, per stream that queued store copies: an event after the last of them
    last_store: dict[str, dict[int, Any]] = {}
    lock = threading.Lock()

    def __init__(self, dev: "torch.device", to_device: bool, own: bool) -> None:
        import torch

        self.dev, self.to_device = dev, to_device
        self.cuda = dev.type == "cuda"
        self.caller = torch.cuda.current_stream(dev) if self.cuda else None
        # the legacy default stream takes no copy-engine batch (cuMemcpyBatchAsync refuses it)
        self.own = self.cuda and (own or int(self.caller.cuda_stream) == 0)
        self.stream: Any = self.caller
        if self.own:
            key = (str(dev), to_device)
            self.stream = self.streams.get(key)
            if self.stream is None:
                self.stream = self.streams[key] = torch.cuda.Stream(dev)

    def handle(self) -> int:
        return int(self.stream.cuda_stream) if self.cuda else 0

    def context(self) -> Any:
        import contextlib

        import torch

        return torch.cuda.stream(self.stream) if self.own else contextlib.nullcontext()

    def side_waits_caller(self) -> None:
        """The copy stream waits for work queued on the caller's stream so far."""
        if self.own:
            self.stream.wait_stream(self.caller)

    def caller_waits_side(self) -> None:
        if self.own:
            self.caller.wait_stream(self.stream)

    def after_stores(self) -> None:
        """A load's copies wait for the store copies queued on this device and not yet done."""
        if not self.cuda:
            return
        with self.lock:
            pending = self.last_store.get(str(self.dev), {})
            for handle, ev in list(pending.items()):
                if ev.query():
                    del pending[handle]
                else:
                    self.stream.wait_event(ev)

    def stores_queued(self) -> None:
        if self.cuda:
            import torch

            ev = torch.cuda.Event()
            ev.record(self.stream)
            with self.lock:
                self.last_store.setdefault(str(self.dev), {})[self.handle()] = ev


def _coded(kv: "PagedKV", parts: Sequence[Any], layers: Sequence[int] | None, gather: bool,
           checked: bool, stage: str | None = None, cache: dict | None = None) -> None:
    import torch

    from lmcache_core.layout import check_slots

    _check_dtype(kv)
    if not parts:
        return
    dev = kv.device
    how = STAGE if stage is None else stage
    staged = how == "always" or (how == "auto" and dev.type != "cpu")
    plan = _plan(kv, parts, gather, staged, cache)
    if not checked:
        check_slots(kv, [(p[0], p[1]) for p in parts])
    sel = layer_list(kv, layers)
    if not staged:
        _launch(kv, plan, sel, gather)
        return
    runs = [(l0, l1, _groups(plan, l0, l1)) for l0, l1 in _runs(sel)]
    side = _Side(dev, not gather, sum(len(g) for _, _, g in runs) > 1)
    copier = _copier(dev, plan)
    if not gather:
        side.after_stores()
    q0 = int(_qbase(dev).data_ptr())
    for l0, l1, groups in runs:
        # the staged run holds layers l0..l1 of every chunk, in groups (_groups); group (a, b) of
        # layers starts at (a - l0) * layer_bytes, its chunk c at (b - a) * offs[c]: chunk c's layers
        # a..b are one range of its image, so a group is one copy per chunk, in one copy-engine batch
        # where the binding takes them (else one torch DMA each)
        nbytes = (l1 - l0) * plan.layer_bytes
        if gather:  # written by the kernel on the caller's stream, read by the copies
            buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        else:  # from the copy stream's pool: its copies need not wait for the caller's earlier work
            with side.context():
                buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        base = int(buf.data_ptr())
        for a, b, c0, c1 in groups:
            at = base + (a - l0) * plan.layer_bytes
            dev_at = np.uint64(at) + np.uint64(b - a) * plan.offs[c0:c1]
            host_at = plan.addrs[c0:c1] + np.uint64(a) * plan.lens[c0:c1]
            sizes = np.uint64(b - a) * plan.lens[c0:c1]
            if gather:
                _launch(kv, plan, list(range(a, b)), True, at - q0, b - a, a, (c0, c1))
                side.side_waits_caller()
                copier = _stage_copies(copier, side, host_at, dev_at, sizes, buf, parts[c0:c1])
            else:
                copier = _stage_copies(copier, side, dev_at, host_at, sizes, buf, parts[c0:c1])
                side.caller_waits_side()
                _launch(kv, plan, list(range(a, b)), False, at - q0, b - a, a, (c0, c1))
        if side.own:  # the other stream used the buffer too: no reuse before its work is done
            buf.record_stream(side.caller if not gather else side.stream)
    if gather:
        side.stores_queued()
        side.caller_waits_side()  # the caller's later events cover the copies into the images


#: devices whose copy-engine batches failed once (the staging copies then go one by one)
_COPIER_OFF: dict[str, str] = {}


def _copier(dev: "torch.device", plan: _Plan) -> Any:
    """The copy-engine binding (:mod:`.dma`) for staging the plan's images, or None: it takes host
    memory that is pinned (or a CPU run's memmove); anything else goes by torch's DMA."""
    from . import dma

    if str(dev) in _COPIER_OFF:
        return None
    copier, _ = dma.copier(dev)
    if copier is None:
        return None
    if dev.type != "cpu" and not plan.pinned:
        return None
    return copier


def _stage_copies(copier: Any, side: _Side, dsts: "np.ndarray", srcs: "np.ndarray", sizes: "np.ndarray",
                  buf: "torch.Tensor", parts: Sequence[Any]) -> Any:
    """One group's staging copies (one range of each of ``parts``' images) on the side stream:
    one batch through ``copier``, or (no binding, or it failed: then never again on that device)
    one torch copy per chunk. Returns the binding to use next."""
    import torch

    dev = side.dev
    if copier is not None:
        from . import dma

        try:
            if isinstance(copier, dma.DriverCopier):
                with torch.cuda.device(dev):
                    copier.copy(dsts, srcs, sizes, side.handle(), side.to_device, dev.index or 0)
            else:
                copier.copy(dsts, srcs, sizes, 0, side.to_device, dev.index or 0)
            return copier
        except Exception as exc:  # noqa: BLE001 - the copy engines' fault: the same copies one by one
            _COPIER_OFF[str(dev)] = f"{type(exc).__name__}: {exc}"
            logger.warning("fp8 staging: copy-engine batch failed on %s (%s); copying chunk by chunk from now "
                           "on", dev, _COPIER_OFF[str(dev)])
    on_dev, on_host = (dsts, srcs) if side.to_device else (srcs, dsts)
    base = int(buf.data_ptr())
    with side.context():
        for p, at, host_at, n in zip(parts, on_dev.tolist(), on_host.tolist(), sizes.tolist()):
            img = p[1]
            lo = host_at - int(img.data_ptr())
            staged = buf[at - base:at - base + n]
            if side.to_device:
                staged.copy_(img[lo:lo + n], non_blocking=True)
            else:
                img[lo:lo + n].copy_(staged, non_blocking=True)
    return None


def kv_max(dtype: str) -> float:
    """The largest finite value of the KV dtype ``dtype``: decoded values saturate there."""
    import torch

    return float(torch.finfo(torch_dtype(dtype)).max)


def torch_dtype(name: str) -> Any:
    from lmcache_core.layout import torch_dtype as td

    return td(name)


def gather(kv: "PagedKV", batch: Batch, layers: Sequence[int] | None = None, *, checked: bool = False) -> None:
    """Kernel: quantise ``kv`` at each chunk's slots into its fp8 image (one launch). The slots are
    range-checked first (:func:`lmcache_core.layout.check_slots`, which waits for the device)
    unless the caller checked them already (``checked``: a pipeline that issues one batch in
    several calls checks it once)."""
    _run(kv, batch, layers, True, checked)


def scatter(kv: "PagedKV", batch: Batch, layers: Sequence[int] | None = None, *, checked: bool = False) -> None:
    """Kernel: dequantise each fp8 image into ``kv`` at its slots (one launch; ``checked`` as for
    :func:`gather`)."""
    _run(kv, batch, layers, False, checked)


def gather_coded(kv: "PagedKV", parts: Sequence[Any], layers: Sequence[int] | None = None, *,
                 checked: bool = False, stage: str | None = None, cache: dict | None = None) -> None:
    """The device's ``gather_coded`` (:class:`lmcache_core.device.CodedPart` parts, whole chunks).
    Images in host memory are written from device memory on accelerators (``stage``: see
    :data:`STAGE`): in groups (:data:`GROUPS`), each one copy-engine batch, on a copy stream of
    their own while the kernel codes the next group (see :class:`_Side`). ``cache``: a dict the
    caller keeps for exactly this batch (its slot and image tensors unchanged), where the checked
    tables are kept between calls."""
    _coded(kv, parts, layers, True, checked, stage, cache)


def scatter_coded(kv: "PagedKV", parts: Sequence[Any], layers: Sequence[int] | None = None, *,
                  checked: bool = False, stage: str | None = None, cache: dict | None = None) -> None:
    """The device's ``scatter_coded``: parts may cover a token range of their image (``first``).
    Staged images must be complete when the call is made (written by the host, or by an earlier
    :func:`gather_coded` on the device: the side stream waits for those copies)."""
    _coded(kv, parts, layers, False, checked, stage, cache)


# -- the torch reference ----------------------------------------------------------------------
def gather_ref(kv: "PagedKV", batch: Batch, layers: Sequence[int] | None = None) -> None:
    import torch

    from lmcache_core.builtin.cpu import torch_gather

    g = kv.geometry
    for slots, img in batch:
        n = int(slots.numel())
        q, s = image_views(g, img, n)
        for layer in layer_list(kv, layers):
            plain = torch.empty(g.shape(n), dtype=torch_dtype(g.dtype), device=img.device)
            torch_gather(kv, slots, plain, [layer])
            encode_into(plain[layer], q[layer], s[layer], g.head_dim)


def scatter_ref(kv: "PagedKV", batch: Batch, layers: Sequence[int] | None = None) -> None:
    import torch

    from lmcache_core.builtin.cpu import torch_scatter

    g = kv.geometry
    for slots, img in batch:
        n = int(slots.numel())
        plain = torch.empty(g.shape(n), dtype=torch_dtype(g.dtype), device=img.device)
        q, s = image_views(g, img, n)
        sel = layer_list(kv, layers)
        for layer in sel:
            plain[layer] = decode_from(q[layer], s[layer], g.head_dim, plain.dtype)
        torch_scatter(kv, slots, plain, sel)


__all__ = ["FP8_MAX", "STAGE", "gather", "gather_coded", "gather_ref", "scatter", "scatter_coded", "scatter_ref"]
