"""The torch reference of the KV copies, and the path of devices without Triton.

A *batch* is a list of ``(slots, chunk)`` pairs sharing one paged cache and one
layer selection: ``slots`` are token slots (``block * block_size + offset``) and
``chunk`` is ``[layers, planes, tokens, hidden]`` with ``tokens >= len(slots)``.
Gather copies ``kv[layer, plane, slots]`` into ``chunk[layer, plane, :len(slots)]``;
scatter is the inverse. Copies go through integer views of the same width, so
every float type (fp8 included) moves bit for bit and NaN payloads survive.

These functions are what the Triton kernels are tested against; they are also
the CPU path and the fallback of every accelerator device when a kernel cannot
run (no Triton, strides the kernel does not take, a compile failure).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from lmcache_core.builtin.cpu import raw, torch_gather, torch_scatter
from lmcache_core.errors import LayoutError
from lmcache_core.layout import check_slots

if TYPE_CHECKING:
    import torch

    from lmcache_core.layout import PagedKV

Batch = Sequence[tuple["torch.Tensor", "torch.Tensor"]]


def layer_list(kv: "PagedKV", layers: Sequence[int] | None) -> list[int]:
    """The selected layers, checked against the cache; ``None`` means all of them."""
    n = kv.geometry.num_layers
    if layers is None:
        return list(range(n))
    out = [int(l) for l in layers]
    for l in out:
        if not 0 <= l < n:
            raise IndexError(f"layer {l} is outside a KV cache of {n} layers")
    return out


def check_chunk(kv: "PagedKV", slots: "torch.Tensor", chunk: "torch.Tensor") -> None:
    """Raise ValueError unless ``chunk`` can hold ``slots`` tokens of ``kv``'s geometry."""
    g = kv.geometry
    if chunk.dim() != 4 or chunk.shape[0] != g.num_layers or chunk.shape[1] != g.kv_planes \
            or chunk.shape[3] != g.hidden:
        raise ValueError(
            f"chunk tensor has shape {tuple(chunk.shape)}; expected "
            f"[{g.num_layers}, {g.kv_planes}, tokens, {g.hidden}] for {g.signature}"
        )
    if chunk.element_size() != kv.layers[0].k.element_size():
        raise ValueError(f"chunk dtype {chunk.dtype} does not match the KV dtype {kv.layers[0].k.dtype}")
    if slots.dim() != 1 or int(slots.numel()) > int(chunk.shape[2]):
        raise ValueError(f"{slots.numel()} slots do not fit a chunk of {chunk.shape[2]} tokens")


def _planes(kv: "PagedKV", layer: int) -> list["torch.Tensor"]:
    lp = kv.layers[layer]
    return [lp.k] if lp.v is None else [lp.k, lp.v]


def gather_batch(kv: "PagedKV", batch: Batch, layers: Sequence[int] | None = None, *,
                 checked: bool = False) -> None:
    """Reference gather of every ``(slots, chunk)`` pair; the chunks may live on any device.

    The copy itself is lmcache-core's CPU-device path (:func:`lmcache_core.builtin.cpu.torch_gather`),
    so the kernels are tested against the very code the cpu device runs. Slots are range
    checked first (:func:`check_slots`) unless the caller did (``checked``)."""
    _each(kv, batch, layers, torch_gather, checked)


def scatter_batch(kv: "PagedKV", batch: Batch, layers: Sequence[int] | None = None, *,
                  checked: bool = False) -> None:
    """Reference scatter: ``chunk[l, p, :len(slots)]`` into the paged cache at ``slots``."""
    _each(kv, batch, layers, torch_scatter, checked)


def _each(kv: "PagedKV", batch: Batch, layers: Sequence[int] | None, copy: Any,
          checked: bool = False) -> None:
    import torch

    sel = layer_list(kv, layers)
    if not checked:
        check_slots(kv, batch)
    for slots, chunk in batch:
        check_chunk(kv, slots, chunk)
        if slots.numel():
            copy(kv, slots.to(kv.device, torch.int64), chunk, sel)


def gather_loop(kv: "PagedKV", slots: Sequence[int], chunk: "torch.Tensor",
                layers: Sequence[int] | None = None) -> None:
    """Token-by-token gather in plain Python: the slow ground truth tests use on small shapes."""
    sel = layer_list(kv, layers)
    dst = raw(chunk)
    for l in sel:
        for p, plane in enumerate(_planes(kv, l)):
            r = raw(plane)
            for i, slot in enumerate(int(x) for x in slots):
                b, o = divmod(slot, kv.block_size)
                dst[l, p, i].copy_(r[b, o].reshape(-1))
