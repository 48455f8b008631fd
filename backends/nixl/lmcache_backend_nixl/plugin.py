"""Entry point of lmcache-backend-nixl: registers the ``nixl`` transport."""

from __future__ import annotations

from lmcache_core import hookimpl
from lmcache_core.hookspecs import RegisterTransport


@hookimpl
def lmcache_register_transports(register: RegisterTransport) -> None:
    register("nixl", "lmcache_backend_nixl.transport:NixlTransport", extra="nixl", requires=("nixl",),
             description="NIXL one-sided READ/WRITE of registered DRAM (and VRAM on GPUs) over UCX")
