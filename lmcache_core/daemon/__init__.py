"""Daemon mode: ``lmcache serve`` runs the cache as its own process.

The daemon owns the tiers, the index, pins and eviction; engines connect over a
Unix socket (TCP optional) with ``daemon: daemon:///path/to/socket`` and keep the
same :class:`~lmcache_core.engine.CacheEngine` API. Control messages are msgpack
frames (:mod:`.protocol`), one round trip per request step; the KV itself moves
through a host arena both sides map (:mod:`.arena`), one per tenant, which the
client's device registers as pinned memory and gathers into / scatters from
directly. See docs/daemon.md.
"""

from .address import Address, parse_address

__all__ = ["Address", "parse_address"]
