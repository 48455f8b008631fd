"""Where a layer-by-layer load's start goes on the host: cProfile of ``CacheEngine.start_retrieve``
for the conformance suite's pipelining shape (16 layers of 32 MiB, chunks of 1024 tokens, random
blocks) on a device, after a warm-up, plus the wall time of each start. Prints the top functions;
``--json`` writes the times and the profile rows.

Usage: python benchmarks/start_profile.py --device cuda --json out/start-profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default="")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--small", action="store_true", help="a toy shape (for a CPU check of the script)")
    args = ap.parse_args()

    from lmcache_conformance import harness as h
    from lmcache_conformance.device_tests import DeviceContract, KVShape, PipeliningTests
    from lmcache_core.plugins import get_plugin_manager, resolve_device

    dev = resolve_device(args.device, get_plugin_manager())
    shape = (KVShape(num_layers=4, num_heads=2, head_dim=16, block_size=16, num_blocks=64) if args.small
             else KVShape(num_layers=16, num_heads=8, head_dim=128, block_size=16, num_blocks=512))
    chunk = 256 if args.small else 1024
    n = shape.slots
    _, _, tokens, eng = PipeliningTests()._stored(dev, shape, chunk, seed=51)  # the contract's own set-up
    try:
        dst = DeviceContract.kv_for(dev, "vllm_flash", "float16", seed=52, shape=shape)
        blocks = list(h.place(dst, n, seed=53).block_ids)
        starts, totals = [], []
        for _ in range(args.reps + 1):
            dev.synchronize()
            t0 = time.perf_counter()
            task = eng.start_retrieve(tokens, dst.kv, blocks)
            t1 = time.perf_counter()
            task.finish()
            dev.synchronize()
            starts.append((t1 - t0) * 1e3)
            totals.append((time.perf_counter() - t0) * 1e3)
        starts, totals = starts[1:], totals[1:]  # the first is a warm-up
        phases = _phase_times(dev, eng, tokens, dst.kv, blocks, args.reps)
        prof = cProfile.Profile()
        dev.synchronize()
        prof.enable()
        task = eng.start_retrieve(tokens, dst.kv, blocks)
        prof.disable()
        task.finish()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("cumulative").print_stats(35)
        stats.sort_stats("tottime").print_stats(20)
        rows = [{"function": f"{fn[0]}:{fn[1]}({fn[2]})", "calls": int(st[1]), "own_ms": st[2] * 1e3,
                 "cum_ms": st[3] * 1e3} for fn, st in stats.stats.items()]  # type: ignore[attr-defined]
        rows.sort(key=lambda r: -r["cum_ms"])
    finally:
        eng.close()
    print(f"start_retrieve ms: median {statistics.median(starts):.2f} (min {min(starts):.2f}, max {max(starts):.2f}); "
          f"start + load ms: median {statistics.median(totals):.2f}; transfer {eng.device.describe()}")
    print("start_retrieve by phase, median ms (wall clock, not profiled): "
          + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    print(out.getvalue()[:9000])
    if args.json:
        Path(args.json).write_text(json.dumps({"start_ms": starts, "total_ms": totals, "phases_ms": phases,
                                               "profile": rows[:60]}, indent=1))
    return 0


def _phase_times(dev, eng, tokens, kv, blocks, reps: int) -> dict[str, float]:
    """Median wall time of each phase of ``start_retrieve`` (a wrapper's clock around the engine's
    own steps, about a microsecond each: cProfile's per-call cost distorts the small torch calls),
    and the rest of the start outside them."""
    from lmcache_core.engine import CacheEngine, LayerwiseRetrieve

    spent: dict[str, float] = {}
    wraps = [(eng, "lookup", "lookup"), (eng.tiers, "get_many", "fetch"), (CacheEngine, "_slot_ranges", "slots"),
             (eng, "_copy_batch", "copy_batch"), (LayerwiseRetrieve, "_load", "queue_layers")]
    saved = []
    for owner, attr, label in wraps:
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr)
        saved.append((owner, attr, raw))
        fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw

        def timed(*a, _fn=fn, _label=label, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t

        setattr(owner, attr, classmethod(timed) if isinstance(raw, classmethod) else timed)
    runs: list[dict[str, float]] = []
    try:
        for _ in range(reps + 1):
            spent.clear()
            dev.synchronize()
            t0 = time.perf_counter()
            task = eng.start_retrieve(tokens, kv, blocks)
            total = time.perf_counter() - t0
            row = {k: v * 1e3 for k, v in spent.items()}  # before finish() queues the rest: the start only
            row["queue_layers"] = row.get("queue_layers", 0.0)
            task.finish()
            runs.append({**row, "start": total * 1e3})
    finally:
        for owner, attr, raw in saved:
            if isinstance(owner, type):
                setattr(owner, attr, raw)
            else:
                delattr(owner, attr)  # back to the class's method
    runs = runs[1:]
    out = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}
    out["other"] = out["start"] - sum(v for k, v in out.items() if k != "start")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
