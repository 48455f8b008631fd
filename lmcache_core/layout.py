"""Engine KV layouts as stride-aware plane views, and the chunk layout.

Every paged KV cache, whatever the engine, is described per layer by a K plane
and a V plane (no V for MLA): a 4-D view ``[blocks, block_size, heads, dim]``
with arbitrary strides over the engine's own memory. Constructors below build
those views from the tensors an engine hands us (shapes and strides, never an
assumption of contiguity); the device gather/scatter, the Triton kernels and
the torch reference take only this description. A new engine layout is a new
constructor here, not a new kernel.

A chunk is ``[layers, planes, tokens, heads * dim]`` (planes = 2 for K/V, 1 for
MLA), layer-major, so one layer of a chunk is one contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Sequence

from .errors import LayoutError

if TYPE_CHECKING:
    import torch

# dtype names as torch spells them; the chunk header stores these strings. uint8 is how vLLM
# hands fp8 KV caches (the fp8 format is then part of the model fingerprint, never guessed).
DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "uint8")


def dtype_name(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise LayoutError(f"KV dtype {name!r} is not supported; supported: {', '.join(DTYPES)}")
    return name


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPES:
        raise LayoutError(f"KV dtype {name!r} is not supported; supported: {', '.join(DTYPES)}")
    return getattr(torch, name)


def itemsize(name: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(name, 1)


@dataclass(frozen=True)
class ChunkGeometry:
    """What one token of KV is: layers x planes x heads x dim of one dtype."""

    num_layers: int
    num_heads: int
    head_dim: int
    dtype: str
    kv_planes: int = 2  # 1 for MLA (a single latent plane)

    def __post_init__(self) -> None:
        for field_name in ("num_layers", "num_heads", "head_dim"):
            if getattr(self, field_name) <= 0:
                raise LayoutError(f"{field_name} must be positive, got {getattr(self, field_name)}")
        if self.kv_planes not in (1, 2):
            raise LayoutError(f"kv_planes must be 2 (K and V) or 1 (MLA), got {self.kv_planes}")
        dtype_name(self.dtype)

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.kv_planes * self.hidden * itemsize(self.dtype)

    def shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        return (self.num_layers, self.kv_planes, num_tokens, self.hidden)

    def nbytes(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    @property
    def signature(self) -> str:
        """Stable text naming the chunk layout; part of every key's namespace."""
        return f"L{self.num_layers}-P{self.kv_planes}-H{self.num_heads}-D{self.head_dim}-{self.dtype}"

    @classmethod
    def from_signature(cls, sig: str) -> "ChunkGeometry":
        try:
            l, p, h, d, dt = sig.split("-", 4)
            return cls(int(l[1:]), int(h[1:]), int(d[1:]), dt, int(p[1:]))
        except (ValueError, IndexError) as exc:
            raise LayoutError(f"not a chunk layout signature: {sig!r}") from exc


@dataclass(frozen=True)
class LayerPlanes:
    """One layer's K and V (None for MLA) as ``[blocks, block_size, heads, dim]`` views."""

    k: "torch.Tensor"
    v: "torch.Tensor | None"


