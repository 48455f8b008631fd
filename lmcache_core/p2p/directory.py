"""Where a chunk is: a Redis/Valkey directory (chunk key -> holders, with TTL) or a rendezvous hash.

:class:`RespDirectory` keeps one sorted set per chunk key,
``<prefix>:<namespace-hex>:<digest-hex>``, whose members are holder addresses
(``host:port`` of their peer servers) scored by their expiry time; the key
itself expires ``ttl`` seconds after the last publish. A holder removes itself
when it evicts a chunk; an entry a holder no longer backs is removed by the
first fetcher that finds it stale. Standalone (``redis://``, ``rediss://``,
``valkey://``) and cluster (``redis+cluster://``, ``valkey+cluster://``)
servers; every batch is one pipelined round trip (per node in a cluster).

:class:`RendezvousDirectory` needs no server: a chunk's candidates are the
``replicas`` peers of a configured list with the highest rendezvous (HRW) score
for the key, so every instance computes the same candidates, and one peer
joining or leaving moves only its own share. It cannot know who holds a chunk,
so its answers are candidates that the store asks (``authoritative`` False).
"""

from __future__ import annotations

import abc
import hashlib
import logging
import time
import urllib.parse
from typing import Any, Sequence

from ..errors import ConfigError, MissingDependencyError
from ..keys import ChunkKey

logger = logging.getLogger(__name__)

_RESP_SCHEMES = {"redis": ("redis", False), "rediss": ("redis", False), "redis+cluster": ("redis", True),
                 "valkey": ("valkey", False), "valkeys": ("valkey", False), "valkey+cluster": ("valkey", True)}


class Directory(abc.ABC):
    """Chunk key -> addresses of peers that may hold it."""

    #: True when ``holders`` lists peers that announced the chunk; False for candidates only.
    authoritative: bool = True

    @abc.abstractmethod
    def holders(self, keys: Sequence[ChunkKey]) -> list[list[str]]:
        """For each key, the peers to ask (best first); raises on a directory failure."""

    def publish(self, keys: Sequence[ChunkKey], holder: str) -> None:
        """``holder`` now holds ``keys`` (renews their TTL)."""

    def unpublish(self, keys: Sequence[ChunkKey], holder: str) -> None:
        """``holder`` no longer holds ``keys``."""

    def health(self) -> tuple[bool, str]:
        return True, ""

    def close(self) -> None: ...


class RespDirectory(Directory):
    def __init__(self, url: str, *, ttl: int = 600, prefix: str = "lmcache-p2p", timeout: float = 1.0) -> None:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in _RESP_SCHEMES:
            raise ConfigError(f"p2p directory {url!r}: scheme must be one of {', '.join(sorted(_RESP_SCHEMES))}")
        module, cluster = _RESP_SCHEMES[scheme]
        try:
            lib: Any = __import__(module)
            if cluster:
                __import__(f"{module}.cluster")
        except ImportError as exc:
            raise MissingDependencyError(
                f"p2p directory {scheme}:// needs {module}; install it with: pip install \"lmcache-core[{module}]\""
            ) from exc
        if ttl < 1:
            raise ConfigError(f"p2p directory ttl must be at least 1 second, got {ttl}")
        self.ttl, self.prefix, self.cluster = ttl, prefix, cluster
        plain = url.replace("+cluster://", "://", 1)
        kw = dict(socket_timeout=timeout, socket_connect_timeout=timeout)
        if cluster:  # the client finds the other nodes from the first one
            scheme_, rest = plain.split("://", 1)
            creds, _, hosts = rest.split("/", 1)[0].rpartition("@")
            first = hosts.split(",", 1)[0]
            cls = getattr(lib.cluster, "RedisCluster" if module == "redis" else "ValkeyCluster")
            self._client = cls.from_url(f"{scheme_}://{creds + '@' if creds else ''}{first}", **kw)
        else:
            self._client = getattr(lib, "Redis" if module == "redis" else "Valkey").from_url(plain, **kw)
        netloc = urllib.parse.urlsplit(plain).netloc.rpartition("@")[2]
        self._display = f"{scheme}://{netloc}"  # never the password

    def _name(self, key: ChunkKey) -> str:
        return f"{self.prefix}:{key.namespace.hex()}:{key.digest.hex()}"

    def holders(self, keys: Sequence[ChunkKey]) -> list[list[str]]:
        if not keys:
            return []
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        for k in keys:
            pipe.zrevrangebyscore(self._name(k), "+inf", now)
        return [[m.decode() if isinstance(m, bytes) else m for m in got] for got in pipe.execute()]

    def publish(self, keys: Sequence[ChunkKey], holder: str) -> None:
        if not keys:
            return
        expiry = time.time() + self.ttl
        pipe = self._client.pipeline(transaction=False)
        for k in keys:
            name = self._name(k)
            pipe.zadd(name, {holder: expiry})
            pipe.zremrangebyscore(name, "-inf", time.time())  # drop members whose holder went quiet
            pipe.expire(name, self.ttl)
        pipe.execute()

    def unpublish(self, keys: Sequence[ChunkKey], holder: str) -> None:
        if not keys:
            return
        pipe = self._client.pipeline(transaction=False)
        for k in keys:
            pipe.zrem(self._name(k), holder)
        pipe.execute()

    def health(self) -> tuple[bool, str]:
        try:
            self._client.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means the directory is down
            return False, f"directory {self._display}: {type(exc).__name__}: {exc}"
        return True, ""

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass


def _score(peer: str, key: ChunkKey) -> bytes:
    return hashlib.blake2b(key.to_bytes() + peer.encode(), digest_size=8, person=b"lmcache-hrw").digest()


class RendezvousDirectory(Directory):
    """Candidates by rendezvous hashing over ``peers`` (``host:port`` of their peer servers)."""

    authoritative = False

    def __init__(self, peers: Sequence[str], *, replicas: int = 2) -> None:
        if not peers:
            raise ConfigError("p2p: a rendezvous directory needs at least one peer (peers=host:port,...)")
        if replicas < 1:
            raise ConfigError(f"p2p: replicas must be at least 1, got {replicas}")
        self.peers = list(dict.fromkeys(peers))
        self.replicas = replicas

    def holders(self, keys: Sequence[ChunkKey]) -> list[list[str]]:
        return [sorted(self.peers, key=lambda p, k=k: _score(p, k), reverse=True)[: self.replicas] for k in keys]


__all__ = ["Directory", "RendezvousDirectory", "RespDirectory"]
