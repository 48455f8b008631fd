"""The storage contract: what a storage plugin (one cache tier) provides.

A store keeps chunk images under :class:`ChunkKey` s. ``put`` receives a sealed
:class:`ChunkBuffer` it must neither change nor keep after returning (the
memory tier, whose capability ``holds_buffers`` says so, keeps a counted
reference instead of a copy). ``get`` returns a verified chunk or ``None``; a
corrupt object raises :class:`ChunkError` so the tier stack can count it and
delete it. Stores are called from the tier stack's worker threads and must be
thread-safe; they may raise on I/O errors, which the stack turns into misses.

Most backends store bytes: subclass :class:`ByteStore` and implement four
byte-level methods; verification, pooling and batching come with it.
"""

from __future__ import annotations

import abc
import ipaddress
import math
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

from .chunk import ChunkBuffer, decode_image
from .config import parse_size
from .errors import ConfigError
from .keys import ChunkKey

if TYPE_CHECKING:
    from .layout import ChunkGeometry
    from .memory import BufferPool, PooledBuffer


@dataclass(frozen=True)
class StoreCapabilities:
    persistent: bool = False  # survives a process restart
    shared: bool = False  # other processes or machines see the same chunks
    holds_buffers: bool = False  # keeps a counted reference instead of serialising (memory tier)
    ttl: bool = False
    cluster: bool = False
    pinning: bool = False  # pin()/unpin() protect chunks from eviction


@dataclass(frozen=True)
class Health:
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    capacity_bytes: int | None
    items: int


@dataclass
class StoreContext:
    """What the engine hands a store factory: the buffer pool and shared settings."""

    pool: "BufferPool"
    options: Mapping[str, Any] = field(default_factory=dict)
    on_evict: Any = None  # callable(tier_name, count) for metrics
    on_write: Any = None  # callable(tier_name, nbytes): bytes a store really wrote (stores that report)
    on_skip: Any = None  # callable(tier_name, count): puts of chunks the store already held
    #: The chunk layout the engine expects: the decoder refuses any other (a forged or foreign
    #: chunk declaring a huge layout is a ChunkError before its payload is read into memory).
    geometry: "ChunkGeometry | None" = None


#: Longest timeout a tier URL may give (seconds): a tier operation never waits longer than its
#: timeout, so an hour is already a stalled request stream; it also stays far below what
#: sockets and locks accept (larger values raise OverflowError there).
MAX_TIMEOUT_S = 3600.0
_MAX_PORT = 65535


def _is_timeout(name: str) -> bool:
    return name == "timeout" or name.endswith("_timeout")


@dataclass(frozen=True)
class ParsedURL:
    """A tier URL split and checked once, the same way for every store (see :func:`parse_url`).

    The option helpers convert one query option each and raise a ConfigError naming the URL,
    the option, the value and what is allowed.
    """

    scheme: str
    netloc: str
    path: str
    query: dict[str, str]
    raw: str

    def option(self, name: str, default: Any = None) -> Any:
        return self.query.get(name, default)

    def size_option(self, name: str, default: int | None = None, *, minimum: int = 1) -> int | None:
        """A byte size (``4GiB``, ``500MB``, ``1048576``); at least ``minimum`` bytes (a zero
        capacity or part size is never meant: leave the option out for the store's default)."""
        value = self.query.get(name)
        if value is None:
            return default
        size = parse_size(value, key=f"{self.raw}: option {name}")
        if size < minimum:
            raise ConfigError(f"{self.raw}: option {name} must be at least {minimum} byte{'s' * (minimum != 1)}, "
                              f"got {value!r}; give a size like {name}=1GiB, or leave it out for the default")
        return size

    def int_option(self, name: str, default: int, *, minimum: int | None = None,
                   maximum: int | None = None) -> int:
        value = self._typed(name, default, int, "an integer")
        self._check_range(name, value, minimum, maximum)
        return value  # type: ignore[no-any-return]

    def float_option(self, name: str, default: float, *, minimum: float | None = None,
                     maximum: float | None = None) -> float:
        """A finite number; an option named ``timeout`` or ``*_timeout`` is seconds in
        ``(0, MAX_TIMEOUT_S]`` whatever the store passes."""
        value = self._typed(name, default, float, "a number")
        if name in self.query and not math.isfinite(value):
            raise ConfigError(f"{self.raw}: option {name} must be a finite number, got {self.query[name]!r}")
        if _is_timeout(name) and name in self.query:
            if not 0 < value <= MAX_TIMEOUT_S:
                raise ConfigError(
                    f"{self.raw}: option {name} must be seconds greater than 0 and at most {MAX_TIMEOUT_S:g}, "
                    f"got {self.query[name]!r}; e.g. {name}=5 (leave it out for the default)")
        self._check_range(name, value, minimum, maximum)
        return value  # type: ignore[no-any-return]

    def _check_range(self, name: str, value: Any, minimum: Any, maximum: Any) -> None:
        if name not in self.query:
            return
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            allowed = (f"from {minimum} to {maximum}" if minimum is not None and maximum is not None
                       else f"at least {minimum}" if minimum is not None else f"at most {maximum}")
            raise ConfigError(f"{self.raw}: option {name} must be {allowed}, got {self.query[name]!r}")

    def _typed(self, name: str, default: Any, cast: Any, what: str) -> Any:
        value = self.query.get(name)
        if value is None:
            return default
        try:
            return cast(value)
        except ValueError:
            raise ConfigError(f"{self.raw}: option {name} must be {what}, got {value!r}") from None

    def bool_option(self, name: str, default: bool) -> bool:
        value = self.query.get(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{self.raw}: option {name} must be true or false, got {value!r}")

    def check_options(self, allowed: Sequence[str]) -> None:
        unknown = sorted(set(self.query) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{self.raw}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed)) or 'none'}"
            )

    def _check_conventions(self) -> None:
        """Options whose meaning every store shares: ``capacity`` is a byte size of at least 1,
        ``timeout`` / ``*_timeout`` are seconds in (0, MAX_TIMEOUT_S]."""
        for name in self.query:
            if name == "capacity":
                self.size_option(name)
            elif _is_timeout(name):
                self.float_option(name, 0.0)


