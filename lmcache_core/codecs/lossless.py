"""``lossless``: exact for every KV dtype. The bytes of each value are split into planes
(all first bytes, then all second bytes, ...): in bf16/fp16 the sign-and-exponent byte of
neighbouring values repeats a few patterns and compresses well, the low mantissa byte hardly
at all, and zstd (level 1, entropy-coded literals) is left to find both. Each plane is one zstd
frame with its content size, decompressed with a cap at the plane's known size.

Stored form: ``u8 planes``, ``u32 length`` per plane, then the frames.
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
_HEAD = struct.Struct("<B")
_LEN = struct.Struct("<I")


class LosslessCodec(Codec):
    name = "lossless"
    wire_id = "lossless-zstd/1"
    lossless = True

    def __init__(self, options: "dict[str, Any] | None" = None) -> None:
        super().__init__(options)
        self._local = threading.local()  # zstd contexts are not thread-safe; one per thread

    def _cctx(self) -> "zstandard.ZstdCompressor":
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=_LEVEL, write_content_size=True)
        return c

    @staticmethod
    def _planes(ctx: CodecContext, n: int) -> int:
        size = itemsize(ctx.geometry.dtype)
        return size if n % size == 0 else 1  # chained after another codec: its bytes are opaque

    def encode(self, data: memoryview, ctx: CodecContext) -> bytes:
        n = len(data)
        planes = self._planes(ctx, n) if n == ctx.payload_len else 1
        arr = np.frombuffer(data, dtype=np.uint8)
        if planes > 1:
            arr = np.ascontiguousarray(arr.reshape(-1, planes).T)
        cctx = self._cctx()
        frames = [cctx.compress(arr[i].data if planes > 1 else arr.data) for i in range(planes)]
        return b"".join([_HEAD.pack(planes), *(_LEN.pack(len(f)) for f in frames), *frames])

    def decode(self, data: memoryview, limit: int, ctx: CodecContext) -> bytes:
        if len(data) < _HEAD.size:
            raise ChunkError(f"chunk {ctx.key}: lossless stream of {len(data)} bytes is truncated")
        (planes,) = _HEAD.unpack_from(data)
        if planes not in (1, 2, 4, 8) or limit % planes:
            raise ChunkError(f"chunk {ctx.key}: lossless stream declares {planes} planes for {limit} bytes")
        pos = _HEAD.size + planes * _LEN.size
        if len(data) < pos:
            raise ChunkError(f"chunk {ctx.key}: lossless stream of {len(data)} bytes is truncated")
        lens = [_LEN.unpack_from(data, _HEAD.size + i * _LEN.size)[0] for i in range(planes)]
        if pos + sum(lens) != len(data):
            raise ChunkError(f"chunk {ctx.key}: lossless planes of {sum(lens)} bytes do not fill the stream")
        dctx = zstandard.ZstdDecompressor()
        # a chained codec's input is only bounded by ``limit``; the payload's planes are exact
        plane_len = limit // planes
        out = np.empty((planes, plane_len), dtype=np.uint8) if planes > 1 else None
        for i, ln in enumerate(lens):
            frame = data[pos: pos + ln]
            pos += ln
            try:
                params = zstandard.get_frame_parameters(frame)
                if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR) or \
                        params.content_size > plane_len:
                    raise ChunkError(f"chunk {ctx.key}: lossless plane declares {params.content_size} bytes, "
                                     f"at most {plane_len} allowed")
                piece = dctx.decompress(frame, max_output_size=plane_len)
            except zstandard.ZstdError as exc:
                raise ChunkError(f"chunk {ctx.key}: lossless plane {i} does not decompress: {exc}") from exc
            if out is None:
                return piece
            if len(piece) != plane_len:
                raise ChunkError(f"chunk {ctx.key}: lossless plane {i} holds {len(piece)} bytes, expected {plane_len}")
            out[i] = np.frombuffer(piece, dtype=np.uint8)
        assert out is not None
        return out.T.tobytes()

    def max_encoded_len(self, n: int, ctx: CodecContext) -> int:
        return _HEAD.size + 8 * _LEN.size + n + n // 128 + 8 * 1024  # zstd's worst case: raw blocks
