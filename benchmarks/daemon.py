"""Daemon mode against embedded mode, same run, same machine.

1. Full-hit TTFT through CachedModel (SmolLM2-135M when its wheel is installed, else a random Llama)
   with the KV in the memory tier: embedded vs through ``lmcache serve``; recompute beside it.
2. Control plane per request for a 32K-token prompt (128 chunks): the daemon round trips a
   store and a load make (lookup+pin, alloc, commit, get, unpin), timed one by one, with a
   payload so small that moving bytes does not count.
3. (``--gpu``) store and load GB/s of a 32K-token request through the engine's batched path,
   embedded (pinned pool) vs daemon (registered shared arena), beside the pinned ceiling.

    python benchmarks/daemon.py [--json OUT] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcache_core.config import Config  # noqa: E402
from lmcache_core.testing.daemon import DaemonProcess  # noqa: E402


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ttft(daemon: DaemonProcess, reps: int, tokens: int, random_model: bool = False) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from lmcache_core.demo import load_model
    from lmcache_core.integrations.transformers import CachedModel

    cache = Path(tempfile.mkdtemp(prefix="lmcache-bench-"))
    model, tok, name = load_model(Path.home() / ".cache" / "lmcache-core", random_model, Console(stderr=True))
    g = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    prompt = torch.randint(10, vocab - 10, (tokens,), generator=g).tolist()
    out: dict[str, Any] = {"model": name, "prompt_tokens": tokens, "reps": reps}
    configs = {"embedded": {"tiers": ["memory://?capacity=1GiB"]}, "daemon": {"daemon": daemon.url}}
    models = {label: CachedModel(model, config=Config.from_dict({"chunk_size": 256, "device": "cpu", **extra}),
                                 model_name=f"bench-{label}") for label, extra in configs.items()}
    runs: dict[str, list[Any]] = {label: [] for label in models}
    base: list[float] = []
    try:
        for cm in models.values():
            cm.generate(prompt, 1)  # store
            cm.engine.flush()
        for _ in range(reps):  # interleaved, so that load on the machine hits both alike
            base.append(models["embedded"].generate(prompt, 1, use_cache=False).ttft_s)
            for label, cm in models.items():
                runs[label].append(cm.generate(prompt, 1))
    finally:
        for cm in models.values():
            cm.close()
    for label, rs in runs.items():
        assert all(r.hit_tokens == tokens - 1 for r in rs), [r.hit_tokens for r in rs]
        out[label] = {"ttft_ms": [round(r.ttft_s * 1e3, 2) for r in rs],
                      "median_ms": round(_median([r.ttft_s for r in rs]) * 1e3, 2)}
    out["recompute_median_ms"] = round(_median(base) * 1e3, 2)
    out["daemon_over_embedded"] = round(out["daemon"]["median_ms"] / out["embedded"]["median_ms"], 3)
    return out


def control_plane(daemon: DaemonProcess, reps: int) -> dict[str, Any]:
    import torch

    from lmcache_core.engine import CacheEngine
    from lmcache_core.layout import PagedKV

    n_tokens, block = 32768, 16
    caches = [torch.zeros((2, n_tokens // block + 1, block, 1, 8), dtype=torch.bfloat16)]
    kv = PagedKV.from_vllm_flash(caches)
    eng = CacheEngine(kv.geometry, Config.from_dict({"daemon": daemon.url, "chunk_size": 256, "device": "cpu"}),
                      model="bench-control-plane")
    conn = eng.daemon.conn
    timings: dict[str, list[float]] = {}
    orig = conn.request

    def timed(msg: dict[str, Any], **kw: Any) -> dict[str, Any]:
        t = time.perf_counter()
        try:
            return orig(msg, **kw)
        finally:
            timings.setdefault(msg["op"], []).append(time.perf_counter() - t)

    conn.request = timed  # type: ignore[method-assign]
    blocks = torch.arange(n_tokens // block)
    try:
        for i in range(reps):
            tokens = [(i * 7919 + j) % 30000 for j in range(n_tokens)]
            t0 = time.perf_counter()
            keys = eng.keys(tokens)
            t_hash = time.perf_counter() - t0
            timings.setdefault("hash", []).append(t_hash)
            eng.store(tokens, kv, blocks, wait=True)
            res = eng.retrieve(tokens, kv, blocks)
            assert res.hit_tokens == n_tokens and len(keys) == 128
    finally:
        conn.request = orig  # type: ignore[method-assign]
        eng.close()
    med = {op: round(_median(ts[1:] if len(ts) > 1 else ts) * 1e3, 3) for op, ts in timings.items()}
    ops = [op for op in ("lookup", "alloc", "commit", "get", "unpin") if op in med]
    per_request = round(sum(med[op] * (2 if op == "lookup" else 1) for op in ops), 3)
    return {"tokens": n_tokens, "chunks": 128, "median_ms": med, "round_trips_ms_per_request": per_request,
            "note": "store: lookup(fast) + alloc + commit; load: lookup(pin) + get + unpin; hashing separate"}


def gpu(daemon: DaemonProcess, reps: int) -> dict[str, Any]:
    import torch

    from lmcache_core.engine import CacheEngine
    from lmcache_core.layout import PagedKV

    L, H, D, block, n = 32, 8, 128, 16, 32768  # an 8B model's KV: 4 GiB at 32K tokens in bf16
    caches = [torch.randn((2, n // block, block, H, D), dtype=torch.bfloat16, device="cuda") for _ in range(L)]
    kv = PagedKV.from_vllm_flash(caches)
    nbytes = kv.geometry.nbytes(n)
    host = torch.empty(nbytes // L, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes // L, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(L):
        host.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    d2h = nbytes / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for _ in range(L):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    h2d = nbytes / (time.perf_counter() - t) / 1e9
    out: dict[str, Any] = {"tokens": n, "bytes": nbytes, "ceiling_d2h_gbps": round(d2h, 1),
                           "ceiling_h2d_gbps": round(h2d, 1)}
    blocks = torch.arange(n // block)
    for label, extra in (("embedded", {"tiers": ["memory://?capacity=40GiB"], "host_pool_size": "40GiB",
                                       "max_inflight_bytes": "40GiB"}),
                         ("daemon", {"daemon": daemon.url, "max_inflight_bytes": "40GiB"})):
        eng = CacheEngine(kv.geometry, Config.from_dict({"chunk_size": 256, "device": "cuda", **extra}),
                          model=f"bench-gpu-{label}")
        st, ld = [], []
        try:
            for i in range(reps):
                tokens = [(i * 104729 + j) % 100000 for j in range(n)]
                torch.cuda.synchronize()
                t = time.perf_counter()
                assert eng.store(tokens, kv, blocks) == n
                st.append(nbytes / (time.perf_counter() - t) / 1e9)
                eng.flush()
                torch.cuda.synchronize()
                t = time.perf_counter()
                res = eng.retrieve(tokens, kv, blocks)
                torch.cuda.synchronize()
                ld.append(nbytes / (time.perf_counter() - t) / 1e9)
                assert res.hit_tokens == n
                eng.clear()
        finally:
            eng.close()
        out[label] = {"store_gbps": round(_median(st), 1), "load_gbps": round(_median(ld), 1),
                      "store_of_ceiling": round(_median(st) / d2h, 3), "load_of_ceiling": round(_median(ld) / h2d, 3)}
    out["daemon_store_vs_embedded"] = round(out["daemon"]["store_gbps"] / out["embedded"]["store_gbps"], 3)
    out["daemon_load_vs_embedded"] = round(out["daemon"]["load_gbps"] / out["embedded"]["load_gbps"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length of the TTFT part")
    ap.add_argument("--sections", default="control,ttft", help="control, ttft, gpu (comma separated)")
    ap.add_argument("--gpu", action="store_true", help="same as --sections control,gpu")
    ap.add_argument("--random-model", action="store_true", help="TTFT with a random-weight Llama (no SmolLM2 wheel)")
    args = ap.parse_args()
    sections = set(("control,gpu" if args.gpu and args.sections == "control,ttft" else args.sections).split(","))
    work = Path(tempfile.mkdtemp(prefix="lmcache-daemon-bench-"))
    memory = "12GiB" if "gpu" in sections else "2GiB"
    d = DaemonProcess(work, tiers=[f"memory://?capacity={memory}"], config={"chunk_size": 256}, http=False)
    d.start()
    result: dict[str, Any] = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
                              "date": time.strftime("%Y-%m-%d"), "python": platform.python_version()}
    try:
        if "control" in sections:
            result["control_plane"] = control_plane(d, args.reps)
        if "ttft" in sections:
            result["ttft"] = ttft(d, args.reps, args.tokens, args.random_model)
        if "gpu" in sections:
            result["gpu"] = gpu(d, args.reps)
    finally:
        d.stop()
    print(json.dumps(result, indent=1))
    if "ttft" in result:
        t = result["ttft"]
        print(f"\nfull-hit TTFT, {t['prompt_tokens']} tokens, {t['model']}: embedded {t['embedded']['median_ms']} ms, "
              f"daemon {t['daemon']['median_ms']} ms ({t['daemon_over_embedded']}x); recompute "
              f"{t['recompute_median_ms']} ms")
    if "control_plane" in result:
        c = result["control_plane"]
        print(f"control plane, 32K tokens: {c['round_trips_ms_per_request']} ms of round trips per request "
              f"(store + load); {c['median_ms']}")
    if "gpu" in result:
        g = result["gpu"]
        print(f"\nGPU 32K tokens ({g['bytes'] / 2**30:.1f} GiB), pinned ceilings D2H {g['ceiling_d2h_gbps']} / H2D "
              f"{g['ceiling_h2d_gbps']} GB/s")
        for label in ("embedded", "daemon"):
            r = g[label]
            print(f"  {label:9s} store {r['store_gbps']} GB/s ({r['store_of_ceiling']:.0%}), load {r['load_gbps']} GB/s "
                  f"({r['load_of_ceiling']:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
