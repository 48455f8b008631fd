"""Registers the ``arm`` device; the class is imported only when chosen."""

from __future__ import annotations

from lmcache_core import hookimpl
from lmcache_core.hookspecs import RegisterDevice


@hookimpl
def lmcache_register_devices(register: RegisterDevice) -> None:
    register("arm", "lmcache_device_arm.device:ArmDevice", extra="arm", requires=("torch",),
             description="aarch64 hosts (Grace, Graviton, Ampere): NUMA-aware buffers, torch CPU ops")
