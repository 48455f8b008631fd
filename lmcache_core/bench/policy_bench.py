"""Load or recompute, measured: ``always`` vs ``adaptive`` vs no cache on one ``CachedModel``.

The case the policy is for: a long shared system prompt sits in this engine's memory tier,
documents were stored by another instance into a slow shared tier (S3), and the model
prefills quickly next to that tier. ``always`` loads the documents from the slow tier;
``adaptive`` loads the system prompt and recomputes the documents once it has measured both;
no cache recomputes everything. The default shape makes the answer a matter of physics,
not of noise (docs/bench.md derives it): the system prompt costs several times more to
compute than to copy, each document several times more to load over the link than to
compute. With ``slow_tier`` None the documents sit in the memory tier too (the case where
adaptive must cost nothing). Configurations take turns request by request, so drift on a
shared machine hits them alike.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .runner import Result
from .workloads import FIRST_TOKEN, Request

POLICY_CONFIGS = ("none", "always", "adaptive")


@dataclass(frozen=True)
class PolicyShape:
    system: int = 6144
    doc: int = 1024
    question: int = 128
    requests: int = 24
    max_tokens: int = 1
    chunk_size: int = 256


@dataclass(frozen=True)
class PolicyRun:
    results: dict[str, list[Result]]  # per configuration, in request order
    policy: dict[str, object]  # the adaptive engine's estimates at the end (AdaptivePolicy.stats)


def policy_model(seed: int = 0) -> Any:
    """A random Llama that prefills quickly next to the size of its KV (2 layers, hidden 64, 4 KV
    heads of 64, fp32): 4 KiB a token, tens of thousands of tokens a second on one CPU core."""
    from ..integrations.transformers import random_llama

    return random_llama(num_layers=2, hidden=64, heads=4, kv_heads=4, vocab=4096, seed=seed, head_dim=64)


def policy_costs(model: Any, shape: PolicyShape = PolicyShape(), link_bytes_per_s: float = 0.0,
                 repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """The costs the case is made of, in seconds (best of ``repeats``), measured on ``model`` the way
    ``CachedModel`` runs it: each configuration's prefill, the copy of the system prompt out of the
    memory tier, and (``link_bytes_per_s``) a document's bytes over the link."""
    import torch

    from ..config import Config
    from ..engine import CacheEngine
    from ..integrations.transformers import CachedModel, geometry_for, model_identity

    rng = np.random.default_rng([seed, 12])
    vocab = int(model.config.vocab_size)
    ids = [int(t) for t in rng.integers(FIRST_TOKEN, vocab, size=shape.system + shape.doc + shape.question)]
    geometry = geometry_for(model)
    engine = CacheEngine(geometry, Config.from_dict({"chunk_size": shape.chunk_size, "device": "cpu",
                                                     "tiers": ["memory://?capacity=1GiB"], "save_partial": False,
                                                     "salt": uuid.uuid4().hex[:12]}), model=model_identity(model))
    cm = CachedModel(model, engine)

    def best(fn: Callable[[], None]) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def none_prefill(n: int) -> None:
        cm.generate(ids[:n], max_new_tokens=1, use_cache=False)

    def behind(prefix: int, n: int) -> float:
        with torch.inference_mode():
            cache = cm._new_cache()
            cm._forward(torch.tensor([ids[:prefix]]), cache, 0)
            t0 = time.perf_counter()
            cm._forward(torch.tensor([ids[prefix:prefix + n]]), cache, prefix)
            return time.perf_counter() - t0

    try:
        s, d = shape.system, shape.doc
        out = {"prefill_whole_prompt_s": best(lambda: none_prefill(len(ids))),
               "prefill_system_s": best(lambda: none_prefill(s)),
               "prefill_doc_and_question_behind_system_s": min(behind(s, len(ids) - s) for _ in range(repeats)),
               "prefill_question_behind_doc_s": min(behind(s + d, len(ids) - s - d) for _ in range(repeats))}
        cm.generate(ids[:s], max_new_tokens=1)  # the system prompt into the memory tier
        engine.flush(60)

        def copy() -> None:
            cache, hit, _ = cm.load_prefix(ids[:s] + [FIRST_TOKEN])
            if hit != s:
                raise RuntimeError(f"the system prompt was not in the memory tier ({hit} of {s} tokens)")

        out["copy_system_from_memory_s"] = best(copy)
        out["kv_bytes_per_token"] = float(geometry.nbytes(shape.chunk_size) / shape.chunk_size)
        if link_bytes_per_s > 0:
            out["load_doc_over_link_s"] = d * out["kv_bytes_per_token"] / link_bytes_per_s
        return out
    finally:
        engine.close()


