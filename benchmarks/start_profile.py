"""Where a layer-by-layer load's start goes on the host: cProfile of ``CacheEngine.start_retrieve``
on a device, after a warm-up, plus the wall time of each start, of each of its phases and of the
first waits. Two shapes: the conformance suite's pipelining shape (``--shape pipelining``: 16
layers of 32 MiB, chunks of 1024 tokens, random blocks) and gpu_transfer.py's layer-wise one
(``--shape layerwise --tokens N``: Llama-3-8B's KV, 32 layers, chunks of 256 tokens). Prints the
top functions; ``--json`` writes the times and the profile rows.

Usage: python benchmarks/start_profile.py --device cuda --json out/start-profile.json
       python benchmarks/start_profile.py --device cuda --shape layerwise --tokens 32768 --json out/sp-32k.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
import types
from pathlib import Path
from typing import Any


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda",
                    help="a device plugin's name, or host-queued: the host stream device (the transfer layer "
                         "over host memory, staged loads) with its copies queued layer by layer as on a GPU")
    ap.add_argument("--stub-copies", action="store_true",
                    help="host-queued only: skip the kernel and the memmoves, time the host's table building")
    ap.add_argument("--json", default="")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--small", action="store_true", help="a toy shape (for a CPU check of the script)")
    ap.add_argument("--shape", choices=("pipelining", "layerwise"), default="pipelining")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens of the layerwise shape")
    args = ap.parse_args()

    from lmcache_conformance import harness as h
    from lmcache_conformance.device_tests import DeviceContract, KVShape, PipeliningTests
    from lmcache_core.plugins import get_plugin_manager, resolve_device

    dev = _host_queued(args.stub_copies) if args.device == "host-queued" else \
        resolve_device(args.device, get_plugin_manager())
    if args.shape == "layerwise":
        shape, chunk = layerwise_shape(args.tokens, args.small), 256 if not args.small else 16
        tokens, eng = _stored_layerwise(dev, shape, chunk)
    else:
        shape = (KVShape(num_layers=4, num_heads=2, head_dim=16, block_size=16, num_blocks=64) if args.small
                 else KVShape(num_layers=16, num_heads=8, head_dim=128, block_size=16, num_blocks=512))
        chunk = 256 if args.small else 1024
        _, _, tokens, eng = PipeliningTests()._stored(dev, shape, chunk, seed=51)  # the contract's own set-up
    n = shape.slots
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
        phases, waits, counts = _phase_times(dev, eng, tokens, dst.kv, blocks, args.reps)
        prof = cProfile.Profile()
        dev.synchronize()
        prof.enable()
        task = eng.start_retrieve(tokens, dst.kv, blocks)
        prof.disable()
        task.finish()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("cumulative").print_stats(35)
        stats.sort_stats("tottime").print_stats(30)
        rows = [{"function": f"{fn[0]}:{fn[1]}({fn[2]})", "calls": int(st[1]), "own_ms": st[2] * 1e3,
                 "cum_ms": st[3] * 1e3} for fn, st in stats.stats.items()]  # type: ignore[attr-defined]
        rows.sort(key=lambda r: -r["cum_ms"])
    finally:
        eng.close()
    print(f"start_retrieve ms: median {statistics.median(starts):.2f} (min {min(starts):.2f}, max {max(starts):.2f}); "
          f"start + load ms: median {statistics.median(totals):.2f}; transfer {eng.device.describe()}")
    print(f"shape {args.shape}: {shape.num_layers} layers, {n} tokens in chunks of {chunk}")
    print("start_retrieve by phase, median ms (wall clock, not profiled; queue_layers.* lie inside queue_layers): "
          + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    print("first waits, median ms: " + ", ".join(f"{w:.3f}" for w in waits))
    print("calls in the start: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(out.getvalue()[:20000])
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "tokens": n, "chunk": chunk, "layers": shape.num_layers,
                                               "start_ms": starts, "total_ms": totals, "phases_ms": phases,
                                               "first_waits_ms": waits, "calls": counts,
                                               "transfer": eng.device.describe(),
                                               "profile": rows[:60]}, indent=1))
    return 0


def _host_queued(stub: bool) -> Any:
    """The host stream device declaring async copies (the engine queues its loads layer by layer,
    the copies run at each event as the test of the window does) with staged loads; ``stub``: the
    kernel launch and the copier's memmoves do nothing (the KV is not moved)."""
    from lmcache_kernels import dma, triton_copy
    from lmcache_kernels.accel import HostStreamDevice
    from lmcache_kernels.transfer import TransferOptions

    from lmcache_core.device import DeviceCapabilities

    class Queued(HostStreamDevice):
        capabilities = DeviceCapabilities(async_copy=True)

    if stub:
        triton_copy.run = lambda *a, **k: None
        dma.HostCopier.copy = lambda *a, **k: None
    return Queued(0, TransferOptions(store_mode="direct", load_mode="staged"))


