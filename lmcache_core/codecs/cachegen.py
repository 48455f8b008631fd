"""``cachegen``: the CacheGen idea on the host, for bandwidth-bound links (S3, Redis, peers).

Per chunk, for every layer, plane and channel (one of ``heads * dim``):

1. *layer-dependent quantisation*: ``q = round(x / step)`` with ``step = amax / 2**(b - 1)``,
   ``amax`` the channel's largest ``|x|`` in the chunk and ``b`` bits by layer depth (early
   layers matter most to later tokens: 8 bits in the first third, 7 in the second, 6 in the
   last by default);
2. *deltas to an anchor token*: tokens come in groups of 16; the first of each group (the
   anchor) is coded against the channel's mean, the others as their difference to the anchor
   (neighbouring tokens' KV are close, so deltas are small; groups decode independently);
3. *arithmetic coding*: ANS (``constriction``) with a discretised Laplace model per channel,
   chosen from 24 fixed scales (half octaves) by the channel's mean ``|symbol|``, one class for
   its anchors and one for its deltas; channels of one class are coded in one vectorised call.

The per-element error is at most ``step / 2`` plus the rounding to the KV dtype: a fraction
``2**-b + 2**-8`` of the channel's ``amax`` (``amax`` rounded to bf16 first), so the declared
bound (6 bits or more) is 0.02. Decoding recomputes every value from integers, and an xxh3-64
of each decoded layer travels with it: a model that decoded differently on another machine is
a miss, never wrong KV.

Stored form: ``u8 group``, ``u8 layers``, ``u8 bits[layers]``, then per layer: bf16 amax, i16
mean, u8 anchor class, u8 delta class (each ``[planes * hidden]``), u64 checksum, u32 word
count, the ANS words.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any

import constriction
import numpy as np
import xxhash

from ..errors import ChunkError
from .base import Codec, CodecContext, from_float32, round_bf16, to_float32

GROUP = 16
DEFAULT_BITS = (8, 7, 6)  # first, second, last third of the layers
MIN_BITS, MAX_BITS = 6, 10
CLASSES = 24
_HEAD = struct.Struct("<BB")  # group, number of layers
_TAIL = struct.Struct("<QI")  # checksum, word count
_PER_CHANNEL = 2 + 2 + 1 + 1  # amax, mean, anchor class, delta class


def layer_bits(num_layers: int, thirds: tuple[int, int, int] = DEFAULT_BITS) -> list[int]:
    return [thirds[min(2, 3 * i // num_layers)] for i in range(num_layers)]


def class_scale(k: np.ndarray | int) -> np.ndarray:
    """Laplace scale of class ``k``: 2**(k/2 - 2), i.e. 0.25 to 724 symbols."""
    return np.power(2.0, np.asarray(k, dtype=np.float64) / 2 - 2)


def _classes(sym: np.ndarray) -> np.ndarray:
    """Class per channel (row) from its mean |symbol|."""
    m = np.maximum(np.abs(sym).mean(axis=1) if sym.shape[1] else np.ones(sym.shape[0]), 0.25)
    return np.clip(np.rint((np.log2(m) + 2) * 2), 0, CLASSES - 1).astype(np.uint8)


@lru_cache(maxsize=CLASSES * (MAX_BITS + 1))
def _model(k: int, b: int) -> Any:
    """Categorical over symbols -2**b..2**b (index = symbol + 2**b) of a discretised Laplace."""
    r = 1 << b
    edges = np.arange(-r, r + 2, dtype=np.float64) - 0.5
    tail = 0.5 * np.exp(-np.abs(edges) / class_scale(k))
    cdf = np.where(edges < 0, tail, 1 - tail)
    p = np.maximum(np.diff(cdf), 1e-12).astype(np.float32)
    return constriction.stream.model.Categorical(p / p.sum(), perfect=False)


class CacheGenCodec(Codec):
    name = "cachegen"
    wire_id = "cachegen/1"
    lossless = False
    error_bound = 2.0 ** -MIN_BITS + 2.0 ** -8
    dtypes = ("float32", "float16", "bfloat16")

    def __init__(self, options: "dict[str, Any] | None" = None) -> None:
        super().__init__(options)
        self.bits = DEFAULT_BITS

    @staticmethod
    def _split(t: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(t)
        return rows[rows % GROUP == 0], rows[rows % GROUP != 0]

    def encode(self, data: memoryview, ctx: CodecContext) -> bytes:
        g, t = ctx.geometry, ctx.num_tokens
        c = g.kv_planes * g.hidden
        x = to_float32(data, g.dtype).reshape(g.num_layers, g.kv_planes, t, g.hidden)
        bits = layer_bits(g.num_layers, self.bits)
        parts = [_HEAD.pack(GROUP, g.num_layers), bytes(bits)]
        anchors, others = self._split(t)
        owner = anchors[np.arange(t) // GROUP][others]  # the anchor of each non-anchor row
        for layer, b in enumerate(bits):
            xl = x[layer].transpose(0, 2, 1).reshape(c, t)  # channel-major
            amax = round_bf16(np.abs(xl).max(axis=1))
            step = self._step(amax, b)
            q = np.rint(xl / step[:, None]).astype(np.int32)
            mean = np.rint(q.mean(axis=1)).astype(np.int16)
            sa = q[:, anchors] - mean[:, None]
            sd = q[:, others] - q[:, owner]
            ka, kd = _classes(sa), _classes(sd)
            coder = constriction.stream.stack.AnsCoder()
            r = 1 << b
            for sym, cls in ((sd, kd), (sa, ka)):  # decoded anchors first, so encoded last
                if not sym.shape[1]:
                    continue
                order = np.argsort(cls, kind="stable")
                sorted_sym, sorted_cls = sym[order], cls[order]
                bounds = np.searchsorted(sorted_cls, np.arange(CLASSES + 1))
                for k in range(CLASSES - 1, -1, -1):  # a stack: encode in reverse of decoding
                    lo, hi = bounds[k], bounds[k + 1]
                    if lo < hi:
                        coder.encode_reverse((sorted_sym[lo:hi].reshape(-1) + r).astype(np.int32), _model(k, b))
            words = coder.get_compressed()
            decoded = self._values(q, step, g, t)
            parts += [(amax.view(np.uint32) >> 16).astype(np.uint16).tobytes(), mean.tobytes(), ka.tobytes(), kd.tobytes(),
                      _TAIL.pack(xxhash.xxh3_64_intdigest(decoded), len(words)), words.tobytes()]
        return b"".join(parts)

    @staticmethod
    def _step(amax: np.ndarray, b: int) -> np.ndarray:
        step = amax / np.float32(1 << (b - 1))
        return np.where(step > 0, step, np.float32(1.0)).astype(np.float32)

    @staticmethod
    def _values(q: np.ndarray, step: np.ndarray, g: Any, t: int) -> bytes:
        """Channel-major integers back to ``[planes, tokens, hidden]`` values of the KV dtype."""
        xf = (q.astype(np.float32) * step[:, None]).reshape(g.kv_planes, g.hidden, t).transpose(0, 2, 1)
        return from_float32(xf, g.dtype)

    def decode(self, data: memoryview, limit: int, ctx: CodecContext) -> bytes:
        try:
            return self._decode(data, limit, ctx)
        except ChunkError:
            raise
        except (ValueError, struct.error, RuntimeError, OverflowError, IndexError) as exc:
            raise ChunkError(f"chunk {ctx.key}: cachegen stream does not decode: {exc}") from exc

    def _decode(self, data: memoryview, limit: int, ctx: CodecContext) -> bytes:
        g, t = ctx.geometry, ctx.num_tokens
        c = g.kv_planes * g.hidden
        if limit != ctx.payload_len:
            raise ChunkError(f"chunk {ctx.key}: cachegen decodes whole payloads only")
        group, layers = _HEAD.unpack_from(data)
        if group != GROUP or layers != g.num_layers:
            raise ChunkError(f"chunk {ctx.key}: cachegen stream of {layers} layers in groups of {group}, "
                             f"expected {g.num_layers} and {GROUP}")
        pos = _HEAD.size
        bits = list(data[pos: pos + layers])
        pos += layers
        if len(bits) != layers or not all(MIN_BITS <= b <= MAX_BITS for b in bits):
            raise ChunkError(f"chunk {ctx.key}: cachegen bits {bits} outside [{MIN_BITS}, {MAX_BITS}]")
        anchors, others = self._split(t)
        owner = anchors[np.arange(t) // GROUP][others]
        out = []
        for b in bits:
            if len(data) < pos + c * _PER_CHANNEL + _TAIL.size:
                raise ChunkError(f"chunk {ctx.key}: cachegen stream is truncated")
            amax = (np.frombuffer(data, np.uint16, c, pos).astype(np.uint32) << 16).view(np.float32)
            pos += 2 * c
            mean = np.frombuffer(data, np.int16, c, pos)
            pos += 2 * c
            ka = np.frombuffer(data, np.uint8, c, pos)
            pos += c
            kd = np.frombuffer(data, np.uint8, c, pos)
            pos += c
            digest, nwords = _TAIL.unpack_from(data, pos)
            pos += _TAIL.size
            if not bool(np.isfinite(amax).all()) or bool((amax < 0).any()) or \
                    int(ka.max(initial=0)) >= CLASSES or int(kd.max(initial=0)) >= CLASSES:
                raise ChunkError(f"chunk {ctx.key}: cachegen model parameters are invalid")
            if len(data) < pos + 4 * nwords:
                raise ChunkError(f"chunk {ctx.key}: cachegen stream is truncated")
            coder = constriction.stream.stack.AnsCoder(np.frombuffer(data, np.uint32, nwords, pos).copy())
            pos += 4 * nwords
            r = 1 << b
            q = np.empty((c, t), dtype=np.int32)
            for cols, cls in ((anchors, ka), (others, kd)):
                if not len(cols):
                    continue
                order = np.argsort(cls, kind="stable")
                bounds = np.searchsorted(cls[order], np.arange(CLASSES + 1))
                sym = np.empty((c, len(cols)), dtype=np.int32)
                for k in range(CLASSES):
                    lo, hi = bounds[k], bounds[k + 1]
                    if lo < hi:
                        got = coder.decode(_model(k, b), int((hi - lo) * len(cols)))
                        sym[order[lo:hi]] = got.reshape(hi - lo, len(cols)).astype(np.int32) - r
                q[:, cols] = sym
            q[:, anchors] += mean[:, None]
            q[:, others] += q[:, owner]
            decoded = self._values(q, self._step(amax, b), g, t)
            if xxhash.xxh3_64_intdigest(decoded) != digest:
                raise ChunkError(f"chunk {ctx.key}: cachegen layer decodes to other values than were encoded")
            out.append(decoded)
        if pos != len(data):
            raise ChunkError(f"chunk {ctx.key}: cachegen stream has {len(data) - pos} trailing bytes")
        return b"".join(out)

    def max_encoded_len(self, n: int, ctx: CodecContext) -> int:
        g = ctx.geometry
        per_layer = g.kv_planes * g.hidden * _PER_CHANNEL + _TAIL.size
        symbols = g.num_layers * g.kv_planes * ctx.num_tokens * g.hidden
        # a leaky categorical spends at most ~32 bits on the rarest symbol; real KV is far below
        return _HEAD.size + g.num_layers * (per_layer + 8) + symbols * 4 + 1024
