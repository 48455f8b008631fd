"""Bind the KV cache tensors vLLM hands a connector as a :class:`PagedKV`.

vLLM 0.3x gives every attention backend the same logical per-layer view
``[blocks, kv_heads, block_size, C]`` over one shared buffer (physical order
set by ``VLLM_KV_CACHE_LAYOUT``), but backends read ``C`` differently:

- FlashAttention, Triton, FlexAttention, FlashInfer's 0.3x view: ``C = K || V``
  per token (``split(head_dim, dim=-1)``);
- CPU_ATTN (ISAs ``vec`` and ``vec16``): the ``(block, head)`` slab of
  ``block_size * 2 * head_dim`` elements holds K transposed
  (``[head_dim, block_size]``), then V (``[block_size, head_dim]``); checked
  against vLLM's own ``cpu_attn_reshape_and_cache`` in the tests.

The two cannot be told apart from shapes and strides, so the backend name
decides, and a layout we cannot describe is a startup error. Older vLLM
(``[2, blocks, block, heads, dim]``), FlashInfer ``[blocks, 2, ...]`` and MLA
go through :meth:`PagedKV.from_vllm`. Nothing here imports vLLM, so the GPU
benchmark can bind vLLM-shaped tensors without it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping, Sequence

from ...errors import LayoutError
from ...layout import ChunkGeometry, LayerPlanes, PagedKV, dtype_name

if TYPE_CHECKING:
    import torch

# Backends whose 4-D per-layer view keeps K rows then V rows inside each (block, head) slab.
SPLIT_BLOCK_BACKENDS = frozenset({"CPU_ATTN"})
# CPU_ATTN kernels whose in-slab order is verified (AMX, NEON, ... pack K differently or unverified).
SPLIT_BLOCK_ISAS = frozenset({"vec", "vec16"})
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_order(names: Sequence[str]) -> list[str]:
    """Layer names in model order: by the first integer in the dotted name
    (``model.layers.12.self_attn.attn``), insertion order for ties or none."""

    def key(item: tuple[int, str]) -> tuple[int, int]:
        pos, name = item
        m = _LAYER_INDEX.search(name)
        return (int(m.group(1)) if m else pos, pos)

    return [name for _, name in sorted(enumerate(names), key=key)]


def from_split_blocks(caches: Sequence["torch.Tensor"], head_dim: int) -> PagedKV:
    """CPU_ATTN: per layer ``[blocks, heads, block_size, 2 * head_dim]`` whose slab per
    (block, head) is ``K^T[head_dim, block_size]`` followed by ``V[block_size, head_dim]``."""
    import torch

    layers: list[LayerPlanes] = []
    t0 = caches[0]
    for i, t in enumerate(caches):
        if t.dim() != 4 or t.shape[3] != 2 * head_dim:
            raise LayoutError(
                f"vllm_split_blocks: layer {i} has shape {tuple(t.shape)}; expected "
                f"[blocks, heads, block_size, {2 * head_dim}]"
            )
        if tuple(t.shape) != tuple(t0.shape) or t.dtype != t0.dtype or t.device != t0.device:
            raise LayoutError(
                f"vllm_split_blocks: layer {i} is {tuple(t.shape)} {t.dtype} on {t.device}, layer 0 is "
                f"{tuple(t0.shape)} {t0.dtype} on {t0.device}; all layers must match"
            )
        blocks, heads, block_size, width = (int(s) for s in t.shape)
        s_block, s_head, s_tok, s_c = t.stride()
        if s_c != 1 or s_tok != width:
            raise LayoutError(
                f"vllm_split_blocks: layer {i} strides {tuple(t.stride())} do not keep each (block, head) "
                "slab contiguous, which the CPU_ATTN K/V split needs; set VLLM_KV_CACHE_LAYOUT to the "
                "backend's default"
            )
        size = (blocks, block_size, heads, head_dim)
        k = torch.as_strided(t, size, (s_block, 1, s_head, block_size), t.storage_offset())
        v = torch.as_strided(t, size, (s_block, head_dim, s_head, 1), t.storage_offset() + block_size * head_dim)
        layers.append(LayerPlanes(k, v))
    geom = ChunkGeometry(len(layers), int(t0.shape[1]), head_dim, dtype_name(t0.dtype), 2)
    return PagedKV("vllm_split_blocks", tuple(layers), int(t0.shape[2]), geom)


def bind_vllm_caches(
    kv_caches: Mapping[str, "torch.Tensor"],
    *,
    head_dim: int,
    use_mla: bool = False,
    backend: str | None = None,
    block_size: int | None = None,
    isa: str | None = None,
) -> tuple[PagedKV, list[str]]:
    """The engine's caches as one :class:`PagedKV` plus the layer names in model order.

    ``backend`` is the attention backend name (``Attention.attn_backend.get_name()``), ``isa``
    the CPU_ATTN kernel (``Attention.isa``) where known;
    ``block_size`` the scheduler's block size, which must equal the tensors' block
    size (a split kernel block size would make vLLM's block ids point elsewhere).
    """
    if not kv_caches:
        raise LayoutError("vLLM registered no KV cache tensors (no attention layers?)")
    names = layer_order(list(kv_caches))
    caches = [kv_caches[n] for n in names]
    t = caches[0]
    if use_mla and t.dim() == 4:
        if t.shape[1] != 1:
            raise LayoutError(f"MLA KV cache of shape {tuple(t.shape)}: expected [blocks, 1, block_size, latent]")
        kv = PagedKV.from_mla([c[:, 0] for c in caches])
    elif not use_mla and t.dim() == 4 and backend in SPLIT_BLOCK_BACKENDS:
        if isa is not None and isa not in SPLIT_BLOCK_ISAS:
            raise LayoutError(
                f"{backend} with the {isa!r} kernel packs K in a way lmcache-core has not verified "
                f"(verified: {', '.join(sorted(SPLIT_BLOCK_ISAS))}); not binding the KV cache"
            )
        kv = from_split_blocks(caches, head_dim)
    elif not use_mla and t.dim() == 4 and t.shape[3] != 2 * head_dim:
        raise LayoutError(
            f"KV cache shape {tuple(t.shape)} (backend {backend}) has a last dim of {t.shape[3]}, not "
            f"2 * head_dim = {2 * head_dim}: K and V of different sizes are not supported"
        )
    else:
        kv = PagedKV.from_vllm(caches, head_dim=head_dim, use_mla=use_mla)
    if block_size is not None and kv.block_size != block_size:
        raise LayoutError(
            f"the KV cache tensors use blocks of {kv.block_size} tokens but the scheduler uses {block_size}; "
            f"run vLLM with --block-size {kv.block_size} so that block ids address whole tensor blocks"
        )
    return kv, names


def layer_number(name: str, default: int) -> int:
    """The model layer index in a layer name (``model.layers.12.self_attn.attn`` -> 12)."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else default


def pp_layer_range(num_hidden_layers: int, stage: int, pp_size: int) -> tuple[int, int]:
    """Layers ``[start, end)`` of pipeline stage ``stage``, as vLLM splits them (its
    ``get_pp_indices``, which honours ``VLLM_PP_LAYER_PARTITION``); all layers for one stage."""
    if pp_size == 1:
        return 0, num_hidden_layers
    from vllm.distributed.utils import get_pp_indices

    start, end = get_pp_indices(num_hidden_layers, stage, pp_size)
    return int(start), int(end)


def stage_layers(names: Sequence[str], num_hidden_layers: int, stage: int, pp_size: int
                 ) -> tuple[list[str], tuple[int, int]]:
    """The attention layers of ``names`` that pipeline stage ``stage`` holds, and its layer range."""
    start, end = pp_layer_range(num_hidden_layers, stage, pp_size)
    if pp_size == 1:
        return list(names), (start, end)
    return [n for i, n in enumerate(names) if start <= layer_number(n, i) < end], (start, end)


def geometry_from_spec(num_layers: int, num_kv_heads: int, head_size: int, dtype: object,
                       use_mla: bool) -> ChunkGeometry:
    """The chunk geometry the worker's tensors will have, known from the scheduler's spec."""
    if use_mla:
        return ChunkGeometry(num_layers, 1, head_size, dtype_name(dtype), 1)
    return ChunkGeometry(num_layers, num_kv_heads, head_size, dtype_name(dtype), 2)
