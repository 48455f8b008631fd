"""The Ascend device: Huawei NPUs through torch_npu.

torch_npu exposes ``torch.npu`` with the same Stream/Event/stream()/current_stream()
shape as ``torch.cuda``, so the data path is the shared
:class:`lmcache_kernels.accel.StreamDevice`. Triton has no backend for NPUs here,
so :class:`~lmcache_kernels.transfer.KVTransfer` runs the torch reference: indexing
ops on the ``npu`` device and non-blocking copies to pinned host memory, on the
transfer stream. torch_npu is imported only after detection found it, and never at
module import, so this plugin lists and explains itself on any host.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from lmcache_core.device import Detection, DeviceCapabilities
from lmcache_kernels.accel import StreamDevice

from . import npusmi


def detect_ascend() -> Detection:
    """torch_npu present, then NPUs from npu-smi (or torch_npu's own count)."""
    try:
        found = importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return Detection(False, 'torch_npu is not installed; install it with: pip install "lmcache-core[ascend]" '
                                "plus the torch_npu build matching your CANN")
    npus, why = npusmi.run_info()
    if npus:
        return Detection(True, f"{len(npus)} Ascend NPU(s): {', '.join(n.name for n in npus)}", len(npus),
                         {"source": "npu-smi", "names": [n.name for n in npus]})
    try:
        import torch
        import torch_npu  # noqa: F401 - registers torch.npu

        count = int(torch.npu.device_count())
    except Exception as exc:  # noqa: BLE001 - a broken CANN install must not break detection
        return Detection(False, f"{why}; torch_npu failed: {type(exc).__name__}: {exc}")
    if count == 0:
        return Detection(False, f"torch_npu sees no NPU ({why})")
    return Detection(True, f"{count} Ascend NPU(s) (torch_npu)", count, {"source": "torch_npu"})


class AscendDevice(StreamDevice):
    """``device: ascend``."""

    name = "ascend"
    capabilities = DeviceCapabilities(async_copy=True, pinned_memory=True, ipc=False, direct_storage=False,
                                      accelerator=True)
    backend_name = "npu"
    torch_type = "npu"

    def __init__(self, index: int = 0, options: Any = None) -> None:
        import torch_npu  # noqa: F401 - registers the npu device type and torch.npu

        super().__init__(index, options)

    @classmethod
    def detect(cls) -> Detection:
        return detect_ascend()

    def telemetry(self) -> dict[str, Any]:
        npus, why = npusmi.run_info()
        for n in npus:
            if n.npu == self.index:
                out: dict[str, Any] = {"index": self.index, "name": n.name, "health": n.health,
                                       "power_w": n.power_w, "temperature_c": n.temperature_c,
                                       "aicore_pct": n.aicore_pct, "bus_id": n.bus_id}
                if n.hbm_total_mb is not None:
                    out["memory_total"] = n.hbm_total_mb * 1024 * 1024
                    out["memory_used"] = (n.hbm_used_mb or 0) * 1024 * 1024
                return out
        return {"index": self.index, "error": why or f"npu-smi does not list NPU {self.index}"}
