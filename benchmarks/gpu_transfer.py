"""GPU transfer benchmark of the CUDA device plugin: ceilings, store/load, overlap, TTFT.

One run measures, on a Llama-3-8B-shaped KV cache (32 layers, 8 KV heads, head
dim 128, bf16, 16-token blocks, random block ids, 256-token chunks):

1. pinned copy ceilings, D2H and H2D (1 GiB, plus 32 MiB and 1 MiB);
2. store (paged GPU -> pinned chunks) and load (pinned chunks -> paged GPU) GB/s
   at 1K, 4K, 16K and 32K tokens for every path: the engine's per-layer calls
   (direct kernel into mapped pinned memory, or kernel into a staging ring plus
   DMA), the batched all-layer call, one and two copy streams, and the plain
   torch path; each path is checked bit for bit against the torch reference;
3. layer-by-layer load through ``CacheEngine.start_retrieve`` overlapped with a
   per-layer stand-in compute (a bf16 matmul sized to the layer's load time):
   how much of the shorter side is hidden;
4. time to first token of a full cache hit vs recompute through the transformers
   integration (``CachedModel``) on a random-weight Llama-3-8B-shaped model,
   against the bound KV bytes / H2D ceiling.

``--dry-run`` runs every section on the CPU with tiny shapes (kernels in the
Triton interpreter) so the script is checked before it spends GPU time.
Results: ``gpu_transfer.json`` under ``--out``; a table is printed last.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from lmcache_core.codecs import fp8 as fp8_codec  # noqa: E402
from lmcache_core.config import Config  # noqa: E402
from lmcache_core.device import CodedPart  # noqa: E402
from lmcache_core.engine import CacheEngine  # noqa: E402
from lmcache_core.layout import ChunkGeometry, PagedKV, slot_mapping  # noqa: E402
from lmcache_kernels import reference  # noqa: E402
from lmcache_kernels.testing import bits, make_kv, random_bits  # noqa: E402
from lmcache_kernels.transfer import TransferOptions  # noqa: E402

log = logging.getLogger("gpu_transfer")
GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Shape:
    """The benchmark's KV geometry (Llama-3-8B on the GPU, a toy in dry runs)."""

    layers: int
    heads: int
    head_dim: int
    block: int
    chunk: int
    tokens: tuple[int, ...]

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.heads * self.head_dim * 2


GPU_SHAPE = Shape(32, 8, 128, 16, 256, (1024, 4096, 16384, 32768))
DRY_SHAPE = Shape(2, 2, 16, 4, 16, (32, 64))


# -- timing ---------------------------------------------------------------------------------
class Timer:
    """Wall time of a synchronised callable: median over ``reps`` after ``warmup`` runs."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any], reps: int = 5, warmup: int = 1) -> dict[str, float]:
        for _ in range(warmup):
            fn()
            self.sync()
        times = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": reps}


def free_device_memory(cuda: bool) -> None:
    """Give a finished section's tensors back (the caller has dropped its references)."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


