"""Hugging Face transformers: skip the prefill of a cached prompt prefix.

``CachedModel(model, engine).generate(ids)`` looks the prompt up, loads the hit
chunks into a fresh ``DynamicCache``, runs the model on the remaining tokens
only, stores the prompt's new chunks, then decodes greedily. The greedy output
equals the model's own without the cache: the cached KV is bit-identical to
what the model computed.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ..config import Config
from ..engine import CacheEngine
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
                 model_name: str | None = None) -> None:
        self.model = model
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

    # -- generation -------------------------------------------------------------------------
    def generate(self, input_ids: Sequence[int] | "torch.Tensor", max_new_tokens: int = 16, *,
                 use_cache: bool = True, eos_token_id: int | Sequence[int] | None = None) -> GenerationResult:
        """Greedy decoding. ``use_cache=False`` runs the same code with no lookup and no store."""
        import torch

        ids = [int(t) for t in (input_ids.reshape(-1).tolist() if hasattr(input_ids, "reshape") else input_ids)]
        if not ids:
            raise ValueError("generate() needs at least one prompt token")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        t0 = time.perf_counter()
        with torch.inference_mode():
            if use_cache:
                cache, hit, by_tier = self.load_prefix(ids)
            else:
                cache, hit, by_tier = self._new_cache(), 0, {}
            rest = torch.tensor([ids[hit:]], device=self.model.device)
            logits = self._forward(rest, cache, hit)
            token = int(torch.argmax(logits))
            ttft = time.perf_counter() - t0
            stored = self.store_prompt(ids, cache) if use_cache else 0
            out = [token]
            pos = len(ids)
            while len(out) < max_new_tokens and token not in eos:
                logits = self._forward(torch.tensor([[token]], device=self.model.device), cache, pos)
                token = int(torch.argmax(logits))
                out.append(token)
                pos += 1
        return GenerationResult(out, ttft, time.perf_counter() - t0, len(ids), hit, by_tier, stored)

    def close(self) -> None:
        self.engine.close()


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
