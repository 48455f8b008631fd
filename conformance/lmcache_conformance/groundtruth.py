"""Ground truth KV: engine caches in every supported layout, built from a known logical tensor.

The suite never checks a plugin against itself. It draws a logical KV tensor
``[layers, planes, slots, heads, dim]`` on the host, lays it out in an engine's
own memory format (vLLM flash-attn, FlashInfer, vLLM 0.3x blocks-heads views
over one shared buffer, MLA, the three SGLang host pools, Hugging Face) with
plain tensor indexing written here, and reads an engine cache back the same
way. Expected chunks are computed from the logical tensor and a slot list, so a
device's gather and scatter are compared with values that never went through
any plugin. Comparisons are on integer views of the same width: bit-exact for
every float type, fp8 included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from lmcache_core.layout import PagedKV, torch_dtype

if TYPE_CHECKING:
    import torch

LAYOUTS: tuple[str, ...] = (
    "vllm_flash",
    "flashinfer",
    "vllm_blocks_heads",
    "mla",
    "sglang_layer_first",
    "sglang_page_first",
    "sglang_page_first_direct",
    "hf",
)
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")

# Layouts whose engine addresses one token per "block" (block_size 1).
_PER_TOKEN = ("sglang_layer_first", "sglang_page_first", "hf")

_RAW = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def raw(t: "torch.Tensor") -> "torch.Tensor":
    """The same memory as a signed/unsigned integer tensor of equal width (bit-exact compares)."""
    import torch

    return t.view(getattr(torch, _RAW[t.element_size()]))


@dataclass(frozen=True)
class KVShape:
    """Sizes of the test KV cache: small enough for CI, shaped to catch index mix-ups.

    Heads, dim and block size differ from each other and from the layer count so a
    transposed stride shows as wrong values, never as a lucky match.
    """

    num_layers: int = 3
    num_heads: int = 2
    head_dim: int = 8
    block_size: int = 16
    num_blocks: int = 12

    @property
    def slots(self) -> int:
        return self.num_blocks * self.block_size


@dataclass
class EngineKV:
    """An engine's KV cache in one layout, on one device, with its ground-truth reader.

    ``tensors`` are the engine's own allocations; ``kv`` is the :class:`PagedKV`
    the plugin under test sees; ``logical()`` reads the allocations back as a host
    ``[layers, planes, slots, heads, dim]`` integer tensor without using ``kv``.
    """

    layout: str
    dtype: str
    shape: KVShape
    tensors: list["torch.Tensor"]
    kv: PagedKV
    block_size: int
    _read: Callable[[list["torch.Tensor"]], "torch.Tensor"]

    @property
    def planes(self) -> int:
        return 1 if self.layout == "mla" else 2

    @property
    def heads(self) -> int:
        return 1 if self.layout == "mla" else self.shape.num_heads

    @property
    def head_dim(self) -> int:
        return self.shape.num_heads * self.shape.head_dim if self.layout == "mla" else self.shape.head_dim

    @property
    def num_blocks(self) -> int:
        return self.shape.slots // self.block_size

    def logical(self) -> "torch.Tensor":
        """Host integer tensor ``[layers, planes, slots, heads, dim]`` of what the cache holds now."""
        return self._read(self.tensors).cpu()

    def fill_raw(self, value: int) -> None:
        """Set every element's bits to ``value`` (a sentinel that no drawn value equals)."""
        for t in self.tensors:
            raw(t).fill_(value)


