"""Entry point of lmcache-storage-redis: registers the Redis URL schemes."""

from __future__ import annotations

from lmcache_core import hookimpl
from lmcache_core.hookspecs import RegisterStorage


@hookimpl
def lmcache_register_storage(register: RegisterStorage) -> None:
    register("redis", "lmcache_storage_redis.store:RedisStore",
             schemes=("redis", "rediss", "unix", "redis+cluster"), extra="redis", requires=("redis",),
             description="Redis standalone, TLS, unix socket or cluster (redis-py, hiredis replies)")
