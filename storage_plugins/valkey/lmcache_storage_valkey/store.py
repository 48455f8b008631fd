"""Valkey tiers: the RESP store of lmcache-storage-redis driven by valkey-py.

``valkey://[user[:password]@]host[:port][/db]?options``, ``valkeys://`` (TLS),
``valkey+unix:///path/valkey.sock``, ``valkey+cluster://host:port[,host:port...]``.
Options, key layout, copies and fault behaviour are those of
:class:`lmcache_storage_redis.store.RespStore` (see ``docs/storage.md``). The
password may also come from ``LMCACHE_VALKEY_PASSWORD``.
"""

from __future__ import annotations

from lmcache_storage_redis.store import ClientLib, RespStore

VALKEY_LIB = ClientLib("valkey", "Valkey", "ValkeyCluster", "ValkeyError", "LMCACHE_VALKEY_PASSWORD")


class ValkeyStore(RespStore):
    """Chunks as values on a Valkey server or cluster (valkey-py)."""

    schemes = ("valkey", "valkeys", "valkey+unix", "valkey+cluster")
    scheme_kinds = {"valkey": "tcp", "valkeys": "tls", "valkey+unix": "unix", "valkey+cluster": "cluster"}
    lib = VALKEY_LIB


__all__ = ["VALKEY_LIB", "ValkeyStore"]