def layerwise_shape(tokens: int, small: bool = False) -> "Any":
    """gpu_transfer.py's layer-wise geometry (Llama-3-8B's KV: 32 layers, 8 KV heads of 128, fp16
    here, blocks of 16) for ``tokens`` tokens; a toy one with ``small``."""
    from lmcache_conformance.device_tests import KVShape

    if small:
        return KVShape(num_layers=8, num_heads=2, head_dim=16, block_size=4, num_blocks=max(1, tokens // 4))
    return KVShape(num_layers=32, num_heads=8, head_dim=128, block_size=16, num_blocks=tokens // 16)


def _stored_layerwise(dev: Any, shape: Any, chunk: int) -> tuple[list[int], Any]:
    """An engine with the layer-wise shape's KV stored in a memory tier large enough for it."""
    import uuid

    from lmcache_conformance import harness as h
    from lmcache_conformance.device_tests import DeviceContract
    from lmcache_core import CacheEngine
    from lmcache_core.config import Config

    src = DeviceContract.kv_for(dev, "vllm_flash", "float16", seed=51, shape=shape)
    n = shape.slots
    nbytes = src.kv.geometry.bytes_per_token * n
    cfg = Config.from_dict({"tiers": [f"memory://?capacity={nbytes + (64 << 20)}"], "chunk_size": chunk,
                            "model": "start-profile", "salt": uuid.uuid4().hex, "host_pool_size": 256 << 20})
    eng = CacheEngine(src.kv.geometry, cfg, device=dev)
    tokens = h.tokens_for(n, seed=51)
    eng.store(tokens, src.kv, list(h.place(src, n, seed=51).block_ids), wait=True)
    assert eng.flush(timeout=120)
    eng.pool.wait_reserve(30)
    return tokens, eng


# the transfer layer's steps inside queue_layers, timed the same way (nested: not subtracted)
_TRANSFER_STEPS = ("check_slots", "_auto_layer_call", "_plan", "_stage_layout", "_stage_preps", "_ring_copies",
                   "_ring_table")


def _phase_times(dev, eng, tokens, kv, blocks, reps: int
                 ) -> tuple[dict[str, float], list[float], dict[str, int]]:
    """Median wall time of each phase of ``start_retrieve`` (a wrapper's clock around the engine's
    own steps, about a microsecond each: cProfile's per-call cost distorts the small torch calls),
    the rest of the start outside them, the transfer layer's steps inside the layer queueing
    (``queue_layers.*``) and the first six ``wait_layer`` calls of the task (each queues more
    layers)."""
    from lmcache_kernels import transfer as xfer
    from lmcache_kernels import triton_copy

    from lmcache_core.engine import CacheEngine, LayerwiseRetrieve

    spent: dict[str, float] = {}
    calls: dict[str, int] = {}  # of the last run: how many times each wrapped step ran
    wraps = [(eng, "lookup", "lookup"), (eng.tiers, "get_many", "fetch"), (CacheEngine, "_slot_ranges", "slots"),
             (eng, "_copy_batch", "copy_batch"), (LayerwiseRetrieve, "_load", "queue_layers")]
    wraps += [(xfer.KVTransfer, name, f"queue_layers.{name.lstrip('_')}") for name in _TRANSFER_STEPS]
    wraps += [(triton_copy, "run", "queue_layers.kernel_launch"),
              (triton_copy, "upload_with_slots", "queue_layers.upload")]
    import torch

    if dev.name == "cuda":  # the CUDA runtime calls everywhere in the start (``cuda.*``: across phases)
        wraps += [(torch.cuda, "current_stream", "cuda.current_stream"), (torch.cuda.Event, "record", "cuda.event_record"),
                  (torch.cuda.Stream, "wait_event", "cuda.wait_event"), (torch.cuda.Event, "__init__", "cuda.event_new")]
    saved = []
    for owner, attr, label in wraps:
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr)
        if raw is None:
            continue
        saved.append((owner, attr, raw))
        fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw

        def timed(*a, _fn=fn, _label=label, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t
                calls[_label] = calls.get(_label, 0) + 1

        setattr(owner, attr, classmethod(timed) if isinstance(raw, classmethod)
                else staticmethod(timed) if isinstance(raw, staticmethod) else timed)
    runs: list[dict[str, float]] = []
    waits: list[list[float]] = []
    try:
        for _ in range(reps + 1):
            spent.clear()
            calls.clear()
            dev.synchronize()
            t0 = time.perf_counter()
            task = eng.start_retrieve(tokens, kv, blocks)
            total = time.perf_counter() - t0
            row = {k: v * 1e3 for k, v in spent.items()}  # before the waits queue the rest: the start only
            row["queue_layers"] = row.get("queue_layers", 0.0)
            counts = dict(calls)
            w = []
            for i in range(min(6, task.num_layers)):
                t1 = time.perf_counter()
                task.wait_layer(i)
                w.append((time.perf_counter() - t1) * 1e3)
            task.finish()
            runs.append({**row, "start": total * 1e3})
            waits.append(w)
    finally:
        for owner, attr, raw in saved:
            if isinstance(owner, (type, types.ModuleType)):
                setattr(owner, attr, raw)
            else:
                delattr(owner, attr)  # back to the class's method
    runs, waits = runs[1:], waits[1:]
    keys = sorted({k for r in runs for k in r}, key=lambda k: (k.startswith("queue_layers."), k))
    out = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
    out["other"] = out["start"] - sum(v for k, v in out.items() if k != "start" and "." not in k)
    return out, [statistics.median(w[i] for w in waits) for i in range(len(waits[0]))], counts


if __name__ == "__main__":
    raise SystemExit(main())
