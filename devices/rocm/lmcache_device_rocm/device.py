"""The ROCm device: AMD GPUs through torch's HIP build.

torch's HIP build keeps the ``torch.cuda`` API and the ``cuda`` device type, so the
data path is the shared :class:`lmcache_kernels.accel.StreamDevice`; Triton compiles
the same gather/scatter kernel for the AMD backend. Pinned host memory is mapped
into the GPU's address space (HIP is UVA too); the transfer layer probes that once
and stages through device memory where it does not hold. IPC uses torch's HIP IPC.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from lmcache_core.device import Detection, DeviceCapabilities
from lmcache_kernels import ipc
from lmcache_kernels.accel import StreamDevice

from . import smi

if TYPE_CHECKING:
    import torch


def torch_build() -> tuple[bool, str]:
    """Whether torch is a ROCm (HIP) build; importing torch creates no context."""
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed; install the ROCm build of torch"
    import torch

    hip = getattr(torch.version, "hip", None)
    if not hip:
        kind = f"CUDA {torch.version.cuda}" if getattr(torch.version, "cuda", None) else "CPU-only"
        return False, f"torch {torch.__version__} is a {kind} build, not a ROCm (HIP) build"
    return True, f"torch {torch.__version__} (HIP {hip})"


def detect_rocm(root: str = smi.KFD_NODES) -> Detection:
    found, reasons = smi.probe(root)
    if found.count == 0:
        return Detection(False, "no AMD GPU found: " + "; ".join(r for r in reasons if r))
    details = {"source": found.source, "names": list(found.names)}
    ok, why = torch_build()
    if not ok:
        return Detection(False, why, found.count, details)
    return Detection(True, f"{found.count} AMD GPU(s) via {found.source}: {', '.join(found.names)}; {why}",
                     found.count, details)


class ROCmDevice(StreamDevice):
    """``device: rocm``."""

    name = "rocm"
    capabilities = DeviceCapabilities(async_copy=True, pinned_memory=True, ipc=True, direct_storage=False,
                                      accelerator=True)
    backend_name = "cuda"  # torch's HIP build exposes torch.cuda
    torch_type = "cuda"

    @classmethod
    def detect(cls) -> Detection:
        return detect_rocm()

    def telemetry(self) -> dict[str, Any]:
        return smi.telemetry(self.index)

    def ipc_export(self, tensor: "torch.Tensor") -> bytes:
        return ipc.export_tensor(tensor)

    def ipc_import(self, handle: bytes) -> "torch.Tensor":
        return ipc.import_tensor(handle)
