"""TCP transport: one-sided reads and writes of registered buffers between processes or hosts.

Each endpoint listens on ``host:port`` (0: any free port) and names itself
``tcp://host:port/<random id>``, so a peer reaches it from the agent name alone
(``connect`` only checks the name). A registered buffer gets a random 62-bit
handle. A transfer opens (or reuses) a connection to the owner, proves the
shared secret (HMAC-SHA256 of the server's nonce; an endpoint without a secret
uses a fixed one, for tests), and streams the bytes straight into the target
buffer (``recv_into``): no intermediate copy on either side. The owner serves
requests on its own threads; the requester's transfers run on a small pool, so
``read``/``write`` return at once and ``poll`` reports completion.

Bounds: at most ``MAX_CONNECTIONS`` served connections, transfers no larger than
the registered buffers (checked on both sides before a byte moves), a socket
timeout on every call. Every failure is a :class:`TransportError` from ``poll``.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..transport import Descriptor, Transport, TransportCapabilities, TransportError, TransportOptions

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
_REQ = struct.Struct("<cQQ")  # op (R/W), handle, nbytes
_REPLY = struct.Struct("<cQ")  # status (K ok / E error), nbytes or error length
_OPEN_SECRET = b"lmcache-tcp-transport-open"
_STEP = 4 << 20


def _recv_exact(sock: socket.socket, mv: memoryview) -> None:
    got = 0
    while got < len(mv):
        n = sock.recv_into(mv[got : got + _STEP])
        if n == 0:
            raise TransportError(f"peer closed the connection after {got} of {len(mv)} bytes")
        got += n


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf))
    return bytes(buf)


def parse_agent(agent: str) -> tuple[str, int]:
    """``(host, port)`` of a ``tcp://host:port/id`` agent name; TransportError if malformed."""
    if not agent.startswith("tcp://") or "/" not in agent[6:]:
        raise TransportError(f"tcp transport: {agent!r} is not a tcp://host:port/id agent name")
    hostport = agent[6:].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TransportError(f"tcp transport: agent {agent!r} has no valid host:port")
    return host.strip("[]"), int(port)