@dataclass(frozen=True)
class PagedKV:
    """An engine's KV cache bound as per-layer plane views; what gather/scatter operate on."""

    kind: str
    layers: tuple[LayerPlanes, ...]
    block_size: int
    geometry: ChunkGeometry

    @property
    def num_blocks(self) -> int:
        return int(self.layers[0].k.shape[0])

    @property
    def device(self) -> "torch.device":
        return self.layers[0].k.device

    def plane_strides(self, layer: int) -> dict[str, Any]:
        """Base addresses and (block, token, head, dim) strides in elements, for kernels."""
        lp = self.layers[layer]
        out: dict[str, Any] = {"k_ptr": lp.k.data_ptr(), "k_strides": tuple(lp.k.stride())}
        if lp.v is not None:
            out.update(v_ptr=lp.v.data_ptr(), v_strides=tuple(lp.v.stride()))
        return out

    # -- constructors ----------------------------------------------------------
    @classmethod
    def _build(cls, kind: str, planes: Sequence[tuple[Any, Any]], mla: bool = False) -> "PagedKV":
        if not planes:
            raise LayoutError(f"{kind}: no layers given")
        k0 = planes[0][0]
        if k0.dim() != 4:
            raise LayoutError(f"{kind}: internal plane view must be 4-D, got shape {tuple(k0.shape)}")
        geom = ChunkGeometry(len(planes), int(k0.shape[2]), int(k0.shape[3]), dtype_name(k0.dtype),
                             1 if mla else 2)
        layers = []
        for i, (k, v) in enumerate(planes):
            for name, t in (("K", k), ("V", v)):
                if t is None:
                    continue
                if tuple(t.shape) != tuple(k0.shape) or t.dtype != k0.dtype or t.device != k0.device:
                    raise LayoutError(
                        f"{kind}: layer {i} {name} is {tuple(t.shape)} {t.dtype} on {t.device}, "
                        f"layer 0 K is {tuple(k0.shape)} {k0.dtype} on {k0.device}; all layers must match"
                    )
            layers.append(LayerPlanes(k, v))
        return cls(kind, tuple(layers), int(k0.shape[1]), geom)

    @classmethod
    def from_vllm_flash(cls, caches: Sequence["torch.Tensor"]) -> "PagedKV":
        """vLLM / FlashAttention: per layer ``[2, blocks, block_size, heads, dim]``."""
        for i, t in enumerate(caches):
            if t.dim() != 5 or t.shape[0] != 2:
                raise LayoutError(
                    f"vllm_flash: layer {i} has shape {tuple(t.shape)}; expected [2, blocks, block_size, heads, dim]"
                )
        return cls._build("vllm_flash", [(t[0], t[1]) for t in caches])

    @classmethod
    def from_flashinfer(cls, caches: Sequence["torch.Tensor"]) -> "PagedKV":
        """FlashInfer: per layer ``[blocks, 2, block_size, heads, dim]``."""
        for i, t in enumerate(caches):
            if t.dim() != 5 or t.shape[1] != 2:
                raise LayoutError(
                    f"flashinfer: layer {i} has shape {tuple(t.shape)}; expected [blocks, 2, block_size, heads, dim]"
                )
        return cls._build("flashinfer", [(t[:, 0], t[:, 1]) for t in caches])

    @classmethod
    def from_vllm_blocks_heads(cls, caches: Sequence["torch.Tensor"], head_dim: int) -> "PagedKV":
        """vLLM 0.3x per-layer views ``[blocks, heads, block_size, K||V]`` (last dim 2 * head_dim)."""
        planes = []
        for i, t in enumerate(caches):
            if t.dim() != 4 or t.shape[3] != 2 * head_dim:
                raise LayoutError(
                    f"vllm_blocks_heads: layer {i} has shape {tuple(t.shape)}; expected "
                    f"[blocks, heads, block_size, {2 * head_dim}] (K and V concatenated)"
                )
            planes.append((t[..., :head_dim].permute(0, 2, 1, 3), t[..., head_dim:].permute(0, 2, 1, 3)))
        return cls._build("vllm_blocks_heads", planes)

    @classmethod
    def from_mla(cls, caches: Sequence["torch.Tensor"]) -> "PagedKV":
        """MLA: per layer ``[blocks, block_size, latent_dim]`` (one plane, no V)."""
        for i, t in enumerate(caches):
            if t.dim() != 3:
                raise LayoutError(
                    f"mla: layer {i} has shape {tuple(t.shape)}; expected [blocks, block_size, latent_dim]"
                )
        return cls._build("mla", [(t.unsqueeze(2), None) for t in caches], mla=True)

    @classmethod
    def from_hf(cls, layers: Sequence[tuple["torch.Tensor", "torch.Tensor"]], batch_index: int = 0) -> "PagedKV":
        """Hugging Face per layer K, V ``[batch, heads, tokens, dim]``; one token per 'block'."""
        planes = []
        for i, (k, v) in enumerate(layers):
            if k.dim() != 4 or v.shape != k.shape:
                raise LayoutError(
                    f"hf: layer {i} has K {tuple(k.shape)} and V {tuple(v.shape)}; expected two "
                    "[batch, heads, tokens, dim] tensors"
                )
            planes.append((k[batch_index].permute(1, 0, 2).unsqueeze(1), v[batch_index].permute(1, 0, 2).unsqueeze(1)))
        return cls._build("hf", planes)

    @classmethod
    def from_sglang_host(
        cls, buffer: "torch.Tensor", layout: str = "page_first", mla: bool = False
    ) -> "PagedKV":
        """SGLang host pool: layer_first ``(2, layers, tokens, heads, dim)``, page_first
        ``(2, tokens, layers, heads, dim)``, page_first_direct ``(2, pages, layers, page, heads, dim)``.
        MLA pools drop the leading 2 (and use heads = 1)."""
        t = buffer if not mla else buffer.unsqueeze(0)
        expected = {"layer_first": 5, "page_first": 5, "page_first_direct": 6}
        if layout not in expected:
            raise LayoutError(f"sglang layout {layout!r} is unknown; use one of {', '.join(expected)}")
        if t.dim() != expected[layout]:
            raise LayoutError(f"sglang {layout}: buffer has shape {tuple(buffer.shape)}; see the docstring")
        if layout == "layer_first":
            planes = [(t[0, l].unsqueeze(1), None if mla else t[1, l].unsqueeze(1)) for l in range(t.shape[1])]
        elif layout == "page_first":
            planes = [(t[0, :, l].unsqueeze(1), None if mla else t[1, :, l].unsqueeze(1)) for l in range(t.shape[2])]
        else:
            planes = [(t[0, :, l], None if mla else t[1, :, l]) for l in range(t.shape[2])]
        return cls._build(f"sglang_{layout}", planes, mla=mla)

    @classmethod
    def from_vllm(
        cls, caches: Sequence["torch.Tensor"], *, head_dim: int | None = None, use_mla: bool = False
    ) -> "PagedKV":
        """Detect a vLLM layout from the tensors' shapes (see docs/vllm.md for the table)."""
        t = caches[0]
        if use_mla or t.dim() == 3:
            return cls.from_mla(caches)
        if t.dim() == 4:
            if head_dim is None:
                raise LayoutError("a 4-D vLLM KV cache needs head_dim to split K||V")
            return cls.from_vllm_blocks_heads(caches, head_dim)
        if t.dim() == 5:
            if t.shape[0] == 2 and t.shape[1] != 2:
                return cls.from_vllm_flash(caches)
            if t.shape[1] == 2 and t.shape[0] != 2:
                return cls.from_flashinfer(caches)
            if t.shape[0] == 2 and t.shape[1] == 2:
                raise LayoutError(
                    f"KV cache shape {tuple(t.shape)} is ambiguous (2 blocks?); allocate more blocks"
                )
        raise LayoutError(
            f"KV cache shape {tuple(t.shape)} matches no known vLLM layout: expected "
            "[2, blocks, block, heads, dim], [blocks, 2, block, heads, dim], "
            "[blocks, heads, block, 2*dim] or MLA [blocks, block, dim]"
        )


