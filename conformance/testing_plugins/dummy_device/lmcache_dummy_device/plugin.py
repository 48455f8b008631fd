"""The ``lmcache`` entry point of lmcache-dummy-device: registers the device ``dummy``."""

from __future__ import annotations

from lmcache_core import hookimpl
from lmcache_core.hookspecs import RegisterDevice


@hookimpl
def lmcache_register_devices(register: RegisterDevice) -> None:
    register("dummy", "lmcache_dummy_device.device:DummyDevice", requires=("torch",),
             description="Test device: CPU with a worker-thread stream and switchable defects")