def run_policy_bench(model: Any, slow_tier: str | None, shape: PolicyShape = PolicyShape(), seed: int = 0,
                     on_result: Callable[[str, Result], None] | None = None,
                     writer_tier: str | None = None) -> PolicyRun:
    """Results per configuration (``none``, ``always``, ``adaptive``). ``writer_tier``: the same
    store as ``slow_tier`` as the instance that wrote the documents reaches it (its own link;
    default ``slow_tier``)."""
    from ..config import Config
    from ..engine import CacheEngine
    from ..integrations.transformers import CachedModel, geometry_for, model_identity

    rng = np.random.default_rng([seed, 11])
    vocab = int(model.config.vocab_size)

    def toks(n: int) -> list[int]:
        return [int(t) for t in rng.integers(FIRST_TOKEN, vocab, size=n)]

    system = toks(shape.system)
    docs = [toks(shape.doc) for _ in range(shape.requests)]
    # questions of 64-192 tokens: prefills of several lengths, so the engine fits a line to them
    prompts = [system + d + toks(int(rng.integers(shape.question // 2, shape.question * 3 // 2 + 1))) for d in docs]
    salt = uuid.uuid4().hex[:12]  # this run's chunks only (the slow tier may be shared)
    name = model_identity(model)
    geometry = geometry_for(model)
    memory = "memory://?capacity=1GiB"
    base = {"chunk_size": shape.chunk_size, "device": "cpu", "salt": salt, "save_partial": False}

    def engine(tiers: list[str], policy: str = "always") -> CacheEngine:
        return CacheEngine(geometry, Config.from_dict({**base, "tiers": tiers, "load_policy": policy}), model=name)

    def warm(cm: CachedModel, tokens: list[int]) -> None:
        cm.generate(tokens, max_new_tokens=1)  # computes and stores the prompt

    engines: list[CacheEngine] = []
    try:
        writer = engine([writer_tier or slow_tier] if slow_tier else [memory])
        engines.append(writer)
        if slow_tier:  # another instance stored the documents (system prompt + document) there
            cm = CachedModel(model, writer)
            for p in prompts:
                warm(cm, p[: shape.system + shape.doc])
            writer.flush(120)
        targets: dict[str, CachedModel] = {}
        for cfg in ("always", "adaptive"):
            eng = engine([memory, slow_tier] if slow_tier else [memory], cfg)
            engines.append(eng)
            cm = targets[cfg] = CachedModel(model, eng)
            # slow case: this engine served the system prompt before; memory case: the documents too
            for p in ([system] if slow_tier else [q[: shape.system + shape.doc] for q in prompts]):
                warm(cm, p)
            for n in (256, 1024, 2048):  # other traffic served before: misses of several lengths
                warm(cm, toks(n))
            eng.flush(60)
        plain = CachedModel(model, writer)
        out: dict[str, list[Result]] = {c: [] for c in POLICY_CONFIGS}
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            order = list(POLICY_CONFIGS[i % 3:] + POLICY_CONFIGS[: i % 3])  # take turns going first
            for cfg in order:
                req = Request(f"policy-{i}", f"p{i}", tuple(p), shape.max_tokens)
                cm = plain if cfg == "none" else targets[cfg]
                start = time.perf_counter() - t0
                res = cm.generate(p, max_new_tokens=shape.max_tokens, use_cache=cfg != "none")
                r = Result(req.id, req.session, start, len(p), res.ttft_s, res.total_s, len(res.tokens),
                           res.hit_tokens, dict(res.by_tier))
                out[cfg].append(r)
                if on_result is not None:
                    on_result(cfg, r)
        return PolicyRun(out, targets["adaptive"].engine.policy.stats())
    finally:
        for e in engines:
            e.close()


def policy_stats(results: dict[str, list[Result]], skip_first: int = 0) -> dict[str, float]:
    """Mean TTFT (s) per configuration, leaving out the first ``skip_first`` requests."""
    return {cfg: float(np.mean([r.ttft_s for r in rs[skip_first:]])) for cfg, rs in results.items() if rs}
