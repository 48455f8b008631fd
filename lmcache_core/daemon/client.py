"""The engine side of daemon mode: a connection, the arena pool and a tier stack that asks the daemon.

:class:`DaemonTiers` stands where an embedded engine has its :class:`~lmcache_core.tiers.TierStack`
(same methods), and :class:`ClientArenaPool` where it has its buffer pool: chunk buffers are
slots of the tenant's arena, so the device gathers a store straight into the daemon's memory
and scatters a load straight out of it. A daemon that is down, slow or restarting makes every
lookup a miss and every store a dropped one (counted, logged once); a background thread
reconnects with back-off and re-registers the engine's namespaces.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import chunk as chunkmod
from ..chunk import HEADER_SIZE, MAGIC, ChunkBuffer, ChunkHeader, decode_header, decode_image
from ..errors import ChunkError, ConfigError
from ..keys import ChunkKey, Namespace
from ..memory import BufferPool, PooledBuffer, round_up
from ..metrics import Metrics
from ..storage import StoreCapabilities
from ..tiers import Presence
from . import protocol
from .address import Address, parse_address
from .arena import Arena

if TYPE_CHECKING:
    from ..config import Config
    from ..device import Device
    from ..layout import ChunkGeometry

logger = logging.getLogger(__name__)
RELEASE_FLUSH_S = 0.05  # slot releases are sent with the next request, or after this long
AUTOSTART_WAIT_S = 15.0


class DaemonUnavailable(ConnectionError):
    """No daemon answers (or it refused us); the caller treats it as a miss."""


class _Link:
    """One live connection (a session) and the arena it mapped."""

    def __init__(self, sock: socket.socket, hello: dict[str, Any], arena: Arena, generation: int) -> None:
        self.sock = sock
        self.hello = hello
        self.arena = arena
        self.generation = generation
        self.tenant: str = hello["tenant"]
        self.lease_s: float = float(hello["lease_s"])
        self.registered = threading.Event()  # the device page-locked the arena (copies are async DMA)
        self.register_ok = False


class DaemonConnection:
    def __init__(self, address: Address, token: str, *, kind: str, timeout_s: float, autostart: bool = False,
                 device: "Device | None" = None, on_link: Callable[["_Link"], bool] | None = None) -> None:
        self.address = address
        self.token = token
        self.kind = kind
        self.timeout_s = timeout_s
        self.autostart = autostart
        self.device = device
        self.on_link = on_link  # called on each new session (register namespaces); False: unusable
        self._lock = threading.Lock()  # one request in flight per connection
        self.link: _Link | None = None
        self._generation = 0
        self._closed = False
        self._stop = threading.Event()  # close(): the keeper wakes and exits at once
        self._registering: list[threading.Thread] = []
        self._next_try = 0.0
        self._backoff = 0.1
        self._warned = False
        self._pending_rel: list[int] = []
        self._rel_lock = threading.Lock()
        self._last_request = time.monotonic()
        self.requests = 0
        self.failures = 0
        self._autostarted: subprocess.Popen[bytes] | None = None
        self._retired: list[_Link] = []  # links of earlier sessions whose arenas may still be in use
        self.live_in: Callable[[int], int] = lambda generation: 0  # buffers of a session still held
        self._keeper = threading.Thread(target=self._keep_alive, name="lmcache-daemon-client", daemon=True)
        self._keeper.start()

    # -- connecting ------------------------------------------------------------------------
    def _dial(self) -> socket.socket:
        if self.address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = self.address.path
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in self.address.host else socket.AF_INET,
                                 socket.SOCK_STREAM)
            target = (self.address.host, self.address.port)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        if self.address.kind == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _start_daemon(self) -> None:
        if self._autostarted is not None and self._autostarted.poll() is None:
            return
        log = open(self.address.path + ".log", "ab")  # noqa: SIM115 - handed to the child
        logger.warning("no daemon on %s: starting `lmcache serve` (autostart; log %s.log)", self.address.path,
                       self.address.path)
        self._autostarted = subprocess.Popen(
            [sys.executable, "-m", "lmcache_core.cli", "serve", "--socket", self.address.path],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + AUTOSTART_WAIT_S
        while time.monotonic() < deadline and not os.path.exists(self.address.path):
            time.sleep(0.05)

    def connect(self) -> _Link:
        """Open a session now (raises DaemonUnavailable)."""
        try:
            try:
                sock = self._dial()
            except (FileNotFoundError, ConnectionRefusedError):
                if not (self.autostart and self.address.kind == "unix"):
                    raise
                self._start_daemon()
                sock = self._retry_dial()
            fds: list[int] = []
            protocol.send(sock, {"op": "hello", "v": protocol.PROTOCOL_VERSION, "kind": self.kind,
                                 "token": self.token, "pid": os.getpid()})
            hello = protocol.recv(sock, fds)
        except (OSError, protocol.ProtocolError) as exc:
            raise DaemonUnavailable(f"daemon {self.address}: {exc}") from exc
        if not hello.get("ok"):
            for fd in fds:
                os.close(fd)
            sock.close()
            raise DaemonUnavailable(f"daemon {self.address} refused the connection: {hello.get('error')}")
        try:
            arena = Arena.attach(fds[0] if fds else None, int(hello["arena_size"]), hello.get("arena_path", ""))
        except (OSError, IndexError, ValueError) as exc:
            for fd in fds:
                os.close(fd)
            sock.close()
            raise DaemonUnavailable(f"daemon {self.address}: cannot map its arena ({exc})") from exc
        for fd in fds[1:]:
            os.close(fd)
        arena.close()  # the descriptor; the mapping stays
        self._generation += 1
        link = _Link(sock, hello, arena, self._generation)
        return link

    def _retry_dial(self) -> socket.socket:
        deadline = time.monotonic() + AUTOSTART_WAIT_S
        while True:
            try:
                return self._dial()
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def ensure(self) -> _Link:
        """The live link, connecting first if the back-off allows (raises DaemonUnavailable)."""
        link = self.link
        if link is not None:
            return link
        if self._closed:
            raise DaemonUnavailable("connection closed")
        now = time.monotonic()
        if now < self._next_try:
            raise DaemonUnavailable(f"daemon {self.address} is down; retrying in {self._next_try - now:.1f} s")
        try:
            link = self.connect()
            if self.on_link is not None and not self.on_link(link):
                link.sock.close()
                raise DaemonUnavailable("the daemon's session is unusable for this engine (see the log)")
        except DaemonUnavailable as exc:
            self._next_try = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)
            if not self._warned:
                logger.warning("lmcache daemon unavailable (%s): lookups miss and stores are dropped until it is "
                               "back", exc)
                self._warned = True
            raise
        if self.link is not None:
            self._retired.append(self.link)
        self.link = link
        self._backoff = 0.1
        # Page-locking a large arena takes seconds: off the caller's path, while the keeper pings.
        # Until it is done, copies run from pageable memory (correct, slower).
        reg = threading.Thread(target=self._register, args=(link,), name="lmcache-arena-register", daemon=True)
        self._registering = [t for t in self._registering if t.is_alive()] + [reg]
        reg.start()
        if self._warned:
            logger.warning("lmcache daemon %s connected again (tenant %s)", self.address, link.tenant)
        self._warned = False
        with self._rel_lock:
            self._pending_rel.clear()  # slots of an earlier session died with it
        return link

    def _register(self, link: _Link) -> None:
        if self.device is None:
            link.registered.set()
            return
        t = time.monotonic()
        try:
            self.device.register_host(link.arena.tensor)
            link.register_ok = True
            logger.info("daemon arena (%d MiB) page-locked for device %s in %.1f s", link.arena.size >> 20,
                        self.device.name, time.monotonic() - t)
        except Exception as exc:  # noqa: BLE001 - unregistered memory still works, slower
            logger.warning("registering the daemon arena with device %s failed (%s); copies use pageable memory",
                           self.device.name, exc)
        finally:
            link.registered.set()

    def _reap_retired(self) -> None:
        """Unregister and unmap arenas of earlier sessions once no buffer of theirs is in use
        (a new mapping may reuse their addresses: they must not stay registered)."""
        keep = []
        for link in self._retired:
            if not link.registered.is_set() or self.live_in(link.generation):
                keep.append(link)
                continue
            if link.register_ok and self.device is not None:
                try:
                    self.device.unregister_host(link.arena.tensor)
                except Exception:  # noqa: BLE001
                    logger.exception("unregistering an old daemon arena failed")
        self._retired = keep

    def _drop(self, link: _Link, why: str) -> None:
        if self.link is link:
            self.link = None
            self.failures += 1
            self._next_try = time.monotonic() + self._backoff
            logger.warning("lmcache daemon connection lost (%s); lookups miss and stores are dropped until it "
                           "reconnects", why)
            self._warned = True
        try:
            link.sock.close()
        except OSError:
            pass

    # -- requests --------------------------------------------------------------------------
    def request(self, msg: dict[str, Any], *, link: _Link | None = None) -> dict[str, Any]:
        """One round trip. Raises DaemonUnavailable (connection trouble) or a refusal as
        :class:`Refusal`; the caller turns both into a miss."""
        with self._lock:
            cur = self.ensure()
            if link is not None and link is not cur:
                raise DaemonUnavailable("the session changed under this request")
            with self._rel_lock:
                if self._pending_rel:
                    msg = {**msg, "rel": self._pending_rel}
                    self._pending_rel = []
            try:
                protocol.send(cur.sock, msg)
                reply = protocol.recv(cur.sock)
            except (OSError, protocol.ProtocolError) as exc:
                self._drop(cur, f"{type(exc).__name__}: {exc}")
                raise DaemonUnavailable(str(exc)) from exc
            self.requests += 1
            self._last_request = time.monotonic()
        if not reply.get("ok"):
            raise Refusal(str(reply.get("error")))
        return reply

    def release_slots(self, generation: int, slots: Sequence[int]) -> None:
        link = self.link
        if link is None or link.generation != generation or not slots:
            return  # that session is gone; the daemon gave its slots back when it closed
        with self._rel_lock:
            self._pending_rel.extend(slots)

    def _keep_alive(self) -> None:
        while not self._stop.wait(RELEASE_FLUSH_S):
            if self._retired:
                self._reap_retired()
            link = self.link
            if link is None:
                continue
            idle = time.monotonic() - self._last_request
            with self._rel_lock:
                pending = bool(self._pending_rel)
            if pending or idle > link.lease_s / 3:
                try:
                    self.request({"op": "ping"}, link=link)
                except (DaemonUnavailable, Refusal):
                    pass

    def close(self) -> None:
        """Give back pending slot releases, end the session and stop this connection's threads.

        The keeper and any arena registration are joined (bounded), so none of them is still
        running when the interpreter exits: a daemon thread inside a native call that released
        the GIL aborts the whole process at finalisation ("terminate called without an active
        exception", pytorch/pytorch#38228)."""
        self._closed = True
        self._stop.set()
        link, self.link = self.link, None
        if link is not None:
            try:
                with self._lock:
                    with self._rel_lock:
                        rel, self._pending_rel = self._pending_rel, []
                    if rel:
                        protocol.send(link.sock, {"op": "ping", "rel": rel})
                        protocol.recv(link.sock)
            except (OSError, protocol.ProtocolError):
                pass
            link.sock.close()
        me = threading.current_thread()
        for t in [self._keeper, *self._registering]:
            if t is not me:
                t.join(timeout=self.timeout_s + 5)
                if t.is_alive():
                    logger.warning("lmcache daemon client: thread %s still running after close", t.name)


class Refusal(RuntimeError):
    """The daemon answered ``ok: false`` (logged; a miss for the engine)."""


class ClientArenaPool(BufferPool):
    """Buffers that are slots of the daemon's arena (current session). ``prepare(sizes)`` asks
    for a request's slots in one round trip; ``acquire`` hands them out (or asks for one)."""

    def __init__(self, conn: DaemonConnection) -> None:
        super().__init__(max_idle_bytes=0)
        self.conn = conn
        self._slots: dict[int, tuple[int, int]] = {}  # id(buf) -> (generation, slot)
        self._committed: set[int] = set()  # id(buf) of slots the daemon now owns
        self._ready: dict[int, list[tuple[int, int, int]]] = {}  # size -> [(generation, slot, offset)]

    def prepare(self, sizes: Sequence[int]) -> None:
        sizes = [round_up(max(n, 1)) for n in sizes]
        if len(sizes) < 2:
            return
        try:
            link = self.conn.ensure()
            reply = self.conn.request({"op": "alloc", "sizes": sizes}, link=link)
        except (DaemonUnavailable, Refusal):
            return
        with self._lock:
            for size, got in zip(sizes, reply["slots"]):
                if got is not None:
                    self._ready.setdefault(size, []).append((link.generation, got[0], got[1]))

    def wrap(self, link: _Link, slot: int, offset: int, nbytes: int) -> PooledBuffer:
        size = round_up(max(nbytes, 1))
        view = link.arena.view(offset, size)
        buf = PooledBuffer(self, view, view)
        with self._lock:
            self._slots[id(buf)] = (link.generation, slot)
            self._live.add(id(buf))
            self._live_bytes += size
            self.allocations += 1
        return buf

    def acquire(self, nbytes: int) -> PooledBuffer:
        size = round_up(max(nbytes, 1))
        link = self.conn.link
        with self._lock:
            ready = self._ready.get(size)
            while ready:
                gen, slot, off = ready.pop()
                if link is not None and gen == link.generation:
                    break
            else:
                gen = -1
        if link is not None and gen == link.generation:
            return self.wrap(link, slot, off, size)
        try:
            link = self.conn.ensure()
            reply = self.conn.request({"op": "alloc", "sizes": [size]}, link=link)
        except (DaemonUnavailable, Refusal) as exc:
            raise MemoryError(f"no daemon arena slot: {exc}") from exc
        got = reply["slots"][0]
        if got is None:
            raise MemoryError(f"the daemon's arena has no room for {size} bytes")
        return self.wrap(link, got[0], got[1], size)

    def unprepare(self) -> None:
        """Give back slots asked for and not used (a store cut short)."""
        with self._lock:
            ready, self._ready = self._ready, {}
        for items in ready.values():
            for gen, slot, _ in items:
                self.conn.release_slots(gen, [slot])

    def live_in_generation(self, generation: int) -> int:
        with self._lock:
            return sum(1 for gen, _ in self._slots.values() if gen == generation)

    def slot(self, buf: PooledBuffer) -> tuple[int, int] | None:
        with self._lock:
            return self._slots.get(id(buf))

    def mark_committed(self, buf: PooledBuffer) -> None:
        with self._lock:
            self._committed.add(id(buf))

    def _give_back(self, buf: PooledBuffer) -> None:
        with self._lock:
            self._live.discard(id(buf))
            self._live_bytes -= buf.capacity
            info = self._slots.pop(id(buf), None)
            committed = id(buf) in self._committed
            self._committed.discard(id(buf))
        if info is not None and not committed:
            self.conn.release_slots(info[0], [info[1]])

    def close(self) -> None:
        with self._lock:
            self._closed = True


class _DaemonStoreView:
    """What ``engine.tiers.tiers[i].store`` offers in daemon mode (clear, capabilities)."""

    name = "daemon"
    schemes = ("daemon",)
    # the daemon outlives engines and every client of the tenant sees its chunks
    capabilities = StoreCapabilities(persistent=True, shared=True, pinning=True)

    def __init__(self, tiers: "DaemonTiers") -> None:
        self._tiers = tiers

    def clear(self, namespace: Any = None, *, all_namespaces: bool = False) -> None:
        spaces = [namespace] if isinstance(namespace, bytes) else list(namespace or [])
        for ns in spaces:
            self._tiers._call({"op": "clear", "ns": ns}, None)


class _DaemonTier:
    name = "daemon"
    fast = False

    def __init__(self, tiers: "DaemonTiers") -> None:
        self.store = _DaemonStoreView(tiers)


class DaemonTiers:
    """The daemon's tiers, with :class:`~lmcache_core.tiers.TierStack`'s methods."""

    def __init__(self, config: "Config", metrics: Metrics, device: "Device | None" = None, *,
                 kind: str = "engine", namespaces: Callable[[], Sequence[Namespace]] = lambda: (),
                 geometry: "ChunkGeometry | None" = None) -> None:
        self.geometry = geometry
        self.address = parse_address(config.daemon)
        self.metrics = metrics
        self.namespaces = namespaces
        self._registered: dict[int, set[bytes]] = {}  # generation -> namespace ids the daemon accepted
        self.tenant: str | None = None
        self.expected_tenant: str | None = None
        self.conn = DaemonConnection(self.address, config.daemon_token_value(), kind=kind,
                                     timeout_s=config.daemon_timeout_ms / 1000, autostart=config.daemon_autostart,
                                     device=device, on_link=self._on_link)
        self.pool = ClientArenaPool(self.conn)
        self.conn.live_in = self.pool.live_in_generation
        self.local_pool = BufferPool()  # decoded copies of encoded chunks
        self.tiers = [_DaemonTier(self)]
        self.dropped = 0
        self.kept = "none"  # the engine's kv_codec wire id: its chunks are read still coded

    def keep_coded(self, wire: str) -> None:
        """Reads hand chunks of the device codec ``wire`` over still coded (``kv_codec``)."""
        chunkmod.keep_coded(self.pool, wire)
        chunkmod.keep_coded(self.local_pool, wire)
        self.kept = wire

    # -- sessions and namespaces -----------------------------------------------------------
    def _on_link(self, link: _Link) -> bool:
        if self.expected_tenant is not None and link.tenant != self.expected_tenant:
            logger.error("the daemon token belongs to tenant %r but this engine's keys are in tenant %r; set "
                         "tenant: %s (or leave it unset) and restart the engine", link.tenant,
                         self.expected_tenant, link.tenant)
            return False
        self.tenant = link.tenant
        self._registered[link.generation] = set()
        return True

    def connect(self) -> str | None:
        """Try a session now; the daemon's name for our tenant, or None when none answers."""
        try:
            return self.conn.ensure().tenant
        except DaemonUnavailable:
            return None

    def _register(self, link: _Link, wanted: set[bytes]) -> bool:
        done = self._registered.setdefault(link.generation, set())
        missing = wanted - done
        if not missing:
            return True
        for ns in self.namespaces():
            if ns.id not in missing:
                continue
            msg = {"op": "ns", "model": ns.model, "layout": ns.layout, "salt": ns.salt, "shard": ns.shard}
            if ns.codec:  # kv_codec: a daemon without codec namespaces answers another id (misses)
                msg["codec"] = ns.codec
            reply = self.conn.request(msg, link=link)
            if reply["id"] != ns.id:
                logger.error("the daemon registered namespace %s as %s (tenant %s vs ours %s); treating as misses",
                             ns.id.hex(), bytes(reply["id"]).hex(), reply.get("tenant"), ns.tenant)
                continue
            done.add(ns.id)
        return wanted <= done

    def _exchange(self, msg: dict[str, Any], keys: Sequence[ChunkKey] = (),
                  link: _Link | None = None) -> tuple[dict[str, Any] | None, _Link | None]:
        """One request on ``link`` (or the current session): the reply, None for a miss, and the
        session that answered (slot offsets in a reply are offsets into that session's arena)."""
        try:
            link = link or self.conn.ensure()
            if keys and not self._register(link, {k.namespace for k in keys}):
                return None, link
            return self.conn.request(msg, link=link), link
        except DaemonUnavailable:
            return None, link
        except Refusal as exc:
            logger.warning("daemon refused %s: %s", msg.get("op"), exc)
            return None, link

    def _call(self, msg: dict[str, Any], default: Any, keys: Sequence[ChunkKey] = (), *,
              link: _Link | None = None) -> Any:
        reply, _ = self._exchange(msg, keys, link)
        return default if reply is None else reply

    # -- the TierStack API -----------------------------------------------------------------
    def lookup(self, keys: Sequence[ChunkKey], *, fast_only: bool = False, pin: bool = False) -> Presence:
        if not keys:
            return Presence(0, ())
        reply = self._call({"op": "lookup", "keys": [k.to_bytes() for k in keys], "fast": fast_only, "pin": pin},
                           None, keys)
        if reply is None:
            return Presence(0, ())
        hits = min(int(reply["hits"]), len(keys))
        return Presence(hits, tuple(str(t) for t in reply["tiers"][:hits]))

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        self.lookup(keys, pin=True)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        if keys:
            self._call({"op": "unpin", "keys": [k.to_bytes() for k in keys]}, None, keys)

    def get(self, key: ChunkKey) -> tuple[ChunkBuffer, str] | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[tuple[ChunkBuffer, str] | None]:
        if not keys:
            return []
        reply, link = self._exchange({"op": "get", "keys": [k.to_bytes() for k in keys]}, keys)
        if reply is None or link is None:
            return [None] * len(keys)
        out: list[tuple[ChunkBuffer, str] | None] = []
        for key, item in zip(keys, reply["items"]):
            if item is None:
                out.append(None)
                continue
            try:
                slot, offset, nbytes, tier = item[:4]
                buf = self.pool.wrap(link, slot, offset, nbytes)
            except (ValueError, TypeError) as exc:  # a bad slot: the daemon is confused; a miss
                logger.warning("daemon returned a bad slot for %s (%s)", key, exc)
                if isinstance(item, list) and item and isinstance(item[0], int):
                    self.conn.release_slots(link.generation, [item[0]])
                out.append(None)
                continue
            chunk = self._accept(buf, key, nbytes, tier, item[4:])
            out.append(None if chunk is None else (chunk, tier))
        return out

    def _fast_header(self, buf: PooledBuffer, key: ChunkKey, nbytes: int, info: Sequence[Any]) -> ChunkHeader | None:
        """The header as the daemon describes it (it verified the image), when it is a plain chunk
        of this engine's layout and the slot's header carries our key; else None (parse it)."""
        g = self.geometry
        if g is None or len(info) != 5:
            return None
        num_tokens, codec, payload_len, stored_len, signature = info
        if codec not in ("none", self.kept) or signature != g.signature or type(num_tokens) is not int:
            return None
        if key.num_tokens and num_tokens != key.num_tokens:
            return None
        want = payload_len if codec == "none" else chunkmod.coded_len(g, num_tokens, codec)
        if payload_len != g.nbytes(num_tokens) or stored_len != want or HEADER_SIZE + stored_len != nbytes:
            return None
        head = bytes(buf.memoryview(0, 512))
        if head[:4] != MAGIC or key.to_bytes() not in head:
            return None
        return ChunkHeader(ChunkKey(key.namespace, key.digest, num_tokens), g, num_tokens, codec, payload_len,
                           stored_len, b"")

    def _accept(self, buf: PooledBuffer, key: ChunkKey, nbytes: int, tier: str,
                info: Sequence[Any] = ()) -> ChunkBuffer | None:
        """Check the header in the slot names the key we asked for; the daemon verified the whole
        image when it was committed. Encoded images are verified and decoded into local memory."""
        try:
            fast = self._fast_header(buf, key, nbytes, info)
            if fast is not None:
                if fast.codec != "none":  # the daemon checked the tag; the device needs a sound stream
                    chunkmod.check_kept(fast, buf.view(HEADER_SIZE, fast.stored_len))
                self.metrics.bytes.labels(f"daemon:{tier}", "read").inc(nbytes)
                return ChunkBuffer(buf, fast)
            header = decode_header(buf.memoryview(0, HEADER_SIZE))
            if key.num_tokens and header.num_tokens != key.num_tokens:
                raise ChunkError(f"slot holds {header.key} of {header.num_tokens} tokens, asked for {key}")
            if header.key != key and not _lossy_form_of(header, key):
                raise ChunkError(f"slot holds {header.key}, asked for {key}")
            if header.image_len != nbytes:
                raise ChunkError(f"slot image is {nbytes} bytes, its header says {header.image_len}")
            if header.codec != "none":
                chunk = decode_image(buf, nbytes, header.key, self.local_pool)
                return chunk
        except ChunkError as exc:
            self.metrics.corrupt.labels(f"daemon:{tier}").inc()
            logger.warning("chunk %s from the daemon fails its check (%s); a miss", key, exc)
            buf.release()
            return None
        self.metrics.bytes.labels(f"daemon:{tier}", "read").inc(header.image_len)
        return ChunkBuffer(buf, header)

    def put(self, key: ChunkKey, chunk: ChunkBuffer) -> None:
        self.put_many([(key, chunk)])

    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkBuffer]]) -> list[bool]:
        """Publish gathered, sealed chunks (their slots become the daemon's). Takes no
        ownership: the caller still releases each chunk."""
        link = self.conn.link
        commits: list[list[Any]] = []
        owners: list[PooledBuffer] = []
        for key, chunk in items:
            self.metrics.stored_tokens.inc(chunk.num_tokens)
            info = self.pool.slot(chunk.buf)
            if link is None or info is None or info[0] != link.generation:
                self._drop(1, "its slot belongs to an earlier daemon session")
                continue
            commits.append([info[1], key.to_bytes(), key.num_tokens, chunk.header.image_len])
            owners.append(chunk.buf)
        if not commits:
            return [False] * len(items)
        # the slots change hands now: a lost reply must not make us release what the daemon owns
        for buf in owners:
            self.pool.mark_committed(buf)
        # only to the session that owns these slots (a reconnect in between makes it a dropped store)
        reply = self._call({"op": "commit", "items": commits}, None, [k for k, _ in items], link=link)
        if reply is None:
            self._drop(len(commits), "the daemon did not take the commit")
            return [False] * len(items)
        stored = [bool(x) for x in reply["stored"]]
        self.metrics.bytes.labels("daemon", "write").inc(sum(c[3] for c, ok in zip(commits, stored) if ok))
        if not all(stored):
            self._drop(stored.count(False), "the daemon refused it")
        return stored

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        self.metrics.dropped.labels("daemon").inc(n)
        logger.info("%d chunk store(s) dropped: %s", n, why)

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        reply = self._call({"op": "delete", "keys": [k.to_bytes() for k in keys]}, None, keys)
        return int(reply["n"]) if reply else 0

    def flush(self, timeout: float | None = None) -> bool:
        reply = self._call({"op": "flush", "timeout": float(min(timeout or 60.0, 3600.0))}, None)
        return bool(reply and reply.get("done"))

    def stats(self) -> dict[str, Any] | None:
        reply = self._call({"op": "stats"}, None)
        return reply["stats"] if reply else None

    def by_name(self, name: str) -> Any:
        raise KeyError(f"daemon mode has no in-process tier {name!r}; the daemon owns the tiers")

    def futures_pending(self) -> int:
        return 0

    def close(self) -> None:
        self.pool.unprepare()
        self.conn.close()


def _lossy_form_of(header: ChunkHeader, key: ChunkKey) -> bool:
    """Whether ``header`` is the chunk of ``key`` as a daemon tier with a lossy codec keeps it:
    the same digest under that codec's namespace of ``key``'s (what the daemon's tier stack
    serves for ``key``, marking the request's KV inexact on its side)."""
    from .. import codecs

    if header.key.digest != key.digest:
        return False
    try:
        chain = codecs.REGISTRY.chain_for_wire(header.codec)
    except Exception:  # noqa: BLE001 - an unknown wire id is no lossy form of anything
        return False
    return not chain.lossless and codecs.lossy_namespace(key.namespace, chain) == header.key.namespace


def check_tenant(config: "Config", tenant: str | None) -> str:
    """The tenant this engine's keys use: the daemon's answer; a config that names another is an error."""
    if tenant is None:
        return config.tenant
    if config.tenant not in ("default", tenant):
        raise ConfigError(f"tenant: the config says {config.tenant!r} but the daemon token belongs to tenant "
                          f"{tenant!r}; remove the tenant key (the token decides) or use that tenant's token")
    return tenant
