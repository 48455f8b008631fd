"""The daemon: tenants' arenas and tier stacks, and the socket server engines talk to.

One thread per connection (engines hold one connection per process and ask little per
request step); every handler runs on validated messages (:func:`protocol.check_request`)
and answers ``{"ok": False, "error": ...}`` for what it refuses. A session owns what it
allocated, fetched and pinned; all of it is given back the moment its socket closes, or
when it stays silent past the lease (a hung client).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from .. import chunk as chunkmod
from ..chunk import ChunkBuffer
from ..config import Config
from ..errors import ChunkError, ConfigError
from ..keys import ChunkKey, Namespace, chunk_keys
from ..memory import PooledBuffer
from ..metrics import Metrics
from ..plugins import PluginManager, build_stores, get_plugin_manager
from ..storage import StoreContext
from ..tiers import TierStack
from . import protocol
from .arena import Arena, ArenaPool, ExtentAllocator
from .settings import ServeSettings, TenantSettings, split_hostport

logger = logging.getLogger(__name__)
ORIGINS_KEPT = 1 << 16  # chunks whose origin (who stored it, when) the stats can trace


@dataclass
class Tenant:
    settings: TenantSettings
    arena: Arena
    alloc: ExtentAllocator
    pool: ArenaPool
    tiers: TierStack
    metrics: Metrics
    #: namespace id -> Namespace, for every namespace a session of this tenant registered
    namespaces: dict[bytes, Namespace] = field(default_factory=dict)
    #: chunk key -> (model, client kind, pid, time stored), newest last, bounded
    origins: "collections.OrderedDict[ChunkKey, tuple[str, str, int, float]]" = field(
        default_factory=collections.OrderedDict)
    admin_pins: "collections.Counter[ChunkKey]" = field(default_factory=collections.Counter)
    ttl_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    committer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="lmcache-daemon-commit"))
    committing: int = 0
    commit_cv: threading.Condition = field(default_factory=threading.Condition)

    @property
    def name(self) -> str:
        return self.settings.name


@dataclass
class Session:
    id: int
    tenant: Tenant
    kind: str
    pid: int
    peer: str
    slots: dict[int, PooledBuffer | ChunkBuffer] = field(default_factory=dict)
    pins: "collections.Counter[ChunkKey]" = field(default_factory=collections.Counter)
    namespaces: set[bytes] = field(default_factory=set)
    next_slot: int = 1
    last_seen: float = field(default_factory=time.monotonic)
    sock: socket.socket | None = None
    after_reply: Any = None  # work a handler queues for after its reply is sent

    def hang_up(self) -> None:
        """End the connection; its handler thread then gives everything back."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def new_slot(self, obj: PooledBuffer | ChunkBuffer) -> int:
        sid = self.next_slot
        self.next_slot += 1
        self.slots[sid] = obj
        return sid


class Refused(Exception):
    """A request the daemon declines (answered, logged; the session goes on)."""