def check_block_ids(block_ids: "torch.Tensor", num_blocks: int) -> "torch.Tensor":
    """The block table as int64, checked once (vectorised): integer dtype, 1-D, every id in
    ``[0, num_blocks)``. A bad table is a :class:`LayoutError`, never a write elsewhere."""
    import torch

    if block_ids.dtype.is_floating_point or block_ids.dtype.is_complex or block_ids.dtype == torch.bool:
        raise LayoutError(f"block ids must be integers, got a {block_ids.dtype} tensor")
    if block_ids.dim() != 1:
        raise LayoutError(f"a block table is 1-D, got shape {tuple(block_ids.shape)}")
    blocks = block_ids.to(torch.int64)
    if blocks.numel():
        lo, hi = int(blocks.min()), int(blocks.max())
        if lo < 0 or hi >= num_blocks:
            bad = lo if lo < 0 else hi
            raise LayoutError(f"block id {bad} is outside the KV cache's {num_blocks} blocks (valid: 0 to "
                              f"{num_blocks - 1})")
    return blocks


def slot_mapping(block_ids: "torch.Tensor", block_size: int, start: int, end: int,
                 num_blocks: int | None = None) -> "torch.Tensor":
    """Slots (block * block_size + offset) of tokens ``start..end`` of a request's block table;
    with ``num_blocks``, the ids the range uses are checked against the cache first."""
    import torch

    if start < 0 or end < start:
        raise LayoutError(f"token range [{start}, {end}) is not valid")
    need = (end - 1) // block_size + 1 if end > start else 0
    if block_ids.numel() < need:
        raise LayoutError(
            f"block table has {block_ids.numel()} blocks but tokens up to {end} need {need} "
            f"blocks of {block_size}"
        )
    first = start // block_size
    used = block_ids[first:need]
    blocks = check_block_ids(used, num_blocks) if num_blocks is not None else used.to(torch.int64)
    # every slot of the blocks used, by broadcasting (a gather by token position cost ten times
    # more: 160 us for 32K tokens), then the range's own slice of them
    every = (blocks[:, None] * block_size + torch.arange(block_size, dtype=torch.int64,
                                                          device=block_ids.device)).reshape(-1)
    lo = start - first * block_size
    return every[lo:lo + (end - start)]


