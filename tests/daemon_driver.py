"""A client process of an ``lmcache serve`` daemon, for tests/test_daemon*.py.

KV of a prompt is a pure function of its tokens (each token's values come from a rolling
hash of the prefix), so any process can store a prompt and any other can check, bit for
bit, what it loads. Modes: store, load, store-then-die (SIGKILL in the middle of a store),
soak (random prompts for a while, checking every load).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import signal
import sys
import time

import torch

from lmcache_core.config import Config
from lmcache_core.engine import CacheEngine
from lmcache_core.layout import PagedKV, slot_mapping

L, H, D, BS, NB = 4, 2, 16, 16, 64
CHUNK = 32


def expected(tokens: list[int]) -> torch.Tensor:
    """[layers, 2, tokens, H*D] bf16 of small integers (exact in bf16)."""
    h, rows = 0, []
    for t in tokens:
        h = (h * 1000003 + t + 1) % (1 << 31)
        rows.append(h)
    base = torch.tensor(rows, dtype=torch.int64)[None, None, :, None]
    layer = torch.arange(L)[:, None, None, None] * 31
    plane = torch.arange(2)[None, :, None, None] * 17
    j = torch.arange(H * D)[None, None, None, :]
    return (((base + layer + plane + j) % 251) - 125).to(torch.bfloat16)


def fresh_cache() -> tuple[list[torch.Tensor], PagedKV]:
    caches = [torch.zeros((2, NB, BS, H, D), dtype=torch.bfloat16) for _ in range(L)]
    return caches, PagedKV.from_vllm_flash(caches)


def write(caches: list[torch.Tensor], blocks: torch.Tensor, kv: torch.Tensor) -> None:
    s = slot_mapping(blocks, BS, 0, kv.shape[2])
    for layer, c in enumerate(caches):
        c[:, s // BS, s % BS] = kv[layer].view(2, -1, H, D)


def read(caches: list[torch.Tensor], blocks: torch.Tensor, n: int) -> torch.Tensor:
    s = slot_mapping(blocks, BS, 0, n)
    return torch.stack([c[:, s // BS, s % BS].reshape(2, n, H * D) for c in caches])


def engine(url: str, token: str = "", model: str = "daemon-test-model", **extra: object) -> CacheEngine:
    cfg = Config.from_dict({"daemon": url, "daemon_token": token, "chunk_size": CHUNK, "device": "cpu",
                            "daemon_timeout_ms": 3000, **extra})
    _, kv = fresh_cache()
    return CacheEngine(kv.geometry, cfg, model=model)


def prompt(seed: int, n: int, shared: int = 0) -> list[int]:
    r = random.Random(seed)
    head = random.Random(7).sample(range(1, 30000), shared)
    return head + [r.randrange(1, 30000) for _ in range(n - shared)]


def store(eng: CacheEngine, tokens: list[int], wait: bool = True) -> int:
    caches, kv = fresh_cache()
    blocks = torch.randperm(NB)[: (len(tokens) + BS - 1) // BS]
    write(caches, blocks, expected(tokens))
    return eng.store(tokens, kv, blocks, wait=wait)


def load(eng: CacheEngine, tokens: list[int]) -> tuple[int, bool, dict[str, int]]:
    """(tokens loaded, all loaded tokens exact, by tier)."""
    caches, kv = fresh_cache()
    blocks = torch.randperm(NB)[: (len(tokens) + BS - 1) // BS]
    res = eng.retrieve(tokens, kv, blocks)
    n = res.hit_tokens
    ok = n == 0 or torch.equal(read(caches, blocks, n), expected(tokens)[:, :, :n])
    return n, ok, res.by_tier


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("store", "load", "store-then-die", "soak"))
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", default="")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    faulthandler.enable()  # an abort in native code prints every thread's Python stack
    seeds = [int(s) for s in args.seeds.split(",")]
    eng = engine(args.url, args.token)
    result: dict[str, object] = {"pid": os.getpid()}
    if args.mode == "store":
        result["stored"] = [store(eng, prompt(s, args.tokens)) for s in seeds]
    elif args.mode == "load":
        result["loads"] = [load(eng, prompt(s, args.tokens)) for s in seeds]
    elif args.mode == "store-then-die":
        store(eng, prompt(seeds[0], args.tokens))  # committed
        caches, kv = fresh_cache()
        tokens = prompt(seeds[1], args.tokens)
        blocks = torch.randperm(NB)[: (len(tokens) + BS - 1) // BS]
        write(caches, blocks, expected(tokens))
        task = eng.start_store(tokens, kv, blocks)  # slots allocated in the daemon, not committed
        task.save_layer(0)
        print(json.dumps({"slots": len(task.todo)}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    else:  # soak: shared system prompts, random lengths; every load checked
        rnd = random.Random(os.getpid())
        loads = bad = checked = stored = 0
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            s = rnd.choice(seeds)
            tokens = prompt(s, rnd.choice((64, 100, 200, 300)), shared=rnd.choice((0, 64, 96)))
            n, ok, _ = load(eng, tokens)
            loads += n > 0
            checked += n
            bad += not ok
            if not ok:
                print(f"MISMATCH seed {s} n {n}", file=sys.stderr, flush=True)
            stored += store(eng, tokens, wait=rnd.random() < 0.3)
            if args.out:  # a kill may come at any time: keep the file current
                with open(args.out + ".tmp", "w") as f:
                    json.dump({"loads": loads, "bad": bad, "stored": stored, "checked_tokens": checked}, f)
                os.replace(args.out + ".tmp", args.out)
        result.update(loads=loads, stored=stored)
    result["dropped"] = eng.dropped_stores + eng.daemon.dropped if eng.daemon else 0
    eng.close()
    if args.out and args.mode != "soak":
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
