"""Registers the ``rocm`` device; the class is imported only when chosen."""

from __future__ import annotations

from lmcache_core import hookimpl
from lmcache_core.hookspecs import RegisterDevice


@hookimpl
def lmcache_register_devices(register: RegisterDevice) -> None:
    register("rocm", "lmcache_device_rocm.device:ROCmDevice", extra="rocm", requires=("torch",),
             description="AMD GPUs (ROCm/HIP): Triton gather/scatter, pinned buffers, streams, HIP IPC")