def clear_targets(namespace: "bytes | Iterable[bytes] | None", used: "Iterable[bytes]") -> set[bytes]:
    """The namespace ids a ``clear(namespace)`` means: the one or several given, else those the
    store wrote or read (``used``)."""
    if namespace is None:
        return set(used)
    if isinstance(namespace, (bytes, bytearray)):
        return {bytes(namespace)}
    return {bytes(ns) for ns in namespace}


def parse_url(url: str) -> ParsedURL:
    """Split a tier URL and check what every store needs the same way, so a malformed URL is a
    ConfigError at config load or tier creation, never a warning or a failure at the first use:
    a ``#`` (a fragment would be dropped silently), an IPv6 literal without its brackets or with
    a bad address, a port that is not 1 to 65535, an option given twice, and the shared options
    ``capacity`` (a byte size of at least 1) and ``timeout`` / ``*_timeout`` (seconds in
    ``(0, MAX_TIMEOUT_S]``). A host list (``redis+cluster://a:7000,b:7001``) is checked host by host."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        authority = url.partition("://")[2]
        for stop in "/?#":
            authority = authority.partition(stop)[0]
        _check_hosts(url, authority)  # names the bad host where it can
        raise ConfigError(f"{url}: not a valid URL ({exc}); an IPv6 address goes in brackets, "
                          f"e.g. redis://[::1]:6379") from None
    if "#" in url:
        frag = url[url.index("#"):]
        raise ConfigError(f"{url}: {frag!r} starts a URL fragment, which a tier URL has no use for (it would be "
                          f"dropped, leaving {url[:url.index('#')]}); if '#' belongs to the path or a value, "
                          f"write it as %23")
    _check_hosts(url, parts.netloc)
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query: dict[str, str] = {}
    for name, value in pairs:
        if name in query:
            given = [v for n, v in pairs if n == name]
            raise ConfigError(f"{url}: option {name} is given {len(given)} times ({', '.join(map(repr, given))}); "
                              f"give it once")
        query[name] = value
    parsed = ParsedURL(parts.scheme, parts.netloc, urllib.parse.unquote(parts.path), query, url)
    parsed._check_conventions()
    return parsed


def _check_hosts(url: str, netloc: str) -> None:
    """Each ``host[:port]`` of the URL's authority (comma-separated for a cluster): a bracketed
    IPv6 address that parses, and a port from 1 to 65535."""
    hostpart = netloc.rpartition("@")[2]
    for part in filter(None, hostpart.split(",")):
        if part.startswith("["):
            host, close, rest = part[1:].partition("]")
            try:
                ipaddress.IPv6Address(urllib.parse.unquote(host))  # a zone id is written %25eth0
                ok = bool(close)
            except ValueError:
                ok = False
            if not ok:
                what = "has no closing ']'" if not close else f"holds {host!r}, which is not an IPv6 address"
                raise ConfigError(f"{url}: the IPv6 literal {part!r} {what}; write it like [::1] or "
                                  f"[2001:db8::5]:6379")
            if rest and not rest.startswith(":"):
                raise ConfigError(f"{url}: {rest!r} after {part[:len(host) + 2]!r} is neither a port nor a host "
                                  f"separator; write [address]:port, e.g. [::1]:6379")
            port = rest[1:] if rest else None
        elif "[" in part or "]" in part:
            raise ConfigError(f"{url}: {part!r} has an unbalanced bracket; an IPv6 address goes in brackets, "
                              f"e.g. [::1]:6379")
        elif part.count(":") > 1:
            raise ConfigError(f"{url}: {part!r} looks like an IPv6 address without brackets; write it in "
                              f"brackets, e.g. [::1]:6379")
        else:
            port = part.partition(":")[2] if ":" in part else None
        if port is None:
            continue
        if not port.isdigit() or not port.isascii():
            raise ConfigError(f"{url}: port must be a number from 1 to {_MAX_PORT}, got {port!r}")
        if not 1 <= int(port) <= _MAX_PORT:
            raise ConfigError(f"{url}: port {port} is out of range; a port is 1 to {_MAX_PORT} "
                              f"(e.g. 6379 for Redis)")


class Store(abc.ABC):
    """Base class of storage plugins."""

    schemes: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[StoreCapabilities] = StoreCapabilities()
    #: True when the store reports its real writes and skipped puts through ``context.on_write`` /
    #: ``context.on_skip`` (the tier stack then does not count every accepted put as a write).
    reports_writes: ClassVar[bool] = False
    #: The tier's codec spec and the secret file of an encrypting codec (its URL's ``codec=`` and
    #: ``codec_key_file=``, which ``build_stores`` takes out before ``from_url``): the tier stack
    #: codes what it writes here; the store sees only images.
    codec: str = ""
    codec_key_file: str = ""

    def __init__(self, name: str, context: StoreContext) -> None:
        self.name = name
        self.context = context

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, context: StoreContext) -> "Store":
        """Build from a tier URL; reject unknown options with a ConfigError naming them."""

    @abc.abstractmethod
    def put(self, key: ChunkKey, chunk: ChunkBuffer) -> bool:
        """Store a sealed chunk. Return False if the store declined (full, pinned)."""

    @abc.abstractmethod
    def get(self, key: ChunkKey) -> ChunkBuffer | None:
        """A verified chunk (caller releases it), None if absent; ChunkError if corrupt."""

    @abc.abstractmethod
    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Presence of each key (one round trip for a batch where the backend allows)."""

    @abc.abstractmethod
    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Delete keys; return how many existed."""

    def contains(self, keys: Sequence[ChunkKey]) -> int:
        """Length of the prefix of ``keys`` that is present."""
        n = 0
        for present in self.exists(keys):
            if not present:
                break
            n += 1
        return n

    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkBuffer]]) -> list[bool]:
        return [self.put(k, c) for k, c in items]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[ChunkBuffer | None]:
        return [self.get(k) for k in keys]

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        """Protect keys from eviction until unpinned (no-op unless capabilities.pinning)."""

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        """Undo one pin() of each key."""

    def usage(self) -> Usage:
        return Usage(0, None, 0)

    def health(self) -> Health:
        return Health(True)

    def report_writes(self, nbytes: int = 0, skipped: int = 0) -> None:
        """Tell the engine (``context.on_write`` / ``on_skip``) what a put really wrote and how many
        chunks it skipped because they were there already (stores with ``reports_writes``)."""
        on_write, on_skip = getattr(self.context, "on_write", None), getattr(self.context, "on_skip", None)
        if nbytes and on_write:
            on_write(self.name, nbytes)
        if skipped and on_skip:
            on_skip(self.name, skipped)

    def clear(self, namespace: "bytes | Iterable[bytes] | None" = None, *, all_namespaces: bool = False) -> None:
        """Drop the chunks of ``namespace`` (by default the namespaces this store wrote or read);
        ``all_namespaces`` drops every namespace this store's root or prefix holds."""
        raise NotImplementedError(f"{type(self).__name__} does not support clear()")

    def close(self) -> None:
        """Release connections and threads; idempotent."""


class ByteStore(Store):
    """A store of byte images: implement ``_write``, ``_read``, ``exists``, ``delete``.

    ``_read`` gets an ``alloc(nbytes) -> PooledBuffer`` callback so it can read
    straight into a pooled buffer (``readinto``, ``recv_into``); it returns the
    buffer and the number of valid bytes, or None.
    """

    @abc.abstractmethod
    def _write(self, key: ChunkKey, image: memoryview, chunk: ChunkBuffer) -> None: ...

    @abc.abstractmethod
    def _read(self, key: ChunkKey, alloc: Any) -> "tuple[PooledBuffer, int] | None": ...

    def put(self, key: ChunkKey, chunk: ChunkBuffer) -> bool:
        self._write(key, chunk.image(), chunk)
        return True

    def get(self, key: ChunkKey) -> ChunkBuffer | None:
        got = self._read(key, self.context.pool.acquire)
        if got is None:
            return None
        buf, nbytes = got
        return decode_image(buf, nbytes, key, self.context.pool, self.context.geometry)