# -- section 1: ceilings -------------------------------------------------------------------------
def ceilings(timer: Timer, cuda: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sizes = (GiB, 32 * MiB, MiB) if cuda else (8 * MiB,)
    dev = "cuda" if cuda else "cpu"
    for size in sizes:
        d = torch.randint(0, 255, (size,), dtype=torch.uint8, device=dev)
        h = torch.empty(size, dtype=torch.uint8, pin_memory=cuda)
        reps = 10 if size >= 32 * MiB else 50
        d2h = timer(lambda: h.copy_(d, non_blocking=True), reps=reps, warmup=2)
        h2d = timer(lambda: d.copy_(h, non_blocking=True), reps=reps, warmup=2)
        out[f"{size // MiB}MiB"] = {"d2h_GBps": gbps(size, d2h["median_s"]), "h2d_GBps": gbps(size, h2d["median_s"])}
        del d, h
    top = out[f"{sizes[0] // MiB}MiB"]
    out["d2h_GBps"], out["h2d_GBps"] = top["d2h_GBps"], top["h2d_GBps"]
    return out


# -- the paged cache --------------------------------------------------------------------------
def make_cache(shape: Shape, num_blocks: int, device: str, kind: str = "vllm_flash",
               dtype: str = "bfloat16") -> tuple[PagedKV, list[torch.Tensor]]:
    """A paged cache of random bits made on ``device`` (vLLM flash-attn ``[2, blocks, block,
    heads, dim]`` per layer by default; also vLLM 0.3x per-layer views, FlashInfer, MLA with a
    576-wide latent, and ``float8_e4m3fn`` for vLLM's fp8 KV cache)."""
    mla = kind == "mla"  # DeepSeek-style latent: one plane of 512 + 64 values per token
    return make_kv(kind, dtype=dtype, device=device, num_layers=shape.layers, num_blocks=num_blocks,
                   block_size=shape.block, heads=1 if mla else shape.heads, head_dim=576 if mla else shape.head_dim,
                   generator=torch.Generator(device=device).manual_seed(1))


def make_chunks(dev: Any, geom: ChunkGeometry, n_chunks: int, chunk: int) -> list[torch.Tensor]:
    out = []
    for _ in range(n_chunks):
        buf = dev.alloc_host(geom.nbytes(chunk))
        out.append(buf.view(getattr(torch, geom.dtype.removeprefix("torch."))).view(geom.shape(chunk)))
    return out


# -- section 2: store / load ------------------------------------------------------------------------
VARIANTS = {
    # name: (options, call style)
    "engine_default": ({}, "layerwise"),  # the defaults: what a user gets
    "engine_direct": (dict(store_mode="direct", load_mode="direct"), "layerwise"),
    "engine_direct_uncapped": (dict(store_mode="direct", load_mode="direct", layer_programs=0,
                                    stream_priority="normal"), "layerwise"),
    "engine_dma": (dict(store_mode="dma", load_mode="dma"), "layerwise"),
    "batched_dma": (dict(store_mode="dma", load_mode="dma"), "batched"),
    "engine_staged": (dict(store_mode="staged", load_mode="staged", staging_slots=8), "layerwise"),
    "engine_staged_each": (dict(store_mode="staged", load_mode="staged", staging_slots=8, staged_copies="each"),
                           "layerwise"),
    "batched_direct": (dict(store_mode="direct", load_mode="direct"), "batched"),
    "batched_staged_1cs": (dict(store_mode="staged", load_mode="staged", copy_streams=1), "batched"),
    "batched_staged_2cs": (dict(store_mode="staged", load_mode="staged", copy_streams=2,
                                staging_slots=4), "batched"),
    "batched_staged_2cs_each": (dict(store_mode="staged", load_mode="staged", copy_streams=2,
                                     staging_slots=4, staged_copies="each"), "batched"),
    "batched_staged_1chunk_4s": (dict(store_mode="staged", load_mode="staged", staging_bytes=32 * MiB,
                                      staging_slots=4, copy_streams=2), "batched"),
    "batched_staged_128m_3s": (dict(store_mode="staged", load_mode="staged", staging_bytes=128 * MiB,
                                    staging_slots=3), "batched"),
    "engine_ringdma": (dict(ring_copy="dma"), "layerwise"),  # defaults, the ring's half on the copy engines
    "batched_ringdma": (dict(ring_copy="dma"), "batched"),
    "torch_reference": (dict(store_mode="torch", load_mode="torch"), "batched"),
    # kv_codec=fp8: the engine's calls with the chunks in fp8 form (GB/s are of the bf16 KV the
    # copies stand for, so a figure over the H2D ceiling is the codec's gain)
    "engine_fp8": ({}, "layerwise_fp8"),
    "batched_fp8": ({}, "batched_fp8"),
    # the staged groups as runs H-J had them (runs of layers of every chunk, GROUP_ORDER "layers")
    "batched_fp8_layer_groups": ({}, "batched_fp8"),
}


def run_store(dev: Any, kv: PagedKV, parts: list[Any], style: str, stream: Any) -> None:
    if style.endswith("_fp8"):
        for layers in ([None] if style == "batched_fp8" else [(i,) for i in range(kv.geometry.num_layers)]):
            with dev.use_stream(stream):
                dev.gather_coded(kv, parts, "fp8", layers=layers)
        dev.record_event(stream).synchronize()
        return
    if style == "batched":
        with dev.use_stream(stream):
            dev.gather_many(kv, parts)
    else:  # what CacheEngine.LayerwiseStore does: per layer one call for every chunk
        for layer in range(kv.geometry.num_layers):
            with dev.use_stream(stream):
                dev.gather_many(kv, parts, layers=(layer,))
    dev.record_event(stream).synchronize()


def run_load(dev: Any, kv: PagedKV, parts: list[Any], style: str, stream: Any) -> None:
    if style.endswith("_fp8"):
        events = []
        for layers in ([None] if style == "batched_fp8" else [(i,) for i in range(kv.geometry.num_layers)]):
            with dev.use_stream(stream):
                dev.scatter_coded(kv, parts, "fp8", layers=layers)
                events.append(dev.record_event(stream))
        for ev in events:
            ev.synchronize()
        return
    if style == "batched":
        with dev.use_stream(stream):
            dev.scatter_many(kv, parts)
        dev.record_event(stream).synchronize()
        return
    events = []  # what CacheEngine.LayerwiseRetrieve does with an async device
    for layer in range(kv.geometry.num_layers):
        with dev.use_stream(stream):
            dev.scatter_many(kv, parts, layers=(layer,))
            events.append(dev.record_event(stream))
    for ev in events:
        ev.synchronize()


def store_load(shape: Shape, timer: Timer, cuda: bool, device_cls: Any, reps: int) -> dict[str, Any]:
    devname = "cuda" if cuda else "cpu"
    max_t = max(shape.tokens)
    num_blocks = 2 * max_t // shape.block
    kv, caches = make_cache(shape, num_blocks, devname)
    geom = kv.geometry
    g = torch.Generator().manual_seed(2)
    blocks = torch.randperm(num_blocks, generator=g)[: max_t // shape.block]
    all_slots = slot_mapping(blocks, shape.block, 0, max_t)
    base_dev = device_cls(0, TransferOptions(store_mode="direct"))
    chunks = make_chunks(base_dev, geom, max_t // shape.chunk, shape.chunk)
    images: list[torch.Tensor] = []
    if geom.dtype in ("bfloat16", "float16", "float32"):
        for c in caches:  # random bits hold NaNs and infinities, which no KV (and no fp8 scale) has
            torch.nan_to_num_(c, nan=0.0, posinf=1.0, neginf=-1.0)
        images = [base_dev.alloc_host(fp8_codec.encoded_len(geom, shape.chunk)) for _ in range(max_t // shape.chunk)]
    results: dict[str, Any] = {}
    check_t = sorted(shape.tokens)[min(1, len(shape.tokens) - 1)]
    for name, (opts, style) in VARIANTS.items():
        if "dma" in name and os.environ.get("LMCACHE_BENCH_NO_DMA"):
            results[name] = {"skipped": os.environ["LMCACHE_BENCH_NO_DMA"]}
            continue
        if style.endswith("_fp8") and not images:
            results[name] = {"skipped": f"fp8 codes bf16/fp16/fp32 KV, not {geom.dtype}"}
            continue
        dev = device_cls(0, TransferOptions(**opts))
        stream = dev.new_stream()
        row: dict[str, Any] = {"style": style, **opts}
        if style.endswith("_fp8"):
            from lmcache_kernels import fp8 as fp8_kernels

            fp8_kernels.GROUP_ORDER = "layers" if name.endswith("_layer_groups") else "chunks"
            row["group_order"] = fp8_kernels.GROUP_ORDER
        for T in shape.tokens:
            n = T // shape.chunk
            if style.endswith("_fp8"):
                parts = [CodedPart(all_slots[i * shape.chunk:(i + 1) * shape.chunk].to(devname), images[i], shape.chunk)
                         for i in range(n)]
            else:
                parts = [(all_slots[i * shape.chunk:(i + 1) * shape.chunk], chunks[i]) for i in range(n)]
            nbytes = T * geom.bytes_per_token
            r = max(1, reps if name != "torch_reference" else min(reps, 2))
            st = timer(lambda: run_store(dev, kv, parts, style, stream), reps=r)
            check = check_fp8_store if style.endswith("_fp8") else check_store
            if T == check_t:
                row["store_bit_exact"] = check(kv, parts, devname)
            ld = timer(lambda: run_load(dev, kv, parts, style, stream), reps=r)
            if T == check_t:  # the load wrote back what store read: the cache must be unchanged
                row["load_bit_exact"] = (check_fp8_load if style.endswith("_fp8") else check_store)(kv, parts, devname)
                if style.endswith("_fp8"):
                    row["fp8_check"] = dict(FP8_DIFFS)  # on the random-bit cache (subnormals, values to 3e38)
            row[str(T)] = {"store_GBps": gbps(nbytes, st["median_s"]), "load_GBps": gbps(nbytes, ld["median_s"]),
                           "store_ms": st["median_s"] * 1e3, "load_ms": ld["median_s"] * 1e3}
            log.info("%-20s T=%-6d store %6.1f GB/s  load %6.1f GB/s", name, T, row[str(T)]["store_GBps"],
                     row[str(T)]["load_GBps"])
        if style.endswith("_fp8"):  # again on normal draws (the fp8 variants run last: the cache is theirs)
            for c in caches:
                c.normal_()
            n = check_t // shape.chunk
            parts = [CodedPart(all_slots[i * shape.chunk:(i + 1) * shape.chunk].to(devname), images[i], shape.chunk)
                     for i in range(n)]
            run_store(dev, kv, parts, style, stream)
            row["normal_store_bit_exact"] = check_fp8_store(kv, parts, devname)
            run_load(dev, kv, parts, style, stream)
            row["normal_load_bit_exact"] = check_fp8_load(kv, parts, devname)
            row["fp8_check_normal"] = dict(FP8_DIFFS)
            gen = torch.Generator(device=devname).manual_seed(3)
            for c in caches:  # random bits again: the next variant checks on them too
                c.copy_(random_bits(tuple(c.shape), c.dtype, devname, gen))
                torch.nan_to_num_(c, nan=0.0, posinf=1.0, neginf=-1.0)
        row["transfer_stats"] = asdict(dev.transfer.stats) if dev._transfer is not None else {}
        if style.endswith("_fp8"):
            row["fp8_kernel_off"] = dev._fp8_off  # non-empty: it fell back to the torch reference
        results[name] = row
    if images:
        from lmcache_kernels import fp8 as fp8_kernels

        fp8_kernels.GROUP_ORDER = "chunks"
    del caches, kv, chunks
    free_device_memory(cuda)
    return results


FP8_DIFFS: dict[str, Any] = {}  # what the last fp8 checks found (bytes / values differing, subnormal inputs)


def check_fp8_store(kv: PagedKV, parts: list[Any], devname: str) -> bool:
    """Every fp8 image is the torch reference's quantisation of its slots, byte for byte."""
    from lmcache_kernels import fp8 as fp8_kernels

    FP8_DIFFS.clear()
    diff = sub = 0
    examples: list[dict[str, Any]] = []
    for p in parts:
        want = torch.empty(p.image.numel(), dtype=torch.uint8, device=devname)
        fp8_kernels.gather_ref(kv, [(p.slots, want)])
        got = p.image.to(devname)
        bad = got != want
        diff += int(bad.sum())
        plain = torch.empty(kv.geometry.shape(p.num_tokens), dtype=getattr(torch, kv.geometry.dtype), device=devname)
        reference.gather_batch(kv, [(p.slots, plain)])
        sub += int(((plain != 0) & (plain.abs() < torch.finfo(plain.dtype).tiny)).sum())
        if bool(bad.any()) and len(examples) < 4:
            examples += fp8_store_examples(kv.geometry, plain, got, want, p.num_tokens, 4 - len(examples))
    FP8_DIFFS.update(store_bytes_differing=diff, subnormal_inputs=sub)
    if examples:
        FP8_DIFFS["store_examples"] = examples
    return diff == 0


def fp8_store_examples(g: ChunkGeometry, plain: torch.Tensor, got: torch.Tensor, want: torch.Tensor, n: int,
                       limit: int) -> list[dict[str, Any]]:
    """Where the kernel's fp8 image differs from the reference: the first ``limit`` bytes, each
    with its place, the head's input values around it, and the CPU host codec's byte (the
    definition): which of kernel and torch-on-the-device is off, and on what input."""
    cpu = torch.empty(want.numel(), dtype=torch.uint8)
    fp8_codec.encode_into(plain.cpu(), *fp8_codec.image_views(g, cpu, n), g.head_dim)
    per = fp8_codec.layer_len(g, n)
    nq = g.kv_planes * n * g.hidden
    out = []
    for i in (got != want).nonzero().reshape(-1)[:limit].tolist():
        layer, off = divmod(i, per)
        row: dict[str, Any] = {"byte": i, "layer": layer, "kernel": int(got[i]), "device_ref": int(want[i]),
                               "cpu_ref": int(cpu[i]), "cpu_vs_kernel_bytes": int((cpu != got.cpu()).sum()),
                               "cpu_vs_device_ref_bytes": int((cpu != want.cpu()).sum())}
        if off < nq:
            plane, rest = divmod(off, n * g.hidden)
            tok, e = divmod(rest, g.hidden)
            head, d = divmod(e, g.head_dim)
            row.update(part="e4m3", plane=plane, token=tok, head=head, dim=d)
        else:
            plane, rest = divmod((off - nq) // 2, n * g.num_heads)
            tok, head = divmod(rest, g.num_heads)
            row.update(part="scale", plane=plane, token=tok, head=head)
        x = plain[layer, plane, tok, head * g.head_dim:(head + 1) * g.head_dim].float().cpu()
        row["head_amax"] = float(x.abs().max())
        if row["part"] == "e4m3":
            row["input"] = float(x[row["dim"]])
            value = plain[layer, plane, tok, head * g.head_dim + row["dim"]]
            row["input_bits"] = hex(int(value.view(torch.int16)) & 0xFFFF)
        out.append(row)
    return out


def check_fp8_load(kv: PagedKV, parts: list[Any], devname: str) -> bool:
    """The cache at each chunk's slots holds its image's values (the host codec's decode), bits."""
    g = kv.geometry
    diff = 0
    for p in parts:
        q, s = fp8_codec.image_views(g, p.image.to(devname), p.num_tokens)
        want = fp8_codec.decode_from(q, s, g.head_dim, getattr(torch, g.dtype))
        got = torch.empty(g.shape(p.num_tokens), dtype=want.dtype, device=devname)
        reference.gather_batch(kv, [(p.slots, got)])
        bad = bits(got) != bits(want)
        diff += int(bad.sum())
        if bool(bad.any()) and "load_examples" not in FP8_DIFFS:
            ex = []
            for idx in bad.nonzero()[:4].tolist():
                layer, plane, tok, e = idx
                ex.append({"layer": layer, "plane": plane, "token": tok, "elem": e,
                           "scattered_bits": hex(int(bits(got)[tuple(idx)]) & 0xFFFF),
                           "decoded_bits": hex(int(bits(want)[tuple(idx)]) & 0xFFFF),
                           "e4m3": int(q[layer, plane, tok, e]), "scale": float(s[layer, plane, tok, e // g.head_dim])})
            FP8_DIFFS["load_examples"] = ex
    FP8_DIFFS.update(load_values_differing=diff)
    return diff == 0


def check_store(kv: PagedKV, parts: list[tuple[torch.Tensor, torch.Tensor]], devname: str) -> bool:
    """Every chunk equals the torch reference gather of its slots (bits, not values)."""
    for s, c in parts:
        want = torch.empty(c.shape, dtype=c.dtype, device=devname)
        reference.gather_batch(kv, [(s, want)])
        if not torch.equal(bits(c), bits(want)):
            return False
    return True


# -- section 2b: every layout vLLM hands, bf16 and fp8 --------------------------------------------
LAYOUT_CASES = (("vllm_flash", "bfloat16"), ("vllm_blocks_heads", "bfloat16"), ("flashinfer", "bfloat16"),
                ("mla", "bfloat16"), ("vllm_flash", "float8_e4m3fn"), ("vllm_blocks_heads", "float8_e4m3fn"))
LAYOUT_VARIANTS = {  # name: (options, call style); "engine_default" is what a user gets
    "engine_default": ({}, "layerwise"),
    "engine_staged": (dict(store_mode="staged", load_mode="staged", staging_slots=8), "layerwise"),
    "batched_default": ({}, "batched"),
}


def layouts(shape: Shape, timer: Timer, cuda: bool, device_cls: Any, reps: int) -> dict[str, Any]:
    """Whole-request store and load through the engine's per-layer calls (and one batched call)
    for each layout and KV dtype of :data:`LAYOUT_CASES`, at 4K and 16K tokens, each checked bit
    for bit; GB/s of that layout's own KV bytes, against the ceilings section of the same run."""
    devname = "cuda" if cuda else "cpu"
    sizes = tuple(t for t in shape.tokens if 4096 <= t <= 16384) or shape.tokens
    out: dict[str, Any] = {"sizes": list(sizes), "rows": {}}
    for kind, dtype in LAYOUT_CASES:
        num_blocks = 2 * max(sizes) // shape.block
        kv, caches = make_cache(shape, num_blocks, devname, kind, dtype)
        geom = kv.geometry
        blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3))[: max(sizes) // shape.block]
        all_slots = slot_mapping(blocks, shape.block, 0, max(sizes))
        base_dev = device_cls(0, TransferOptions())
        chunks = make_chunks(base_dev, geom, max(sizes) // shape.chunk, shape.chunk)
        row: dict[str, Any] = {"kind": kind, "dtype": dtype, "bytes_per_token": geom.bytes_per_token}
        for name, (opts, style) in LAYOUT_VARIANTS.items():
            dev = device_cls(0, TransferOptions(**opts))
            stream = dev.new_stream()
            r: dict[str, Any] = {}
            try:
                for T in sizes:
                    n = T // shape.chunk
                    parts = [(all_slots[i * shape.chunk:(i + 1) * shape.chunk], chunks[i]) for i in range(n)]
                    nbytes = T * geom.bytes_per_token
                    st = timer(lambda: run_store(dev, kv, parts, style, stream), reps=reps)
                    ok_store = check_store(kv, parts, devname)
                    ld = timer(lambda: run_load(dev, kv, parts, style, stream), reps=reps)
                    r[str(T)] = {"store_GBps": gbps(nbytes, st["median_s"]), "load_GBps": gbps(nbytes, ld["median_s"]),
                                 "store_bit_exact": ok_store, "load_bit_exact": check_store(kv, parts, devname)}
                    log.info("layouts %-18s %-14s %-16s T=%-6d store %6.1f GB/s  load %6.1f GB/s  %s", kind, dtype,
                             name, T, r[str(T)]["store_GBps"], r[str(T)]["load_GBps"],
                             "exact" if ok_store and r[str(T)]["load_bit_exact"] else "MISMATCH")
                r["transfer_stats"] = asdict(dev.transfer.stats) if dev._transfer is not None else {}
            except Exception as exc:  # noqa: BLE001 - one layout failing must not lose the others
                r["error"] = f"{type(exc).__name__}: {exc}"
                log.exception("layouts %s %s %s failed", kind, dtype, name)
            row[name] = r
        out["rows"][f"{kind}/{dtype}"] = row
        del caches, kv, chunks
        free_device_memory(cuda)
    return out


def tune(shape: Shape, timer: Timer, cuda: bool, device_cls: Any, reps: int) -> dict[str, Any]:
    """Direct kernel tile size and warps, batched and per layer, at the second-largest token count."""
    from lmcache_kernels import triton_copy

    devname = "cuda" if cuda else "cpu"
    T = sorted(shape.tokens)[-2] if len(shape.tokens) > 1 else shape.tokens[0]
    num_blocks = 2 * T // shape.block
    kv, caches = make_cache(shape, num_blocks, devname)
    g = torch.Generator().manual_seed(5)
    blocks = torch.randperm(num_blocks, generator=g)[: T // shape.block]
    slots = slot_mapping(blocks, shape.block, 0, T)
    dev = device_cls(0, TransferOptions(store_mode="direct", load_mode="direct"))
    chunks = make_chunks(dev, kv.geometry, T // shape.chunk, shape.chunk)
    parts = [(slots[i * shape.chunk:(i + 1) * shape.chunk], chunks[i]) for i in range(T // shape.chunk)]
    stream = dev.new_stream()
    nbytes = T * kv.geometry.bytes_per_token
    out: dict[str, Any] = {"tokens": T}
    old = (triton_copy.TILE_BYTES, triton_copy.NUM_WARPS)
    try:
        for tile in (8192, 16384, 32768):
            for warps in (4, 8):
                triton_copy.TILE_BYTES, triton_copy.NUM_WARPS = tile, warps
                row = {}
                for style in ("batched", "layerwise"):
                    st = timer(lambda: run_store(dev, kv, parts, style, stream), reps=reps)["median_s"]
                    ld = timer(lambda: run_load(dev, kv, parts, style, stream), reps=reps)["median_s"]
                    row[style] = {"store_GBps": gbps(nbytes, st), "load_GBps": gbps(nbytes, ld)}
                out[f"tile{tile // 1024}k_w{warps}"] = row
                log.info("tune T=%d tile %dk warps %d: %s", T, tile // 1024, warps, row)
    finally:
        triton_copy.TILE_BYTES, triton_copy.NUM_WARPS = old
    del caches, kv, chunks
    free_device_memory(cuda)
    return out


# -- section 3: overlap ---------------------------------------------------------------------------
def overlap(shape: Shape, timer: Timer, cuda: bool, device_cls: Any) -> dict[str, Any]:
    """Engine layer-by-layer load with a per-layer matmul on the compute stream, per load mode."""
    devname = "cuda" if cuda else "cpu"
    T = max(shape.tokens)
    num_blocks = 2 * T // shape.block
    kv, caches = make_cache(shape, num_blocks, devname)
    tokens = list(range(10, 10 + T))
    g = torch.Generator().manual_seed(3)
    blocks = torch.randperm(num_blocks, generator=g)[: T // shape.block]
    out: dict[str, Any] = {"tokens": T}
    nbytes = T * shape.bytes_per_token
    n = 2048 if cuda else 64
    a = torch.randn(n, n, device=devname, dtype=torch.bfloat16 if cuda else torch.float32)
    b = torch.randn_like(a)
    mm = timer(lambda: torch.mm(a, b), reps=20, warmup=3)["median_s"]
    for mode in ("direct", "staged"):
        dev = device_cls(0, TransferOptions(store_mode="direct", load_mode=mode))
        cfg = Config.load(overrides={"tiers": [f"memory://?capacity={2 * nbytes + 64 * MiB}"],
                                     "chunk_size": shape.chunk, "host_pool_size": 2 * nbytes}, env={})
        with CacheEngine(kv.geometry, cfg, model="overlap", device=dev) as eng:
            eng.store(tokens, kv, blocks, wait=True)
            eng.pool.wait_reserve(30)  # the reserve's refill is a warm-up, not the load (see layerwise)
            load = timer(lambda: eng.retrieve(tokens, kv, blocks), reps=3)["median_s"]
            k = max(1, round(load / shape.layers / mm))

            def compute_all() -> None:
                for _ in range(shape.layers):
                    for _ in range(k):
                        torch.mm(a, b)

            comp = timer(compute_all, reps=3)["median_s"]

            def both() -> None:
                task = eng.start_retrieve(tokens, kv, blocks)
                for _layer in task:  # wait_layer: the compute stream waits for this layer's event
                    for _ in range(k):
                        torch.mm(a, b)
                task.finish()

            both_t = timer(both, reps=3)["median_s"]
        hidden = (load + comp - both_t) / min(load, comp)
        out[f"device_{mode}"] = device_overlap(shape, timer, kv, blocks, dev, a, b, mm)
        out[mode] = dict(load_ms=load * 1e3, compute_ms=comp * 1e3, overlapped_ms=both_t * 1e3,
                         matmuls_per_layer=k, hidden_fraction=hidden, load_GBps=gbps(nbytes, load))
        log.info("overlap %s T=%d load %.1f ms compute %.1f ms both %.1f ms hidden %.0f%%", mode, T, load * 1e3,
                 comp * 1e3, both_t * 1e3, 100 * hidden)
    del caches, kv
    free_device_memory(cuda)
    return out


def device_overlap(shape: Shape, timer: Timer, kv: PagedKV, blocks: torch.Tensor, dev: Any, a: torch.Tensor,
                   b: torch.Tensor, mm: float) -> dict[str, Any]:
    """The device alone: every layer's load queued on a transfer stream with one ``scatter_many``
    per layer, then per layer the compute stream waits for that layer's event and multiplies."""
    T = max(shape.tokens)
    chunks = make_chunks(dev, kv.geometry, T // shape.chunk, shape.chunk)
    slots = slot_mapping(blocks, shape.block, 0, T)
    parts = [(slots[i * shape.chunk:(i + 1) * shape.chunk], chunks[i]) for i in range(T // shape.chunk)]
    dev.gather_many(kv, parts)
    dev.synchronize()
    ts = dev.new_stream()

    def enqueue() -> list[Any]:
        evs = []
        for layer in range(shape.layers):
            with dev.use_stream(ts):
                dev.scatter_many(kv, parts, layers=(layer,))
                evs.append(dev.record_event(ts))
        return evs

    def load_only() -> None:
        for ev in enqueue():
            ev.synchronize()

    load = timer(load_only, reps=3)["median_s"]
    k = max(1, round(load / shape.layers / mm))

    def compute_all() -> None:
        for _ in range(shape.layers):
            for _ in range(k):
                torch.mm(a, b)

    comp = timer(compute_all, reps=3)["median_s"]

    def both() -> None:
        for ev in enqueue():
            ev.wait_on_compute()
            for _ in range(k):
                torch.mm(a, b)

    both_t = timer(both, reps=3)["median_s"]
    hidden = (load + comp - both_t) / min(load, comp)
    log.info("device overlap %s: load %.1f ms compute %.1f ms both %.1f ms hidden %.0f%%",
             dev.transfer.options.load_mode, load * 1e3, comp * 1e3, both_t * 1e3, 100 * hidden)
    return dict(load_ms=load * 1e3, compute_ms=comp * 1e3, overlapped_ms=both_t * 1e3, matmuls_per_layer=k,
                hidden_fraction=hidden, load_GBps=gbps(T * shape.bytes_per_token, load))


# -- section 3b: layer-wise load under compute, per transfer variant and size --------------------------
# name: TransferOptions for the engine's per-layer loads (the store that fills the tier is direct)
LAYERWISE = {
    "direct": dict(load_mode="direct", layer_programs=0, stream_priority="normal"),  # before 2026-12-02
    "direct_p16": dict(load_mode="direct", layer_programs=16, stream_priority="normal"),
    "direct_hi": dict(load_mode="direct", layer_programs=0, stream_priority="high"),
    "direct_hi_p8": dict(load_mode="direct", layer_programs=8, stream_priority="high"),
    "direct_hi_p12": dict(load_mode="direct", layer_programs=12, stream_priority="high"),
    "direct_hi_p16": dict(load_mode="direct", layer_programs=16, stream_priority="high"),  # the default
    "direct_hi_p24": dict(load_mode="direct", layer_programs=24, stream_priority="high"),
    "direct_hi_p32": dict(load_mode="direct", layer_programs=32, stream_priority="high"),
    # staged: the copy engines move each chunk's layer into a device ring (one batch call per
    # ring group), then an uncapped kernel scatters it from device memory (a few SM-microseconds
    # per layer); on 2026-12-02 (late run) a capped scatter (16 programs) hid 57-65% beside large GEMMs at
    # 16K-32K where the uncapped one hid 82-84%, so the staged kernel is no longer capped
    "staged_8s": dict(load_mode="staged", stream_priority="high", staging_slots=8),
    "staged_4s": dict(load_mode="staged", stream_priority="high", staging_slots=4),
    # one ring slot holds a 32K request's whole layer (128 MiB): one batch call and one kernel per
    # layer instead of four, for the host-issue question (2026-12-03 timeline: host-bound layers)
    "staged_4s_128m": dict(load_mode="staged", stream_priority="high", staging_slots=4, staging_bytes=128 << 20),
    "staged_each_8s": dict(load_mode="staged", stream_priority="high", staging_slots=8,
                           staged_copies="each"),  # one torch DMA per chunk (the way until 2026-12-02)
    "dma": dict(load_mode="dma"),  # copy-engine batches, no kernel
    "auto": {},  # the defaults: what a user gets
    # the ring's half in device memory as copy-engine batches too (ring_copy "dma"): no byte of
    # the load needs an SM, so a GEMM holding every SM cannot hold the load back
    "staged_8s_ringdma": dict(load_mode="staged", stream_priority="high", staging_slots=8, ring_copy="dma"),
    "auto_ringdma": dict(ring_copy="dma"),
}
# also measured beside large GEMMs (8192^2, the conformance suite's size): they hold every SM
LAYERWISE_BIG = ("direct", "direct_hi_p16", "dma", "staged_8s", "staged_4s", "auto", "staged_8s_ringdma",
                 "auto_ringdma")


def layerwise(shape: Shape, timer: Timer, cuda: bool, device_cls: Any, variants: list[str] | None = None,
              sizes: tuple[int, ...] | None = None, blocks_order: str = "random",
              timeline_reps: int = 0, profile: bool = False) -> dict[str, Any]:
    """``CacheEngine.start_retrieve`` layer by layer beside a per-layer matmul, for each variant
    of :data:`LAYERWISE` and each size; the same run's reference is a plain per-layer H2D copy of
    the same bytes (one contiguous pinned range per layer) on a side stream beside the same
    matmuls. Hidden share = (load + compute - both) / min(load, compute). Each variant's last
    overlapped load goes into zeroed blocks and is compared bit for bit with what was stored."""
    devname = "cuda" if cuda else "cpu"
    sizes = sizes or tuple(t for t in shape.tokens if t >= 4 * shape.chunk) or shape.tokens
    dt_ = torch.bfloat16 if cuda else torch.float32
    mats = {}
    for label, n in (("small", 2048 if cuda else 64), ("big", 8192 if cuda else 96)):
        x = torch.randn(n, n, device=devname, dtype=dt_)
        mats[label] = (x, torch.randn_like(x), timer(lambda: torch.mm(x, x), reps=10, warmup=3)["median_s"])
    a, b, mm = mats["small"]
    out: dict[str, Any] = {"matmul": {lbl: {"n": int(m[0].shape[0]), "ms": m[2] * 1e3} for lbl, m in mats.items()},
                           "sizes": list(sizes), "blocks": blocks_order, "rows": {}}
    names = variants or list(LAYERWISE)
    gemm = {"mat": mats["small"]}

    def mm_k(k: int) -> None:
        x, y, _ = gemm["mat"]
        for _ in range(k):
            torch.mm(x, y)

    def measure(load_fn: Callable[[], Any], both_fn: Callable[[int], Any]) -> dict[str, Any]:
        load = timer(load_fn, reps=3)["median_s"]
        k = max(1, round(load / shape.layers / gemm["mat"][2]))

        def compute_all() -> None:
            for _ in range(shape.layers):
                mm_k(k)

        comp = timer(compute_all, reps=3)["median_s"]
        both_t = timer(lambda: both_fn(k), reps=3)
        both = both_t["median_s"]
        return dict(load_ms=load * 1e3, compute_ms=comp * 1e3, overlapped_ms=both * 1e3, matmuls_per_layer=k,
                    overlapped_min_ms=both_t["min_s"] * 1e3, overlapped_max_ms=both_t["max_s"] * 1e3,
                    matmul_n=int(gemm["mat"][0].shape[0]), hidden_fraction=(load + comp - both) / min(load, comp))

    def timeline(start: Callable[[], Any], k: int, reps: int) -> dict[str, Any]:
        """``reps`` pipelined runs, each with the host time at which every layer's compute was
        issued and, on a GPU, the compute stream's time when that layer's load was ready
        (an event after its wait) and when its compute ended: a layer's stall is ready(i) -
        done(i - 1), and a layer whose ready time is about its host issue time waited for the
        host, not for the copy."""
        runs = []
        for rep in range(reps + (1 if profile else 0)):
            timer.sync()
            ev0 = torch.cuda.Event(enable_timing=True) if cuda else None
            h0 = time.perf_counter()
            if ev0 is not None:
                ev0.record()
            prof = cProfile.Profile() if rep == reps else None  # one extra run, not in the figures
            if prof is not None:
                prof.enable()
            task = start()
            started = (time.perf_counter() - h0) * 1e3
            issued, ready, done, in_task = [], [], [], []
            t_in = time.perf_counter()
            for _layer in task:
                t_out = time.perf_counter()
                in_task.append((t_out - t_in) * 1e3)  # wait_layer: queueing the lookahead layer's copies
                issued.append((t_out - h0) * 1e3)
                if cuda:
                    ready.append(torch.cuda.Event(enable_timing=True))
                    ready[-1].record()
                mm_k(k)
                if cuda:
                    done.append(torch.cuda.Event(enable_timing=True))
                    done[-1].record()
                t_in = time.perf_counter()
            task.finish()
            timer.sync()
            run: dict[str, Any] = {"total_ms": (time.perf_counter() - h0) * 1e3, "issued_ms": issued,
                                   "start_ms": started, "in_task_ms": in_task}
            if prof is not None:
                prof.disable()
                run["profile"] = top_functions(prof, 25)
            if ev0 is not None:
                r_ms = [ev0.elapsed_time(e) for e in ready]
                d_ms = [ev0.elapsed_time(e) for e in done]
                stalls = [max(0.0, r - (d_ms[i - 1] if i else 0.0)) for i, r in enumerate(r_ms)]
                run.update(ready_ms=r_ms, done_ms=d_ms, stall_ms=stalls, stall_total_ms=sum(stalls),
                           host_bound_layers=sum(1 for r, h in zip(r_ms, issued) if r - h < 0.05))
            runs.append(run)
        profiled = runs.pop() if profile else None
        totals = [r["total_ms"] for r in runs]
        out = {"reps": reps, "matmuls_per_layer": k, "total_ms": totals, "runs": runs,
               "total_median_ms": statistics.median(totals), "total_max_ms": max(totals),
               "in_task_median_ms": statistics.median(x for r in runs for x in r["in_task_ms"])}
        if cuda:
            out["stall_total_ms"] = [r["stall_total_ms"] for r in runs]
        if profiled is not None:
            out["profiled_run"] = profiled
        return out

    for T in sizes:
        num_blocks = 2 * T // shape.block
        kv, caches = make_cache(shape, num_blocks, devname)
        g = torch.Generator().manual_seed(11)
        blocks = torch.randperm(num_blocks, generator=g)[: T // shape.block]
        if blocks_order == "contiguous":  # a fresh request on an unfragmented cache: one run per chunk
            blocks = torch.arange(num_blocks // 4, num_blocks // 4 + T // shape.block)
        tokens = list(range(20, 20 + T))
        nbytes = T * shape.bytes_per_token
        row: dict[str, Any] = {"bytes": nbytes}
        # the reference: one DMA per layer of the layer's bytes, contiguous pinned -> device
        per_layer = nbytes // shape.layers
        host = torch.empty(shape.layers, per_layer, dtype=torch.uint8, pin_memory=cuda)
        dst = torch.empty(shape.layers, per_layer, dtype=torch.uint8, device=devname)
        side = torch.cuda.Stream() if cuda else None

        def plain_enqueue() -> list[Any]:
            evs = []
            for layer in range(shape.layers):
                if side is None:
                    dst[layer].copy_(host[layer])
                    evs.append(None)
                    continue
                with torch.cuda.stream(side):
                    dst[layer].copy_(host[layer], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(side)
                evs.append(ev)
            return evs

        def plain_load() -> None:
            for ev in plain_enqueue():
                if ev is not None:
                    ev.synchronize()

        def plain_both(k: int) -> None:
            for ev in plain_enqueue():
                if ev is not None:
                    torch.cuda.current_stream().wait_event(ev)
                mm_k(k)

        r = measure(plain_load, plain_both)
        r["load_GBps"] = gbps(nbytes, r["load_ms"] / 1e3)
        gemm["mat"] = mats["big"]
        r["big_gemm"] = measure(plain_load, plain_both)
        gemm["mat"] = mats["small"]
        row["plain_copy"] = r
        log.info("layerwise T=%d plain per-layer copy: load %.1f ms (%.1f GB/s) compute %.1f both %.1f hidden %.0f%%",
                 T, r["load_ms"], r["load_GBps"], r["compute_ms"], r["overlapped_ms"], 100 * r["hidden_fraction"])
        del host, dst
        dev = device_cls(0, TransferOptions(store_mode="direct", load_mode="direct"))
        cfg = Config.load(overrides={"tiers": [f"memory://?capacity={nbytes + 64 * MiB}"],
                                     "chunk_size": shape.chunk, "host_pool_size": 2 * nbytes}, env={})
        with CacheEngine(kv.geometry, cfg, model="layerwise", device=dev) as eng:
            eng.store(tokens, kv, blocks, wait=True)
            # a fresh engine's pinned reserve fills after its first store (1 GiB at about 1 GB/s,
            # each allocation holding the driver's lock): timed beside it, the first variant paid
            # for it (2026-12-03: 31 allocations while direct_hi_p16 was timed at 4K); a warm
            # server is past it
            eng.pool.wait_reserve(30)
            stored = [c[:, blocks].clone() for c in caches]
            for name in names:
                opts = TransferOptions(store_mode="direct", **LAYERWISE[name])
                dev._options, dev._transfer = opts, None  # the engine's device takes the variant

                def load_only() -> None:
                    eng.start_retrieve(tokens, kv, blocks).finish()

                def both(k: int) -> None:
                    task = eng.start_retrieve(tokens, kv, blocks)
                    for _layer in task:
                        mm_k(k)
                    task.finish()

                if name.startswith("dma") and os.environ.get("LMCACHE_BENCH_NO_DMA"):
                    row[name] = {"error": f"skipped: {os.environ['LMCACHE_BENCH_NO_DMA']}"}
                    continue
                try:
                    gemm["mat"] = mats["small"]
                    made = eng.pool.allocations  # pinned allocations beside the timed runs (the reserve's)
                    r = measure(load_only, both)
                    if name in LAYERWISE_BIG:
                        gemm["mat"] = mats["big"]
                        r["big_gemm"] = measure(load_only, both)
                        gemm["mat"] = mats["small"]
                        log.info("layerwise T=%d %-18s beside %d^2 GEMMs: hidden %.0f%% (load %.1f compute %.1f "
                                 "both %.1f)", T, name, mats["big"][0].shape[0],
                                 100 * r["big_gemm"]["hidden_fraction"], r["big_gemm"]["load_ms"],
                                 r["big_gemm"]["compute_ms"], r["big_gemm"]["overlapped_ms"])
                    if timeline_reps:
                        r["timeline"] = timeline(lambda: eng.start_retrieve(tokens, kv, blocks),
                                                 r["matmuls_per_layer"], timeline_reps)
                    for c in caches:
                        c[:, blocks] = 0
                    both(r["matmuls_per_layer"])
                    timer.sync()
                    r["bit_exact"] = all(torch.equal(bits(c[:, blocks]), bits(s)) for c, s in zip(caches, stored))
                except Exception as exc:  # noqa: BLE001 - one variant failing must not lose the others
                    r = {"error": f"{type(exc).__name__}: {exc}"}
                    log.exception("layerwise %s T=%d failed", name, T)
                else:
                    r["load_GBps"] = gbps(nbytes, r["load_ms"] / 1e3)
                    r["pool_allocations_while_timed"] = eng.pool.allocations - made
                    r["options"] = LAYERWISE[name]
                    r["transfer_stats"] = asdict(dev.transfer.stats)
                    log.info("layerwise T=%d %-18s load %.1f ms (%.1f GB/s) compute %.1f both %.1f hidden %.0f%% %s",
                             T, name, r["load_ms"], r["load_GBps"], r["compute_ms"], r["overlapped_ms"],
                             100 * r["hidden_fraction"], "exact" if r["bit_exact"] else "MISMATCH")
                row[name] = r
            del stored
        out["rows"][str(T)] = row
        del caches, kv
        free_device_memory(cuda)
    return out


def top_functions(prof: cProfile.Profile, n: int) -> list[dict[str, Any]]:
    """``prof``'s ``n`` functions with the most own time: name, calls, own and cumulative ms."""
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, calls, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{os.path.basename(file)}:{line}:{func}", "calls": calls,
                     "own_ms": tt * 1e3, "cum_ms": ct * 1e3})
    return sorted(rows, key=lambda r: -r["own_ms"])[:n]


# -- section 3c: one request storing while another loads ----------------------------------------------
def concurrent(shape: Shape, timer: Timer, cuda: bool, device_cls: Any) -> dict[str, Any]:
    """Request A stored (gathers, paged GPU -> pinned chunks) while request B loads (scatters)
    on a second transfer stream, layer by layer as the engine issues them, per size; against
    the same run's bidirectional ceiling: one pinned H2D and one D2H copy of the same bytes on
    two streams at once. Both directions are checked bit for bit after the timed runs."""
    devname = "cuda" if cuda else "cpu"
    out: dict[str, Any] = {"rows": {}}
    sizes = tuple(t for t in shape.tokens if t >= 4 * shape.chunk) or shape.tokens
    for T in sizes:
        nbytes = T * shape.bytes_per_token
        num_blocks = 4 * T // shape.block
        kv, caches = make_cache(shape, num_blocks, devname)
        g = torch.Generator().manual_seed(13)
        perm = torch.randperm(num_blocks, generator=g)
        blocks_a, blocks_b = perm[: T // shape.block], perm[T // shape.block: 2 * T // shape.block]
        n = T // shape.chunk
        row: dict[str, Any] = {"bytes_each_way": nbytes}
        # the ceiling: plain copies, one each way, at once
        h_up = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        h_down = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        d_up = torch.empty(nbytes, dtype=torch.uint8, device=devname)
        d_down = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=devname)
        s1 = torch.cuda.Stream() if cuda else None
        s2 = torch.cuda.Stream() if cuda else None

        def both_ways() -> None:
            if not cuda:
                d_up.copy_(h_up)
                h_down.copy_(d_down)
                return
            with torch.cuda.stream(s1):
                d_up.copy_(h_up, non_blocking=True)
            with torch.cuda.stream(s2):
                h_down.copy_(d_down, non_blocking=True)

        t = timer(both_ways, reps=5)["median_s"]
        row["ceiling_GBps"] = gbps(2 * nbytes, t)
        del h_up, h_down, d_up, d_down
        for name, opts in (("default", {}), ("dma", dict(store_mode="dma", load_mode="dma")),
                           ("staged", dict(store_mode="staged", load_mode="staged", staging_slots=8))):
            if name == "dma" and os.environ.get("LMCACHE_BENCH_NO_DMA"):
                continue
            dev = device_cls(0, TransferOptions(**opts))
            geom = kv.geometry
            src = make_chunks(dev, geom, n, shape.chunk)
            dst = make_chunks(dev, geom, n, shape.chunk)
            slots_a = slot_mapping(blocks_a, shape.block, 0, T)
            slots_b = slot_mapping(blocks_b, shape.block, 0, T)
            store = [(slots_a[i * shape.chunk:(i + 1) * shape.chunk], dst[i]) for i in range(n)]
            load = [(slots_b[i * shape.chunk:(i + 1) * shape.chunk], src[i]) for i in range(n)]
            dev.gather_many(kv, load)  # B's chunks hold what B's blocks hold now
            dev.synchronize()
            st, ls = dev.new_stream(), dev.new_stream()

            def store_and_load() -> None:
                evs = []
                for layer in range(shape.layers):
                    with dev.use_stream(st):
                        dev.gather_many(kv, store, layers=(layer,))
                    with dev.use_stream(ls):
                        dev.scatter_many(kv, load, layers=(layer,))
                        evs.append(dev.record_event(ls))
                dev.record_event(st).synchronize()
                for ev in evs:
                    ev.synchronize()

            t = timer(store_and_load, reps=5)["median_s"]
            for c in caches:  # B's blocks zeroed: the check below needs the load to rewrite them
                c[:, blocks_b] = 0
            store_and_load()
            timer.sync()
            ok = check_store(kv, store, devname) and check_store(kv, load, devname)
            r = {"GBps": gbps(2 * nbytes, t), "ms": t * 1e3, "bit_exact": ok,
                 "share_of_ceiling": gbps(2 * nbytes, t) / row["ceiling_GBps"]}
            row[name] = r
            log.info("concurrent T=%d %s: %.1f GB/s both ways (%.0f%% of %.1f), %s", T, name, r["GBps"],
                     100 * r["share_of_ceiling"], row["ceiling_GBps"], "exact" if ok else "MISMATCH")
            del src, dst
        out["rows"][str(T)] = row
        del caches, kv
        free_device_memory(cuda)
    return out


# -- section 4: TTFT ------------------------------------------------------------------------------------
def llama_model(cuda: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    if cuda:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          max_position_embeddings=131072, rope_theta=500000.0)
    else:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def ttft(shape: Shape, cuda: bool, device_cls: Any, h2d_ceiling: float, reps: int,
         kv_codecs: tuple[str, ...] = ("none", "fp8")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        from lmcache_core.integrations.transformers import CachedModel, geometry_for
        out["method"] = "transformers integration: CachedModel.generate (ttft_s)"
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"transformers integration unavailable: {type(exc).__name__}: {exc}"
        return out
    t0 = time.perf_counter()
    model = llama_model(cuda)
    out["model_init_s"] = time.perf_counter() - t0
    geom = geometry_for(model)
    max_t = max(shape.tokens)
    cap = 2 * max_t * geom.bytes_per_token + 256 * MiB
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, model.config.vocab_size, (max_t,), generator=g).tolist()
    for codec in kv_codecs:  # "none": exact KV (rows); "fp8": kv_codec fp8, half the bytes (fp8_rows)
        cfg = Config.load(overrides={"tiers": [f"memory://?capacity={cap}"], "chunk_size": shape.chunk,
                                     "host_pool_size": cap, "kv_codec": codec}, env={})
        eng = CacheEngine(geom, cfg, model="llama3-8b-random", device=device_cls(0))
        try:
            out["rows" if codec == "none" else f"{codec}_rows"] = _ttft_rows(shape, model, eng, prompt, h2d_ceiling,
                                                                             reps, CachedModel)
        except Exception as exc:  # noqa: BLE001 - the exact rows stay; the error is reported
            if codec == "none":
                raise
            out[f"{codec}_error"] = f"{type(exc).__name__}: {exc}"
    del model
    free_device_memory(cuda)
    return out


def _ttft_rows(shape: Shape, model: Any, eng: CacheEngine, prompt: list[int], h2d_ceiling: float, reps: int,
               cached_model: Any) -> dict[str, Any]:
    """Recompute vs full hit per prompt length through CachedModel and the batched call (``eng``
    closed at the end). The bound is the bf16 KV bytes over the H2D ceiling whatever the codec."""
    geom = eng.geometry
    cm = cached_model(model, eng)
    rows = {}
    try:
        for T in sorted(shape.tokens):
            ids = prompt[:T]
            rec = [cm.generate(ids, 1, use_cache=False).ttft_s for _ in range(reps)]
            cold = cm.generate(ids, 1)  # computes, then stores the prompt's chunks
            eng.flush()
            hits = [cm.generate(ids, 1) for _ in range(reps)]
            hit_s = statistics.median(r.ttft_s for r in hits)
            batched = [hit_batched(model, eng, ids) for _ in range(reps)]
            bat_s = statistics.median(t for t, _ in batched)
            # the parts, each the median of ``reps`` runs that synchronise between parts (one
            # run's parts swung by 5-10% at 32K, runs J-L); the KV part is the median of the sums
            runs: list[dict[str, float]] = []
            for _ in range(reps):
                runs.append({})
                hit_batched(model, eng, ids, runs[-1])
            breakdown = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            kv_ms = statistics.median(r["lookup_fetch_ms"] + r["load_ms"] for r in runs)
            bound = T * geom.bytes_per_token / (h2d_ceiling * 1e9) if h2d_ceiling > 0 else float("nan")
            rows[str(T)] = {"recompute_ms": statistics.median(rec) * 1e3, "hit_ms": hit_s * 1e3,
                            "hit_tokens": hits[-1].hit_tokens, "by_tier": hits[-1].by_tier,
                            "stored_tokens": cold.stored_tokens, "bound_ms": bound * 1e3,
                            "hit_over_bound": hit_s / bound if bound else None,
                            "hit_batched_ms": bat_s * 1e3, "batched_over_bound": bat_s / bound if bound else None,
                            "batched_same_token": batched[-1][1] == hits[-1].tokens[0],
                            "batched_breakdown_ms": breakdown, "breakdown_runs": len(runs),
                            "kv_ms": kv_ms, "kv_min_ms": min(r["lookup_fetch_ms"] + r["load_ms"] for r in runs),
                            "kv_over_bound": kv_ms / (bound * 1e3) if bound else None,
                            "speedup": statistics.median(rec) / hit_s,
                            "same_token": hits[-1].tokens[0] == cm.generate(ids, 1, use_cache=False).tokens[0]}
            log.info("ttft %s T=%d recompute %.1f ms hit %.1f ms batched hit %.1f ms bound %.1f ms", eng.kv_codec, T,
                     rows[str(T)]["recompute_ms"], rows[str(T)]["hit_ms"], bat_s * 1e3, rows[str(T)]["bound_ms"])
    finally:
        eng.close()
    return rows


def hit_batched(model: Any, eng: CacheEngine, ids: list[int], parts_out: dict[str, float] | None = None
                ) -> tuple[float, int]:
    """A full hit as the engine would run it with the device's batched call: lookup, fetch, one
    ``scatter_many`` of every chunk into a fresh HF cache (all layers), then the last token's
    forward. Returns (seconds to the first token, that token)."""
    from transformers import DynamicCache

    def mark(name: str, since: float) -> float:
        if parts_out is None:
            return since
        eng.device.synchronize()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        parts_out[name] = (now - since) * 1e3
        return now

    t0 = time.perf_counter()
    with torch.inference_mode():
        lookup = eng.lookup(ids, pin=True)
        want = min(lookup.hit_tokens, len(ids) - 1)
        got = eng.tiers.get_many(list(lookup.keys))
        try:
            t = mark("lookup_fetch_ms", t0)
            g = eng.geometry
            dev, dt = model.device, model.dtype
            # the HF cache is allocated per request (a vLLM cache exists before): timed apart
            ks = [torch.empty(1, g.num_heads, want, g.head_dim, dtype=dt, device=dev) for _ in range(g.num_layers)]
            vs = [torch.empty_like(k) for k in ks]
            kv = PagedKV.from_hf(list(zip(ks, vs)))
            slots = torch.arange(want, device=dev)
            t = mark("alloc_ms", t)
            parts, pos = [], 0
            for item in got:
                if item is None or pos >= want:
                    break
                c = item[0]
                n = min(c.num_tokens, want - pos)
                parts.append((c, slots[pos:pos + n], 0, n))
                pos += n
            eng._scatter(kv, eng._copy_batch(parts), None)  # plain, or coded with the engine's kv_codec
            t = mark("load_ms", t)
            try:
                cache = DynamicCache(config=model.config)
            except TypeError:
                cache = DynamicCache()
            for i, (k, v) in enumerate(zip(ks, vs)):
                cache.update(k[:, :, :pos], v[:, :, :pos], i)
            rest = torch.tensor([ids[pos:]], device=dev)
            position = torch.arange(pos, len(ids), device=dev).unsqueeze(0)
            import inspect

            kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            logits = model(input_ids=rest, use_cache=True, position_ids=position, logits_to_keep=1,
                           **{kw: cache}).logits[0, -1]
            token = int(torch.argmax(logits))
            mark("forward_ms", t)
        finally:
            for item in got:
                if item is not None:
                    item[0].release()
            eng.release(lookup)
    return time.perf_counter() - t0, token


# -- report ---------------------------------------------------------------------------------------------
def env_info(cuda: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "host": platform.node()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"unavailable: {exc}"
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_memory=p.total_memory)
        from lmcache_device_cuda.device import CUDADevice

        d = CUDADevice(0)
        info["telemetry"] = d.telemetry()
        info["mapped_host"] = d.transfer.mapped_host()
        st = d.gds_status()
        info["gds"] = {"mode": st.mode, "reason": st.reason, "version": st.version}
    return info


def table(res: dict[str, Any]) -> str:
    lines = []
    c = res.get("ceilings", {})
    lines.append(f"ceilings: D2H {c.get('d2h_GBps', 0):.1f} GB/s  H2D {c.get('h2d_GBps', 0):.1f} GB/s")
    sl = res.get("store_load", {})
    if sl:
        toks = [k for k in next(iter(sl.values())) if k.isdigit()]
        lines.append("variant               " + "  ".join(f"{t:>15}" for t in toks) + "   exact")
        for name, row in sl.items():
            if "skipped" in row:
                lines.append(f"{name:<22}skipped: {row['skipped']}")
                continue
            cells = "  ".join(f"{row[t]['store_GBps']:6.1f}/{row[t]['load_GBps']:6.1f}  " for t in toks)
            lines.append(f"{name:<22}{cells}  {row.get('store_bit_exact')}/{row.get('load_bit_exact')}")
    tn = res.get("tune", {})
    for k, v in tn.items():
        if isinstance(v, dict):
            lines.append(f"tune {k:<12} batched {v['batched']['store_GBps']:5.1f}/{v['batched']['load_GBps']:5.1f}"
                         f"  layerwise {v['layerwise']['store_GBps']:5.1f}/{v['layerwise']['load_GBps']:5.1f}")
    for mode, ov in sorted(res.get("overlap", {}).items()):
        if isinstance(ov, dict):
            lines.append(f"overlap {mode}: load {ov['load_ms']:.1f} ms compute {ov['compute_ms']:.1f} ms both "
                         f"{ov['overlapped_ms']:.1f} ms hidden {100 * ov['hidden_fraction']:.0f}%")
    for T, row in res.get("concurrent", {}).get("rows", {}).items():
        for name in ("default", "dma", "staged"):
            if name in row:
                r = row[name]
                lines.append(f"concurrent {T:>6} {name:<8} {r['GBps']:6.1f} GB/s both ways = "
                             f"{100 * r['share_of_ceiling']:.0f}% of {row['ceiling_GBps']:.1f}"
                             f"{'' if r['bit_exact'] else '  MISMATCH'}")
    for case, row in res.get("layouts", {}).get("rows", {}).items():
        for name, r in row.items():
            if isinstance(r, dict) and "error" in r:
                lines.append(f"layouts {case:<32} {name:<16} ERROR {r['error']}")
            elif isinstance(r, dict):
                cells = "  ".join(f"{T}: {v['store_GBps']:5.1f}/{v['load_GBps']:5.1f}"
                                  + ("" if v["store_bit_exact"] and v["load_bit_exact"] else " MISMATCH")
                                  for T, v in r.items() if T.isdigit())
                lines.append(f"layouts {case:<32} {name:<16} store/load GB/s {cells}")
    for T, row in res.get("layerwise", {}).get("rows", {}).items():
        for name, r in row.items():
            if isinstance(r, dict) and "hidden_fraction" in r:
                big = r.get("big_gemm")
                lines.append(f"layerwise {T:>6} {name:<18} load {r['load_ms']:7.1f} ms ({r['load_GBps']:5.1f} GB/s) "
                             f"compute {r['compute_ms']:7.1f}  both {r['overlapped_ms']:7.1f}  "
                             f"hidden {100 * r['hidden_fraction']:4.0f}%"
                             + (f"  big GEMMs {100 * big['hidden_fraction']:4.0f}%" if big else "")
                             + f"  {'' if r.get('bit_exact', True) else 'MISMATCH'}")
            elif isinstance(r, dict) and "error" in r:
                lines.append(f"layerwise {T:>6} {name:<18} ERROR {r['error']}")
    for key in ("rows", "fp8_rows"):  # exact KV, then kv_codec fp8 (the bound is the bf16 bytes' either way)
        for T, r in res.get("ttft", {}).get(key, {}).items():
            lines.append(f"ttft {'fp8 ' if key == 'fp8_rows' else ''}{T:>6}: recompute {r['recompute_ms']:8.1f} ms  "
                         f"hit {r['hit_ms']:7.1f} ms  batched {r['hit_batched_ms']:7.1f} ms  bound {r['bound_ms']:6.1f} ms"
                         f"  hit/bound {r['hit_over_bound']:.2f}  batched/bound {r['batched_over_bound']:.2f}  KV part "
                         f"{r.get('kv_ms', float('nan')):.1f} ms = {r.get('kv_over_bound') or float('nan'):.3f}x bound")
    for k, v in res.get("errors", {}).items():
        lines.append(f"ERROR {k}: {v.splitlines()[-1] if v else v}")
    return "\n".join(lines)


def plot(res: dict[str, Any], png: str) -> None:
    """Three panels: store and load GB/s per path against the ceilings, and TTFT hit vs recompute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sl = res["store_load"]
    toks = sorted(int(k) for k in next(iter(sl.values())) if k.isdigit())
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    show = ["engine_default", "engine_direct", "engine_staged", "batched_direct", "batched_staged_1chunk_4s",
            "batched_staged_128m_3s", "torch_reference", "engine_fp8", "batched_fp8",
            "batched_fp8_layer_groups"]
    for ax, key, ceil_key, title in ((axes[0], "store_GBps", "d2h_GBps", "store: paged GPU -> pinned chunks"),
                                     (axes[1], "load_GBps", "h2d_GBps", "load: pinned chunks -> paged GPU")):
        top = 0.0
        for name in show:
            if name in sl and "skipped" not in sl[name]:
                ys = [sl[name][str(t)][key] for t in toks]
                top = max(top, *ys)
                ax.plot(toks, ys, marker="o", label=name + (" (bf16 bytes coded as fp8)" if "fp8" in name else ""),
                        ls="--" if "fp8" in name else "-")
        ceil = max(res["ceilings"][ceil_key], res["ceilings"].get("32MiB", {}).get(ceil_key, 0.0))
        ax.axhline(ceil, color="k", ls="--", lw=1, label=f"pinned copy ceiling {ceil:.1f} (best of 1 GiB, 32 MiB)")
        ax.axhline(0.95 * ceil, color="grey", ls=":", lw=1, label="95% of it")
        ax.set_xscale("log", base=2)
        ax.set_xticks(toks, [f"{t // 1024}K" for t in toks])
        ax.set_ylim(0, max(ceil, top) * 1.1)
        ax.set_xlabel("tokens (Llama-3-8B KV, 128 KiB/token)")
        ax.set_ylabel("GB/s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    rows = res.get("ttft", {}).get("rows", {})
    if not rows:
        axes[2].axis("off")
        axes[2].text(0.5, 0.5, "no TTFT section in this run", ha="center", va="center")
    if rows:
        ts = sorted(int(t) for t in rows)
        ax = axes[2]
        ax.plot(ts, [rows[str(t)]["recompute_ms"] for t in ts], marker="o", label="recompute (prefill)")
        ax.plot(ts, [rows[str(t)]["hit_ms"] for t in ts], marker="o", label="full hit, CachedModel")
        ax.plot(ts, [rows[str(t)]["hit_batched_ms"] for t in ts], marker="o", label="full hit, scatter_many")
        ax.plot(ts, [rows[str(t)]["bound_ms"] for t in ts], ls="--", color="k", label="KV bytes / H2D ceiling")
        fp8_rows = res.get("ttft", {}).get("fp8_rows", {})
        fts = sorted(int(t) for t in fp8_rows if "hit_batched_ms" in fp8_rows[t])
        if fts:
            ax.plot(fts, [fp8_rows[str(t)]["hit_batched_ms"] for t in fts], marker="s",
                    label="full hit, kv_codec fp8 (scatter_coded)")
            ax.plot(fts, [fp8_rows[str(t)]["kv_ms"] for t in fts], marker="s", ls=":",
                    label="its KV part (lookup, fetch, load)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ts, [f"{t // 1024}K" for t in ts])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("time to first token (ms)")
        ax.set_title("TTFT, random-weight Llama-3-8B shape, bf16 KV")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    env = res.get("env", {})
    fig.suptitle(f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, Triton {env.get('triton', '?')}, "
                 f"{env.get('date', '?')[:10]}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def plot_layerwise(runs: list[dict[str, Any]], png: str) -> None:
    """Hidden share of a layer-by-layer load per size: beside small matmuls (left) and beside
    8192^2 GEMMs (middle), per variant, with the load's GB/s alone beside the ceiling (right),
    from one or more runs' ``layerwise`` sections: each run's figure is a dot, the line joins
    the medians over the runs (the per-layer figures vary from run to run)."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for res in runs:
        for T, row in res.get("layerwise", {}).get("rows", {}).items():
            for name, r in row.items():
                if isinstance(r, dict) and "hidden_fraction" in r:
                    rows.setdefault(name, {}).setdefault(int(T), []).append(r)
    show = [n for n in ("plain_copy", "direct", "direct_hi_p16", "staged_8s", "dma", "auto") if n in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, name in enumerate(show):
        color = f"C{i}"
        ts = sorted(t for t in rows[name] if t >= 4096)
        label = {"plain_copy": "plain per-layer DMA (reference)", "direct": "direct, uncapped (before)",
                 "direct_hi_p16": "direct, 16 programs, high priority",
                 "staged_8s": "staged, batched ring copies, 8 slots",
                 "auto": "defaults (auto)"}.get(name, name)
        panels = ((axes[0], lambda r: 100 * r["hidden_fraction"]),
                  (axes[1], lambda r: 100 * r["big_gemm"]["hidden_fraction"] if "big_gemm" in r else None),
                  (axes[2], lambda r: r["load_GBps"]))
        for ax, get in panels:
            pts = [(t, v) for t in ts for v in (get(r) for r in rows[name][t]) if v is not None]
            if not pts:
                continue
            ax.scatter([t for t, _ in pts], [v for _, v in pts], color=color, s=12, alpha=0.5)
            mts = sorted({t for t, _ in pts})
            ax.plot(mts, [statistics.median(v for t2, v in pts if t2 == t) for t in mts], marker="o",
                    label=label, color=color)
    for ax, title in ((axes[0], "hidden beside 2048^2 matmuls per layer"),
                      (axes[1], "hidden beside 8192^2 GEMMs per layer")):
        ax.axhline(80, color="grey", ls=":", lw=1, label="goal 80%")
        ax.set_ylim(-80, 115)
        ax.set_ylabel("% of the shorter side hidden")
        ax.set_title(title)
    ceil = max(r.get("ceilings", {}).get("h2d_GBps", 0.0) for r in runs)
    if ceil:
        axes[2].axhline(ceil, color="k", ls="--", lw=1, label=f"pinned H2D ceiling {ceil:.1f}")
    axes[2].set_ylabel("load alone, GB/s")
    axes[2].set_title("layer-by-layer load alone")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ts = sorted({t for n in show for t in rows[n] if t >= 4096})
        ax.set_xticks(ts, [f"{t // 1024}K" for t in ts])
        ax.set_xlabel("tokens (Llama-3-8B KV)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    env = runs[-1].get("env", {})
    dates = sorted({r.get("env", {}).get("date", "?")[:16].replace("T", " ") for r in runs})
    fig.suptitle(f"CacheEngine.start_retrieve layer by layer, {env.get('gpu', '?')}, "
                 f"{len(runs)} run(s): {', '.join(dates)} UTC")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, kernels in the Triton interpreter")
    ap.add_argument("--sections", default="ceilings,store_load,layouts,tune,overlap,concurrent,layerwise,ttft")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--blocks", choices=("random", "contiguous"), default="random",
                    help="layerwise section: the request's block ids random (worst case) or consecutive")
    ap.add_argument("--variants", default="", help="layerwise section: comma-separated names of LAYERWISE "
                                                   "(default all)")
    ap.add_argument("--timeline", type=int, default=0, metavar="N",
                    help="layerwise section: N more pipelined runs per variant with each layer's host issue "
                         "time and (GPU) its ready/done events on the compute stream")
    ap.add_argument("--profile", action="store_true",
                    help="layerwise section, with --timeline: one more timeline run of each variant under cProfile "
                         "(the host's top functions by own time; kept apart from the timed runs)")
    ap.add_argument("--plot", metavar="JSON", help="only draw the figure of an earlier run's gpu_transfer.json")
    ap.add_argument("--png", default="docs/benchmarks-gpu-transfer.png")
    ap.add_argument("--plot-layerwise", nargs="+", metavar="JSON",
                    help="only draw the layer-wise overlap figure from these runs' gpu_transfer.json")
    args = ap.parse_args(argv)
    if args.profile and not args.timeline:
        ap.error("--profile profiles a timeline run: add --timeline N (e.g. --timeline 5)")
    if args.plot_layerwise:
        runs = []
        for path in args.plot_layerwise:
            with open(path) as f:
                runs.append(json.load(f))
        png = args.png if args.png != "docs/benchmarks-gpu-transfer.png" else "docs/benchmarks-layerwise.png"
        plot_layerwise(runs, png)
        print(f"wrote {png}")
        return 0
    if args.plot:
        with open(args.plot) as f:
            plot(json.load(f), args.png)
        print(f"wrote {args.png}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    shape = DRY_SHAPE if args.dry_run else GPU_SHAPE
    if cuda:
        from lmcache_device_cuda.device import CUDADevice as device_cls
    else:
        from lmcache_kernels.accel import HostStreamDevice as device_cls  # the CPU stand-in

    timer = Timer(cuda)
    os.makedirs(args.out, exist_ok=True)
    res: dict[str, Any] = {"shape": asdict(shape), "errors": {}}
    res["env"] = env_info(cuda)
    log.info("env: %s", json.dumps(res["env"], default=str))
    sections = args.sections.split(",")
    path = os.path.join(args.out, "gpu_transfer.json")

    def save() -> None:
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)

    for name, fn in (("ceilings", lambda: ceilings(timer, cuda)),
                     ("store_load", lambda: store_load(shape, timer, cuda, device_cls, args.reps)),
                     ("layouts", lambda: layouts(shape, timer, cuda, device_cls, args.reps)),
                     ("tune", lambda: tune(shape, timer, cuda, device_cls, args.reps)),
                     ("overlap", lambda: overlap(shape, timer, cuda, device_cls)),
                     ("concurrent", lambda: concurrent(shape, timer, cuda, device_cls)),
                     ("layerwise", lambda: layerwise(shape, timer, cuda, device_cls,
                                                     args.variants.split(",") if args.variants else None,
                                                     blocks_order=args.blocks, timeline_reps=args.timeline,
                                                     profile=args.profile)),
                     ("ttft", lambda: ttft(shape, cuda, device_cls, res.get("ceilings", {}).get("h2d_GBps", 0.0),
                                           3 if cuda else 1))):
        if name not in sections:
            continue
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception:  # noqa: BLE001 - one failed section must not lose the others
            res["errors"][name] = traceback.format_exc()
            log.error("section %s failed:\n%s", name, res["errors"][name])
        res.setdefault("section_s", {})[name] = time.perf_counter() - t0
        save()
    print(table(res))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
