"""The codec contract: what a codec plugin provides, and the context it codes a chunk in.

A codec turns a chunk's payload (``[layers, planes, tokens, hidden]`` of the KV dtype,
layer-major) into stored bytes and back. It declares, as class attributes:

- ``name``: what a tier URL names (``disk:///x?codec=lossless``);
- ``wire_id``: what the chunk header records (``lossless-zstd/2``); every read checks it, and a
  change of the stored format is a new wire id, never the same one;
- ``lossless``: whether decode gives back every byte; a lossy codec declares ``error_bound``:
  the largest ``|x - decode(encode(x))|`` as a fraction of ``max|x|`` of the same layer and
  plane of the chunk (the conformance suite checks it on real KV);
- ``where``: ``host`` (between the pinned buffer and a tier) or ``device`` (fused into
  gather/scatter, with a host reference so every tier can read what the device wrote).

Lossy codecs are part of the key namespace (:func:`lmcache_core.codecs.lossy_namespace`), so a
lossy chunk is never read where an exact one was asked for. Decoding failures raise
:class:`~lmcache_core.errors.ChunkError`: the tier stack counts the chunk as corrupt and treats
it as a miss.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ChunkError

if TYPE_CHECKING:
    import numpy as np

    from ..keys import ChunkKey
    from ..layout import ChunkGeometry
    from ..memory import BufferPool

HOST = "host"
DEVICE = "device"


@dataclass(frozen=True)
class CodecContext:
    """What a codec may use to code one chunk: its key (associated data, per-tenant keys), its
    layout and token count, and the engine's buffer pool (secrets are bound to it)."""

    key: "ChunkKey"
    geometry: "ChunkGeometry"
    num_tokens: int
    pool: "BufferPool | None" = None

    @property
    def payload_len(self) -> int:
        return self.geometry.nbytes(self.num_tokens)


class Codec(abc.ABC):
    """Base class of codec plugins. Instances are stateless apart from configuration and
    must be thread-safe: writer and reader threads of every tier share one."""

    name: ClassVar[str] = ""
    wire_id: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    error_bound: ClassVar[float] = 0.0  # fraction of max|x| per layer and plane (lossy codecs)
    where: ClassVar[str] = HOST
    #: KV dtypes the codec accepts (empty: all)
    dtypes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: "dict[str, Any] | None" = None) -> None:
        self.options = dict(options or {})

    @abc.abstractmethod
    def encode(self, data: memoryview, ctx: CodecContext) -> "bytes | bytearray | memoryview":
        """The stored form of ``data`` (a payload, or the previous codec's output in a chain)."""

    @abc.abstractmethod
    def decode(self, data: memoryview, limit: int, ctx: CodecContext) -> "bytes | bytearray | memoryview":
        """Invert :meth:`encode`, producing at most ``limit`` bytes (the payload length, when this
        codec is first in its chain; never allocate more). Raise ChunkError on anything that
        does not decode."""

    def max_encoded_len(self, n: int, ctx: CodecContext) -> int:
        """Upper bound of what ``encode`` makes of ``n`` bytes (a header claiming more is rejected
        before any decoding)."""
        return n + n // 64 + 1024

    def supports(self, ctx: CodecContext) -> str:
        """Why this codec cannot code chunks of ``ctx`` ("" when it can)."""
        if self.dtypes and ctx.geometry.dtype not in self.dtypes:
            return f"codec {self.name} codes {', '.join(self.dtypes)} KV, not {ctx.geometry.dtype}"
        return ""


def to_float32(data: "memoryview | bytes", dtype: str) -> "np.ndarray":
    """KV bytes of ``dtype`` (float32, float16, bfloat16) as a float32 array (numpy: one thread,
    no thread-pool wake-ups on a busy host)."""
    import numpy as np

    if dtype == "bfloat16":
        return (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16":
        return np.frombuffer(data, np.float16).astype(np.float32)
    return np.frombuffer(data, np.float32)


def round_bf16(x: "np.ndarray") -> "np.ndarray":
    """float32 values rounded to bf16 (nearest-even), still as float32."""
    import numpy as np

    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def from_float32(x: "np.ndarray", dtype: str) -> bytes:
    """float32 values rounded to ``dtype`` (nearest-even, as torch rounds), as bytes."""
    import numpy as np

    if dtype == "bfloat16":
        return (round_bf16(x).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    if dtype == "float16":
        return np.ascontiguousarray(x).astype(np.float16).tobytes()
    return np.ascontiguousarray(x, dtype=np.float32).tobytes()


def check_len(got: int, want: int, what: str, ctx: CodecContext) -> None:
    """ChunkError unless a decoded length is what the header declared."""
    if got != want:
        raise ChunkError(f"chunk {ctx.key}: {what} decoded to {got} bytes, expected {want}")


__all__ = ["Codec", "CodecContext", "DEVICE", "HOST", "check_len", "from_float32", "round_bf16", "to_float32"]
