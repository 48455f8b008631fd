"""CacheBlend: reuse the KV of text that is not a prefix (RAG documents in any order).

A prompt given as segments (system, documents, question) reuses each segment's KV, computed
once on its own at position 0 and stored under a position-independent segment key
(:func:`lmcache_core.keys.segment_extras`). On load each cached segment is placed at its new
offset: rotary keys are re-rotated exactly (:func:`rerotate`; values carry no position). What
re-rotation cannot restore is the attention *across* segments, which the standalone
computation never saw; CacheBlend (Yao et al., EuroSys 2025) recomputes a small share of
tokens to repair it: every token is computed fresh up to an early ``check_layer``, the tokens
whose KV deviates most from the cached KV there are picked (:func:`select_tokens`), and only
those (plus the fresh, uncached tokens) are computed in the later layers, attending over the
blended cache (:func:`blend_attention_mask`).

This module holds the math only and imports no engine: the Hugging Face integration
(``integrations/transformers.py``) drives it from its own layer loop, and a vLLM or SGLang
model runner can do the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

ROTARY_STYLES = ("half", "interleaved")
# Rope types whose frequencies do not depend on the sequence length: a rotation by a
# position delta is exact for them. "dynamic" and "longrope" change their frequencies with
# the length, so KV computed at one length is not KV at another: they are refused.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class BlendConfig:
    """How a segmented prompt is blended.

    ``ratio``: share of the cached tokens recomputed in the layers after ``check_layer``
    (CacheBlend's recompute ratio; 1.0 recomputes everything, i.e. full prefill).
    ``check_layer``: every token is computed up to and including this layer, where the
    deviation that picks the recomputed tokens is measured. ``rerotate``: move cached
    rotary keys to their new positions (off only for the "naive reuse" baseline).
    """

    ratio: float = 0.15
    check_layer: int = 1
    rerotate: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"blend ratio must be within [0, 1], got {self.ratio!r}; 0.15 is CacheBlend's default")
        if self.check_layer < 0:
            raise ConfigError(f"blend check_layer must be >= 0, got {self.check_layer!r}")


@dataclass(frozen=True)
class SegmentPlan:
    """Where each segment lands in the blended prompt: ``offsets[i]`` is the position of
    segment ``i``'s first token; ``reusable[i]`` says whether its KV may come from the cache
    (the last segment, the question, never does: it is computed fresh)."""

    lengths: tuple[int, ...]
    offsets: tuple[int, ...]
    reusable: tuple[bool, ...]

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1] + self.lengths[-1] if self.lengths else 0

    def fresh_mask(self) -> np.ndarray:
        """``[num_tokens]`` bool: True for tokens of non-reusable segments."""
        return np.repeat(~np.asarray(self.reusable, dtype=bool), self.lengths)


def plan_segments(segments: Sequence[Sequence[int]], reusable: Sequence[bool] | None = None) -> SegmentPlan:
    """The layout of ``segments`` laid end to end. By default every segment but the last is
    reusable. Empty segments are refused (they have no key and no position)."""
    if not segments:
        raise ValueError("a segmented prompt needs at least one segment")
    lengths = tuple(len(s) for s in segments)
    if min(lengths) == 0:
        raise ValueError(f"segment {lengths.index(0)} is empty; drop it or give it tokens")
    flags = tuple(bool(r) for r in reusable) if reusable is not None else (True,) * (len(lengths) - 1) + (False,)
    if len(flags) != len(lengths):
        raise ValueError(f"{len(flags)} reusable flags for {len(lengths)} segments")
    if flags[-1]:
        raise ValueError("the last segment is the one the first token is generated from; it cannot be reusable")
    offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    return SegmentPlan(lengths, offsets, flags)


def split_segments(tokens: Sequence[int] | np.ndarray, separator: int | Sequence[int]) -> list[list[int]]:
    """The separator-token form: one token list with ``separator`` (one token id or a run of
    ids) between segments, as an engine that passes a single list sends it. The separators
    are markers, not content: they are dropped. Empty pieces (two separators in a row, a
    leading or trailing one) are dropped too."""
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    sep = np.atleast_1d(np.asarray(separator, dtype=np.int64))
    if sep.size == 0:
        raise ValueError("the segment separator needs at least one token id")
    n = sep.size
    if arr.size < n:
        return [arr.tolist()] if arr.size else []
    windows = np.lib.stride_tricks.sliding_window_view(arr, n)
    starts = np.flatnonzero((windows == sep).all(axis=1))
    cuts: list[int] = []
    last_end = -1
    for s in starts.tolist():  # one entry per separator, not per token
        if s >= last_end:
            cuts.append(s)
            last_end = s + n
    out, prev = [], 0
    for s in cuts:
        if s > prev:
            out.append(arr[prev:s].tolist())
        prev = s + n
    if prev < arr.size:
        out.append(arr[prev:].tolist())
    return out


# -- rotary embeddings ----------------------------------------------------------------------
def rerotate(k: "torch.Tensor", delta: "int | torch.Tensor", inv_freq: "torch.Tensor", *,
             style: str = "half", token_dim: int = -2) -> "torch.Tensor":
    """Rotary keys computed at positions ``p`` moved to ``p + delta``, exactly: RoPE rotates
    each pair of dimensions by ``position * inv_freq``, so a further rotation by
    ``delta * inv_freq`` composes into the rotation at the new position. ``k``'s last
    dimension is the head dimension (only its first ``2 * len(inv_freq)`` dims rotate: partial
    rotary); ``token_dim`` is its token axis; ``delta`` is one int or one per token.
    ``inv_freq`` is the model's own (scaled variants included); an attention scaling such as
    YaRN's is already in the cached K and must not be applied again. The angles are computed
    in float64 and the rotation in float32, then cast back to ``k``'s dtype."""
    import torch

    if style not in ROTARY_STYLES:
        raise ValueError(f"rotary style {style!r} is not one of {', '.join(ROTARY_STYLES)}")
    rot = 2 * inv_freq.numel()
    if rot > k.shape[-1]:
        raise ValueError(f"inv_freq has {inv_freq.numel()} frequencies; head dim {k.shape[-1]} is too small")
    ntok = k.shape[token_dim]
    d = torch.as_tensor(delta, dtype=torch.float64, device=k.device).reshape(-1)
    if d.numel() not in (1, ntok):
        raise ValueError(f"delta has {d.numel()} entries for {ntok} tokens")
    angles = d[:, None] * inv_freq.to(device=k.device, dtype=torch.float64)[None, :]  # [T or 1, rot/2]
    cos, sin = angles.cos().float(), angles.sin().float()
    # broadcast [T, rot/2] against k: the token axis at token_dim, the head dim last
    shape = [1] * k.dim()
    shape[token_dim] = cos.shape[0]
    shape[-1] = cos.shape[1]
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x = k[..., :rot].float()
    if style == "half":
        x1, x2 = x[..., : rot // 2], x[..., rot // 2 :]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    out = out.to(k.dtype)
    if rot < k.shape[-1]:
        out = torch.cat([out, k[..., rot:]], dim=-1)
    return out


# -- token selection and the blended attention ------------------------------------------------
def kv_deviation(k_new: "torch.Tensor", v_new: "torch.Tensor", k_old: "torch.Tensor", v_old: "torch.Tensor", *,
                 token_dim: int = -2) -> "torch.Tensor":
    """Per-token squared distance between freshly computed and cached K and V (summed over
    heads and head dims), in float32: CacheBlend's measure of what the standalone
    computation missed."""
    dims = [d for d in range(k_new.dim()) if d != token_dim % k_new.dim()]
    dk = (k_new.float() - k_old.float()).pow(2).sum(dim=dims)
    dv = (v_new.float() - v_old.float()).pow(2).sum(dim=dims)
    return dk + dv


def select_tokens(deviation: "torch.Tensor", fresh: "torch.Tensor", ratio: float) -> "torch.Tensor":
    """Sorted indices of the tokens to recompute: every fresh token, plus the
    ``ceil(ratio * reusable)`` reusable tokens of largest deviation."""
    import torch

    fresh = fresh.to(device=deviation.device, dtype=torch.bool)
    n_reuse = int((~fresh).sum())
    k = min(n_reuse, math.ceil(ratio * n_reuse - 1e-9)) if ratio > 0 else 0
    picked = torch.zeros_like(fresh)
    if k:
        score = deviation.float().masked_fill(fresh, float("-inf"))
        picked[torch.topk(score, k).indices] = True
    return torch.nonzero(picked | fresh).reshape(-1)


def blend_attention_mask(query_positions: "torch.Tensor", num_keys: int, dtype: "torch.dtype") -> "torch.Tensor":
    """Additive mask ``[1, 1, queries, num_keys]``: query at position ``p`` sees keys
    ``0..p`` of the blended cache (causal by position; the cache is in prompt order)."""
    import torch

    keys = torch.arange(num_keys, device=query_positions.device)
    allowed = keys[None, :] <= query_positions.reshape(-1, 1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=query_positions.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
