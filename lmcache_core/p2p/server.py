"""The peer server: serves chunks of a local memory tier to authenticated peers through a transport.

Start and stop it over anything that holds chunks in memory::

    server = PeerServer(source_of(tier_stack_or_memory_store), transport, token,
                        tenants=tenant_map, listen=("0.0.0.0", 7100), advertise="10.0.0.5:7100")
    server.start()          # returns at once; one thread accepts, one thread per peer connection
    ...
    server.stop()           # closes every connection and releases every chunk it lent

``source_of`` accepts a :class:`~lmcache_core.tiers.TierStack` (its tiers that hold
buffers), a memory store, or a list of stores. ``tenants`` says which tenant
each namespace id belongs to (:class:`TenantMap`; the embedded p2p store fills
it from its own stores, the daemon from its sessions): a peer's connection is
bound to one tenant by the handshake (:mod:`.protocol`), and a request for a
chunk of a namespace that is not that tenant's is refused and written to the
``lmcache_core.p2p.audit`` log. A lent chunk stays referenced (so eviction
frees nothing under a transfer) until the peer says ``done``, its connection
closes, or ``lease_s`` passes; at most ``max_leases`` per connection and
``max_connections`` connections, past which requests are answered ``busy``.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

from ..chunk import ChunkBuffer
from ..keys import ChunkKey
from ..transport import Descriptor, Transport
from . import protocol as proto

logger = logging.getLogger(__name__)
audit = logging.getLogger("lmcache_core.p2p.audit")


class ChunkSource(Protocol):
    def get(self, key: ChunkKey) -> ChunkBuffer | None:
        """A retained chunk (the caller releases it) or None."""

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]: ...


class StoresSource:
    """Serve from the stores that hold buffers in this process (no I/O on the serving path)."""

    def __init__(self, stores: Iterable[Any]) -> None:
        self.stores = [s for s in stores if s.capabilities.holds_buffers]

    def get(self, key: ChunkKey) -> ChunkBuffer | None:
        for s in self.stores:
            chunk = s.get(key)
            if chunk is not None:
                return chunk
        return None

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        out = [False] * len(keys)
        for s in self.stores:
            out = [a or b for a, b in zip(out, s.exists(keys))]
        return out


def source_of(obj: Any) -> ChunkSource:
    """A :class:`ChunkSource` over a TierStack, one memory store, or a list of stores."""
    if hasattr(obj, "tiers") and isinstance(getattr(obj, "tiers"), list):  # a TierStack
        return StoresSource(t.store for t in obj.tiers)
    if isinstance(obj, (list, tuple)):
        return StoresSource(obj)
    return StoresSource([obj])


class TenantMap:
    """Namespace id -> tenant, bounded (oldest forgotten first past ``limit``)."""

    def __init__(self, limit: int = 1 << 16) -> None:
        self.limit = limit
        self._map: dict[bytes, str] = {}
        self._lock = threading.Lock()

    def bind(self, namespace: bytes, tenant: str) -> None:
        with self._lock:
            if self._map.get(namespace) == tenant:
                return
            self._map[namespace] = tenant
            while len(self._map) > self.limit:
                self._map.pop(next(iter(self._map)))

    def tenant_of(self, namespace: bytes) -> str | None:
        with self._lock:
            return self._map.get(namespace)


@dataclass
class _Lease:
    chunk: ChunkBuffer
    desc: Descriptor
    expires: float


@dataclass
class ServerStats:
    connections: int = 0
    auth_failures: int = 0
    served: int = 0
    served_bytes: int = 0
    absent: int = 0
    refused: int = 0
    busy: int = 0
    protocol_errors: int = 0
    leases: int = 0  # outstanding now
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {k: v for k, v in vars(self).items() if k != "lock"}


class PeerServer:
    def __init__(self, source: ChunkSource, transport: Transport, token: bytes, *, tenants: TenantMap,
                 listen: tuple[str, int] = ("127.0.0.1", 0), advertise: str = "", name: str = "",
                 max_connections: int = 64, max_leases: int = 64, lease_s: float = 30.0,
                 timeout: float = 5.0) -> None:
        self.source = source
        self.transport = transport
        self._key = proto.derive_token(token)
        self.tenants = tenants
        self.listen = listen
        self.advertise = advertise
        self.name = name or f"peer-{secrets.token_hex(4)}"
        self.max_connections, self.max_leases, self.lease_s, self.timeout = \
            max_connections, max_leases, lease_s, timeout
        self.stats = ServerStats()
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``host:port`` peers reach this server on (what the directory records)."""
        if self.advertise:
            return self.advertise
        if self._sock is None:
            raise RuntimeError("PeerServer.address: the server is not started")
        host, port = self._sock.getsockname()[:2]
        return f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"

    def start(self) -> "PeerServer":
        if self._sock is not None:
            return self
        self._sock = socket.create_server(self.listen, backlog=64)
        self._thread = threading.Thread(target=self._accept_loop, name="lmcache-p2p-accept", daemon=True)
        self._thread.start()
        logger.info("p2p peer server %s on %s (transport %s)", self.name, self.address, self.transport.name)
        return self

    def stop(self) -> None:
        self._stopped.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- connections ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        sock = self._sock
        while not self._stopped.is_set() and sock is not None:
            try:
                conn, addr = sock.accept()
            except OSError:
                return
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                logger.warning("p2p server %s: %d connections already; refusing %s", self.name,
                               self.max_connections, addr)
                conn.close()
                continue
            threading.Thread(target=self._serve_conn, args=(conn, addr), name="lmcache-p2p-peer",
                             daemon=True).start()

    def _handshake(self, conn: socket.socket, addr: Any) -> str | None:
        nonce = secrets.token_bytes(16)
        proto.send(conn, {"v": proto.VERSION, "peer": self.name, "nonce": nonce})
        hello = proto.recv(conn)
        if hello.get("v") != proto.VERSION:
            proto.send(conn, {"ok": False, "error": f"protocol version {hello.get('v')!r} is not {proto.VERSION}"})
            raise proto.ProtocolError(f"protocol version {hello.get('v')!r}")
        proto.check(hello, {"v": int, "peer": str, "tenant": str, "nonce": bytes, "proof": bytes}, "hello")
        tenant, theirs = hello["tenant"], hello["nonce"]
        if len(theirs) != 16 or not hmac.compare_digest(
                hello["proof"], proto.proof(self._key, b"c", nonce, theirs, tenant)):
            self.stats.add(auth_failures=1)
            audit.warning("p2p %s: refused peer %r from %s: wrong cluster token (tenant %r claimed)",
                          self.name, hello["peer"][:64], addr, tenant[:64])
            proto.send(conn, {"ok": False, "error": "authentication failed"})
            return None
        proto.send(conn, {"ok": True, "proof": proto.proof(self._key, b"s", theirs, nonce, tenant),
                          "transport": self.transport.name, "endpoint": self.transport.endpoint()})
        return tenant

    def _serve_conn(self, conn: socket.socket, addr: Any) -> None:
        leases: dict[int, _Lease] = {}
        self.stats.add(connections=1)
        try:
            conn.settimeout(self.timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tenant = self._handshake(conn, addr)
            if tenant is None:
                return
            conn.settimeout(min(self.lease_s, 1.0))
            while not self._stopped.is_set():
                try:
                    msg = proto.recv(conn)
                except socket.timeout:
                    self._expire(leases)
                    continue
                self._expire(leases)
                self._handle(conn, msg, tenant, leases, addr)
        except (ConnectionError, OSError) as exc:
            logger.debug("p2p %s: connection from %s ended: %s", self.name, addr, exc)
        except proto.ProtocolError as exc:
            self.stats.add(protocol_errors=1)
            logger.warning("p2p %s: closing connection from %s: %s", self.name, addr, exc)
        except Exception:  # noqa: BLE001 - a bug here must cost one connection, never the server
            logger.exception("p2p %s: connection from %s failed", self.name, addr)
        finally:
            for lease_id in list(leases):
                self._release(leases, lease_id)
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(self, conn: socket.socket, msg: dict[str, Any], tenant: str, leases: dict[int, _Lease],
                addr: Any) -> None:
        op = msg.get("op")
        if op == "done":
            proto.check(msg, {"op": str, "lease": int}, "done")
            self._release(leases, msg["lease"])
            return
        if op == "has":
            proto.check(msg, {"op": str, "keys": list}, "has")
            if len(msg["keys"]) > proto.MAX_KEYS:
                raise proto.ProtocolError(f"has: {len(msg['keys'])} keys (at most {proto.MAX_KEYS})")
            keys = [ChunkKey.from_bytes(proto.check_key(k, "has")) for k in msg["keys"]]
            allowed = [self.tenants.tenant_of(k.namespace) == tenant for k in keys]
            present = self.source.exists(keys)
            proto.send(conn, {"has": [a and p for a, p in zip(allowed, present)]})
            return
        if op != "get":
            raise proto.ProtocolError(f"unknown operation {op!r}")
        proto.check(msg, {"op": str, "key": bytes, "tokens": int}, "get")
        key = ChunkKey.from_bytes(proto.check_key(msg["key"], "get"), msg["tokens"])
        owner = self.tenants.tenant_of(key.namespace)
        if owner != tenant:
            self.stats.add(refused=1)
            audit.warning("p2p %s: refused chunk %s to peer at %s of tenant %r (its namespace is %s)", self.name,
                          key, addr, tenant[:64], "another tenant's" if owner else "not served here")
            proto.send(conn, {"desc": None, "why": "refused"})
            return
        if len(leases) >= self.max_leases:
            self.stats.add(busy=1)
            proto.send(conn, {"desc": None, "why": "busy"})
            return
        chunk = self.source.get(key)
        if chunk is None:
            self.stats.add(absent=1)
            proto.send(conn, {"desc": None, "why": "absent"})
            return
        try:
            desc = self.transport.register(chunk.image())
        except BaseException:
            chunk.release()
            raise
        lease_id = next(self._ids)
        leases[lease_id] = _Lease(chunk, desc, time.monotonic() + self.lease_s)
        self.stats.add(served=1, served_bytes=desc.nbytes, leases=1)
        proto.send(conn, {"desc": [desc.agent, desc.handle, desc.nbytes, desc.meta], "lease": lease_id})

    def _release(self, leases: dict[int, _Lease], lease_id: int) -> None:
        lease = leases.pop(lease_id, None)
        if lease is None:
            return
        try:
            self.transport.deregister(lease.desc)
        finally:
            lease.chunk.release()
            self.stats.add(leases=-1)

    def _expire(self, leases: dict[int, _Lease]) -> None:
        now = time.monotonic()
        for lease_id in [i for i, l in leases.items() if l.expires < now]:
            logger.info("p2p %s: lease %d expired before the peer said done; releasing it", self.name, lease_id)
            self._release(leases, lease_id)


__all__ = ["ChunkSource", "PeerServer", "ServerStats", "StoresSource", "TenantMap", "source_of"]
