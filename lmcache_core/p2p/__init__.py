"""Sharing chunks between instances: a directory, a peer server, a peer client and the ``p2p://`` tier.

An instance that misses a chunk locally asks a directory which peers hold it
(:mod:`.directory`: Redis/Valkey, standalone or cluster, or a rendezvous hash
over a fixed peer list), reads it from a holder's memory through a transport
(:mod:`lmcache_core.transport`: the built-in ``tcp``, or ``nixl``) and verifies
it like any tier's chunk; a peer that is down, slow or sends bad bytes is a
miss. :mod:`.server` lends this instance's memory-tier chunks to peers holding
the cluster token, one tenant per connection (:mod:`.protocol`). :mod:`.store`
puts it together as a tier, the same in an embedded CacheEngine and in the
daemon. See docs/p2p.md.
"""

from __future__ import annotations

from .directory import Directory, RendezvousDirectory, RespDirectory
from .server import PeerServer, StoresSource, TenantMap, source_of

__all__ = ["Directory", "PeerServer", "RendezvousDirectory", "RespDirectory", "StoresSource", "TenantMap",
           "source_of"]
