"""The host CPU device: torch indexing ops for every layout, synchronous."""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING, Any, Sequence

from ..device import Detection, Device, DeviceCapabilities
from ..layout import check_slots

if TYPE_CHECKING:
    import torch

    from ..layout import PagedKV

_RAW = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def raw(t: "torch.Tensor") -> "torch.Tensor":
    """Reinterpret as an integer dtype of the same width: bit-exact copies for every float
    type, fp8 included (CPU indexing kernels do not all exist for fp8)."""
    import torch

    return t.view(getattr(torch, _RAW[t.element_size()]))


def torch_gather(kv: "PagedKV", slots: "torch.Tensor", out: "torch.Tensor", layers: Sequence[int] | None) -> None:
    """Reference gather in torch ops; also the CPU path. ``out``: ``[L, P, T, hidden]``."""
    n = int(slots.numel())
    blocks, offsets = slots // kv.block_size, slots % kv.block_size
    heads, dim = kv.geometry.num_heads, kv.geometry.head_dim
    dst = raw(out)
    for l in range(kv.geometry.num_layers) if layers is None else layers:
        lp = kv.layers[l]
        for p, plane in enumerate((lp.k, lp.v)[: kv.geometry.kv_planes]):
            picked = raw(plane)[blocks, offsets]  # [n, heads, dim]
            dst[l, p, :n].view(n, heads, dim).copy_(picked, non_blocking=True)


def torch_scatter(kv: "PagedKV", slots: "torch.Tensor", src: "torch.Tensor", layers: Sequence[int] | None) -> None:
    """Reference scatter in torch ops; the inverse of :func:`torch_gather`."""
    n = int(slots.numel())
    blocks, offsets = slots // kv.block_size, slots % kv.block_size
    heads, dim = kv.geometry.num_heads, kv.geometry.head_dim
    s = raw(src)
    for l in range(kv.geometry.num_layers) if layers is None else layers:
        lp = kv.layers[l]
        for p, plane in enumerate((lp.k, lp.v)[: kv.geometry.kv_planes]):
            values = s[l, p, :n].reshape(n, heads, dim).to(plane.device, non_blocking=True)
            raw(plane).index_put_((blocks, offsets), values)


class CPUDevice(Device):
    """KV caches in host memory (Hugging Face on CPU, vLLM CPU, SGLang host pools)."""

    name = "cpu"
    capabilities = DeviceCapabilities()

    @classmethod
    def detect(cls) -> Detection:
        return Detection(True, "host CPU", os.cpu_count() or 1, {"machine": platform.machine()})

    @property
    def torch_device(self) -> "torch.device":
        import torch

        return torch.device("cpu")

    def gather(self, kv: "PagedKV", slots: "torch.Tensor", out: "torch.Tensor",
               layers: Sequence[int] | None = None) -> None:
        check_slots(kv, [(slots, out)])  # used without the engine too: never index outside the cache
        torch_gather(kv, slots.to(kv.device), out, layers)

    def scatter(self, kv: "PagedKV", slots: "torch.Tensor", src: "torch.Tensor",
                layers: Sequence[int] | None = None) -> None:
        check_slots(kv, [(slots, src)])
        torch_scatter(kv, slots.to(kv.device), src, layers)

    def telemetry(self) -> dict[str, Any]:
        return {"cpus": os.cpu_count(), "machine": platform.machine(), **host_meminfo()}


def host_meminfo() -> dict[str, int]:
    """MemTotal and MemAvailable in bytes from /proc/meminfo (empty where there is none)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out
