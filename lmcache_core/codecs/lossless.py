"""``lossless``: exact for every KV dtype. The bytes of each value are split into planes
(low bytes, then high bytes, ...): in bf16/fp16 the sign-and-exponent byte of neighbouring
values repeats a few patterns and compresses well (zstd level 1, entropy-coded literals), the
low mantissa byte hardly at all, so a plane that zstd cannot shrink by 2% is stored raw (no
time spent decoding it). Planes are split and joined with integer shifts (vectorised, no
strided copies). Each zstd plane is one frame with its content size, decompressed with a cap
at the plane's known size.

Stored form: ``u8 planes``, per plane ``u8 mode`` (0 raw, 1 zstd) and ``u32 length``, then
the planes.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import numpy as np
import zstandard

from ..errors import ChunkError
from ..layout import itemsize
from .base import Codec, CodecContext

_LEVEL = 1
_RAW, _ZSTD = 0, 1
_KEEP = 0.98  # a plane zstd shrinks less than this is stored raw
_HEAD = struct.Struct("<B")
_PLANE = struct.Struct("<BI")
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def split_planes(data: memoryview, size: int) -> list[np.ndarray]:
    """Byte ``i`` of every ``size``-byte value, for each ``i`` (little-endian)."""
    if size == 1:
        return [np.frombuffer(data, np.uint8)]
    words = np.frombuffer(data, _UINT[size])
    return [((words >> (8 * i)) & 0xFF).astype(np.uint8) for i in range(size)]


def join_planes(planes: list[np.ndarray], size: int) -> bytes:
    if size == 1:
        return planes[0].tobytes()
    words = planes[0].astype(_UINT[size])
    for i in range(1, size):
        words |= planes[i].astype(_UINT[size]) << (8 * i)
    return words.tobytes()


class LosslessCodec(Codec):
    name = "lossless"
    wire_id = "lossless-zstd/2"
    lossless = True

    def __init__(self, options: "dict[str, Any] | None" = None) -> None:
        super().__init__(options)
        self._local = threading.local()  # zstd contexts are not thread-safe; one per thread

    def _ctx(self) -> tuple["zstandard.ZstdCompressor", "zstandard.ZstdDecompressor"]:
        c = getattr(self._local, "ctx", None)
        if c is None:
            c = self._local.ctx = (zstandard.ZstdCompressor(level=_LEVEL, write_content_size=True),
                                   zstandard.ZstdDecompressor())
        return c

    def encode(self, data: memoryview, ctx: CodecContext) -> bytes:
        n = len(data)
        size = itemsize(ctx.geometry.dtype)
        if n != ctx.payload_len or size not in _UINT or n % size:
            size = 1  # chained after another codec: its bytes are opaque
        cctx = self._ctx()[0]
        heads, bodies = [_HEAD.pack(size)], []
        for plane in split_planes(data, size):
            z = cctx.compress(plane.data)
            mode, body = (_ZSTD, z) if len(z) < _KEEP * plane.nbytes else (_RAW, plane.tobytes())
            heads.append(_PLANE.pack(mode, len(body)))
            bodies.append(body)
        return b"".join(heads + bodies)

    def decode(self, data: memoryview, limit: int, ctx: CodecContext) -> bytes:
        if len(data) < _HEAD.size:
            raise ChunkError(f"chunk {ctx.key}: lossless stream of {len(data)} bytes is truncated")
        (size,) = _HEAD.unpack_from(data)
        if size not in (1, *_UINT) or limit % size:
            raise ChunkError(f"chunk {ctx.key}: lossless stream declares {size} planes for {limit} bytes")
        pos = _HEAD.size + size * _PLANE.size
        if len(data) < pos:
            raise ChunkError(f"chunk {ctx.key}: lossless stream of {len(data)} bytes is truncated")
        modes = [_PLANE.unpack_from(data, _HEAD.size + i * _PLANE.size) for i in range(size)]
        if pos + sum(ln for _, ln in modes) != len(data):
            raise ChunkError(f"chunk {ctx.key}: lossless planes do not fill the stream")
        dctx = self._ctx()[1]
        # the payload's planes are exact; a chained codec's input (one plane) is only bounded
        plane_len = limit // size
        planes = []
        for i, (mode, ln) in enumerate(modes):
            body = data[pos: pos + ln]
            pos += ln
            if mode == _RAW:
                piece: Any = body
            elif mode == _ZSTD:
                try:
                    params = zstandard.get_frame_parameters(body)
                    if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR) or \
                            params.content_size > plane_len:
                        raise ChunkError(f"chunk {ctx.key}: lossless plane declares {params.content_size} bytes, "
                                         f"at most {plane_len} allowed")
                    piece = dctx.decompress(body, max_output_size=plane_len)
                except zstandard.ZstdError as exc:
                    raise ChunkError(f"chunk {ctx.key}: lossless plane {i} does not decompress: {exc}") from exc
            else:
                raise ChunkError(f"chunk {ctx.key}: lossless plane {i} has unknown mode {mode}")
            if size == 1:
                return bytes(piece)
            if len(piece) != plane_len:
                raise ChunkError(f"chunk {ctx.key}: lossless plane {i} holds {len(piece)} bytes, expected {plane_len}")
            planes.append(np.frombuffer(piece, dtype=np.uint8))
        return join_planes(planes, size)

    def max_encoded_len(self, n: int, ctx: CodecContext) -> int:
        return _HEAD.size + 8 * _PLANE.size + n + 1024  # every plane raw at worst
