"""lmcache-storage-redis: Redis tiers for lmcache-core (``redis://``, ``rediss://``, ``unix://``,
``redis+cluster://``). The store lives in :mod:`lmcache_storage_redis.store`; it is imported only
when a tier uses one of these schemes."""

from __future__ import annotations

__version__ = "0.1.0"