class Daemon:
    def __init__(self, settings: ServeSettings, config: Config | None = None,
                 plugins: PluginManager | None = None) -> None:
        self.settings = settings
        self.config = config or Config.load()
        self.plugins = plugins or get_plugin_manager()
        self.tenants: dict[str, Tenant] = {}
        self.sessions: dict[int, Session] = {}
        self._next_session = 1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._audit_file = open(settings.audit_log, "a", buffering=1) if settings.audit_log else None  # noqa: SIM115
        self.refused = collections.Counter[str]()
        self.started = time.time()
        self.lookup_seconds: collections.deque[float] = collections.deque(maxlen=4096)
        self.admin = None
        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry()
        self.hit_tokens = Counter("lmcache_daemon_hit_tokens", "Tokens served to clients, by tenant, model and tier",
                                  ["tenant", "model", "tier"], registry=self.registry)
        self.lookup_chunks = Counter("lmcache_daemon_lookup_chunks", "Chunks asked for in lookups",
                                     ["tenant", "model"], registry=self.registry)
        self.lookup_hits = Counter("lmcache_daemon_lookup_hit_chunks", "Chunks found by lookups, by tier",
                                   ["tenant", "model", "tier"], registry=self.registry)
        for ts in settings.tenants:
            self.tenants[ts.name] = self._make_tenant(ts)

    # -- tenants ---------------------------------------------------------------------------
    def _tier_urls(self, tenant: str) -> tuple[int, list[str]]:
        """The memory tier's capacity and the other tiers' URLs for ``tenant`` (a disk tier gets
        a directory per tenant, so quotas and clears never cross tenants)."""
        memory = 0
        others: list[str] = []
        for url in self.config.tiers:
            scheme, _, rest = url.partition("://")
            if scheme.lower() == "memory":
                from ..storage import parse_url

                memory = parse_url(url).size_option("capacity", 0) or 0
                continue
            if scheme.lower() == "disk":
                path, q, query = rest.partition("?")
                url = f"{scheme}://{path.rstrip('/')}/{tenant}{q}{query}"
            others.append(url)
        return memory, others

    def _make_tenant(self, ts: TenantSettings) -> Tenant:
        from ..builtin.memory_store import MemoryStore

        tier_memory, others = self._tier_urls(ts.name)
        memory = ts.memory or tier_memory or self.settings.memory
        arena = Arena.create(int(memory * (1 + self.settings.headroom)), ts.name, self.settings.arena_dir,
                             populate=self.settings.populate)
        alloc = ExtentAllocator(arena.size)
        pool = ArenaPool(arena, alloc.alloc, lambda off, _n: alloc.free(off))
        chunkmod.bind_integrity_key(pool, self.config.integrity_secret())
        # chunks an engine's device coded (kv_codec) are stored and served as they are: verified
        # (tag and stream), never decoded here; the client's device decodes them
        chunkmod.keep_coded(pool, *chunkmod.device_codecs())
        metrics = Metrics()
        ctx = StoreContext(pool, {**self.config.to_dict(), "tenant": ts.name},  # a p2p tier lends this tenant's only
                           on_evict=lambda tier, n: metrics.evictions.labels(tier).inc(n),
                           on_write=lambda tier, n: metrics.bytes.labels(tier, "write").inc(n),
                           on_skip=lambda tier, n: metrics.skipped_writes.labels(tier).inc(n))
        # one call, so that tiers working with the others of their stack see them all (p2p lends from memory)
        stores = build_stores([f"memory://?capacity={memory}", *others], self.plugins, ctx)
        if not isinstance(stores[0], MemoryStore):
            raise ConfigError(f"the daemon's first tier must be its memory tier, got {stores[0].name}")
        tiers = TierStack(stores, metrics, queue_size=self.config.store_queue_size,
                          writer_threads=self.config.writer_threads, reader_threads=self.config.reader_threads,
                          promote=self.config.promote)
        logger.info("tenant %s: arena %d MiB, memory tier %d MiB, tiers %s", ts.name, arena.size >> 20,
                    memory >> 20, [t.name for t in tiers.tiers])
        return Tenant(ts, arena, alloc, pool, tiers, metrics, ttl_s=ts.ttl_s)

    # -- audit -----------------------------------------------------------------------------
    def audit(self, who: str, what: str, result: str, **details: Any) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "who": who, "what": what,
                 "result": result, **details}
        logger.warning("audit: %s", json.dumps(entry)) if result != "ok" else logger.info("audit: %s",
                                                                                           json.dumps(entry))
        if self._audit_file is not None:
            try:
                self._audit_file.write(json.dumps(entry) + "\n")
            except OSError:
                logger.exception("audit log write failed")

    # -- serving ---------------------------------------------------------------------------
    def start(self) -> "Daemon":
        path = self.settings.socket
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise ConfigError(f"serve.socket: {path!r} exists and is not a socket; choose another path")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a stale socket from a daemon that died
            else:
                probe.close()
                raise ConfigError(f"serve.socket: a daemon already listens on {path!r}")
            finally:
                probe.close()
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~self.settings.socket_mode)
        try:
            unix.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, self.settings.socket_mode)
        unix.listen(128)
        self._listeners.append(unix)
        if self.settings.tcp:
            host, port = split_hostport(self.settings.tcp)
            tcp = socket.create_server((host, port), reuse_port=False)
            self._listeners.append(tcp)
        for lst in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(lst,), name="lmcache-daemon-accept", daemon=True)
            t.start()
            self._threads.append(t)
        reaper = threading.Thread(target=self._reap_loop, name="lmcache-daemon-reaper", daemon=True)
        reaper.start()
        self._threads.append(reaper)
        if self.settings.http:
            from .admin import AdminServer

            self.admin = AdminServer(self, self.settings.http).start()
        logger.info("lmcache daemon listening on %s%s%s", path,
                    f" and tcp {self.settings.tcp}" if self.settings.tcp else "",
                    f"; admin API on http://{self.admin.address}" if self.admin else "")
        return self

    def _accept_loop(self, lst: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = lst.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_conn, args=(conn, addr, lst.family), daemon=True,
                             name="lmcache-daemon-conn").start()

    def _reap_loop(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self._lock:
                stale = [s for s in self.sessions.values() if now - s.last_seen > self.settings.lease_s]
            for s in stale:
                logger.warning("session %d (%s pid %d) silent for %.0f s: lease expired, reclaiming", s.id,
                               s.kind, s.pid, now - s.last_seen)
                s.hang_up()
            for tenant in self.tenants.values():
                if tenant.ttl_s:
                    self._expire(tenant, time.time() - tenant.ttl_s)

    def _expire(self, tenant: Tenant, before: float) -> None:
        with tenant.lock:
            old = []
            for key, origin in tenant.origins.items():
                if origin[3] >= before:
                    break
                old.append(key)
        if old:
            tenant.tiers.delete(old)
            with tenant.lock:
                for key in old:
                    tenant.origins.pop(key, None)

    def stop(self) -> None:
        self._stop.set()
        for lst in self._listeners:
            try:
                lst.close()
            except OSError:
                pass
        if self.admin is not None:
            self.admin.stop()
        with self._lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            s.hang_up()
        for tenant in self.tenants.values():
            self.wait_commits(tenant, 30)
            tenant.committer.shutdown(wait=True)
            tenant.tiers.flush(30)
            tenant.tiers.close()
            tenant.arena.close()
        try:
            os.unlink(self.settings.socket)
        except OSError:
            pass
        if self._audit_file is not None:
            self._audit_file.close()

    # -- one connection --------------------------------------------------------------------
    def _serve_conn(self, conn: socket.socket, addr: Any, family: int) -> None:
        peer = self._peer(conn, addr, family)
        session: Session | None = None
        try:
            session = self._handshake(conn, peer, family)
            if session is None:
                return
            while not self._stop.is_set():
                try:
                    msg = protocol.recv(conn)
                except protocol.Closed:
                    return
                session.last_seen = time.monotonic()
                try:
                    op = protocol.check_request(msg)
                    reply = self._dispatch(session, op, msg)
                except protocol.ProtocolError as exc:
                    self._refuse(peer, session, str(exc))
                    protocol.send(conn, {"ok": False, "error": f"protocol error: {exc}"})
                    return  # a peer that breaks the protocol is cut off; the others go on
                except Refused as exc:
                    reply = {"ok": False, "error": str(exc)}
                if "id" in msg:
                    reply["id"] = msg["id"]
                try:
                    protocol.send(conn, reply)
                finally:
                    after, session.after_reply = session.after_reply, None
                    if after is not None:
                        after()
        except protocol.ProtocolError as exc:
            self._refuse(peer, session, str(exc))
            try:
                protocol.send(conn, {"ok": False, "error": f"protocol error: {exc}"})
            except OSError:
                pass
        except OSError as exc:
            logger.info("connection from %s ended: %s", peer, exc)
        except Exception:  # noqa: BLE001 - one bad session must never take the daemon down
            logger.exception("session from %s failed; closing it", peer)
        finally:
            if session is not None:
                self._close_session(session)
            try:
                conn.close()
            except OSError:
                pass

    @staticmethod
    def _peer(conn: socket.socket, addr: Any, family: int) -> str:
        if family == socket.AF_UNIX:
            try:
                import struct

                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                pid, uid, _gid = struct.unpack("3i", creds)
                return f"unix:pid={pid},uid={uid}"
            except OSError:
                return "unix"
        return f"tcp:{addr[0]}:{addr[1]}"

    def _refuse(self, peer: str, session: Session | None, reason: str) -> None:
        self.refused[reason.split(":")[0][:60]] += 1
        who = f"{session.tenant.name}/{session.kind}" if session else "unauthenticated"
        self.audit(who, "request", "refused", peer=peer, reason=reason)

    def _handshake(self, conn: socket.socket, peer: str, family: int) -> Session | None:
        conn.settimeout(10)
        msg = protocol.recv(conn)
        conn.settimeout(None)
        op = protocol.check_request(msg)
        if op != "hello":
            raise protocol.ProtocolError(f"the first message must be hello, got {op!r}")
        if msg["v"] != protocol.PROTOCOL_VERSION:
            reason = (f"protocol version {msg['v']} is not spoken here (this daemon speaks "
                      f"{protocol.PROTOCOL_VERSION}); run the same lmcache-core version on both sides")
            self._refuse(peer, None, reason)
            protocol.send(conn, {"ok": False, "error": reason})
            return None
        ts = self.settings.tenant_for_token(msg["token"])
        if ts is None:
            reason = "no tenant has this token" if msg["token"] else "this daemon needs a tenant token (daemon_token)"
            self._refuse(peer, None, reason)
            protocol.send(conn, {"ok": False, "error": f"refused: {reason}"})
            return None
        tenant = self.tenants[ts.name]
        with self._lock:
            sid = self._next_session
            self._next_session += 1
            session = Session(sid, tenant, msg["kind"][:32], msg["pid"], peer, sock=conn)
            self.sessions[sid] = session
        reply = {"ok": True, "v": protocol.PROTOCOL_VERSION, "tenant": tenant.name, "session": sid,
                 "arena_size": tenant.arena.size, "arena_path": tenant.arena.path, "lease_s": self.settings.lease_s,
                 "chunk_size": self.config.chunk_size}
        if not tenant.arena.path and family != socket.AF_UNIX:
            protocol.send(conn, {"ok": False, "error": "TCP clients need serve.arena_dir on the daemon"})
            return None
        protocol.send(conn, reply, fds=None if tenant.arena.path else [tenant.arena.fd])
        logger.info("session %d: %s pid %d of tenant %s (%s)", sid, session.kind, session.pid, tenant.name, peer)
        return session

    def _close_session(self, s: Session) -> None:
        with self._lock:
            self.sessions.pop(s.id, None)
        slots, s.slots = s.slots, {}
        for obj in slots.values():
            obj.release()
        pins, s.pins = s.pins, collections.Counter()
        if pins:
            s.tenant.tiers.unpin(list(pins.elements()))
        logger.info("session %d closed: %d slots and %d pins given back", s.id, len(slots), sum(pins.values()))

    # -- requests --------------------------------------------------------------------------
    def _keys(self, s: Session, raw: Iterable[bytes]) -> list[ChunkKey]:
        keys = [ChunkKey.from_bytes(k) for k in raw]
        for k in keys:
            if k.namespace not in s.namespaces:
                self._refuse(s.peer, s, f"key in namespace {k.namespace.hex()} not registered by this session")
                raise Refused("a key's namespace is not one this session registered (op ns); keys are only "
                              "valid in the tenant's own namespaces")
        return keys

    def _dispatch(self, s: Session, op: str, msg: dict[str, Any]) -> dict[str, Any]:
        for sid in msg.get("rel", ()):
            obj = s.slots.pop(sid, None)
            if obj is not None:
                obj.release()
        handler = getattr(self, f"_op_{op}", None)
        if handler is None or op == "hello":
            raise protocol.ProtocolError(f"op {op!r} is not valid after the handshake")
        return handler(s, msg)

    @staticmethod
    def _model(tenant: Tenant, key: ChunkKey) -> str:
        ns = tenant.namespaces.get(key.namespace)
        return ns.model if ns is not None else "?"

    def _op_ping(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    def _op_ns(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        codec = msg.get("codec", "")  # a client's kv_codec: its chunks live in that codec's namespace
        if codec and codec not in chunkmod.device_codecs():
            raise Refused(f"namespace codec {codec!r} is not a device codec; device codecs: "
                          f"{', '.join(chunkmod.device_codecs())}")
        try:
            ns = Namespace(msg["model"], msg["layout"], s.tenant.name, msg["salt"], msg["shard"], codec)
        except ConfigError as exc:
            raise Refused(str(exc)) from None
        s.namespaces.add(ns.id)
        with s.tenant.lock:
            s.tenant.namespaces[ns.id] = ns
        return {"ok": True, "id": ns.id, "tenant": s.tenant.name}

    def _op_lookup(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        keys = self._keys(s, msg["keys"])
        presence = s.tenant.tiers.lookup(keys, fast_only=msg["fast"])
        if not msg["fast"] and keys:
            model = self._model(s.tenant, keys[0])
            self.lookup_chunks.labels(s.tenant.name, model).inc(len(keys))
            for tier in set(presence.tiers):
                self.lookup_hits.labels(s.tenant.name, model, tier).inc(presence.tiers.count(tier))
        if msg["pin"] and presence.hits:
            hit = keys[: presence.hits]
            s.tenant.tiers.pin(hit)
            s.pins.update(hit)
        self.lookup_seconds.append(time.perf_counter() - t0)
        return {"ok": True, "hits": presence.hits, "tiers": list(presence.tiers)}

    def _op_unpin(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        keys = self._keys(s, msg["keys"])
        pins = s.pins
        mine = []
        for k in keys:
            n = pins.get(k, 0)
            if n:
                mine.append(k)
                if n == 1:
                    del pins[k]
                else:
                    pins[k] = n - 1
        if mine:
            s.tenant.tiers.unpin(mine)
        return {"ok": True}

    def _op_get(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        keys = self._keys(s, msg["keys"])
        items: list[Any] = []
        tenant = s.tenant
        served: collections.Counter[tuple[str, str]] = collections.Counter()
        for key, got in zip(keys, tenant.tiers.get_many(keys)):
            if got is None:
                items.append(None)
                continue
            chunk, tier = got
            if chunk.buf._pool is not tenant.pool:  # a store that allocated elsewhere: copy into the arena
                try:
                    buf = tenant.pool.acquire(chunk.header.image_len)
                except MemoryError:
                    chunk.release()
                    items.append(None)
                    continue
                buf.view(0, chunk.header.image_len).copy_(chunk.buf.view(0, chunk.header.image_len))
                chunk.release()
                chunk = ChunkBuffer(buf, chunk.header)
            served[(self._model(tenant, key), tier)] += chunk.num_tokens
            sid = s.new_slot(chunk)
            h = chunk.header  # verified at commit (or by the tier that read it): the client need not parse it
            items.append([sid, tenant.pool.offset(chunk.buf), h.image_len, tier, h.num_tokens, h.codec,
                          h.payload_len, h.stored_len, h.geometry.signature])
        for (model, tier), n in served.items():
            self.hit_tokens.labels(tenant.name, model, tier).inc(n)
        return {"ok": True, "items": items}

    def _op_alloc(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        out: list[Any] = []
        for size in msg["sizes"]:
            try:
                buf = s.tenant.pool.acquire(size)
            except MemoryError:
                s.tenant.metrics.dropped.labels("arena").inc()
                out.append(None)
                continue
            out.append([s.new_slot(buf), s.tenant.pool.offset(buf)])
        return {"ok": True, "slots": out}

    def _op_commit(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        """Take the slots over now (they are the daemon's from here on, whatever happens to the
        client) and answer; verifying and publishing run on the tenant's committer thread, off
        the client's path. A chunk becomes visible once it is verified, never before."""
        tenant = s.tenant
        accepted: list[bool] = []
        batch: list[tuple[PooledBuffer, ChunkKey, int]] = []
        for sid, _, _, _ in msg["items"]:
            if not isinstance(s.slots.get(sid), PooledBuffer):
                raise Refused(f"slot {sid} is not a slot this session allocated")
        for sid, raw_key, num_tokens, nbytes in msg["items"]:
            buf = s.slots.pop(sid)
            key = ChunkKey.from_bytes(raw_key, num_tokens)
            if key.namespace not in s.namespaces:
                buf.release()  # type: ignore[union-attr]
                self._refuse(s.peer, s, f"commit into namespace {key.namespace.hex()} not registered")
                accepted.append(False)
                continue
            batch.append((buf, key, nbytes))  # type: ignore[arg-type]
            accepted.append(True)
        if batch:
            with tenant.commit_cv:
                tenant.committing += 1

            def publish() -> None:
                tenant.committer.submit(self._publish, tenant, batch, s.kind, s.pid, s.id)

            s.after_reply = publish  # the reply goes out before the committer competes for the GIL
        return {"ok": True, "stored": accepted}

    def _publish(self, tenant: Tenant, batch: list[tuple[PooledBuffer, ChunkKey, int]], kind: str, pid: int,
                 sid: int) -> None:
        try:
            now = time.time()
            for buf, key, nbytes in batch:
                try:
                    chunk = chunkmod.decode_image(buf, nbytes, key, tenant.pool)  # verified once, here
                except ChunkError as exc:
                    tenant.metrics.corrupt.labels("commit").inc()
                    logger.warning("session %d committed a bad chunk %s (%s); not stored", sid, key, exc)
                    continue
                try:
                    tenant.tiers.put(key, chunk)
                except Exception:  # noqa: BLE001 - one failed put is one future miss
                    logger.exception("storing chunk %s failed", key)
                finally:
                    chunk.release()
                ns = tenant.namespaces.get(key.namespace)
                with tenant.lock:
                    tenant.origins[key] = (ns.model if ns else "?", kind, pid, now)
                    tenant.origins.move_to_end(key)
                    while len(tenant.origins) > ORIGINS_KEPT:
                        tenant.origins.popitem(last=False)
        finally:
            with tenant.commit_cv:
                tenant.committing -= 1
                tenant.commit_cv.notify_all()

    def wait_commits(self, tenant: Tenant, timeout: float) -> bool:
        with tenant.commit_cv:
            return tenant.commit_cv.wait_for(lambda: tenant.committing == 0, timeout)

    def _op_delete(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "n": s.tenant.tiers.delete(self._keys(s, msg["keys"]))}

    def _op_clear(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        if msg["ns"] not in s.namespaces:
            raise Refused("clear: not a namespace this session registered")
        self.clear_namespaces(s.tenant, [msg["ns"]])
        return {"ok": True}

    def _op_flush(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + float(msg["timeout"])
        done = self.wait_commits(s.tenant, float(msg["timeout"]))
        return {"ok": True, "done": done and s.tenant.tiers.flush(max(0.0, deadline - time.monotonic()))}

    def _op_stats(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "stats": self.tenant_stats(s.tenant)}

    # -- admin operations (the HTTP API calls these) ---------------------------------------
    def clear_namespaces(self, tenant: Tenant, namespaces: Iterable[bytes], *, memory_only: bool = False) -> None:
        ns = list(namespaces)
        for tier in tenant.tiers.tiers:
            if memory_only and not tier.fast:
                continue
            try:
                tier.store.clear(namespace=ns)
            except NotImplementedError:
                logger.info("tier %s of tenant %s cannot be cleared", tier.name, tenant.name)
        with tenant.lock:
            for key in [k for k in tenant.origins if k.namespace in ns]:
                del tenant.origins[key]

    def namespaces_of(self, tenant: Tenant, model: str | None = None) -> list[Namespace]:
        with tenant.lock:
            return [ns for ns in tenant.namespaces.values() if model is None or ns.model == model]

    def prefix_keys(self, tenant: Tenant, tokens: list[int], model: str | None = None) -> list[ChunkKey]:
        keys: list[ChunkKey] = []
        for ns in self.namespaces_of(tenant, model):
            keys += chunk_keys(tokens, ns, self.config.chunk_size, save_partial=self.config.save_partial,
                               algorithm=self.config.hash_algorithm)
        return keys

    def tenant_stats(self, tenant: Tenant) -> dict[str, Any]:
        with self._lock:
            sessions = [s for s in self.sessions.values() if s.tenant is tenant]
        usage = {t.name: t.store.usage().__dict__ for t in tenant.tiers.tiers}
        return {
            "arena_bytes": tenant.arena.size, "arena_used": tenant.alloc.used, "arena_slots": tenant.alloc.held(),
            "sessions": len(sessions), "session_slots": sum(len(s.slots) for s in sessions),
            "session_pins": sum(sum(s.pins.values()) for s in sessions), "tiers": usage,
            "models": sorted({ns.model for ns in self.namespaces_of(tenant)}),
            "metrics": tenant.metrics.snapshot(), "ttl_s": tenant.ttl_s,
        }

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.lookup_seconds)
        return {
            "uptime_s": round(time.time() - self.started, 1), "protocol": protocol.PROTOCOL_VERSION,
            "refused": dict(self.refused),
            "lookup_ms_p50": round(lat[len(lat) // 2] * 1e3, 3) if lat else None,
            "lookup_ms_p99": round(lat[int(len(lat) * 0.99)] * 1e3, 3) if lat else None,
            "tenants": {name: self.tenant_stats(t) for name, t in self.tenants.items()},
        }

    def latency_families(self) -> Any:
        from prometheus_client.core import HistogramMetricFamily

        bounds = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, float("inf"))
        samples = list(self.lookup_seconds)
        buckets = [(("+Inf" if b == float("inf") else str(b)), sum(1 for s in samples if s <= b)) for b in bounds]
        yield HistogramMetricFamily("lmcache_daemon_lookup_seconds",
                                    "Daemon-side lookup latency (the last 4096 lookups)",
                                    buckets=buckets, sum_value=sum(samples))

    def trace(self, tenant: Tenant, key: ChunkKey) -> dict[str, Any]:
        """Where a chunk is and who stored it."""
        with tenant.lock:
            origin = tenant.origins.get(key)
        held = [t.name for t in tenant.tiers.tiers if t.store.exists([key])[0]]
        out: dict[str, Any] = {"key": key.path, "tiers": held}
        if origin:
            out.update(model=origin[0], stored_by=origin[1], pid=origin[2],
                       stored_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(origin[3])))
        return out


def serve_forever(daemon: Daemon) -> None:
    """Run until SIGTERM/SIGINT; then flush the tiers and remove the socket."""
    import signal

    done = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    daemon.start()
    try:
        while not done.wait(1.0):
            pass
    finally:
        daemon.stop()
