"""lmcache-storage-valkey: Valkey tiers for lmcache-core (``valkey://``, ``valkeys://``,
``valkey+cluster://``), through valkey-py. The store is :mod:`lmcache_storage_valkey.store`."""

from __future__ import annotations

__version__ = "0.1.0"
