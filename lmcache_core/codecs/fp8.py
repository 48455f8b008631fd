"""``fp8``: e4m3 values with one bf16 scale per token and head (the torch reference).

For every (layer, plane, token, head) the scale is ``bf16(amax / 448)`` (1 where the head is all
zeros) and each value is stored as ``e4m3(clamp(x / scale, -448, 448))``; decoding multiplies back
and rounds to the KV dtype. Per element the error is at most ``(2**-4 + 2**-8) * amax`` of its
head (three mantissa bits, and a scale rounded down by bf16 clamping the largest value), so the
declared bound (a fraction of the layer's and plane's ``max|x|``) is 0.07.

Stored form, layer by layer (so one layer of a chunk stays one contiguous slice): the e4m3
bytes ``[planes, tokens, heads * dim]``, then the scales ``[planes, tokens, heads]`` as bf16.
The GPU gather kernel (``lmcache_kernels.fp8``) writes exactly this form and its scatter reads
it, so a chunk quantised on the device is read by this host codec and the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ChunkError
from ..layout import torch_dtype
from .base import DEVICE, Codec, CodecContext, check_len

if TYPE_CHECKING:
    from ..layout import ChunkGeometry

FP8_MAX = 448.0
SCALE_BYTES = 2  # bf16


def encoded_len(geometry: "ChunkGeometry", num_tokens: int) -> int:
    """Bytes of the fp8 form of a chunk of ``num_tokens`` tokens."""
    per_plane = num_tokens * (geometry.hidden + geometry.num_heads * SCALE_BYTES)
    return geometry.num_layers * geometry.kv_planes * per_plane


def layer_len(geometry: "ChunkGeometry", num_tokens: int) -> int:
    return encoded_len(geometry, num_tokens) // geometry.num_layers


def image_views(geometry: "ChunkGeometry", image: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of an fp8 image (uint8, 1-D, :func:`encoded_len` bytes): the e4m3 bytes
    ``[layers, planes, tokens, hidden]`` (uint8) and the scales ``[layers, planes, tokens, heads]``
    (bf16)."""
    g, n = geometry, num_tokens
    if image.dtype != torch.uint8 or image.dim() != 1 or image.numel() != encoded_len(g, n):
        raise ValueError(f"an fp8 image of {n} tokens is {encoded_len(g, n)} bytes (uint8, 1-D), "
                         f"got {tuple(image.shape)} of {image.dtype}")
    per = image.view(g.num_layers, layer_len(g, n))
    nq = g.kv_planes * n * g.hidden
    q = per[:, :nq].view(g.num_layers, g.kv_planes, n, g.hidden)
    s = per[:, nq:].view(torch.bfloat16).view(g.num_layers, g.kv_planes, n, g.num_heads)
    return q, s


def encode_into(plain: torch.Tensor, q: torch.Tensor, s: torch.Tensor, head_dim: int) -> None:
    """Quantise ``plain`` ``[..., tokens, hidden]`` into the views ``q`` / ``s`` of an image
    (:func:`image_views`, the same leading shape)."""
    qq, ss = quantize(plain, head_dim)
    q.copy_(qq.view(torch.uint8))
    s.copy_(ss)


def decode_from(q: torch.Tensor, s: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The KV values of the views ``q`` / ``s`` (any leading shape), in ``dtype``."""
    return dequantize(q.contiguous().view(torch.float8_e4m3fn), s, head_dim, dtype)


def check_image(geometry: "ChunkGeometry", image: torch.Tensor, num_tokens: int, what: object = "") -> None:
    """Raise ChunkError unless ``image`` is a well-formed fp8 stream: every scale finite and
    positive, no e4m3 NaN byte (``0x7f`` / ``0xff``). What a reader checks before it hands a
    still-coded chunk to the device's scatter (the host decode checks the decoded values)."""
    q, s = image_views(geometry, image, num_tokens)
    sf = s.float()
    if not bool((torch.isfinite(sf) & (sf > 0)).all()):
        raise ChunkError(f"chunk {what}: fp8 stream has a scale that is not a positive finite number")
    if bool(((q & 0x7F) == 0x7F).any()):
        raise ChunkError(f"chunk {what}: fp8 stream holds a NaN value")


def quantize(x: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., heads * head_dim]`` -> (e4m3 ``[..., heads * head_dim]``, bf16 scales
    ``[..., heads]``). The reference every kernel must match."""
    shape = x.shape
    xf = x.reshape(*shape[:-1], shape[-1] // head_dim, head_dim).float()
    amax = xf.abs().amax(dim=-1)
    # a tensor divisor: torch on CUDA divides by a scalar as a multiply by its reciprocal, which
    # is not IEEE division (the kernels' and the CPU's) and can round a scale the other way
    scale = (amax / torch.full_like(amax, FP8_MAX)).to(torch.bfloat16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (xf / scale.float().unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype``, saturated to its finite range: a scale rounded up from
    ``amax / 448`` near the dtype's largest value would otherwise decode to infinity."""
    shape = q.shape
    qf = q.reshape(*shape[:-1], shape[-1] // head_dim, head_dim).float()
    top = torch.finfo(dtype).max
    return (qf * scale.float().unsqueeze(-1)).clamp_(-top, top).to(dtype).reshape(shape)


class FP8Codec(Codec):
    name = "fp8"
    wire_id = "fp8-e4m3-th/1"
    lossless = False
    error_bound = 0.07
    where = DEVICE  # fused into the GPU gather/scatter where the device offers it; this is the host path
    dtypes = ("float32", "float16", "bfloat16")

    def encode(self, data: memoryview, ctx: CodecContext) -> memoryview:
        g, t = ctx.geometry, ctx.num_tokens
        check_len(len(data), ctx.payload_len, "fp8 input", ctx)
        x = torch.frombuffer(data, dtype=torch_dtype(g.dtype)).view(g.shape(t))
        out = torch.empty(encoded_len(g, t), dtype=torch.uint8)
        encode_into(x, *image_views(g, out, t), g.head_dim)
        return memoryview(out.numpy()).cast("B")

    def decode(self, data: memoryview, limit: int, ctx: CodecContext) -> memoryview:
        g, t = ctx.geometry, ctx.num_tokens
        if len(data) != encoded_len(g, t) or limit != ctx.payload_len:
            raise ChunkError(f"chunk {ctx.key}: fp8 stream of {len(data)} bytes, expected {encoded_len(g, t)}")
        q, s = image_views(g, torch.frombuffer(data, dtype=torch.uint8), t)
        x = decode_from(q, s, g.head_dim, torch_dtype(g.dtype))
        if not torch.isfinite(x).all():
            raise ChunkError(f"chunk {ctx.key}: fp8 stream decodes to non-finite values")
        return memoryview(x.contiguous().view(torch.uint8).numpy()).cast("B")

    def max_encoded_len(self, n: int, ctx: CodecContext) -> int:
        return encoded_len(ctx.geometry, ctx.num_tokens)


__all__ = ["FP8Codec", "FP8_MAX", "check_image", "decode_from", "dequantize", "encode_into", "encoded_len",
           "image_views", "layer_len", "quantize"]
