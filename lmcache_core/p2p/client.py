"""The peer client: asks a peer server for a chunk and reads it through the transport.

One fetch is one control round trip (``get`` -> the peer's descriptor), one
one-sided transport read into a pooled buffer, and a ``done`` that lets the
peer release its chunk. The bytes are then verified like any tier's
(:func:`~lmcache_core.chunk.decode_image`: the key asked for, the expected
layout, the tag). Connections are kept per peer (at most ``per_peer``); a peer
that fails (refused connection, timeout, broken transfer) is skipped for a
back-off that doubles up to ``BACKOFF_MAX_S``, so a dead peer costs nothing per
request. Every wait is bounded by ``timeout``.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from ..chunk import HEADER_SIZE, ChunkBuffer, decode_image
from ..errors import LMCacheError
from ..keys import ChunkKey
from ..layout import ChunkGeometry
from ..memory import BufferPool
from ..transport import Descriptor, Transport
from . import protocol as proto

logger = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0


class PeerUnavailable(LMCacheError):
    """A peer could not be reached, did not answer in time, or broke off a transfer."""


@dataclass
class _Conn:
    sock: socket.socket
    agent: str  # the peer transport's agent name, after transport.connect


class PeerClient:
    def __init__(self, transport: Transport, token: bytes, tenant: str, pool: BufferPool, *,
                 geometry: ChunkGeometry | None = None, name: str = "", timeout: float = 2.0,
                 per_peer: int = 4) -> None:
        self.transport = transport
        self._key = proto.derive_token(token)
        self.tenant = tenant
        self.pool = pool
        self.geometry = geometry
        self.name = name or f"client-{secrets.token_hex(4)}"
        self.timeout = timeout
        self.per_peer = per_peer
        self._idle: dict[str, list[_Conn]] = {}
        self._down: dict[str, tuple[float, float]] = {}  # peer -> (until, next back-off)
        self._lock = threading.Lock()
        self._closed = False

    # -- peer health ---------------------------------------------------------------------------
    def usable(self, peer: str) -> bool:
        with self._lock:
            until = self._down.get(peer, (0.0, 0.0))[0]
        return time.monotonic() >= until

    def _failed(self, peer: str, why: str) -> None:
        with self._lock:
            _, backoff = self._down.get(peer, (0.0, BACKOFF_START_S))
            self._down[peer] = (time.monotonic() + backoff, min(backoff * 2, BACKOFF_MAX_S))
            conns = self._idle.pop(peer, [])
        for c in conns:
            c.sock.close()
        logger.warning("p2p peer %s failed (%s); skipping it for %.1fs", peer, why, backoff)

    def _ok(self, peer: str) -> None:
        if peer in self._down:
            with self._lock:
                self._down.pop(peer, None)

    # -- connections ---------------------------------------------------------------------------
    def _connect(self, peer: str) -> _Conn:
        host, _, port = peer.rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = proto.check(proto.recv(sock), {"v": int, "peer": str, "nonce": bytes}, "server hello")
            if hello["v"] != proto.VERSION:
                raise proto.ProtocolError(f"peer speaks protocol {hello['v']}, this build {proto.VERSION}")
            mine = secrets.token_bytes(16)
            proto.send(sock, {"v": proto.VERSION, "peer": self.name, "tenant": self.tenant, "nonce": mine,
                              "proof": proto.proof(self._key, b"c", hello["nonce"], mine, self.tenant)})
            ans = proto.recv(sock)
            if not ans.get("ok"):
                raise PeerUnavailable(f"peer {peer} refused the handshake: {str(ans.get('error'))[:200]}")
            proto.check(ans, {"ok": bool, "proof": bytes, "transport": str, "endpoint": bytes}, "server welcome")
            if not hmac.compare_digest(ans["proof"], proto.proof(self._key, b"s", mine, hello["nonce"], self.tenant)):
                raise PeerUnavailable(f"peer {peer} does not hold the cluster token")
            if ans["transport"] != self.transport.name:
                raise PeerUnavailable(f"peer {peer} serves through {ans['transport']!r}, this one uses "
                                      f"{self.transport.name!r}; set the same transport on every peer")
            agent = self.transport.connect(ans["endpoint"])
        except BaseException:
            sock.close()
            raise
        return _Conn(sock, agent)

    def _take(self, peer: str) -> _Conn:
        with self._lock:
            idle = self._idle.get(peer)
            if idle:
                return idle.pop()
        return self._connect(peer)

    def _give(self, peer: str, conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(peer, [])
            if len(idle) < self.per_peer and not self._closed:
                idle.append(conn)
                return
        conn.sock.close()

    # -- requests ------------------------------------------------------------------------------
    def has(self, peer: str, keys: list[ChunkKey]) -> list[bool]:
        """Which of ``keys`` the peer holds for this tenant; PeerUnavailable on failure."""
        def ask(conn: _Conn) -> list[bool]:
            proto.send(conn.sock, {"op": "has", "keys": [k.to_bytes() for k in keys]})
            ans = proto.check(proto.recv(conn.sock), {"has": list}, "has reply")
            if len(ans["has"]) != len(keys) or not all(type(x) is bool for x in ans["has"]):
                raise proto.ProtocolError("has reply: wrong length or types")
            return ans["has"]
        return self._call(peer, ask)

    def fetch(self, peer: str, key: ChunkKey) -> tuple[ChunkBuffer | None, str]:
        """``(verified chunk, "")``, or ``(None, why)`` when the peer does not lend it to this tenant
        (``absent``, ``refused``, ``busy``); PeerUnavailable when the peer fails, ChunkError when
        its bytes are bad."""
        got: list[tuple[_Conn, int, Descriptor]] = []
        why: list[str] = []

        def ask(conn: _Conn) -> Descriptor | None:
            proto.send(conn.sock, {"op": "get", "key": key.to_bytes(), "tokens": key.num_tokens})
            ans = proto.recv(conn.sock)
            if ans.get("desc") is None:
                proto.check(ans, {"desc": type(None), "why": str}, "get reply")
                why.append(ans["why"])
                return None
            proto.check(ans, {"desc": list, "lease": int}, "get reply")
            d = ans["desc"]
            if len(d) != 4 or type(d[0]) is not str or type(d[1]) is not int or type(d[2]) is not int \
                    or type(d[3]) is not bytes:
                raise proto.ProtocolError("get reply: malformed descriptor")
            desc = Descriptor(d[0], d[1], d[2], d[3])
            got.append((conn, ans["lease"], desc))
            return desc

        desc = self._call(peer, ask, keep=False)
        if desc is None:
            logger.debug("p2p peer %s has no %s for tenant %r (%s)", peer, key, self.tenant, why)
            return None, why[0] if why else "absent"
        conn, lease, remote = got[0]
        limit = self._max_image(key)
        if not HEADER_SIZE < remote.nbytes <= limit:
            conn.sock.close()
            raise proto.ProtocolError(f"peer {peer} offers {remote.nbytes} bytes for {key} (at most {limit})")
        buf = self.pool.acquire(remote.nbytes)
        local = None
        try:
            local = self.transport.register(buf.memoryview(0, remote.nbytes), private=True)
            handle = self.transport.read(local, remote)
            self.transport.wait(handle, self.timeout)
        except BaseException as exc:
            buf.release()
            conn.sock.close()
            if isinstance(exc, Exception):
                self._failed(peer, f"transfer: {type(exc).__name__}: {exc}")
                raise PeerUnavailable(f"peer {peer}: reading {key} failed: {exc}") from exc
            raise
        finally:
            if local is not None:
                self.transport.deregister(local)
        try:
            proto.send(conn.sock, {"op": "done", "lease": lease})
            self._give(peer, conn)
        except OSError:
            conn.sock.close()
        return decode_image(buf, remote.nbytes, key, self.pool, self.geometry), ""

    def _max_image(self, key: ChunkKey) -> int:
        if self.geometry is not None and key.num_tokens:
            payload = self.geometry.nbytes(key.num_tokens)
            return HEADER_SIZE + payload + payload // 100 + 8192
        return HEADER_SIZE + (1 << 32)

    def _call(self, peer: str, fn, keep: bool = True):  # type: ignore[no-untyped-def]
        if not self.usable(peer):
            raise PeerUnavailable(f"peer {peer} is backing off")
        try:
            conn = self._take(peer)
        except (OSError, proto.ProtocolError, PeerUnavailable) as exc:
            self._failed(peer, f"connect: {type(exc).__name__}: {exc}")
            raise PeerUnavailable(f"peer {peer}: {exc}") from exc
        try:
            out = fn(conn)
        except (OSError, ConnectionError, proto.ProtocolError) as exc:
            conn.sock.close()
            self._failed(peer, f"{type(exc).__name__}: {exc}")
            raise PeerUnavailable(f"peer {peer}: {exc}") from exc
        self._ok(peer)
        if keep or out is None:
            self._give(peer, conn)
        return out

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conns = [c for group in self._idle.values() for c in group]
            self._idle.clear()
        for c in conns:
            c.sock.close()


__all__ = ["PeerClient", "PeerUnavailable"]
