"""Registers the ``ascend`` device; the class is imported only when chosen."""

from __future__ import annotations

from lmcache_core import hookimpl
from lmcache_core.hookspecs import RegisterDevice


@hookimpl
def lmcache_register_devices(register: RegisterDevice) -> None:
    register("ascend", "lmcache_device_ascend.device:AscendDevice", extra="ascend",
             requires=("torch", "torch_npu"),
             description="Huawei Ascend NPUs: torch_npu streams and events, torch-op gather/scatter")
