"""Entry point of lmcache-storage-valkey: registers the Valkey URL schemes."""

from __future__ import annotations

from lmcache_core import hookimpl
from lmcache_core.hookspecs import RegisterStorage


@hookimpl
def lmcache_register_storage(register: RegisterStorage) -> None:
    register("valkey", "lmcache_storage_valkey.store:ValkeyStore",
             schemes=("valkey", "valkeys", "valkey+unix", "valkey+cluster"), extra="valkey",
             requires=("valkey", "lmcache_storage_redis"),
             description="Valkey standalone, TLS, unix socket or cluster (valkey-py)")