def check_slots(kv: "PagedKV", batch: Sequence[tuple["torch.Tensor", Any]]) -> None:
    """Raise LayoutError unless every slot of ``batch`` is an integer in ``[0, blocks * block_size)``.

    One vectorised min/max over the whole batch (one per device the slots live on), before
    anything is copied: a device used without the engine never reads or writes outside the
    KV tensor (a negative slot would wrap, a huge one overflow the kernel's arithmetic)."""
    import torch

    total = kv.num_blocks * kv.block_size
    slots_of = [s for s, _ in batch]
    dtypes = set(map(attrgetter("dtype"), slots_of))
    for dt in dtypes:  # per distinct dtype, not per tensor
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise LayoutError(f"slots must be integers, got a {dt} tensor")
    groups: dict[Any, list["torch.Tensor"]] = {}
    if len(slots_of) > 1 and len(dtypes) == 1 and len(set(map(attrgetter("device"), slots_of))) == 1 \
            and set(map(torch.Tensor.dim, slots_of)) == {1}:
        # one C call (the engine's per-chunk slices); one dtype, so no promotion between parts
        groups[slots_of[0].device] = [torch.cat(slots_of).to(torch.int64)]
    else:
        for slots in slots_of:
            if slots.numel():
                groups.setdefault(slots.device, []).append(slots.reshape(-1).to(torch.int64))
    for parts in groups.values():
        if not parts[0].numel():
            continue
        both = torch.cat(parts).aminmax() if len(parts) > 1 else parts[0].aminmax()
        lo, hi = torch.stack([both.min, both.max]).tolist()
        if lo < 0 or hi >= total:
            bad = lo if lo < 0 else hi
            raise LayoutError(
                f"slot {bad} (block {bad // kv.block_size}) is outside the KV cache's {kv.num_blocks} blocks of "
                f"{kv.block_size} tokens (valid slots: 0 to {total - 1}); check the block table")
