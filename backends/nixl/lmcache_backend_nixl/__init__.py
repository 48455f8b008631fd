"""lmcache-backend-nixl: the ``nixl`` transport (NIXL agents over UCX).

The transport lives in :mod:`lmcache_backend_nixl.transport` and is imported only
when chosen (``transport=nixl`` on a ``p2p://`` tier), so listing plugins never
loads NIXL or UCX.
"""
