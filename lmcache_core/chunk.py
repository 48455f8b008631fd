"""A chunk at rest: a 4096-byte header, then the payload, in one aligned byte image.

Header: ``b"LMCK"``, format version, flags, metadata length, msgpack metadata
(key, token count, layout signature, dtype, shape, codec wire id, payload lengths),
xxh3-64 of everything before it (a quick check that lets a store reject a
foreign header before it reads the payload), then the *tag*, then zeros up to
4096 bytes. The tag covers the header before it and the stored payload: xxh3-128
by default, or HMAC-SHA256 when the deployment sets an integrity key
(``integrity_key`` / ``integrity_key_file``; flag bit 0 says which), so nobody
without the secret can write a chunk this process accepts.

The image is the same in every tier (memory, file, Redis value, S3 object), so
a gathered buffer is written as is and a read lands in a buffer that is used in
place. :func:`decode_image` checks every field against every other and the tag
before it trusts a byte, bounds decompression by the declared size, and turns
any failure into :class:`ChunkError` (the tier deletes the object), never
another exception and never a chunk whose bytes differ from what was sealed. Codecs other
than ``none``/``zlib`` are :mod:`lmcache_core.codecs` chains, named in the header by wire id;
the tag covers the coded bytes, the codec checks its own stream as it decodes.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import struct
import threading
import weakref
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import xxhash

from . import codecs as _codecs
from .errors import ChunkError
from .keys import ChunkKey
from .layout import ChunkGeometry, itemsize, torch_dtype
from .memory import BufferError_, BufferPool, PooledBuffer, round_up

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MAGIC = b"LMCK"
VERSION = 2  # 2: the tag covers header and payload, and may be keyed
HEADER_SIZE = 4096
_PREFIX = struct.Struct("<4sHHI")  # magic, version, flags, metadata length
CODECS = ("none", "zlib")  # coded here; every other codec field is a wire id of lmcache_core.codecs
FLAG_KEYED = 0x1
TAG_PLAIN = 16  # xxh3-128
TAG_KEYED = 32  # HMAC-SHA256
MIN_KEY_BYTES = 16
MAX_TOKENS = 1 << 20  # far beyond any chunk_size; bounds what a header can ask to allocate
MAX_PAYLOAD_BYTES = 1 << 32  # 4 GiB of decoded KV per chunk
_META_TYPES: dict[str, type] = {"key": bytes, "tokens": int, "layout": str, "dtype": str, "shape": list,
                                "codec": str, "payload_len": int, "stored_len": int}
_INFLATE_STEP = 1 << 20


def MAX_STORED_EXTRA(payload_len: int) -> int:  # noqa: N802 - a bound, read like a constant
    """Most stored bytes any codec may declare for ``payload_len`` decoded bytes."""
    return payload_len + payload_len // 100 + 4096


@dataclass(frozen=True)
class ChunkHeader:
    key: ChunkKey
    geometry: ChunkGeometry
    num_tokens: int
    codec: str
    payload_len: int  # decoded payload bytes
    stored_len: int  # bytes after the header in the image (after the codec)
    checksum: bytes  # the tag over the header before it and the stored payload
    flags: int = 0  # FLAG_KEYED: the tag is keyed
    tag_offset: int = 0  # where the tag starts in the header (what it covers of the header)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.geometry.shape(self.num_tokens)

    @property
    def image_len(self) -> int:
        return HEADER_SIZE + self.stored_len


# -- the integrity key -------------------------------------------------------------------------
class _Keyring:
    """The deployment secret: process-wide, or bound to one engine's buffer pool (which both
    :func:`seal` and :func:`decode_image` receive). Never logged, never in a repr."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._default: bytes | None = None
        self._by_pool: "weakref.WeakKeyDictionary[BufferPool, bytes | None]" = weakref.WeakKeyDictionary()

    def set_default(self, secret: bytes | None) -> None:
        with self._lock:
            self._default = derive_key(secret)

    def bind(self, pool: BufferPool, secret: bytes | None) -> None:
        with self._lock:
            self._by_pool[pool] = derive_key(secret)

    def get(self, pool: BufferPool | None) -> bytes | None:
        with self._lock:
            if pool is not None and pool in self._by_pool:
                return self._by_pool[pool]
            return self._default

    def __repr__(self) -> str:
        return "<integrity keyring>"


