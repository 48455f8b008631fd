"""Two-process end-to-end check of a shared tier with the transformers integration.

Public names (stable):

- :func:`run_two_process` - process A generates with ``[memory, TIER]`` and
  stores the prompt's KV; process B, with a cold memory tier, generates the
  same prompt, must hit from ``TIER``, and its greedy output must equal a
  cache-less run. Returns B's report; raises AssertionError otherwise.
- ``python -m lmcache_core.testing.e2e --tier URL`` - one process's half
  (prints a JSON report); the model is a small random-weight Llama built from
  a fixed seed, so both processes hold identical weights without a download.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Mapping

CHUNK_SIZE = 64
PROMPT_TOKENS = 300
MAX_NEW_TOKENS = 12


def _prompt(seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(1, 500) for _ in range(PROMPT_TOKENS)]


def run_half(tier: str, prompt_seed: int, model: str) -> dict[str, Any]:
    """Generate once with and once without the cache; report tokens and where hits came from."""
    from ..config import Config
    from ..engine import CacheEngine
    from ..integrations.transformers import CachedModel, geometry_for, random_llama

    llm = random_llama(seed=1234)
    cfg = Config.from_dict({"tiers": ["memory://?capacity=256MiB", tier], "chunk_size": CHUNK_SIZE,
                            "device": "cpu"})
    engine = CacheEngine(geometry_for(llm), cfg, model=model)
    cached = CachedModel(llm, engine)
    try:
        ids = _prompt(prompt_seed)
        plain = cached.generate(ids, MAX_NEW_TOKENS, use_cache=False)
        res = cached.generate(ids, MAX_NEW_TOKENS)
        engine.flush(120)
        healthy = {t.name: engine.metrics.registry.get_sample_value("lmcache_tier_healthy", {"tier": t.name})
                   for t in engine.tiers.tiers}
    finally:
        cached.close()
    return {"tokens": res.tokens, "plain_tokens": plain.tokens, "hit_tokens": res.hit_tokens,
            "by_tier": res.by_tier, "stored_tokens": res.stored_tokens, "ttft_s": res.ttft_s,
            "plain_ttft_s": plain.ttft_s, "healthy": healthy}


def _spawn(tier: str, prompt_seed: int, model: str, env: Mapping[str, str] | None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "lmcache_core.testing.e2e", "--tier", tier, "--prompt-seed", str(prompt_seed),
            "--model", model]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise AssertionError(f"e2e child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_two_process(tier: str, tier_name: str, *, prompt_seed: int = 7, model: str = "e2e-random-llama",
                    env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Store from process A, hit from process B through ``tier``; outputs must match a cache-less run."""
    a = _spawn(tier, prompt_seed, model, env)
    assert a["healthy"].get(tier_name) == 1, f"tier {tier_name} unhealthy in process A: {a}"
    assert a["tokens"] == a["plain_tokens"], "process A: cached generation differs from the plain one"
    assert a["stored_tokens"] > 0, f"process A stored nothing: {a}"
    b = _spawn(tier, prompt_seed, model, env)
    assert b["hit_tokens"] >= CHUNK_SIZE, f"process B missed the shared tier: {b}"
    assert b["by_tier"] == {tier_name: b["hit_tokens"]}, f"process B hits must all come from {tier_name}: {b}"
    assert b["tokens"] == b["plain_tokens"] == a["plain_tokens"], "greedy output changed with cached KV"
    return b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tier", required=True, help="remote tier URL, after a fresh memory tier")
    p.add_argument("--prompt-seed", type=int, default=7)
    p.add_argument("--model", default="e2e-random-llama", help="model name in the key namespace")
    args = p.parse_args(argv)
    print(json.dumps(run_half(args.tier, args.prompt_seed, args.model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
