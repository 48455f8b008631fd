"""A chunk at rest: a 4096-byte header, then the payload, in one aligned byte image.

Header: ``b"LMCK"``, format version, flags, metadata length, msgpack metadata
(key, token count, layout signature, dtype, shape, codec, payload lengths,
xxh3-128 of the stored payload), then xxh3-64 of everything before it. The
image is the same in every tier (memory, file, Redis value, S3 object), so a
gathered buffer is written as is and a read lands in a buffer that is used in
place. ``decode_image`` checks every field and the checksum, and raises
:class:`ChunkError` rather than return a chunk that fails.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack
import xxhash

from .errors import ChunkError
from .keys import ChunkKey
from .layout import ChunkGeometry, itemsize, torch_dtype
from .memory import BufferPool, PooledBuffer, round_up

if TYPE_CHECKING:
    import torch

MAGIC = b"LMCK"
VERSION = 1
HEADER_SIZE = 4096
_PREFIX = struct.Struct("<4sHHI")  # magic, version, flags, metadata length
CODECS = ("none", "zlib")


@dataclass(frozen=True)
class ChunkHeader:
    key: ChunkKey
    geometry: ChunkGeometry
    num_tokens: int
    codec: str
    payload_len: int  # decoded payload bytes
    stored_len: int  # bytes after the header in the image (after the codec)
    checksum: bytes  # xxh3-128 of the stored bytes

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.geometry.shape(self.num_tokens)

    @property
    def image_len(self) -> int:
        return HEADER_SIZE + self.stored_len


def encode_header(h: ChunkHeader) -> bytes:
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
            "checksum": h.checksum,
        }
    )
    head = _PREFIX.pack(MAGIC, VERSION, 0, len(meta)) + meta
    head += xxhash.xxh3_64_digest(head)
    if len(head) > HEADER_SIZE:
        raise ChunkError(f"chunk header of {len(head)} bytes exceeds {HEADER_SIZE}")
    return head


def decode_header(data: bytes | memoryview) -> ChunkHeader:
    """Parse and verify a header; raise ChunkError on any mismatch."""
    mv = memoryview(data)
    if len(mv) < _PREFIX.size:
        raise ChunkError(f"chunk image of {len(mv)} bytes is shorter than a header")
    magic, version, _flags, meta_len = _PREFIX.unpack_from(mv)
    if magic != MAGIC:
        raise ChunkError(f"bad magic {bytes(magic)!r}: not an lmcache chunk")
    if version != VERSION:
        raise ChunkError(f"chunk format version {version} is not supported (this build reads {VERSION})")
    end = _PREFIX.size + meta_len
    if end + 8 > min(len(mv), HEADER_SIZE):
        raise ChunkError("chunk header is truncated")
    if xxhash.xxh3_64_digest(mv[:end]) != bytes(mv[end : end + 8]):
        raise ChunkError("chunk header checksum mismatch")
    try:
        meta = msgpack.unpackb(mv[_PREFIX.size : end])
        geometry = ChunkGeometry.from_signature(meta["layout"])
        header = ChunkHeader(
            key=ChunkKey.from_bytes(meta["key"], meta["tokens"]),
            geometry=geometry,
            num_tokens=int(meta["tokens"]),
            codec=str(meta["codec"]),
            payload_len=int(meta["payload_len"]),
            stored_len=int(meta["stored_len"]),
            checksum=bytes(meta["checksum"]),
        )
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise ChunkError(f"chunk header metadata is invalid: {exc}") from exc
    if header.codec not in CODECS:
        raise ChunkError(f"chunk codec {header.codec!r} is unknown")
    if list(header.shape) != list(meta["shape"]) or geometry.dtype != meta["dtype"]:
        raise ChunkError("chunk header shape or dtype disagrees with its layout")
    if header.payload_len != geometry.nbytes(header.num_tokens):
        raise ChunkError("chunk payload length disagrees with its shape")
    return header


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

    def kv(self) -> "torch.Tensor":
        """The payload as ``[layers, planes, tokens, hidden]`` of the KV dtype (no copy)."""
        if self.header.codec != "none":
            raise ChunkError("kv() on an encoded chunk; decode it first")
        g = self.header.geometry
        return self.buf.view(HEADER_SIZE, self.header.payload_len).view(torch_dtype(g.dtype)).view(
            g.shape(self.header.num_tokens)
        )

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


def new_chunk(pool: BufferPool, key: ChunkKey, geometry: ChunkGeometry, num_tokens: int) -> ChunkBuffer:
    """An empty chunk whose ``kv()`` the device gathers into; seal it before storing."""
    n = geometry.nbytes(num_tokens)
    buf = pool.acquire(HEADER_SIZE + n)
    header = ChunkHeader(key, geometry, num_tokens, "none", n, n, b"")
    return ChunkBuffer(buf, header)


def seal(chunk: ChunkBuffer, codec: str = "none", pool: BufferPool | None = None) -> ChunkBuffer:
    """Checksum the payload and write the header into the image; encode with ``codec``.

    With ``codec="none"`` the image is sealed in place (no copy). Other codecs
    produce a new buffer (compression cannot be in place) and release ``chunk``.
    """
    h = chunk.header
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
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    header = ChunkHeader(h.key, h.geometry, h.num_tokens, codec, h.payload_len, len(stored),
                         xxhash.xxh3_128_digest(stored))
    head = encode_header(header)
    mv = out.buf.memoryview(0, HEADER_SIZE)
    mv[: len(head)] = head
    mv[len(head) :] = bytes(HEADER_SIZE - len(head))
    out.header = header
    return out


def decode_image(buf: PooledBuffer, nbytes: int, expected: ChunkKey | None, pool: BufferPool,
                 geometry: ChunkGeometry | None = None) -> ChunkBuffer:
    """Verify an image read into ``buf`` (``nbytes`` valid bytes) and return it as a chunk.

    Takes ownership of ``buf``: on failure it is released and ChunkError raised.
    """
    try:
        header = decode_header(buf.memoryview(0, min(nbytes, HEADER_SIZE)))
        if expected is not None and header.key != expected:
            raise ChunkError(f"chunk holds key {header.key} but was stored under {expected}")
        if geometry is not None and header.geometry != geometry:
            raise ChunkError(f"chunk layout {header.geometry.signature} != expected {geometry.signature}")
        if nbytes < header.image_len:
            raise ChunkError(f"chunk is truncated: {nbytes} bytes, header says {header.image_len}")
        stored = buf.memoryview(HEADER_SIZE, header.stored_len)
        if xxhash.xxh3_128_digest(stored) != header.checksum:
            raise ChunkError(f"chunk {header.key} payload checksum mismatch")
        if header.codec == "zlib":
            try:
                data = zlib.decompress(stored)
            except zlib.error as exc:
                raise ChunkError(f"chunk {header.key} does not decompress: {exc}") from exc
            if len(data) != header.payload_len:
                raise ChunkError(f"chunk {header.key} decompressed to {len(data)} bytes, expected {header.payload_len}")
            plain = pool.acquire(HEADER_SIZE + len(data))
            plain.memoryview(HEADER_SIZE, len(data))[:] = data
            buf.release()
            buf = plain
            header = ChunkHeader(header.key, header.geometry, header.num_tokens, "none",
                                 header.payload_len, header.payload_len, b"")
            return seal(ChunkBuffer(buf, header))  # a plain image, valid in any tier
    except BaseException:
        buf.release()
        raise
    return ChunkBuffer(buf, header)


__all__ = ["ChunkBuffer", "ChunkHeader", "HEADER_SIZE", "decode_header", "decode_image", "encode_header",
           "new_chunk", "seal", "itemsize"]