_KEYRING = _Keyring()


def derive_key(secret: bytes | None) -> bytes | None:
    """The 64-byte HMAC key (a BLAKE2b digest) of a deployment secret of any length (None: no key)."""
    if secret is None:
        return None
    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(f"an integrity key needs at least {MIN_KEY_BYTES} bytes, got {len(secret)}")
    return hashlib.blake2b(bytes(secret), digest_size=64, person=b"lmcache-ikey").digest()


def set_integrity_key(secret: bytes | None) -> None:
    """Seal and verify every chunk of this process with ``secret`` (None: unkeyed xxh3).
    :class:`~lmcache_core.config.Config` calls it when ``integrity_key(_file)`` is set."""
    _KEYRING.set_default(secret)
    logger.info("chunk integrity: %s", "keyed HMAC-SHA256" if secret is not None else "unkeyed xxh3-128")


def bind_integrity_key(pool: BufferPool, secret: bytes | None) -> None:
    """Give one engine (its buffer pool) its own key, ahead of the process-wide one."""
    _KEYRING.bind(pool, secret)


def integrity_keyed(pool: BufferPool | None = None) -> bool:
    """Whether chunks sealed with ``pool`` (or in this process) carry a keyed tag."""
    return _KEYRING.get(pool) is not None


def _tag(head: Any, stored: Any, key: bytes | None) -> bytes:
    if key is None:
        h: Any = xxhash.xxh3_128()
    else:  # HMAC-SHA256: SHA extensions make it about 2x keyed BLAKE2b on current x86 and Arm
        h = hmac.new(key, b"lmcache-chunk-v2", "sha256")
    h.update(head)
    h.update(stored)
    return h.digest()


# -- header --------------------------------------------------------------------------------------
def encode_header(h: ChunkHeader) -> bytes:
    """The header bytes up to (not including) the tag; :func:`seal` appends the tag."""
    meta = msgpack.packb(
        {
            "key": h.key.to_bytes(),
            "tokens": h.num_tokens,
            "layout": h.geometry.signature,
            "dtype": h.geometry.dtype,
            "shape": list(h.shape),
            "codec": h.codec,
            "payload_len": h.payload_len,
            "stored_len": h.stored_len,
        }
    )
    head = _PREFIX.pack(MAGIC, VERSION, h.flags, len(meta)) + meta
    head += xxhash.xxh3_64_digest(head)
    tag_len = TAG_KEYED if h.flags & FLAG_KEYED else TAG_PLAIN
    if len(head) + tag_len > HEADER_SIZE:
        raise ChunkError(f"chunk header of {len(head) + tag_len} bytes exceeds {HEADER_SIZE}")
    return head


