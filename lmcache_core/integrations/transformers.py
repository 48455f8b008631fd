"""Hugging Face transformers: skip the prefill of a cached prompt prefix, or blend cached
segments that are not a prefix.

``CachedModel(model, engine).generate(ids)`` looks the prompt up, loads the hit
chunks into a fresh ``DynamicCache``, runs the model on the remaining tokens
only, stores the prompt's new chunks, then decodes greedily. The greedy output
equals the model's own without the cache: the cached KV is bit-identical to
what the model computed.

``generate(segments=[system, doc1, doc2, question])`` (or one token list with a
``separator``) reuses each segment but the last from its segment key, wherever it
sits in the prompt, and blends them (CacheBlend, :mod:`lmcache_core.blend`): an
approximation whose quality the ``blend`` ratio sets; its KV is never stored under
prefix keys.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ..blend import (STATIC_ROPE_TYPES, BlendConfig, blend_attention_mask, kv_deviation, plan_segments, rerotate,
                     select_tokens, split_segments)
from ..config import Config
from ..engine import CacheEngine
from ..keys import KeyExtras, segment_extras
from ..layout import ChunkGeometry, PagedKV, dtype_name

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    tokens: list[int]  # generated token ids (not the prompt)
    ttft_s: float  # prompt in, first generated token out
    total_s: float
    prompt_tokens: int
    hit_tokens: int  # prompt tokens whose KV came from the cache
    by_tier: dict[str, int] = field(default_factory=dict)
    stored_tokens: int = 0
    blended: bool = False  # the prompt was blended from segments (an approximation)
    recomputed_tokens: int = 0  # blended: tokens computed in the layers after the check layer
    ttft_cpu_s: float = 0.0  # CPU time of this process (all threads) until the first token


# Decoder families whose layers the blend loop drives: Llama-style layers (rotate-half RoPE,
# a layer call taking position_embeddings, attention_mask and past_key_values).
BLEND_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def geometry_for(model: Any) -> ChunkGeometry:
    """The chunk geometry of a decoder-only transformers model (GQA aware)."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ChunkGeometry(cfg.num_hidden_layers, heads, head_dim, dtype_name(model.dtype))


