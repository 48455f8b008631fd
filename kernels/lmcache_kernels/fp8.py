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
from typing import TYPE_CHECKING, Any, Sequence

from lmcache_core.codecs.fp8 import FP8_MAX, decode_from, encode_into, image_views

from .reference import layer_list
from .triton_copy import interpreting, layer_ids, plane_table, to_device, triton

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
        P: tl.constexpr, HEADS: tl.constexpr, HP2: tl.constexpr, DIM: tl.constexpr,
        BLOCK_T: tl.constexpr, GATHER: tl.constexpr, DROP: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        c = tl.program_id(1)
        lp = tl.program_id(2)
        p = lp % P
        layer = tl.load(layer_ids_ + lp // P).to(tl.int64)
        img = tl.load(tab + c * 5)
        n = tl.load(tab + c * 5 + 1)
        start = tl.load(tab + c * 5 + 2)
        big_n = tl.load(tab + c * 5 + 3)  # tokens of the image (n of them from t0 are copied)
        t0 = tl.load(tab + c * 5 + 4)
        hidden = HEADS * DIM
        llen = P * big_n * (hidden + 2 * HEADS)  # bytes of one layer of the image
        q0 = img + layer * llen + (p * big_n + t0) * hidden
        s0 = (img + layer * llen + P * big_n * hidden) // 2 + (p * big_n + t0) * HEADS
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
            x = q * scale[:, :, None]  # exact: 4 x 8 significant bits
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


def _launch(kv: "PagedKV", rows: Sequence[tuple["torch.Tensor", int, int, int]], sel: Sequence[int],
            gather: bool) -> None:
    """One kernel launch over ``rows`` (slots, image address, image tokens, first token) and the
    layers ``sel``; every image is addressable from ``kv``'s device at its address."""
    import torch

    if not rows or not sel:
        return
    table, why = plane_table(kv)
    if table is None:
        raise ValueError(why)
    dev = kv.device
    g = kv.geometry
    qbase = torch.empty(256, dtype=torch.uint8, device=dev)
    sbase = qbase.view(torch.bfloat16)
    kbase = table.base.view(torch_dtype(g.dtype))
    tab_rows: list[int] = []
    start = 0
    for slots, addr, big_n, first in rows:
        n = int(slots.numel())
        tab_rows += [addr - int(qbase.data_ptr()), n, start, big_n, first]
        start += n
    tab = to_device(tab_rows, torch.int64, dev)
    from .triton_copy import concat_slots

    sl = concat_slots([r[0] for r in rows], dev)
    max_n = max(int(r[0].numel()) for r in rows)
    if max_n == 0:
        return
    hp2 = triton.next_power_of_2(g.num_heads)
    block_t = triton.next_power_of_2(max_n) if interpreting() else max(1, min(triton.next_power_of_2(max_n),
                                                                                   4096 // (hp2 * g.head_dim)))
    sb, stok, sh, sd = table.strides
    grid = (triton.cdiv(max_n, block_t), len(rows), len(sel) * g.kv_planes)
    lid = layer_ids(sel, dev)
    if dev.type == "cuda":
        stream = torch.cuda.current_stream(dev)
        for t in (table.addrs, table.base, tab, sl, lid, qbase):
            t.record_stream(stream)
    args = (kbase, qbase, sbase, table.addrs, lid, tab, sl, sb, stok, sh, sd, kv.block_size)
    meta = dict(P=g.kv_planes, HEADS=g.num_heads, HP2=hp2, DIM=g.head_dim, BLOCK_T=block_t, GATHER=gather,
                DROP={"bfloat16": 16, "float16": 13}.get(g.dtype, 0), num_warps=4)
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


def _coded(kv: "PagedKV", parts: Sequence[Any], layers: Sequence[int] | None, gather: bool,
           checked: bool, stage: str | None = None) -> None:
    import torch

    from lmcache_core.codecs.fp8 import layer_len
    from lmcache_core.layout import check_slots

    _check_dtype(kv)
    for slots, img, big_n, first in parts:
        n = int(slots.numel())
        if gather and (first or n != big_n):
            raise ValueError(f"an fp8 gather writes whole chunks: {n} slots from token {first} of a "
                             f"{big_n}-token image")
        _check_image(kv, img, big_n, first, n)
    if not checked:
        check_slots(kv, [(p[0], p[1]) for p in parts])
    sel = layer_list(kv, layers)
    dev = kv.device
    how = STAGE if stage is None else stage
    if not (how == "always" or (how == "auto" and dev.type != "cpu")) or not parts:
        _launch(kv, [(slots, int(img.data_ptr()), big_n, first) for slots, img, big_n, first in parts], sel, gather)
        return
    g = kv.geometry
    copier = _copier(dev, parts)
    for l0, l1 in _runs(sel):
        # each chunk's layers l0..l1 are one contiguous range of its image: one copy per chunk, all
        # of a run in one copy-engine batch where the binding takes them (else one torch DMA each)
        spans = [(l0 * layer_len(g, big_n), (l1 - l0) * layer_len(g, big_n)) for _, _, big_n, _ in parts]
        buf = torch.empty(sum(n for _, n in spans), dtype=torch.uint8, device=dev)  # lengths are even
        base = int(buf.data_ptr())
        rows, dev_at, host_at, sizes, off = [], [], [], [], 0
        for (slots, img, big_n, first), (lo, n) in zip(parts, spans):
            rows.append((slots, base + off - lo, big_n, first))  # image base, as if whole
            dev_at.append(base + off)
            host_at.append(int(img.data_ptr()) + lo)
            sizes.append(n)
            off += n
        if not gather:
            copier = _stage_copies(copier, dev, dev_at, host_at, sizes, True, buf, parts, spans)
        _launch(kv, rows, list(range(l0, l1)), gather)
        if gather:
            copier = _stage_copies(copier, dev, host_at, dev_at, sizes, False, buf, parts, spans)


#: devices whose copy-engine batches failed once (the staging copies then go one by one)
_COPIER_OFF: dict[str, str] = {}


def _copier(dev: "torch.device", parts: Sequence[Any]) -> Any:
    """The copy-engine binding (:mod:`.dma`) for staging ``parts``' images, or None: it takes host
    memory that is pinned (or a CPU run's memmove); anything else goes by torch's DMA."""
    from . import dma

    if str(dev) in _COPIER_OFF:
        return None
    copier, _ = dma.copier(dev)
    if copier is None:
        return None
    if dev.type != "cpu" and not all(p[1].device.type == "cpu" and p[1].is_pinned() for p in parts):
        return None
    return copier


def _stage_copies(copier: Any, dev: "torch.device", dsts: list[int], srcs: list[int], sizes: list[int],
                  to_device: bool, buf: "torch.Tensor", parts: Sequence[Any], spans: list[tuple[int, int]]) -> Any:
    """The staging buffer's copies in stream order: one batch through ``copier`` on the current
    stream, or (no binding, or it failed: then never again on ``dev``) one torch copy per chunk.
    Returns the binding to use next."""
    import numpy as np
    import torch

    if copier is not None:
        from . import dma

        try:
            arrays = [np.asarray(a, dtype=np.uint64) for a in (dsts, srcs, sizes)]
            if isinstance(copier, dma.DriverCopier):
                with torch.cuda.device(dev):
                    copier.copy(*arrays, torch.cuda.current_stream(dev).cuda_stream, to_device, dev.index or 0)
            else:
                copier.copy(*arrays, 0, to_device, dev.index or 0)
            return copier
        except Exception as exc:  # noqa: BLE001 - the copy engines' fault: the same copies one by one
            _COPIER_OFF[str(dev)] = f"{type(exc).__name__}: {exc}"
            logger.warning("fp8 staging: copy-engine batch failed on %s (%s); copying chunk by chunk from now "
                           "on", dev, _COPIER_OFF[str(dev)])
    off = 0
    for (_, img, _, _), (lo, n) in zip(parts, spans):
        if to_device:
            buf[off:off + n].copy_(img[lo:lo + n], non_blocking=True)
        else:
            img[lo:lo + n].copy_(buf[off:off + n], non_blocking=True)
        off += n
    return None


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
                 checked: bool = False, stage: str | None = None) -> None:
    """The device's ``gather_coded`` (:class:`lmcache_core.device.CodedPart` parts, whole chunks):
    one launch per run of consecutive layers. Images in host memory are written from device
    memory by one DMA per chunk and run of layers on accelerators (``stage``: see :data:`STAGE`)."""
    _coded(kv, parts, layers, True, checked, stage)


def scatter_coded(kv: "PagedKV", parts: Sequence[Any], layers: Sequence[int] | None = None, *,
                  checked: bool = False, stage: str | None = None) -> None:
    """The device's ``scatter_coded``: parts may cover a token range of their image (``first``)."""
    _coded(kv, parts, layers, False, checked, stage)


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
