"""The entry point: three registration hooks, each naming a factory by import path.

Nothing heavy is imported here; the factories load only when chosen.
"""

from __future__ import annotations

from lmcache_core import hookimpl
from lmcache_core.hookspecs import RegisterDevice, RegisterStorage, RegisterTransport


@hookimpl
def lmcache_register_devices(register: RegisterDevice) -> None:
    register("example", "lmcache_example.device:ExampleDevice", requires=("torch",),
             description="Example: host memory with torch copies")


@hookimpl
def lmcache_register_storage(register: RegisterStorage) -> None:
    register("example", "lmcache_example.store:ExampleStore", schemes=("example",),
             description="Example: chunk images in process memory")


@hookimpl
def lmcache_register_transports(register: RegisterTransport) -> None:
    register("example", "lmcache_example.transport:ExampleTransport",
             description="Example: copies between buffers of one process")
