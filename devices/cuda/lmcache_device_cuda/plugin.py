"""Registers the ``cuda`` device; the class is imported only when chosen."""

from __future__ import annotations

from lmcache_core import hookimpl
from lmcache_core.hookspecs import RegisterDevice


@hookimpl
def lmcache_register_devices(register: RegisterDevice) -> None:
    register("cuda", "lmcache_device_cuda.device:CUDADevice", extra="cuda", requires=("torch", "pynvml"),
             description="NVIDIA GPUs: Triton gather/scatter, pinned buffers, streams, CUDA IPC, GDS")