def _int_field(meta: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = meta[name]
    if not lo <= v <= hi:
        raise ChunkError(f"chunk header field {name}={v} is outside [{lo}, {hi}]")
    return v


def decode_header(data: bytes | memoryview) -> ChunkHeader:
    """Parse a header (the first 4096 bytes of an image) and check every field against every
    other; raise ChunkError on any mismatch. The tag is checked by :func:`decode_image`, with
    the payload: until then nothing here is trusted beyond sizing a read."""
    try:
        return _decode_header(memoryview(data).cast("B"))
    except ChunkError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a hostile header does, it is a bad chunk
        raise ChunkError(f"chunk header is invalid: {type(exc).__name__}: {exc}") from exc


def _decode_header(mv: memoryview) -> ChunkHeader:
    if len(mv) < HEADER_SIZE:
        raise ChunkError(f"chunk image of {len(mv)} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, version, flags, meta_len = _PREFIX.unpack_from(mv)
    if magic != MAGIC:
        raise ChunkError(f"bad magic {bytes(magic)!r}: not an lmcache chunk")
    if version != VERSION:
        raise ChunkError(f"chunk format version {version} is not supported (this build reads {VERSION})")
    if flags & ~FLAG_KEYED:
        raise ChunkError(f"chunk header flags {flags:#x} are unknown")
    tag_len = TAG_KEYED if flags & FLAG_KEYED else TAG_PLAIN
    end = _PREFIX.size + meta_len
    if end + 8 + tag_len > HEADER_SIZE:
        raise ChunkError(f"chunk header metadata length {meta_len} does not fit the header")
    if xxhash.xxh3_64_digest(mv[:end]) != bytes(mv[end : end + 8]):
        raise ChunkError("chunk header checksum mismatch")
    tag_offset = end + 8
    pad = HEADER_SIZE - tag_offset - tag_len
    if mv[tag_offset + tag_len : HEADER_SIZE].tobytes() != bytes(pad):
        raise ChunkError("chunk header padding is not zero")
    try:
        meta = msgpack.unpackb(mv[_PREFIX.size : end], raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ChunkError(f"chunk header metadata is not msgpack: {exc}") from exc
    if type(meta) is not dict or set(meta) != set(_META_TYPES):
        raise ChunkError(f"chunk header metadata must hold exactly {sorted(_META_TYPES)}")
    for name, typ in _META_TYPES.items():
        if type(meta[name]) is not typ:
            raise ChunkError(f"chunk header field {name} is a {type(meta[name]).__name__}, not {typ.__name__}")
    tokens = _int_field(meta, "tokens", 1, MAX_TOKENS)
    payload_len = _int_field(meta, "payload_len", 1, MAX_PAYLOAD_BYTES)
    stored_len = _int_field(meta, "stored_len", 1, MAX_STORED_EXTRA(MAX_PAYLOAD_BYTES))
    codec = meta["codec"]
    if codec not in CODECS and not _codecs.REGISTRY.known_wire(codec):
        raise ChunkError(f"chunk codec {codec!r} is unknown")
    try:
        geometry = ChunkGeometry.from_signature(meta["layout"])
    except ValueError as exc:
        raise ChunkError(f"chunk layout is invalid: {exc}") from exc
    if geometry.signature != meta["layout"] or geometry.dtype != meta["dtype"]:
        raise ChunkError(f"chunk layout {meta['layout']!r} or dtype {meta['dtype']!r} is not canonical")
    if meta["shape"] != list(geometry.shape(tokens)):
        raise ChunkError(f"chunk shape {meta['shape']} disagrees with layout {geometry.signature} x {tokens} tokens")
    if payload_len != geometry.nbytes(tokens):
        raise ChunkError(f"chunk payload length {payload_len} disagrees with its shape ({geometry.nbytes(tokens)})")
    if codec == "none" and stored_len != payload_len:
        raise ChunkError(f"chunk stores {stored_len} bytes but codec none needs exactly {payload_len}")
    if codec == "zlib" and stored_len > payload_len + payload_len // 100 + 1024:
        raise ChunkError(f"chunk's {stored_len} zlib bytes exceed the bound for {payload_len} bytes")
    key = ChunkKey.from_bytes(meta["key"], tokens)
    if codec not in CODECS:
        ctx = _codecs.CodecContext(key, geometry, tokens)
        bound = min(_codecs.REGISTRY.chain_for_wire(codec).max_encoded_len(payload_len, ctx),
                    MAX_STORED_EXTRA(payload_len))
        if stored_len > bound:
            raise ChunkError(f"chunk's {stored_len} {codec} bytes exceed the bound {bound} for {payload_len} bytes")
    checksum = bytes(mv[tag_offset : tag_offset + tag_len])
    return ChunkHeader(key, geometry, tokens, codec, payload_len, stored_len, checksum, flags, tag_offset)


class ChunkBuffer:
    """A chunk's image in a pooled buffer: header region, then payload. Reference counted."""

    __slots__ = ("buf", "header")

    def __init__(self, buf: PooledBuffer, header: ChunkHeader) -> None:
        self.buf = buf
        self.header = header

    @property
    def key(self) -> ChunkKey:
        return self.header.key

    @property
    def num_tokens(self) -> int:
        return self.header.num_tokens

    @property
    def nbytes(self) -> int:
        return self.buf.capacity

    def kv(self, first: int = 0, end: int | None = None) -> "torch.Tensor":
        """The payload as ``[layers, planes, tokens, hidden]`` of the KV dtype (no copy); with
        ``first``/``end``, only those tokens (the same view as slicing the third dimension)."""
        h = self.header
        if h.codec != "none":
            raise ChunkError("kv() on an encoded chunk; decode it first")
        g = h.geometry
        n = h.num_tokens
        end = n if end is None else end
        if not 0 <= first <= end <= n:
            raise ChunkError(f"tokens [{first}:{end}] of a chunk of {n}")
        dtype = torch_dtype(g.dtype)
        t = self.buf.typed(dtype)
        elem = t.element_size()
        layers, planes, hidden = g.num_layers, g.kv_planes, g.hidden
        # the view's bounds are checked here: the buffer may be carved from a larger allocation,
        # whose storage as_strided would check against instead
        if h.payload_len != layers * planes * n * hidden * elem or HEADER_SIZE + h.payload_len > self.buf.capacity:
            raise ChunkError(f"payload of {h.payload_len} bytes does not hold {n} tokens of {g.signature} "
                             f"in a buffer of {self.buf.capacity}")
        return t.as_strided((layers, planes, end - first, hidden), (planes * n * hidden, n * hidden, hidden, 1),
                            t.storage_offset() + HEADER_SIZE // elem + first * hidden)

    def coded(self) -> "torch.Tensor":
        """The stored payload as a 1-D uint8 tensor (no copy): what a device codec gathers into
        and scatters from (``kv_codec``), where ``kv()`` is for plain chunks."""
        return self.buf.view(HEADER_SIZE, self.header.stored_len)

    def image(self) -> memoryview:
        """Header and stored payload, exactly the bytes a store writes."""
        return self.buf.memoryview(0, self.header.image_len)

    def padded_image(self) -> memoryview:
        """The image padded to 4096 bytes (for O_DIRECT writes); the padding is ignored on read."""
        return self.buf.memoryview(0, min(self.buf.capacity, round_up(self.header.image_len)))

    def retain(self) -> "ChunkBuffer":
        self.buf.retain()
        return self

    def release(self) -> None:
        self.buf.release()


@functools.lru_cache(maxsize=256)
def coded_len(geometry: ChunkGeometry, num_tokens: int, codec: str = "none") -> int:
    """Stored bytes of a chunk a device codec (wire id ``codec``) fills, or its plain size (cached:
    the engine asks for every chunk of every request, and resolving a chain builds it anew)."""
    n = geometry.nbytes(num_tokens)
    if codec == "none":
        return n
    ctx = _codecs.CodecContext(ChunkKey(bytes(16), bytes(16), num_tokens), geometry, num_tokens)
    return _codecs.REGISTRY.chain_for_wire(codec).max_encoded_len(n, ctx)


def new_chunk(pool: BufferPool, key: ChunkKey, geometry: ChunkGeometry, num_tokens: int,
              codec: str = "none") -> ChunkBuffer:
    """An empty chunk whose ``kv()`` the device gathers into; seal it before storing. With a
    device codec's wire id (``codec``) the buffer holds that codec's stored form instead
    (``coded()``, exactly its size), which the device writes and :func:`seal` tags as is."""
    n = geometry.nbytes(num_tokens)
    stored = coded_len(geometry, num_tokens, codec)
    buf = pool.acquire(HEADER_SIZE + stored)
    header = ChunkHeader(key, geometry, num_tokens, codec, n, stored, b"")
    return ChunkBuffer(buf, header)


def seal(chunk: ChunkBuffer, codec: str = "none", pool: BufferPool | None = None) -> ChunkBuffer:
    """Tag header and payload and write the header into the image; encode with ``codec``.

    With ``codec="none"`` the image is sealed in place (no copy). Other codecs
    produce a new buffer (compression cannot be in place) and release ``chunk``.
    The tag is keyed when an integrity key is set for ``pool`` (or the process).
    """
    h = chunk.header
    if h.codec != "none":  # filled in its coded form by the device (new_chunk's codec)
        if codec not in ("none", h.codec):
            raise ValueError(f"chunk {h.key} holds {h.codec} bytes already; it cannot be coded with {codec}")
        return _write_header(chunk, h.codec, chunk.buf.memoryview(HEADER_SIZE, h.stored_len), pool)
    payload = chunk.buf.memoryview(HEADER_SIZE, h.payload_len)
    if codec == "none":
        stored = payload
        out = chunk
    elif codec == "zlib":
        if pool is None:
            raise ValueError("seal(codec='zlib') needs a pool for the encoded image")
        data = zlib.compress(payload, 1)
        buf = pool.acquire(HEADER_SIZE + len(data))
        buf.memoryview(HEADER_SIZE, len(data))[:] = data
        out = ChunkBuffer(buf, h)
        stored = buf.memoryview(HEADER_SIZE, len(data))
        chunk.release()
    else:
        if pool is None:
            raise ValueError(f"seal(codec={codec!r}) needs a pool for the encoded image")
        chain = _codecs.resolve(codec)
        if chain is None:
            raise ValueError(f"codec must be one of {CODECS} or a registered codec, got {codec!r}")
        out = encode_chunk(chunk, chain, pool)
        chunk.release()
        return out
    return _write_header(out, codec, stored, pool)


def _write_header(out: ChunkBuffer, codec: str, stored: memoryview, pool: BufferPool | None) -> ChunkBuffer:
    """Tag ``out``'s header (with ``codec``) and ``stored`` payload and write the header in place."""
    h = out.header
    key = _KEYRING.get(pool)
    flags = FLAG_KEYED if key is not None else 0
    header = ChunkHeader(h.key, h.geometry, h.num_tokens, codec, h.payload_len, len(stored), b"", flags)
    head = encode_header(header)
    tag = _tag(head, stored, key)
    mv = out.buf.memoryview(0, HEADER_SIZE)
    mv[: len(head)] = head
    mv[len(head) : len(head) + len(tag)] = tag
    mv[len(head) + len(tag) :] = bytes(HEADER_SIZE - len(head) - len(tag))
    out.header = ChunkHeader(h.key, h.geometry, h.num_tokens, codec, h.payload_len, len(stored), tag, flags,
                             len(head))
    return out


def encode_chunk(chunk: ChunkBuffer, chain: "_codecs.Chain", pool: BufferPool, key: ChunkKey | None = None) -> ChunkBuffer:
    """A new sealed image of plain ``chunk``'s payload coded by ``chain`` (``chunk`` is not
    consumed), under ``key`` (a lossy chain's namespace) or the chunk's own. Raises ValueError
    when the chain cannot code this chunk's layout."""
    h = chunk.header
    if h.codec != "none":
        raise ValueError(f"chunk {h.key} is already coded ({h.codec}); codecs apply to plain chunks")
    key = h.key if key is None else key
    ctx = _codecs.CodecContext(key, h.geometry, h.num_tokens, pool)
    why = chain.supports(ctx)
    if why:
        raise ValueError(why)
    data = memoryview(chain.encode(chunk.buf.memoryview(HEADER_SIZE, h.payload_len), ctx)).cast("B")
    if len(data) > MAX_STORED_EXTRA(h.payload_len):
        raise ValueError(f"codec {chain.name} made {len(data)} bytes of a {h.payload_len}-byte chunk {h.key}, "
                         f"more than a header may declare; not storing it coded")
    buf = pool.acquire(HEADER_SIZE + len(data))
    try:
        stored = buf.memoryview(HEADER_SIZE, len(data))
        stored[:] = data
        out = ChunkBuffer(buf, ChunkHeader(key, h.geometry, h.num_tokens, chain.wire_id, h.payload_len,
                                           len(data), b""))
        return _write_header(out, chain.wire_id, stored, pool)
    except BaseException:
        buf.release()
        raise


def encode_coded(chunk: ChunkBuffer, chain: "_codecs.Chain", pool: BufferPool) -> ChunkBuffer:
    """A new sealed image of a device-coded ``chunk`` (``new_chunk(codec)``, e.g. fp8) whose stored
    bytes ``chain`` codes further: ``lossless`` (zstd over the fp8 bytes, exact), ``aesgcm``
    (encryption at rest) or both; the header names every stage, ``fp8-e4m3-th/1+aesgcm/1``, as a
    tier chain ``fp8+aesgcm`` writes it. ``chunk`` is not consumed. Only lossless chains apply:
    they keep the namespace (ValueError otherwise)."""
    h = chunk.header
    if h.codec == "none":
        raise ValueError(f"chunk {h.key} is plain; use encode_chunk")
    if not chain.lossless:
        raise ValueError(f"codec {chain.name} cannot code {h.codec} images (only lossless codecs, lossless and "
                         "aesgcm, apply to a device codec's bytes)")
    wire = f"{h.codec}+{chain.wire_id}"
    full = _codecs.REGISTRY.chain_for_wire(wire)  # a valid chain, or ValueError-like ChunkError
    ctx = _codecs.CodecContext(h.key, h.geometry, h.num_tokens, pool)
    data = memoryview(chain.encode(chunk.buf.memoryview(HEADER_SIZE, h.stored_len), ctx)).cast("B")
    if len(data) > full.max_encoded_len(h.payload_len, ctx):
        raise ValueError(f"codec {chain.name} made {len(data)} bytes of a {h.stored_len}-byte {h.codec} image")
    buf = pool.acquire(HEADER_SIZE + len(data))
    try:
        stored = buf.memoryview(HEADER_SIZE, len(data))
        stored[:] = data
        out = ChunkBuffer(buf, ChunkHeader(h.key, h.geometry, h.num_tokens, wire, h.payload_len, len(data), b""))
        return _write_header(out, wire, stored, pool)
    except BaseException:
        buf.release()
        raise


def decode_image(buf: PooledBuffer, nbytes: int, expected: ChunkKey | None, pool: BufferPool,
                 geometry: ChunkGeometry | None = None) -> ChunkBuffer:
    """Verify an image read into ``buf`` (``nbytes`` valid bytes) and return it as a chunk.

    Takes ownership of ``buf``: on failure it is released and ChunkError raised, whatever
    went wrong (a pool misuse or running out of memory excepted). ``expected`` is the key the
    caller asked for (its ``num_tokens``, when set, must match too).
    """
    try:
        return _decode_image(buf, nbytes, expected, pool, geometry)
    except ChunkError:
        raise
    except (MemoryError, BufferError_):
        raise
    except Exception as exc:  # noqa: BLE001 - any decode failure is a bad chunk, to be deleted
        raise ChunkError(f"chunk {expected} cannot be decoded: {type(exc).__name__}: {exc}") from exc


def _decode_image(buf: PooledBuffer, nbytes: int, expected: ChunkKey | None, pool: BufferPool,
                  geometry: ChunkGeometry | None) -> ChunkBuffer:
    owned = buf
    try:
        if type(nbytes) is not int or not 0 <= nbytes <= buf.capacity:
            raise ChunkError(f"chunk read reports {nbytes!r} bytes in a buffer of {buf.capacity}")
        whole = buf.memoryview(0, nbytes)
        header = decode_header(whole[:HEADER_SIZE])
        if expected is not None and header.key != expected:
            raise ChunkError(f"chunk holds key {header.key} but was stored under {expected}")
        if expected is not None and expected.num_tokens and header.num_tokens != expected.num_tokens:
            raise ChunkError(f"chunk {expected} holds {header.num_tokens} tokens, its key {expected.num_tokens}")
        if geometry is not None and header.geometry != geometry:
            raise ChunkError(f"chunk layout {header.geometry.signature} != expected {geometry.signature}")
        if not header.image_len <= nbytes <= round_up(header.image_len):
            raise ChunkError(f"chunk image is {nbytes} bytes, its header describes {header.image_len}")
        key = _KEYRING.get(pool)
        if key is None and header.flags & FLAG_KEYED:
            raise ChunkError(f"chunk {header.key} is sealed with an integrity key and this process has none; "
                             "set integrity_key or integrity_key_file")
        if key is not None and not header.flags & FLAG_KEYED:
            raise ChunkError(f"chunk {header.key} carries no keyed tag; with an integrity key set only chunks "
                             "sealed with it are accepted")
        stored = whole[HEADER_SIZE : header.image_len]
        if not hmac.compare_digest(_tag(whole[: header.tag_offset], stored, key), header.checksum):
            raise ChunkError(f"chunk {header.key} fails its {'keyed ' if key else ''}integrity check")
        if header.codec == "none":
            return ChunkBuffer(buf, header)
        kept = _KEPT.get(pool, ())
        if header.codec in kept:  # the engine's device decodes it (kv_codec)
            check_kept(header, buf.view(HEADER_SIZE, header.stored_len))
            return ChunkBuffer(buf, header)
        for k in kept:
            if header.codec.startswith(k + "+"):  # e.g. fp8 then aesgcm: undo the rest
                return _decode_to_kept(buf, header, k, pool)
        plain = pool.acquire(HEADER_SIZE + header.payload_len)
        owned = plain
        if header.codec == "zlib":
            _inflate(stored, plain.memoryview(HEADER_SIZE, header.payload_len), header)
        else:
            ctx = _codecs.CodecContext(header.key, header.geometry, header.num_tokens, pool)
            decoded = _codecs.REGISTRY.chain_for_wire(header.codec).decode(stored, header.payload_len, ctx)
            plain.memoryview(HEADER_SIZE, header.payload_len)[:] = memoryview(decoded).cast("B")
        buf.release()
        owned = buf = plain
        header = ChunkHeader(header.key, header.geometry, header.num_tokens, "none",
                             header.payload_len, header.payload_len, b"")
        return seal(ChunkBuffer(plain, header), "none", pool)  # a plain image, valid in any tier
    except BaseException:
        owned.release()
        if owned is not buf:
            buf.release()
        raise


# -- chunks kept coded for the device ----------------------------------------------------------
_KEPT: "weakref.WeakKeyDictionary[BufferPool, tuple[str, ...]]" = weakref.WeakKeyDictionary()


def keep_coded(pool: BufferPool, *codecs: str) -> None:
    """Reads into ``pool`` return chunks of ``codecs`` (device codecs' wire ids) still coded,
    their stream checked but not decoded: the engine's device decodes them as it scatters
    (``kv_codec``), the daemon stores and serves them as they are. Chunks of any other codec
    are decoded on the host as before."""
    for codec in codecs:
        if codec not in _KEPT_CHECKS:
            raise ValueError(f"codec {codec!r} is not a device codec; device codecs: {sorted(_KEPT_CHECKS)}")
    _KEPT[pool] = tuple(codecs)


def device_codecs() -> tuple[str, ...]:
    """Wire ids of the codecs a device can fuse into its copies (what :func:`keep_coded` takes)."""
    return tuple(_KEPT_CHECKS)


def _decode_to_kept(buf: PooledBuffer, header: ChunkHeader, kept: str, pool: BufferPool) -> ChunkBuffer:
    """Undo the codecs after the kept device codec (decryption): a sealed chunk of the kept
    codec's stored form, checked. Takes ``buf`` (released on success and on failure)."""
    ctx = _codecs.CodecContext(header.key, header.geometry, header.num_tokens, pool)
    rest = _codecs.REGISTRY.chain_for_wire(header.codec[len(kept) + 1:])
    want = _codecs.REGISTRY.chain_for_wire(kept).max_encoded_len(header.payload_len, ctx)
    stored = buf.memoryview(HEADER_SIZE, header.stored_len)
    decoded = memoryview(rest.decode(stored, want, ctx)).cast("B")
    out = pool.acquire(HEADER_SIZE + want)
    try:
        out.memoryview(HEADER_SIZE, want)[:] = decoded
        plain = ChunkHeader(header.key, header.geometry, header.num_tokens, kept, header.payload_len, want, b"")
        check_kept(plain, out.view(HEADER_SIZE, want))
        sealed = _write_header(ChunkBuffer(out, plain), kept, out.memoryview(HEADER_SIZE, want), pool)
    except BaseException:
        out.release()
        raise
    buf.release()  # last: on any failure above the caller releases it
    return sealed


def _check_fp8(header: ChunkHeader, stored: "torch.Tensor") -> None:
    from .codecs import fp8

    if header.stored_len != fp8.encoded_len(header.geometry, header.num_tokens):
        raise ChunkError(f"chunk {header.key}: fp8 stream of {header.stored_len} bytes, expected "
                         f"{fp8.encoded_len(header.geometry, header.num_tokens)}")
    fp8.check_image(header.geometry, stored, header.num_tokens, header.key)


_KEPT_CHECKS = {"fp8-e4m3-th/1": _check_fp8}


def check_kept(header: ChunkHeader, stored: "torch.Tensor") -> None:
    """ChunkError unless ``stored`` is a sound stream of the device codec ``header.codec`` (what
    a reader checks before it hands a still-coded chunk to the device)."""
    _KEPT_CHECKS[header.codec](header, stored)


def _inflate(stored: memoryview, out: memoryview, header: ChunkHeader) -> None:
    """zlib-decompress ``stored`` into ``out``, never producing more than ``len(out)`` + 1
    bytes: a stream that inflates beyond the declared size is cut off, not allocated."""
    d = zlib.decompressobj()
    want, pos = len(out), 0
    tail: Any = stored
    while True:
        try:
            piece = d.decompress(tail, min(_INFLATE_STEP, want + 1 - pos))
        except zlib.error as exc:
            raise ChunkError(f"chunk {header.key} does not decompress: {exc}") from exc
        if pos + len(piece) > want:
            raise ChunkError(f"chunk {header.key} inflates beyond its declared {want} bytes")
        out[pos : pos + len(piece)] = piece
        pos += len(piece)
        before, tail = len(tail), d.unconsumed_tail
        if d.eof:
            break
        if not piece and len(tail) >= before:
            raise ChunkError(f"chunk {header.key}'s zlib stream is truncated")
    if d.unused_data or pos != want:
        raise ChunkError(f"chunk {header.key} decompressed to {pos} bytes (+{len(d.unused_data)} trailing), "
                         f"expected {want}")


__all__ = ["ChunkBuffer", "ChunkHeader", "HEADER_SIZE", "bind_integrity_key", "coded_len", "decode_header",
           "decode_image", "encode_chunk", "encode_coded", "encode_header", "integrity_keyed", "keep_coded", "new_chunk", "seal",
           "set_integrity_key", "itemsize"]
