"""``p2p://`` tier: fetch chunks other instances hold in memory; serve this instance's to them.

``p2p://[LISTEN_HOST[:PORT]]?directory=redis://host:6379/0&token_file=/etc/lmcache/p2p.token``
or ``...?peers=10.0.0.5:7100,10.0.0.6:7100`` (rendezvous, no directory server).
Put it after the memory tier: ``tiers: [memory://..., p2p://0.0.0.0:7100?...]``.

- ``exists``: one directory round trip for the batch (peers other than this one);
  with rendezvous, one ``has`` request to each candidate peer.
- ``get``: asks the holders in turn (at most ``tries``), reads the chunk through
  the transport and verifies it (key, layout, tag). A peer that is down, slow
  (``timeout``) or refuses is a miss; bad bytes raise ChunkError (the tier
  stack counts a corrupt chunk) after the bad holder's entry is dropped. The
  tier stack's promotion keeps the copy in the memory tier.
- ``put`` (on the tier stack's writer thread): publishes this instance as a
  holder when a memory tier of the same stack holds the chunk; entries of
  chunks it no longer holds are withdrawn every ``reconcile`` seconds.
- With a listen address (a host alone: any free port; none: fetch only) the store runs a :class:`~.server.PeerServer` over the
  memory tiers of its own stack (the tier stack hands them over through
  ``bind_tiers``) and lends chunks of this engine's tenant only.

Options: ``directory``, ``peers``, ``replicas`` (2), ``advertise`` (host:port
peers reach; default the listen address), ``token_file`` (or the environment
variable ``LMCACHE_P2P_TOKEN``; at least 16 bytes, required), ``transport``
(``tcp``; ``nixl`` with lmcache-backend-nixl), ``timeout`` (seconds per peer
operation, 2), ``ttl`` (directory entry lifetime, 600 s), ``reconcile`` (5 s),
``tries`` (2).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from ..chunk import ChunkBuffer
from ..errors import ChunkError, ConfigError
from ..keys import ChunkKey
from ..storage import Health, Store, StoreCapabilities, StoreContext, parse_url
from ..transport import Transport, TransportOptions
from .client import PeerClient, PeerUnavailable
from .directory import Directory, RendezvousDirectory, RespDirectory
from .server import PeerServer, StoresSource, TenantMap

logger = logging.getLogger(__name__)

OPTIONS = ("directory", "peers", "replicas", "advertise", "token_file", "transport", "timeout", "ttl",
           "reconcile", "tries")
PUBLISHED_MAX = 1 << 17  # keys this instance announced, checked by the reconciler (oldest forgotten)
HOLDERS_CACHE = 4096  # exists() answers kept for the get() that follows


def read_token(path: str | None) -> bytes:
    """The cluster token from ``path`` (trailing newline dropped) or ``LMCACHE_P2P_TOKEN``."""
    if path:
        try:
            token = Path(path).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"p2p: cannot read token_file {path!r}: {exc.strerror}") from None
    else:
        token = os.environ.get("LMCACHE_P2P_TOKEN", "").encode()
    if len(token) < 16:
        raise ConfigError("p2p: a cluster token of at least 16 bytes is required (token_file=PATH or the "
                          "environment variable LMCACHE_P2P_TOKEN); every peer must use the same one")
    return token


def make_transport(name: str, options: TransportOptions) -> Transport:
    from ..plugins import get_plugin_manager

    return get_plugin_manager().get("transport", name).load()(options)


class P2PStore(Store):
    schemes = ("p2p",)
    capabilities = StoreCapabilities(shared=True, ttl=True)
    reports_writes = True  # a put only announces; no bytes move

    def __init__(self, context: StoreContext, directory: Directory, transport: Transport, token: bytes, *,
                 listen: tuple[str, int] | None = None, advertise: str = "", timeout: float = 2.0,
                 reconcile_s: float = 5.0, tries: int = 2, name: str = "p2p") -> None:
        super().__init__(name, context)
        self.directory = directory
        self.transport = transport
        self.tenant = str(context.options.get("tenant", "default")) if context.options else "default"
        self.tenants = TenantMap()
        self.tries = tries
        self.client = PeerClient(transport, token, self.tenant, context.pool, geometry=context.geometry,
                                 timeout=timeout)
        self._token = token
        self._listen, self._advertise, self._timeout = listen, advertise, timeout
        self.server: PeerServer | None = None
        self.address = advertise  # this instance's entry in the directory ("" when it serves nothing)
        self._local: list[Store] = []
        self._published: OrderedDict[ChunkKey, None] = OrderedDict()
        self._holders: OrderedDict[ChunkKey, list[str]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats: dict[str, int] = dict.fromkeys(
            ("peer_hits", "peer_bytes", "absent", "refused", "peer_errors", "corrupt", "published",
             "withdrawn", "directory_errors"), 0)
        self._stop = threading.Event()
        self._reconcile_s = reconcile_s
        self._reconciler: threading.Thread | None = None

    @classmethod
    def from_url(cls, url: str, context: StoreContext) -> "P2PStore":
        u = parse_url(url)
        u.check_options(OPTIONS)
        directory_url, peers = u.option("directory"), u.option("peers")
        if bool(directory_url) == bool(peers):
            raise ConfigError(f"{url}: give exactly one of directory=redis://... (a Redis/Valkey directory) or "
                              f"peers=host:port,... (rendezvous over a fixed peer list)")
        timeout = u.float_option("timeout", 2.0)
        ttl = u.int_option("ttl", 600, minimum=1, maximum=30 * 86400)
        token = read_token(u.option("token_file"))
        directory: Directory = RespDirectory(directory_url, ttl=ttl, timeout=timeout) if directory_url else \
            RendezvousDirectory([p.strip() for p in peers.split(",") if p.strip()],
                                replicas=u.int_option("replicas", 2, minimum=1, maximum=64))
        listen = None
        if u.netloc:  # host:port, or a host alone for any free port
            host, colon, port = u.netloc.rpartition(":") if not u.netloc.endswith("]") else ("", "", "")
            if not colon:
                host, port = u.netloc, "0"
            if not host or "@" in host:
                raise ConfigError(f"{url}: the listen address must be host:port or a host, got {u.netloc!r}")
            listen = (host.strip("[]"), int(port))
        transport = make_transport(u.option("transport", "tcp"),
                                   TransportOptions(host=listen[0] if listen else "127.0.0.1", secret=token, timeout=timeout))
        return cls(context, directory, transport, token, listen=listen, advertise=u.option("advertise", ""),
                   timeout=timeout, reconcile_s=u.float_option("reconcile", 5.0, minimum=0.05, maximum=3600),
                   tries=u.int_option("tries", 2, minimum=1, maximum=16))

    # -- the stack's memory tiers and the server -------------------------------------------------
    def bind_tiers(self, stores: Sequence[Store]) -> None:
        """Called with every store of this stack once it is built: serve from its memory tiers."""
        self._local = [s for s in stores if s is not self and s.capabilities.holds_buffers]
        if self._listen is None or self.server is not None:
            return
        if not self._local:
            logger.warning("p2p: no memory tier in this stack to serve from; fetching only")
            return
        try:
            self.serve(StoresSource(self._local))
        except OSError as exc:  # e.g. a second engine of this process on the same port: fetch only
            self.server = None
            logger.warning("p2p: cannot listen on %s:%s (%s); this engine fetches from peers but lends "
                           "nothing", *self._listen, exc)

    def serve(self, source: Any) -> PeerServer:
        """Start the peer server over ``source`` (a :class:`~.server.ChunkSource`)."""
        self.server = PeerServer(source, self.transport, self._token, tenants=self.tenants,
                                 listen=self._listen or ("127.0.0.1", 0), advertise=self._advertise,
                                 timeout=self._timeout).start()
        self.address = self.server.address
        self._reconciler = threading.Thread(target=self._reconcile_loop, name="lmcache-p2p-reconcile",
                                            daemon=True)
        self._reconciler.start()
        return self.server

    # -- Store ---------------------------------------------------------------------------------
    def _others(self, holders: list[str]) -> list[str]:
        return [h for h in holders if h != self.address]

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        try:
            found = [self._others(h) for h in self.directory.holders(keys)]
        except Exception as exc:  # noqa: BLE001 - a directory fault is a miss
            self._count("directory_errors")
            logger.warning("p2p directory lookup failed: %s: %s", type(exc).__name__, exc)
            return [False] * len(keys)
        if not self.directory.authoritative:
            found = self._confirm(keys, found)
        with self._lock:
            for k, h in zip(keys, found):
                if h:
                    self._holders[k] = h
                    self._holders.move_to_end(k)
            while len(self._holders) > HOLDERS_CACHE:
                self._holders.popitem(last=False)
        return [bool(h) for h in found]

    def _confirm(self, keys: Sequence[ChunkKey], candidates: list[list[str]]) -> list[list[str]]:
        """Rendezvous: ask each candidate peer which of its keys it really holds (one request each)."""
        by_peer: dict[str, list[int]] = {}
        for i, peers in enumerate(candidates):
            for p in peers:
                by_peer.setdefault(p, []).append(i)
        out: list[list[str]] = [[] for _ in keys]
        for peer, idx in by_peer.items():
            if not self.client.usable(peer):
                continue
            try:
                has = self.client.has(peer, [keys[i] for i in idx])
            except PeerUnavailable:
                self._count("peer_errors")
                continue
            for i, ok in zip(idx, has):
                if ok:
                    out[i].append(peer)
        return out

    def get(self, key: ChunkKey) -> ChunkBuffer | None:
        with self._lock:
            holders = self._holders.pop(key, None)
        if holders is None:
            if not self.exists([key])[0]:
                return None
            with self._lock:
                holders = self._holders.pop(key, [])
        bad: ChunkError | None = None
        for peer in [h for h in holders if self.client.usable(h)][: self.tries]:
            try:
                chunk, why = self.client.fetch(peer, key)
            except PeerUnavailable as exc:
                self._count("peer_errors")
                logger.info("p2p: %s from %s is a miss: %s", key, peer, exc)
                continue
            except ChunkError as exc:
                self._count("corrupt")
                logger.warning("p2p: peer %s sent a bad chunk %s (%s); dropping its directory entry", peer, key, exc)
                self._withdraw([key], peer)
                bad = exc
                continue
            if chunk is None:
                self._count("refused" if why == "refused" else "absent")
                if why == "absent" and self.directory.authoritative:
                    self._withdraw([key], peer)  # a stale entry: the holder evicted it
                continue
            self._count("peer_hits")
            self._count("peer_bytes", chunk.header.image_len)
            return chunk
        if bad is not None:
            raise bad
        return None

    def put(self, key: ChunkKey, chunk: ChunkBuffer) -> bool:
        if self.server is None:
            return False
        if not any(s.exists([key])[0] for s in self._local):
            return False  # the memory tier did not keep it: nothing to lend
        self.tenants.bind(key.namespace, self.tenant)
        self.directory.publish([key], self.address)
        with self._lock:
            self._published[key] = None
            self._published.move_to_end(key)
            while len(self._published) > PUBLISHED_MAX:
                self._published.popitem(last=False)
        self._count("published")
        return True

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        if self.address:
            self._withdraw(keys, self.address)
        return 0

    def _withdraw(self, keys: Sequence[ChunkKey], holder: str) -> None:
        try:
            self.directory.unpublish(keys, holder)
        except Exception as exc:  # noqa: BLE001
            self._count("directory_errors")
            logger.warning("p2p directory: withdrawing %d entries of %s failed: %s", len(keys), holder, exc)

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self._reconcile_s):
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - a background thread's failure is logged, never lost
                logger.exception("p2p: reconciling the directory failed")

    def reconcile(self) -> int:
        """Withdraw the entries of announced chunks the memory tiers no longer hold (evicted)."""
        with self._lock:
            keys = list(self._published)
        if not keys or not self._local:
            return 0
        held = StoresSource(self._local).exists(keys)
        gone = [k for k, h in zip(keys, held) if not h]
        if gone:
            self._withdraw(gone, self.address)
            with self._lock:
                for k in gone:
                    self._published.pop(k, None)
            self._count("withdrawn", len(gone))
        return len(gone)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    def health(self) -> Health:
        ok, why = self.directory.health()
        return Health(ok, why)

    def clear(self, namespace: Any = None, *, all_namespaces: bool = False) -> None:
        """Withdraw this instance's entries (the chunks themselves live in the memory tier)."""
        with self._lock:
            keys = list(self._published)
            self._published.clear()
        if keys and self.address:
            self._withdraw(keys, self.address)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self.server is not None:
            self.clear()
            self.server.stop()
        self.client.close()
        self.transport.close()
        self.directory.close()


__all__ = ["P2PStore", "make_transport", "read_token"]
