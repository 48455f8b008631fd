"""The CUDA device: NVIDIA GPUs through torch, lmcache-kernels, NVML, CUDA IPC and cuFile.

Data movement (batched Triton gather/scatter, pinned host buffers, streams and
events) comes from :class:`lmcache_kernels.accel.StreamDevice`. This class adds
NVML detection and telemetry, CUDA IPC export/import for daemon mode, and
GPUDirect Storage as an optional capability that is probed on first use.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from lmcache_core.device import Detection, DeviceCapabilities
from lmcache_kernels import ipc
from lmcache_kernels.accel import StreamDevice
from lmcache_kernels.transfer import TransferOptions

from . import gds, nvml

if TYPE_CHECKING:
    import os

    import torch

logger = logging.getLogger(__name__)


class CUDADevice(StreamDevice):
    """``device: cuda``. ``capabilities.direct_storage`` turns True on an instance once
    :meth:`gds_status` finds the nvidia-fs driver (compatibility mode does not count)."""

    name = "cuda"
    capabilities = DeviceCapabilities(async_copy=True, pinned_memory=True, ipc=True, direct_storage=False,
                                      accelerator=True)
    backend_name = "cuda"
    torch_type = "cuda"

    def __init__(self, index: int = 0, options: TransferOptions | None = None) -> None:
        super().__init__(index, options)
        self._gds: gds.GDSStatus | None = None

    @classmethod
    def detect(cls) -> Detection:
        return nvml.detect()

    # -- telemetry ------------------------------------------------------------------------------
    def telemetry(self) -> dict[str, Any]:
        out = nvml.telemetry(self.index)
        try:
            import torch

            if torch.cuda.is_initialized():
                out["torch_allocated"] = int(torch.cuda.memory_allocated(self.index))
                out["torch_reserved"] = int(torch.cuda.memory_reserved(self.index))
        except Exception as exc:  # noqa: BLE001
            logger.debug("torch memory stats unavailable: %s", exc)
        return out

    # -- IPC (daemon mode) -------------------------------------------------------------------------
    def ipc_export(self, tensor: "torch.Tensor") -> bytes:
        return ipc.export_tensor(tensor)

    def ipc_import(self, handle: bytes) -> "torch.Tensor":
        return ipc.import_tensor(handle)

    # -- GPUDirect Storage ------------------------------------------------------------------------
    def gds_status(self) -> gds.GDSStatus:
        """Probe cuFile once; updates this instance's ``capabilities.direct_storage``."""
        if self._gds is None:
            import torch

            torch.cuda.init()  # cuFile needs the CUDA runtime up
            self._gds = gds.status()
            if self._gds.direct:
                self.capabilities = dataclasses.replace(type(self).capabilities, direct_storage=True)
            logger.info("GPUDirect Storage on cuda:%d: %s (%s)", self.index, self._gds.mode, self._gds.reason)
        return self._gds

    def open_direct(self, path: "str | os.PathLike[str]", write: bool = False) -> gds.GDSFile:
        """A file for cuFile reads/writes of CUDA tensors (GDS, or cuFile's compatibility mode)."""
        st = self.gds_status()
        if not st.usable:
            raise RuntimeError(f"GPUDirect Storage is not available on cuda:{self.index}: {st.reason}")
        return gds.GDSFile(path, write)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self._gds is not None:
            out["gds"] = {"mode": self._gds.mode, "reason": self._gds.reason, "version": self._gds.version}
        return out