def weights_digest(model: Any) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes, bytes): the identity of a
    model that has no checkpoint path (built from a config, fine-tuned in memory)."""
    import hashlib

    import torch

    h = hashlib.blake2b(digest_size=16, person=b"lmcache-weights")
    tensors = list(model.state_dict().items())
    for name, t in tensors:
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.contiguous().view(-1)
        if flat.dtype.is_floating_point or flat.dtype.itemsize > 1:
            flat = flat.view(torch.uint8) if flat.numel() else flat
        h.update(flat.cpu().numpy().tobytes())
    return h.hexdigest()


def model_identity(model: Any) -> str:
    """The model fingerprint for the key namespace: the checkpoint path or name with its revision
    (the hub commit when transformers knows it), the architecture, dtype and quantization; for a
    model without a checkpoint path (built from a config), a hash of its weights. Two models
    with the same shape but other weights never share chunks."""
    from ..keys import model_fingerprint

    cfg = model.config
    name = getattr(cfg, "_name_or_path", "") or ""
    arch = ",".join(getattr(cfg, "architectures", None) or [type(model).__name__])
    quant = getattr(cfg, "quantization_config", None)
    if quant is not None and hasattr(quant, "to_dict"):
        quant = quant.to_dict()
    revision = getattr(cfg, "_commit_hash", None)
    weights = None if name else weights_digest(model)
    return model_fingerprint(f"{name}|{arch}" if name else arch, revision=revision, dtype=str(model.dtype),
                             quantization=repr(quant) if quant else None, weights=weights)


class CachedModel:
    """A causal LM with lmcache-core in front of its prefill (batch size 1, greedy)."""

    def __init__(self, model: Any, engine: CacheEngine | None = None, *, config: Config | None = None,
                 model_name: str | None = None, blend: BlendConfig | None = None) -> None:
        self.model = model
        self.blend = blend or BlendConfig()
        self._blend_refused: set[str] = set()
        self.engine = engine or CacheEngine(geometry_for(model), config, model=model_name or model_identity(model))
        if self.engine.geometry != geometry_for(model):
            raise ValueError(
                f"engine geometry {self.engine.geometry.signature} does not match the model's "
                f"{geometry_for(model).signature}"
            )
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -- pieces ---------------------------------------------------------------------------
    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _forward(self, ids: "torch.Tensor", cache: Any, start: int) -> "torch.Tensor":
        import torch

        pos = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
        kwargs = {self._cache_kw: cache, "use_cache": True, "position_ids": pos}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, **kwargs)
        return out.logits[0, -1]

    @staticmethod
    def _layer_kv(cache: Any) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]

    def load_prefix(self, ids: Sequence[int]) -> tuple[Any, int, dict[str, int]]:
        """A DynamicCache holding the longest cached prefix (at most ``len(ids) - 1`` tokens)."""
        import torch

        cache = self._new_cache()
        lookup = self.engine.lookup(ids, pin=True)
        want = min(lookup.hit_tokens, len(ids) - 1)
        if want <= 0:
            self.engine.release(lookup)
            return cache, 0, {}
        g = self.engine.geometry
        dev, dt = self.model.device, self.model.dtype
        ks = [torch.empty(1, g.num_heads, want, g.head_dim, dtype=dt, device=dev) for _ in range(g.num_layers)]
        vs = [torch.empty_like(k) for k in ks]
        kv = PagedKV.from_hf(list(zip(ks, vs)))
        try:
            res = self.engine.retrieve(ids, kv, slots=torch.arange(want, device=dev), max_tokens=want,
                                       lookup=lookup)
        finally:
            self.engine.release(lookup)
        hit = res.hit_tokens
        if hit:
            for i, (k, v) in enumerate(zip(ks, vs)):
                cache.update(k[:, :, :hit], v[:, :, :hit], i)
        return cache, hit, res.by_tier

    def store_prompt(self, ids: Sequence[int], cache: Any) -> int:
        import torch

        layers = [(k[:, :, : len(ids)], v[:, :, : len(ids)]) for k, v in self._layer_kv(cache)]
        kv = PagedKV.from_hf(layers)
        return self.engine.store(ids, kv, slots=torch.arange(len(ids), device=kv.device))

    # -- blending (CacheBlend) ---------------------------------------------------------------
    def blend_unsupported(self, num_tokens: int) -> str | None:
        """Why this model cannot blend a prompt of ``num_tokens`` (None: it can)."""
        cfg = getattr(self.model.config, "text_config", None) or self.model.config
        inner = getattr(self.model, "model", None)
        if getattr(cfg, "model_type", None) not in BLEND_MODEL_TYPES:
            return f"model type {getattr(cfg, 'model_type', None)!r} is not one of {', '.join(BLEND_MODEL_TYPES)}"
        if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
                or not hasattr(self.model, "lm_head"):
            return "the model has no embed_tokens/layers/norm/rotary_emb/lm_head to drive"
        rope = getattr(inner.rotary_emb, "rope_type", "default")
        if rope not in STATIC_ROPE_TYPES:
            return f"rope type {rope!r} changes its frequencies with the length (re-rotation would not be exact)"
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            return f"attention implementation {impl!r} takes no additive mask; use sdpa or eager"
        if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
            return "the model has sliding-window layers"
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and num_tokens > window:
            return f"the prompt ({num_tokens} tokens) exceeds the sliding window ({window})"
        return None

    def _segment_kv(self, seg: list[int], extras: KeyExtras) -> tuple[list[tuple[Any, Any]] | None, dict[str, int]]:
        """A cached segment's KV at its canonical position 0, or None unless all of it is cached."""
        import torch

        lookup = self.engine.lookup(seg, pin=True, extras=extras)
        if lookup.hit_tokens < len(seg):
            self.engine.release(lookup)
            return None, {}
        g, n = self.engine.geometry, len(seg)
        dev, dt = self.model.device, self.model.dtype
        ks = [torch.empty(1, g.num_heads, n, g.head_dim, dtype=dt, device=dev) for _ in range(g.num_layers)]
        vs = [torch.empty_like(k) for k in ks]
        try:
            res = self.engine.retrieve(seg, PagedKV.from_hf(list(zip(ks, vs))), slots=torch.arange(n, device=dev),
                                       max_tokens=n, lookup=lookup, extras=extras)
        finally:
            self.engine.release(lookup)
        if res.hit_tokens < n:  # a chunk failed its check on the way: the segment is a miss
            return None, {}
        return list(zip(ks, vs)), res.by_tier

    def _blend_prefill(self, segments: list[list[int]], cfg: BlendConfig,
                       extras: KeyExtras | None) -> tuple["torch.Tensor", Any, int, dict[str, int], int, int]:
        """CacheBlend prefill: (last logits, DynamicCache, hit, by_tier, stored, recomputed)."""
        import torch

        plan = plan_segments(segments)
        n, dev = plan.num_tokens, self.model.device
        inner = self.model.model
        inv_freq = inner.rotary_emb.inv_freq
        layers = list(inner.layers)
        seg_x = segment_extras(extras)
        g = self.engine.geometry
        ks = [torch.zeros(1, g.num_heads, n, g.head_dim, dtype=self.model.dtype, device=dev) for _ in layers]
        vs = [torch.zeros_like(k) for k in ks]
        hit, stored, by_tier = 0, 0, Counter()
        for seg, off, length, reuse in zip(segments, plan.offsets, plan.lengths, plan.reusable):
            if not reuse:
                continue
            kv, tiers = self._segment_kv(seg, seg_x)
            if kv is None:  # compute it on its own at position 0 (its canonical KV) and store it
                solo = self._new_cache()
                self._forward(torch.tensor([seg], device=dev), solo, 0)
                kv = [(k[:, :, :length], v[:, :, :length]) for k, v in self._layer_kv(solo)]
                stored += self.engine.store(seg, PagedKV.from_hf(kv), slots=torch.arange(length, device=dev),
                                            extras=seg_x)
            else:
                hit += length
                by_tier.update(tiers)
            for i, (k, v) in enumerate(kv):
                ks[i][:, :, off:off + length] = rerotate(k, off, inv_freq) if cfg.rerotate and off else k
                vs[i][:, :, off:off + length] = v

        fresh = torch.from_numpy(plan.fresh_mask()).to(dev)
        positions = torch.arange(n, device=dev)
        ids = torch.tensor([[t for seg in segments for t in seg]], device=dev)
        # layers 0..full_upto compute every token; after it only the selected ones
        full_upto = -1 if cfg.ratio == 0 else min(cfg.check_layer, len(layers) - 1)
        if cfg.ratio >= 1:
            full_upto = len(layers) - 1
        sel = positions if full_upto >= 0 else torch.nonzero(fresh).reshape(-1)
        hidden = inner.embed_tokens(ids)[:, sel]
        cache = _BlendCache(ks, vs)
        layer_kw = "cache" if "cache" in inspect.signature(layers[0].forward).parameters else "past_key_values"
        causal_ok = getattr(self.model.config, "_attn_implementation", None) == "sdpa"
        for i, layer in enumerate(layers):
            pos = positions[sel][None]
            cache.sel, cache.measure = sel, i == full_upto < len(layers) - 1
            # every token computed: plain causal attention (sdpa's causal kernel, no [n, n] mask)
            mask = None if causal_ok and sel.numel() == n else blend_attention_mask(pos[0], n, hidden.dtype)
            out = layer(hidden, attention_mask=mask, position_ids=pos,
                        use_cache=True, position_embeddings=inner.rotary_emb(hidden, pos), **{layer_kw: cache})
            hidden = out[0] if isinstance(out, tuple) else out
            if i == full_upto and i < len(layers) - 1:
                sel = select_tokens(cache.deviation, fresh, cfg.ratio)
                hidden = hidden[:, sel]
        logits = self.model.lm_head(inner.norm(hidden[:, -1:]))[0, -1]
        dc = self._new_cache()
        for i, (k, v) in enumerate(zip(ks, vs)):
            dc.update(k, v, i)
        return logits, dc, hit, dict(by_tier), stored, int(sel.numel())

    # -- generation -------------------------------------------------------------------------
    def generate(self, input_ids: Sequence[int] | "torch.Tensor" | None = None, max_new_tokens: int = 16, *,
                 segments: Sequence[Sequence[int]] | None = None, separator: int | Sequence[int] | None = None,
                 blend: BlendConfig | None = None, extras: KeyExtras | None = None,
                 use_cache: bool = True, eos_token_id: int | Sequence[int] | None = None) -> GenerationResult:
        """Greedy decoding. ``use_cache=False`` runs the same code with no lookup and no store.

        ``segments`` (token lists: system, documents, ..., question) or ``input_ids`` with a
        ``separator`` token (or run of tokens) between segments: every segment but the last
        is reused from its segment key and blended (``blend``, default the model's
        :class:`BlendConfig`). A model that cannot blend gets a full prefill of the joined
        prompt (logged once); ``use_cache=False`` is the full prefill."""
        import torch

        if separator is not None:
            if segments is not None or input_ids is None:
                raise ValueError("pass input_ids with a separator, or segments, not both")
            segments = split_segments(self._ids(input_ids), separator)
        segs = [self._ids(s) for s in segments] if segments is not None else None
        ids = [t for s in segs for t in s] if segs is not None else self._ids(input_ids)
        if segs is not None and len(segs) == 1:  # nothing to blend: an ordinary prompt
            segs = None
        if not ids:
            raise ValueError("generate() needs at least one prompt token")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        why = self.blend_unsupported(len(ids)) if segs is not None and use_cache else "no segments"
        if segs is not None and use_cache and why and why not in self._blend_refused:
            self._blend_refused.add(why)
            logger.warning("lmcache-core: not blending segments (%s); running a full prefill", why)
        t0, c0 = time.perf_counter(), time.process_time()
        blended, recomputed, stored = False, 0, 0
        with torch.inference_mode():
            if why is None:
                logits, cache, hit, by_tier, stored, recomputed = self._blend_prefill(segs, blend or self.blend, extras)
                blended = True
            else:
                if use_cache and segs is None:
                    cache, hit, by_tier = self.load_prefix(ids)
                else:
                    cache, hit, by_tier = self._new_cache(), 0, {}
                rest = torch.tensor([ids[hit:]], device=self.model.device)
                logits = self._forward(rest, cache, hit)
            token = int(torch.argmax(logits))
            ttft, ttft_cpu = time.perf_counter() - t0, time.process_time() - c0
            if use_cache and segs is None:
                stored = self.store_prompt(ids, cache)
            out = [token]
            pos = len(ids)
            while len(out) < max_new_tokens and token not in eos:
                logits = self._forward(torch.tensor([[token]], device=self.model.device), cache, pos)
                token = int(torch.argmax(logits))
                out.append(token)
                pos += 1
        return GenerationResult(out, ttft, time.perf_counter() - t0, len(ids), hit, by_tier, stored, blended,
                                recomputed, ttft_cpu)

    @staticmethod
    def _ids(tokens: Sequence[int] | "torch.Tensor") -> list[int]:
        return [int(t) for t in (tokens.reshape(-1).tolist() if hasattr(tokens, "reshape") else tokens)]

    def close(self) -> None:
        self.engine.close()


class _BlendCache:
    """The cache a decoder layer sees during a blend: the whole blended K/V of every layer;
    ``update`` writes the K/V of the tokens being computed (``sel``) into it and returns all
    of it. At the check layer (``measure``) it first records each token's deviation from
    the cached K/V."""

    def __init__(self, ks: list["torch.Tensor"], vs: list["torch.Tensor"]) -> None:
        self.ks, self.vs = ks, vs
        self.sel: "torch.Tensor | None" = None
        self.measure = False
        self.deviation: "torch.Tensor | None" = None

    def update(self, key_states: "torch.Tensor", value_states: "torch.Tensor", layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
        k, v = self.ks[layer_idx], self.vs[layer_idx]
        if self.measure:
            self.deviation = kv_deviation(key_states, value_states, k[:, :, self.sel], v[:, :, self.sel])
        k.index_copy_(2, self.sel, key_states.to(k.dtype))
        v.index_copy_(2, self.sel, value_states.to(v.dtype))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def random_llama(num_layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                 vocab: int = 512, seed: int = 0, dtype: str = "float32", **extra: Any) -> Any:
    """A small random-weight Llama built from a config (tests, demo fallback, benchmarks)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=65536, **extra)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    return model
