"""The ``lmcache`` entry point of lmcache-dummy-storage: registers ``dummy://``."""

from __future__ import annotations

from lmcache_core import hookimpl
from lmcache_core.hookspecs import RegisterStorage


@hookimpl
def lmcache_register_storage(register: RegisterStorage) -> None:
    register("dummy", "lmcache_dummy_storage.store:DummyStore", schemes=("dummy",),
             description="Test store: in-process bytes with switchable defects")
