"""The Arm host device: KV in host memory on aarch64 servers, with NUMA-aware buffers.

It differs from the built-in ``cpu`` device in three ways: it is only available
on aarch64 (so ``device: auto`` prefers it there over ``cpu``), it places the
host buffers it allocates on the NUMA node of the calling thread, and its
telemetry names the cores and their vector features (SVE, SVE2, BF16). The
copies are the torch reference of lmcache-kernels (indexing ops that torch
vectorises with NEON/SVE); there is no stream, so every call is synchronous.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import TYPE_CHECKING, Any, Sequence

from lmcache_core.builtin.cpu import host_meminfo
from lmcache_core.device import Detection, Device, DeviceCapabilities
from lmcache_kernels import reference

from . import cpuinfo, numa

if TYPE_CHECKING:
    import torch

    from lmcache_core.layout import PagedKV

logger = logging.getLogger(__name__)


def detect_arm(machine: str | None = None, cpuinfo_text: str | None = None) -> Detection:
    """Available on aarch64 hosts whose cpuinfo names an implementer; the reason otherwise."""
    machine = (machine or platform.machine()).lower()
    if machine not in cpuinfo.AARCH64:
        return Detection(False, f"host architecture is {machine}, not aarch64 (the built-in cpu device serves it)")
    cpu = cpuinfo.parse_cpuinfo(cpuinfo_text) if cpuinfo_text is not None else cpuinfo.read_cpuinfo()
    if cpu is None:
        return Detection(False, "aarch64 host but /proc/cpuinfo names no CPU implementer/part")
    desc = cpu.describe()
    label = f"{cpu.vendor} {cpu.core}" + (f" ({cpu.system})" if cpu.system else "")
    return Detection(True, f"{cpu.processors} x {label}", cpu.processors, desc)


class ArmDevice(Device):
    """``device: arm``. ``numa_node``: where host buffers go (default: the caller's node)."""

    name = "arm"
    capabilities = DeviceCapabilities()  # host memory, synchronous, no IPC, not an accelerator

    def __init__(self, index: int = 0, numa_node: int | None = None) -> None:
        super().__init__(index)
        self.topology = numa.nodes()
        self.numa_node = numa_node
        self.placements: dict[str, int] = {}

    @classmethod
    def detect(cls) -> Detection:
        return detect_arm()

    @property
    def torch_device(self) -> "torch.device":
        import torch

        return torch.device("cpu")

    def _target_node(self) -> int | None:
        if self.numa_node is not None:
            return self.numa_node
        if len(self.topology) < 2 or not hasattr(os, "sched_getaffinity"):
            return None
        return numa.node_of_cpus(os.sched_getaffinity(0), self.topology)

    def alloc_host(self, nbytes: int) -> "torch.Tensor":
        import torch

        t = torch.empty(nbytes, dtype=torch.uint8)
        node = self._target_node()
        if node is not None and nbytes:
            how = numa.place(t, node, self.topology)
            self.placements[how] = self.placements.get(how, 0) + 1
        return t

    def gather(self, kv: "PagedKV", slots: "torch.Tensor", out: "torch.Tensor",
               layers: Sequence[int] | None = None) -> None:
        reference.gather_batch(kv, [(slots, out)], layers)

    def scatter(self, kv: "PagedKV", slots: "torch.Tensor", src: "torch.Tensor",
                layers: Sequence[int] | None = None) -> None:
        reference.scatter_batch(kv, [(slots, src)], layers)

    def telemetry(self) -> dict[str, Any]:
        cpu = cpuinfo.read_cpuinfo()
        out: dict[str, Any] = {"machine": platform.machine(), "numa_nodes": len(self.topology),
                               "placements": dict(self.placements)}
        if cpu is not None:
            out.update(cpu.describe())
        out.update(host_meminfo())
        return out