class TcpTransport(Transport):
    name = "tcp"
    capabilities = TransportCapabilities(cross_host=True, cross_process=True)

    def __init__(self, options: TransportOptions | None = None) -> None:
        self.options = options or TransportOptions()
        self._secret = self.options.secret or _OPEN_SECRET
        self._buffers: dict[int, memoryview] = {}
        self._lock = threading.Lock()
        self._listener = socket.create_server((self.options.host, self.options.port), backlog=64)
        host, port = self._listener.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.agent = self.options.agent or f"tcp://{shown}:{port}/{secrets.token_hex(6)}"
        if not self.agent.startswith("tcp://"):
            self.agent = f"tcp://{shown}:{port}/{self.agent}"
        self._served: set[socket.socket] = set()
        self._idle: dict[str, list[socket.socket]] = {}
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="lmcache-tcpx")
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="lmcache-tcpx-accept", daemon=True)
        self._thread.start()

    # -- registration --------------------------------------------------------------------------
    def register(self, buffer: memoryview, *, private: bool = False) -> Descriptor:
        mv = memoryview(buffer).cast("B")
        with self._lock:
            handle = secrets.randbits(62) | 1
            self._buffers[handle] = mv
        return Descriptor(self.agent, handle, len(mv))

    def deregister(self, desc: Descriptor) -> None:
        with self._lock:
            self._buffers.pop(desc.handle, None)

    def _local(self, desc: Descriptor) -> memoryview:
        with self._lock:
            mv = self._buffers.get(desc.handle)
        if mv is None or desc.agent != self.agent:
            raise TransportError(f"tcp transport: local descriptor {desc.handle} is not registered here")
        return mv

    def connect(self, endpoint: bytes) -> str:
        agent = endpoint.decode()
        parse_agent(agent)
        return agent

    def disconnect(self, agent: str) -> None:
        with self._lock:
            socks = self._idle.pop(agent, [])
        for s in socks:
            s.close()

    # -- requester side ------------------------------------------------------------------------
    def read(self, local: Descriptor, remote: Descriptor) -> Any:
        return self._submit(b"R", self._local(local), remote)

    def write(self, local: Descriptor, remote: Descriptor) -> Any:
        return self._submit(b"W", self._local(local), remote)

    def _submit(self, op: bytes, mv: memoryview, remote: Descriptor) -> Future[None]:
        n = remote.nbytes if op == b"R" else len(mv)
        if op == b"R" and remote.nbytes > len(mv):
            raise TransportError(f"tcp transport: reading {remote.nbytes} bytes into a buffer of {len(mv)}")
        if self._closed:
            raise TransportError("tcp transport is closed")
        return self._pool.submit(self._transfer, op, mv[:n], remote)

    def _conn(self, agent: str) -> socket.socket:
        with self._lock:
            idle = self._idle.get(agent)
            if idle:
                return idle.pop()
        host, port = parse_agent(agent)
        sock = socket.create_connection((host, port), timeout=self.options.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            nonce = _recv_bytes(sock, 16)
            sock.sendall(hmac.new(self._secret, nonce, "sha256").digest())
        except BaseException:
            sock.close()
            raise
        return sock

    def _transfer(self, op: bytes, mv: memoryview, remote: Descriptor) -> None:
        try:
            sock = self._conn(remote.agent)
        except OSError as exc:
            raise TransportError(f"tcp transport: cannot reach {remote.agent}: {exc}") from exc
        ok = False
        try:
            sock.sendall(_REQ.pack(op, remote.handle, len(mv)))
            self._expect_ok(sock, remote)
            if op == b"R":
                _recv_exact(sock, mv)
            else:
                sock.sendall(mv)
                self._expect_ok(sock, remote)
            ok = True
        except OSError as exc:
            raise TransportError(f"tcp transport: transfer with {remote.agent} failed: {exc}") from exc
        finally:
            if ok and not self._closed:
                with self._lock:
                    self._idle.setdefault(remote.agent, []).append(sock)
            else:
                sock.close()

    @staticmethod
    def _expect_ok(sock: socket.socket, remote: Descriptor) -> None:
        status, n = _REPLY.unpack(_recv_bytes(sock, _REPLY.size))
        if status != b"K":
            why = _recv_bytes(sock, min(n, 1024)).decode(errors="replace")
            raise TransportError(f"tcp transport: {remote.agent} refused the transfer: {why}")

    def poll(self, handle: Any) -> bool:
        if not handle.done():
            return False
        exc = handle.exception()
        if exc is not None:
            raise exc if isinstance(exc, TransportError) else TransportError(f"{type(exc).__name__}: {exc}")
        return True

    # -- owner side ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                full = len(self._served) >= MAX_CONNECTIONS
                if not full:
                    self._served.add(sock)
            if full:
                logger.warning("tcp transport %s: %d connections already; refusing one", self.agent, MAX_CONNECTIONS)
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock,), name="lmcache-tcpx-serve", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(self.options.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce = secrets.token_bytes(16)
            sock.sendall(nonce)
            proof = _recv_bytes(sock, 32)
            if not hmac.compare_digest(proof, hmac.new(self._secret, nonce, "sha256").digest()):
                logger.warning("tcp transport %s: a peer failed authentication; closing it", self.agent)
                return
            sock.settimeout(None)  # idle between requests; each request is bounded below
            while not self._closed:
                try:
                    head = _recv_bytes(sock, _REQ.size)
                except TransportError:
                    return  # the peer closed between requests
                sock.settimeout(self.options.timeout)
                self._serve_one(sock, *_REQ.unpack(head))
                sock.settimeout(None)
        except (OSError, TransportError) as exc:
            logger.debug("tcp transport %s: connection ended: %s", self.agent, exc)
        finally:
            with self._lock:
                self._served.discard(sock)
            sock.close()

    def _serve_one(self, sock: socket.socket, op: bytes, handle: int, n: int) -> None:
        with self._lock:
            mv = self._buffers.get(handle)
        if op not in (b"R", b"W") or mv is None or n > len(mv):
            why = ("unknown operation" if op not in (b"R", b"W") else "descriptor is not registered"
                   if mv is None else f"{n} bytes exceed the registered {len(mv)}").encode()
            sock.sendall(_REPLY.pack(b"E", len(why)) + why)
            raise TransportError(why.decode())  # the stream may hold data we will not read: close it
        sock.sendall(_REPLY.pack(b"K", n))
        if op == b"R":
            sock.sendall(mv[:n])
        else:
            _recv_exact(sock, mv[:n])
            sock.sendall(_REPLY.pack(b"K", n))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            socks = [s for group in self._idle.values() for s in group] + list(self._served)
            self._idle.clear()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


__all__ = ["TcpTransport", "parse_agent"]
