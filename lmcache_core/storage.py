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


@dataclass(frozen=True)
class ParsedURL:
    scheme: str
    netloc: str
    path: str
    query: dict[str, str]
    raw: str

    def option(self, name: str, default: Any = None) -> Any:
        return self.query.get(name, default)

    def size_option(self, name: str, default: int | None = None) -> int | None:
        value = self.query.get(name)
        return default if value is None else parse_size(value, key=f"{self.raw}: {name}")

    def int_option(self, name: str, default: int) -> int:
        return self._typed(name, default, int, "an integer")

    def float_option(self, name: str, default: float) -> float:
        return self._typed(name, default, float, "a number")

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


def clear_targets(namespace: "bytes | Iterable[bytes] | None", used: "Iterable[bytes]") -> set[bytes]:
    """The namespace ids a ``clear(namespace)`` means: the one or several given, else those the
    store wrote or read (``used``)."""
    if namespace is None:
        return set(used)
    if isinstance(namespace, (bytes, bytearray)):
        return {bytes(namespace)}
    return {bytes(ns) for ns in namespace}


def parse_url(url: str) -> ParsedURL:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return ParsedURL(parts.scheme, parts.netloc, urllib.parse.unquote(parts.path), query, url)


class Store(abc.ABC):
    """Base class of storage plugins."""

    schemes: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[StoreCapabilities] = StoreCapabilities()
    #: True when the store reports its real writes and skipped puts through ``context.on_write`` /
    #: ``context.on_skip`` (the tier stack then does not count every accepted put as a write).
    reports_writes: ClassVar[bool] = False

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