def draw_values(shape: Sequence[int], dtype: str, seed: int) -> "torch.Tensor":
    """Host tensor of ``dtype`` with varied, finite values (normal draws cast to the dtype)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 4).to(torch_dtype(dtype))


def build(layout: str, dtype: str, device: "torch.device | str", shape: KVShape = KVShape(),
          seed: int = 0) -> EngineKV:
    """An engine cache in ``layout`` on ``device`` holding drawn values (see :func:`draw_values`)."""
    import torch

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
    L, H, D, S = shape.num_layers, shape.num_heads, shape.head_dim, shape.slots
    bs = 1 if layout in _PER_TOKEN else shape.block_size
    B = S // bs
    def put(host: "torch.Tensor") -> "torch.Tensor":
        return host.to(device)

    tensors: list[torch.Tensor]
    read: Callable[[list[torch.Tensor]], torch.Tensor]
    if layout == "vllm_flash":
        tensors = [put(draw_values((2, B, bs, H, D), dtype, seed + l)) for l in range(L)]
        kv = PagedKV.from_vllm_flash(tensors)

        def read(ts: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([raw(t).cpu().reshape(2, S, H, D) for t in ts])

    elif layout == "flashinfer":
        tensors = [put(draw_values((B, 2, bs, H, D), dtype, seed + l)) for l in range(L)]
        kv = PagedKV.from_flashinfer(tensors)

        def read(ts: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([raw(t).cpu().permute(1, 0, 2, 3, 4).reshape(2, S, H, D) for t in ts])

    elif layout == "vllm_blocks_heads":
        # vLLM 0.3x: one buffer, physical order [layers, blocks, tokens, heads, K||V]; each
        # layer's view [blocks, heads, tokens, 2*dim] is a non-contiguous permutation of it.
        phys = put(draw_values((L, B, bs, H, 2 * D), dtype, seed))
        tensors = [phys]
        kv = PagedKV.from_vllm_blocks_heads([phys[l].permute(0, 2, 1, 3) for l in range(L)], head_dim=D)

        def read(ts: list[torch.Tensor]) -> torch.Tensor:
            p = raw(ts[0]).cpu().reshape(L, S, H, 2 * D)
            return torch.stack([p[..., :D], p[..., D:]], dim=1)

    elif layout == "mla":
        latent = H * D
        tensors = [put(draw_values((B, bs, latent), dtype, seed + l)) for l in range(L)]
        kv = PagedKV.from_mla(tensors)

        def read(ts: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([raw(t).cpu().reshape(1, S, 1, latent) for t in ts])

    elif layout == "sglang_layer_first":
        buf = put(draw_values((2, L, S, H, D), dtype, seed))
        tensors = [buf]
        kv = PagedKV.from_sglang_host(buf, "layer_first")

        def read(ts: list[torch.Tensor]) -> torch.Tensor:
            return raw(ts[0]).cpu().permute(1, 0, 2, 3, 4).contiguous()

    elif layout == "sglang_page_first":
        buf = put(draw_values((2, S, L, H, D), dtype, seed))
        tensors = [buf]
        kv = PagedKV.from_sglang_host(buf, "page_first")

        def read(ts: list[torch.Tensor]) -> torch.Tensor:
            return raw(ts[0]).cpu().permute(2, 0, 1, 3, 4).contiguous()

    elif layout == "sglang_page_first_direct":
        buf = put(draw_values((2, B, L, bs, H, D), dtype, seed))
        tensors = [buf]
        kv = PagedKV.from_sglang_host(buf, "page_first_direct")

        def read(ts: list[torch.Tensor]) -> torch.Tensor:
            return raw(ts[0]).cpu().permute(2, 0, 1, 3, 4, 5).reshape(L, 2, S, H, D).contiguous()

    else:  # hf: per layer K and V [batch, heads, tokens, dim]; batch 0 is the request
        tensors = []
        for l in range(L):
            tensors.append(put(draw_values((1, H, S, D), dtype, seed + 2 * l)))
            tensors.append(put(draw_values((1, H, S, D), dtype, seed + 2 * l + 1)))
        kv = PagedKV.from_hf([(tensors[2 * l], tensors[2 * l + 1]) for l in range(L)])

        def read(ts: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([
                torch.stack([raw(ts[2 * l]).cpu()[0].permute(1, 0, 2), raw(ts[2 * l + 1]).cpu()[0].permute(1, 0, 2)])
                for l in range(L)
            ])

    return EngineKV(layout, dtype, shape, tensors, kv, bs, read)


def slots_for(block_ids: Sequence[int], block_size: int, start: int, end: int) -> list[int]:
    """Slots of tokens ``start..end`` under a block table, computed independently of the core."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def block_table(num_blocks: int, needed: int, seed: int) -> list[int]:
    """``needed`` distinct blocks out of ``num_blocks`` in a shuffled, non-contiguous order."""
    import torch

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    if needed > num_blocks:
        raise ValueError(f"{needed} blocks needed but the cache has {num_blocks}")
    return perm[:needed]


def expected_chunk(logical: "torch.Tensor", slots: Sequence[int]) -> "torch.Tensor":
    """``[layers, planes, len(slots), heads*dim]`` integer tensor: the chunk a gather must produce."""
    import torch

    idx = torch.as_tensor(list(slots), dtype=torch.int64)
    picked = logical[:, :, idx]
    return picked.reshape(picked.shape[0], picked.shape[1], len(slots), -1)


__all__ = ["DTYPES", "LAYOUTS", "EngineKV", "KVShape", "block_table", "build", "draw_values",
           "expected_chunk", "raw", "slots_for"]
