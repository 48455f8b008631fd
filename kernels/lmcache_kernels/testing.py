"""Builders for tests and benchmarks: every engine layout filled with random bits.

Used by this distribution's tests, the device plugins' tests and
``benchmarks/gpu_transfer.py``, so that all of them check the same layouts.
Values are random bit patterns (NaN payloads included), never zeros.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from lmcache_core.layout import PagedKV

LAYOUTS = (
    "vllm_flash", "flashinfer", "vllm_blocks_heads", "mla",
    "sglang_layer_first", "sglang_page_first", "sglang_page_first_direct", "sglang_page_first_mla", "hf",
)
DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")


def random_bits(shape: tuple[int, ...], dtype: "torch.dtype", device: "torch.device | str" = "cpu",
                generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """A tensor of ``dtype`` whose bytes are uniformly random (every bit pattern possible). With
    a generator on an accelerator the bits are drawn there, in place (GiB-sized caches)."""
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[size]
    lo, hi = (0, 256) if size == 1 else (-(2 ** (8 * size - 1)), 2 ** (8 * size - 1))
    if generator is not None and generator.device.type != "cpu":
        return torch.randint(lo, hi - 1 if size == 4 else hi, shape, dtype=ints, device=generator.device,
                             generator=generator).view(dtype)
    t = torch.randint(lo, hi, shape, dtype=torch.int64, generator=generator).to(ints)
    return t.view(dtype).to(device)


def poison(t: "torch.Tensor", byte: int = 0x5A) -> "torch.Tensor":
    """Fill ``t`` with a repeated byte (not zero), so unwritten elements stand out."""
    from .reference import raw

    r = raw(t)
    r.fill_(int.from_bytes(bytes([byte]) * t.element_size(), "little", signed=r.dtype.is_signed))
    return t


def bits(t: "torch.Tensor") -> "torch.Tensor":
    """The tensor's raw bits as integers, on the CPU, for exact comparison."""
    from .reference import raw

    return raw(t).cpu()


def make_kv(kind: str, *, dtype: str = "bfloat16", device: "torch.device | str" = "cpu", num_layers: int = 3,
            num_blocks: int = 12, block_size: int = 4, heads: int = 2, head_dim: int = 16,
            generator: "torch.Generator | None" = None) -> tuple["PagedKV", list["torch.Tensor"]]:
    """A PagedKV of layout ``kind`` over freshly allocated random memory, and its backing tensors.

    ``hf`` uses ``num_blocks * block_size`` tokens (one token per block); MLA kinds use
    one head of ``head_dim`` latent values.
    """
    import torch

    from lmcache_core.layout import PagedKV

    dt = getattr(torch, dtype)
    L, B, S, H, D = num_layers, num_blocks, block_size, heads, head_dim

    def rnd(*shape: int) -> torch.Tensor:
        return random_bits(shape, dt, device, generator)

    if kind == "vllm_flash":
        caches = [rnd(2, B, S, H, D) for _ in range(L)]
        return PagedKV.from_vllm_flash(caches), caches
    if kind == "flashinfer":
        caches = [rnd(B, 2, S, H, D) for _ in range(L)]
        return PagedKV.from_flashinfer(caches), caches
    if kind == "vllm_blocks_heads":
        # vLLM 0.3x: per-layer [blocks, heads, block, 2*D] views over one shared buffer whose
        # physical order puts layers inside blocks, so every view is non-contiguous.
        shared = rnd(B, L, H, S, 2 * D)
        caches = [shared[:, l] for l in range(L)]
        return PagedKV.from_vllm_blocks_heads(caches, D), [shared]
    if kind == "mla":
        caches = [rnd(B, S, D) for _ in range(L)]
        return PagedKV.from_mla(caches), caches
    if kind == "sglang_layer_first":
        buf = rnd(2, L, B * S, H, D)
        return PagedKV.from_sglang_host(buf, "layer_first"), [buf]
    if kind == "sglang_page_first":
        buf = rnd(2, B * S, L, H, D)
        return PagedKV.from_sglang_host(buf, "page_first"), [buf]
    if kind == "sglang_page_first_direct":
        buf = rnd(2, B, L, S, H, D)
        return PagedKV.from_sglang_host(buf, "page_first_direct"), [buf]
    if kind == "sglang_page_first_mla":
        buf = rnd(B * S, L, 1, D)
        return PagedKV.from_sglang_host(buf, "page_first", mla=True), [buf]
    if kind == "hf":
        pairs = [(rnd(1, H, B * S, D), rnd(1, H, B * S, D)) for _ in range(L)]
        return PagedKV.from_hf(pairs), [t for p in pairs for t in p]
    raise ValueError(f"unknown layout {kind!r}; known: {', '.join(LAYOUTS)}")


def random_slots(num_tokens: int, kv: "PagedKV", generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """Slots of ``num_tokens`` tokens over random, non-contiguous blocks (a shuffled block table)."""
    import torch

    need = (num_tokens + kv.block_size - 1) // kv.block_size
    if need > kv.num_blocks:
        raise ValueError(f"{num_tokens} tokens need {need} blocks, the cache has {kv.num_blocks}")
    blocks = torch.randperm(kv.num_blocks, generator=generator)[:need]
    pos = torch.arange(num_tokens)
    return blocks[pos // kv.block_size] * kv.block_size + pos % kv.block_size


def chunk_like(kv: "PagedKV", tokens: int, device: "torch.device | str" = "cpu",
               pin: bool = False) -> "torch.Tensor":
    """A poisoned chunk tensor ``[L, P, tokens, hidden]`` of the KV dtype."""
    import torch

    g = kv.geometry
    t = torch.empty(g.shape(tokens), dtype=kv.layers[0].k.dtype, device=device, pin_memory=pin)
    return poison(t)
