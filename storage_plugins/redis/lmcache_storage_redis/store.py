"""A cache tier on a RESP server (Redis or Valkey): standalone, TLS, unix socket or cluster.

``redis://[user[:password]@]host[:port][/db]?options``, ``rediss://`` (TLS),
``unix:///path/redis.sock?db=0``, ``redis+cluster://host:port[,host:port...]``.
The Valkey plugin reuses :class:`RespStore` with valkey-py (``valkey://`` ...).

One value per chunk: the sealed chunk image (header with key and checksum,
then payload) under ``<prefix>/<namespace-hex>/<digest-hex>``, so two models or
tenants never share a key and a foreign or damaged value fails verification
(:class:`~lmcache_core.errors.ChunkError`; the tier stack counts and deletes it).

Writes never upload a value another instance already wrote: a put asks first
which keys exist (``EXISTS``, or ``EXPIRE`` when a ``ttl`` is set, which also
renews a present value's expiry as the old overwrite did), in one pipeline for
a batch, then sends ``SET ... NX`` for the others, so a writer that loses a race
leaves the first value in place. ``writes``/``bytes_written`` count values
this store set, ``skipped_writes`` the puts that found the value there. ``clear()``
scans exactly ``<prefix>/<32 hex>/<32 hex>`` (the prefix's glob characters
escaped), for the namespaces this store used unless told otherwise.

Copies, per chunk:

- put: none here. The client is given the image as a ``memoryview`` and a
  connection class whose command packer is redis-py's pure-Python
  ``PythonRespSerializer``, which sends a memoryview as its own ``sendall``
  item. (The default hiredis packer would copy the value twice: ``bytes(view)``
  and ``hiredis.pack_command``.) The kernel copies into the socket buffer.
- get (standalone, TLS, unix): none here. The GET is sent on a pooled
  connection and the bulk reply is read from the socket with ``recv_into``
  straight into the pooled, 4096-aligned buffer that the device scatters from
  (``direct_read=false`` turns this off).
- get (cluster, batched ``get_many``, ``direct_read=false``): one copy that the
  client forces (hiredis returns a ``bytes`` object) plus one copy into the
  pooled buffer (a ``bytes`` object cannot be handed to the pool).

Timeouts: every round trip waits at most ``timeout`` (connecting at most
``connect_timeout``), and a timeout is never retried: a hung server costs one
``timeout`` per operation, and ``classify_error`` tells the tier stack it was a
timeout, so the tier backs off at once. Only a broken connection (``retries``,
default 1) is retried, on a fresh one. An error reply (``OOM`` at
``maxmemory`` with ``noeviction``, ``READONLY``) is a refusal: the stack drops
that store and keeps the tier, whose reads still work.

Connecting is lazy: ``from_url`` never touches the network, so a server that
is down at start makes ``health()`` False and the tier stack runs without the
tier until a re-probe succeeds; the connection pool reconnects by itself.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from lmcache_core.chunk import ChunkBuffer
from lmcache_core.errors import ConfigError
from lmcache_core.keys import ChunkKey
from lmcache_core.memory import PooledBuffer
from lmcache_core.storage import (ByteStore, Health, ParsedURL, StoreCapabilities, StoreContext, Usage, clear_targets,
                                  parse_url)

logger = logging.getLogger(__name__)

OPTIONS = (
    "prefix", "ttl", "timeout", "connect_timeout", "max_connections", "batch", "db", "username", "password",
    "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname", "ssl", "retries",
    "direct_read",
)


@dataclass(frozen=True)
class ClientLib:
    """Where a RESP client library keeps the classes this store uses (redis-py or valkey-py)."""

    module: str
    client: str
    cluster: str
    error: str
    password_env: str

    def load(self) -> Any:
        return importlib.import_module(self.module)


REDIS_LIB = ClientLib("redis", "Redis", "RedisCluster", "RedisError", "LMCACHE_REDIS_PASSWORD")


@dataclass(frozen=True)
class RespOptions:
    """Everything parsed from a tier URL (no secrets are logged: see ``describe``)."""

    mode: str  # "tcp" | "unix" | "cluster"
    hosts: tuple[tuple[str, int], ...]
    path: str  # unix socket path
    db: int
    username: str | None
    password: str | None
    tls: bool
    ssl: dict[str, Any]
    prefix: str
    ttl: int | None
    timeout: float
    connect_timeout: float
    max_connections: int
    batch: int
    retries: int
    direct_read: bool

    def describe(self) -> str:
        where = self.path if self.mode == "unix" else ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{self.mode}{'+tls' if self.tls else ''} {where}"


def parse_options(url: str, schemes: dict[str, str], password_env: str) -> RespOptions:
    """Parse a tier URL; ``schemes`` maps each URL scheme to ``tcp``, ``tls``, ``unix`` or ``cluster``."""
    u: ParsedURL = parse_url(url)
    u.check_options(OPTIONS)
    kind = schemes.get(u.scheme)
    if kind is None:
        raise ConfigError(f"{url}: scheme must be one of {', '.join(s + '://' for s in schemes)}")
    userinfo, _, hostpart = u.netloc.rpartition("@")
    username = u.option("username") or (userinfo.partition(":")[0] if userinfo else None) or None
    password = u.option("password") or (userinfo.partition(":")[2] if ":" in userinfo else None) \
        or os.environ.get(password_env) or None
    hosts: list[tuple[str, int]] = []
    for part in filter(None, hostpart.split(",")):
        host, sep, port = part.rpartition(":") if part.count(":") == 1 or part.startswith("[") else ("", "", part)
        if not sep:
            host, port = part, "6379"
        try:
            hosts.append((host.strip("[]") or "127.0.0.1", int(port)))
        except ValueError:
            raise ConfigError(f"{url}: port must be a number, got {port!r}") from None
    db = u.int_option("db", 0)
    path = ""
    if kind == "unix":
        path = u.path
        if not path:
            raise ConfigError(f"{url}: a unix socket URL needs a path, e.g. unix:///run/redis/redis.sock")
    else:
        if not hosts:
            hosts = [("127.0.0.1", 6379)]
        tail = u.path.strip("/")
        if tail:
            if kind == "cluster":
                raise ConfigError(f"{url}: a cluster has only database 0; drop the /{tail}")
            try:
                db = int(tail)
            except ValueError:
                raise ConfigError(f"{url}: the path must be a database number, got /{tail}") from None
    tls = kind == "tls" or u.bool_option("ssl", False)
    ssl: dict[str, Any] = {}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"):
        if u.option(name):
            ssl[name] = u.option(name)
    if u.option("ssl_check_hostname") is not None:
        ssl["ssl_check_hostname"] = u.bool_option("ssl_check_hostname", True)
    ttl = u.int_option("ttl", 0) or None
    if ttl is not None and ttl < 0:
        raise ConfigError(f"{url}: ttl must be seconds >= 0 (0 = no expiry), got {ttl}")
    opts = RespOptions(
        mode="cluster" if kind == "cluster" else ("unix" if kind == "unix" else "tcp"),
        hosts=tuple(hosts), path=path, db=db, username=username, password=password, tls=tls, ssl=ssl,
        prefix=u.option("prefix", "lmcache"), ttl=ttl, timeout=u.float_option("timeout", 5.0),
        connect_timeout=u.float_option("connect_timeout", 2.0),
        max_connections=u.int_option("max_connections", 32), batch=u.int_option("batch", 16),
        retries=u.int_option("retries", 1), direct_read=u.bool_option("direct_read", True),
    )
    if opts.max_connections < 1 or opts.batch < 1 or opts.timeout <= 0 or opts.connect_timeout <= 0:
        raise ConfigError(f"{url}: max_connections and batch must be >= 1, timeouts > 0")
    return opts


def _zero_copy(lib: Any, base: type) -> type:
    """A connection class of ``lib`` that sends memoryviews without copying them (see module doc)."""
    serializer = lib.connection.PythonRespSerializer

    def _construct_command_packer(self: Any, packer: Any) -> Any:
        return packer if packer is not None else serializer(self._buffer_cutoff, self.encoder.encode)

    return type(f"ZeroCopy{base.__name__}", (base,), {"_construct_command_packer": _construct_command_packer})


class RespStore(ByteStore):
    """Chunks as values on a Redis-protocol server. Thread-safe (a blocking connection pool)."""

    schemes = ("redis", "rediss", "unix", "redis+cluster")
    scheme_kinds = {"redis": "tcp", "rediss": "tls", "unix": "unix", "redis+cluster": "cluster"}
    capabilities = StoreCapabilities(persistent=True, shared=True, ttl=True, cluster=True)
    #: counts its own writes (``writes``, ``bytes_written``, ``skipped_writes``) and reports them
    #: through ``context.on_write(tier, nbytes)`` / ``context.on_skip(tier, n)`` where the engine
    #: gives those: a put that found the value there returns True but uploaded nothing
    reports_writes = True
    lib: ClientLib = REDIS_LIB

    def __init__(self, context: StoreContext, options: RespOptions, name: str | None = None) -> None:
        default = self.lib.module if options.mode != "cluster" else f"{self.lib.module}-cluster"
        super().__init__(name or default, context)
        self.options = options
        self._mod = self.lib.load()
        self.error: type[BaseException] = getattr(self._mod.exceptions, self.lib.error)
        self._client: Any = None
        self._lock = threading.Lock()
        self._closed = False
        # redis-py >= 5.3 deprecates get_connection("GET"); valkey-py still requires the name.
        params = inspect.signature(self._mod.connection.ConnectionPool.get_connection).parameters
        self._get_conn_no_args = params["command_name"].default is not inspect.Parameter.empty
        self._namespaces: set[bytes] = set()  # what clear() deletes by default
        self._counts = threading.Lock()
        self.writes = 0  # values this store SET
        self.bytes_written = 0
        self.skipped_writes = 0  # puts of a value some instance had already written (not uploaded again)

    @classmethod
    def from_url(cls, url: str, context: StoreContext) -> "RespStore":
        return cls(context, parse_options(url, cls.scheme_kinds, cls.lib.password_env))

    # -- the client (built on first use; building never connects) ----------------------------
    def _retry(self) -> Any:
        """Retry a broken connection (stale after a server restart), never a timeout: redis-py's
        default also retries timeouts, which made a hung server cost 2-3x ``timeout``."""
        m = self._mod
        return m.retry.Retry(m.backoff.ExponentialBackoff(cap=0.5, base=0.05), self.options.retries,
                             supported_errors=(m.exceptions.ConnectionError,))

    def classify_error(self, exc: BaseException) -> str | None:
        """For the tier stack: ``"timeout"`` (back off at once), ``"refused"`` (an error reply such
        as OOM or READONLY: the server answers, only this write failed), else None."""
        e = self._mod.exceptions
        if isinstance(exc, (e.TimeoutError, TimeoutError, socket.timeout)):
            return "timeout"
        if isinstance(exc, e.ResponseError):
            return "refused"
        return None

    def _build_client(self) -> Any:
        o, m = self.options, self._mod
        common: dict[str, Any] = dict(
            username=o.username, password=o.password, socket_timeout=o.timeout,
            socket_connect_timeout=o.connect_timeout, retry=self._retry(), health_check_interval=0,
        )
        conn = m.connection
        if o.mode == "cluster":
            base = conn.SSLConnection if o.tls else conn.Connection
            nodes = [m.cluster.ClusterNode(h, p) for h, p in o.hosts]
            cluster_cls = getattr(m.cluster, self.lib.cluster)
            common.pop("health_check_interval")
            common.pop("retry")  # the cluster client retries itself; node clients must not
            # `url=` makes the cluster build node pools from kwargs, so connection_class reaches them.
            host, port = o.hosts[0]
            return cluster_cls(url=f"{self.lib.module}://{host}:{port}", startup_nodes=nodes,
                               connection_class=_zero_copy(m, base), max_connections=o.max_connections,
                               **common, **o.ssl)
        if o.mode == "unix":
            kwargs: dict[str, Any] = dict(path=o.path)
            base = conn.UnixDomainSocketConnection
        else:
            kwargs = dict(host=o.hosts[0][0], port=o.hosts[0][1])
            base = conn.SSLConnection if o.tls else conn.Connection
            if o.tls:
                kwargs.update(o.ssl)
        pool = conn.BlockingConnectionPool(
            connection_class=_zero_copy(m, base), max_connections=o.max_connections, timeout=o.timeout,
            db=o.db, **kwargs, **common)
        return getattr(m, self.lib.client)(connection_pool=pool)

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._closed:
                    raise self._mod.exceptions.ConnectionError(f"{self.name} tier is closed")
                if self._client is None:
                    self._client = self._build_client()
        return self._client

    def key_name(self, key: ChunkKey) -> str:
        """``<prefix>/<namespace-hex>/<digest-hex>``: the namespace keeps models and tenants apart."""
        return f"{self.options.prefix}/{key.path}"

    # -- ByteStore ----------------------------------------------------------------------------
    def put(self, key: ChunkKey, chunk: ChunkBuffer) -> bool:
        return self.put_many([(key, chunk)])[0]

    def _write(self, key: ChunkKey, image: memoryview, chunk: ChunkBuffer) -> None:
        self.put(key, chunk)

    def _present(self, names: Sequence[str]) -> list[bool]:
        """Which values exist: EXISTS, or with a ttl EXPIRE (which also renews a present value's
        expiry, as the SET it replaces did). One round trip for the batch."""
        ttl = self.options.ttl
        if len(names) == 1:
            n = self.client.expire(names[0], ttl) if ttl else self.client.exists(names[0])
            return [bool(n)]
        with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                if ttl:
                    pipe.expire(name, ttl)
                else:
                    pipe.exists(name)
            return [bool(n) for n in pipe.execute()]

    def _read(self, key: ChunkKey, alloc: Any) -> tuple[PooledBuffer, int] | None:
        self._namespaces.add(key.namespace)
        if self.options.mode == "cluster" or not self.options.direct_read:
            return self._land(self.client.get(self.key_name(key)), alloc)
        for attempt in (0, 1):
            try:
                return self._direct_get(self.key_name(key), alloc)
            except (TimeoutError, socket.timeout, self._mod.exceptions.TimeoutError):
                raise  # a hung server: retrying would double the wait
            except (ConnectionError, OSError, self._mod.exceptions.ConnectionError) as exc:
                # A pooled connection may be stale after a server restart: retry once on a fresh one.
                if attempt:
                    raise
                logger.debug("tier %s direct GET failed (%s); retrying on a new connection", self.name, exc)
        return None  # not reached

    def _connection(self) -> Any:
        pool = self.client.connection_pool
        return pool.get_connection() if self._get_conn_no_args else pool.get_connection("GET")

    def _direct_get(self, name: str, alloc: Any) -> tuple[PooledBuffer, int] | None:
        """GET that reads the bulk reply from the socket straight into a pooled buffer.

        The reply parser is bypassed for this one reply, so the value is copied once, by the
        kernel, into the buffer the device reads (instead of hiredis bytes plus a copy). Any
        error disconnects the connection, so no half-read reply is left in it.
        """
        pool = self.client.connection_pool
        conn = self._connection()
        try:
            conn.send_command("GET", name)
            got = _read_bulk_into(conn._sock, alloc)
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        if isinstance(got, str):
            raise self._mod.exceptions.ResponseError(got)
        return got

    @staticmethod
    def _land(value: bytes | None, alloc: Any) -> tuple[PooledBuffer, int] | None:
        """Copy a reply into a pooled buffer (the one copy this side of the client, see module doc)."""
        if value is None:
            return None
        n = len(value)
        buf = alloc(n)
        if n:
            buf.memoryview(0, n)[:] = value
        return buf, n

    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkBuffer]]) -> list[bool]:
        """Upload only what no instance wrote yet: one round trip asks which keys exist, one
        more sends ``SET NX`` for the others (NX settles a race with another writer). Values
        found present count in ``skipped_writes``, never in ``writes``/``bytes_written``."""
        b = self.options.batch
        for i in range(0, len(items), b):
            part = items[i : i + b]
            names = [self.key_name(key) for key, _ in part]
            for key, _ in part:
                self._namespaces.add(key.namespace)
            todo = [(n, c) for n, (_, c), present in zip(names, part, self._present(names)) if not present]
            skipped = len(part) - len(todo)
            written = nbytes = 0
            if len(todo) == 1:
                # `image` is a view of the caller's pooled buffer; the packer sends it as is (no copy).
                name, chunk = todo[0]
                results = [self.client.set(name, chunk.image(), nx=True, ex=self.options.ttl)]
            elif todo:
                with self.client.pipeline(transaction=False) as pipe:
                    for name, chunk in todo:
                        pipe.set(name, chunk.image(), nx=True, ex=self.options.ttl)
                    results = pipe.execute()
            else:
                results = []
            for (_, chunk), ok in zip(todo, results):
                if ok:
                    written += 1
                    nbytes += chunk.header.image_len
                else:
                    skipped += 1  # another instance set it between our check and our SET
            self._count(written, nbytes, skipped)
        return [True] * len(items)

    def _count(self, written: int, nbytes: int, skipped: int) -> None:
        with self._counts:
            self.writes += written
            self.bytes_written += nbytes
            self.skipped_writes += skipped
        self.report_writes(nbytes, skipped)

    def get_many(self, keys: Sequence[ChunkKey]) -> list[ChunkBuffer | None]:
        """GETs in pipelines of ``batch``; each value verified like ``get`` (a bad one raises ChunkError
        after the good ones are released)."""
        from lmcache_core.chunk import decode_image

        out: list[ChunkBuffer | None] = []
        pool = self.context.pool
        b = self.options.batch
        self._namespaces.update(k.namespace for k in keys)
        try:
            for i in range(0, len(keys), b):
                with self.client.pipeline(transaction=False) as pipe:
                    for key in keys[i : i + b]:
                        pipe.get(self.key_name(key))
                    values = pipe.execute()
                for key, value in zip(keys[i : i + b], values):
                    got = self._land(value, pool.acquire)
                    out.append(None if got is None else decode_image(got[0], got[1], key, pool,
                                                                      getattr(self.context, "geometry", None)))
        except BaseException:
            for c in out:
                if c is not None:
                    c.release()
            raise
        return out

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        out: list[bool] = []
        b = max(self.options.batch, 64)
        for i in range(0, len(keys), b):
            with self.client.pipeline(transaction=False) as pipe:
                for key in keys[i : i + b]:
                    pipe.exists(self.key_name(key))
                out.extend(bool(n) for n in pipe.execute())
        return out

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        if not keys:
            return 0
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.delete(self.key_name(key))
            return int(sum(pipe.execute()))

    # -- admin ----------------------------------------------------------------------------------
    def health(self) -> Health:
        try:
            self.client.ping()
        except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", with the reason
            return Health(False, f"{self.options.describe()}: {type(exc).__name__}: {exc}")
        return Health(True)

    def usage(self) -> Usage:
        """Server memory (``INFO memory``) and key count; zeros while the server is unreachable."""
        try:
            info = self.client.info("memory")
            if self.options.mode == "cluster":  # {node: info}
                infos = list(info.values()) if info and isinstance(next(iter(info.values())), dict) else [info]
            else:
                infos = [info]
            used = sum(int(i.get("used_memory", 0)) for i in infos)
            caps = [int(i.get("maxmemory", 0)) for i in infos]
            items = int(self.client.dbsize())
        except self.error as exc:
            logger.debug("tier %s usage unavailable: %s", self.name, exc)
            return Usage(0, None, 0)
        return Usage(used, sum(caps) if all(caps) else None, items)

    def clear(self, namespace: bytes | Iterable[bytes] | None = None, *, all_namespaces: bool = False) -> None:
        """Delete the chunks of ``namespace`` (one id or several), by default of the namespaces this
        store wrote or read; ``all_namespaces`` deletes every chunk under exactly this prefix.
        SCAN (never KEYS) with the prefix's glob characters escaped, and each name checked again:
        prefix ``lmcache`` never touches ``lmcache/team-b/...``, prefix ``p*`` never ``pq/...``."""
        if all_namespaces:
            patterns = [chunk_pattern(self.options.prefix)]
        else:
            targets = clear_targets(namespace, self._namespaces)
            patterns = [chunk_pattern(self.options.prefix, ns) for ns in sorted(targets)]
            self._namespaces -= targets
        ours = chunk_name_regex(self.options.prefix)
        for pattern in patterns:
            batch: list[Any] = []
            for name in self.client.scan_iter(match=pattern, count=1000):
                if not ours.fullmatch(name if isinstance(name, bytes) else name.encode()):
                    continue
                batch.append(name)
                if len(batch) >= 500:
                    self._unlink(batch)
                    batch = []
            if batch:
                self._unlink(batch)

    def _unlink(self, names: list[Any]) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.unlink(n)
            pipe.execute()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001
                logger.debug("closing %s: %s", self.name, exc)


def _read_bulk_into(sock: Any, alloc: Any) -> tuple[PooledBuffer, int] | None | str:
    """Read one RESP2/RESP3 reply to GET from ``sock``: a bulk string lands in ``alloc(n)``.

    Returns ``(buffer, n)``, None for a nil reply, or the error text of an error reply.
    """
    head = bytearray()
    while b"\r\n" not in head:
        part = sock.recv(65536)
        if not part:
            raise ConnectionError("server closed the connection")
        head += part
        if len(head) > (1 << 20) and b"\r\n" not in head:
            raise ConnectionError("malformed reply: no line end")
    line, _, rest = bytes(head).partition(b"\r\n")
    if line[:1] == b"-":
        if len(rest) != 0:
            raise ConnectionError("unexpected bytes after an error reply")
        return line[1:].decode(errors="replace")
    if line[:1] == b"_" and not rest:  # RESP3 null (redis-py 8 speaks RESP3 by default)
        return None
    if line[:1] != b"$":
        raise ConnectionError(f"unexpected reply to GET: {line[:40]!r}")
    n = int(line[1:])
    if n < 0:
        return None
    buf = alloc(n)
    try:
        mv = buf.memoryview(0, n) if n else memoryview(bytearray(0))
        take = min(len(rest), n)
        mv[:take] = rest[:take]  # the few bytes that came with the header line
        trailer = len(rest) - take
        done = take
        while done < n:
            k = sock.recv_into(mv[done:], n - done)
            if not k:
                raise ConnectionError("server closed the connection mid-value")
            done += k
        crlf = bytearray(2)
        while trailer < 2:
            k = sock.recv_into(memoryview(crlf)[trailer:], 2 - trailer)
            if not k:
                raise ConnectionError("server closed the connection mid-reply")
            trailer += k
        if len(rest) > n + 2:
            raise ConnectionError("unexpected bytes after the reply")
    except BaseException:
        buf.release()
        raise
    return buf, n


_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_HEX32 = "[0-9a-f]" * 32


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern (``*``, ``?``, ``[``, ``]`` and ``\\`` escaped)."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def chunk_pattern(prefix: str, namespace: bytes | None = None) -> str:
    """MATCH pattern of exactly this prefix's chunk names (of one namespace, if given)."""
    ns = namespace.hex() if namespace is not None else _HEX32
    return f"{glob_escape(prefix)}/{ns}/{_HEX32}"


def chunk_name_regex(prefix: str) -> re.Pattern[bytes]:
    return re.compile(re.escape(prefix.encode()) + rb"/[0-9a-f]{32}/[0-9a-f]{32}")


class RedisStore(RespStore):
    """The ``redis://``, ``rediss://``, ``unix://`` and ``redis+cluster://`` tiers (redis-py)."""


__all__ = ["ClientLib", "REDIS_LIB", "RedisStore", "RespOptions", "RespStore", "chunk_pattern", "glob_escape",
           "parse_options"]
