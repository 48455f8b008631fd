"""A device: detect without side effects, say what you can, gather and scatter through strides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from lmcache_core.builtin.cpu import torch_gather, torch_scatter
from lmcache_core.device import Detection, Device, DeviceCapabilities

if TYPE_CHECKING:
    import torch

    from lmcache_core.layout import PagedKV


class ExampleDevice(Device):
    name = "example"
    # Synchronous host copies: no async_copy, no pinned memory. The suite skips the
    # overlap measurement and the pinned-memory check, with these flags as the reason.
    capabilities = DeviceCapabilities()
    # `device: auto` takes the one accelerator present, else a host device other than cpu.
    # An example must never win that choice: it is used only when named.
    auto_select = False

    @classmethod
    def detect(cls) -> Detection:
        # A real device probes its management library here (pynvml, amdsmi, npu-smi), catches
        # every exception, never creates a device context, and explains an absence in `reason`.
        return Detection(True, "host memory is always present", 1)

    @property
    def torch_device(self) -> "torch.device":
        import torch

        return torch.device("cpu")

    def gather(self, kv: "PagedKV", slots: "torch.Tensor", out: "torch.Tensor",
               layers: Sequence[int] | None = None) -> None:
        torch_gather(kv, slots.to(kv.device), out, layers)

    def scatter(self, kv: "PagedKV", slots: "torch.Tensor", src: "torch.Tensor",
                layers: Sequence[int] | None = None) -> None:
        torch_scatter(kv, slots.to(kv.device), src, layers)
