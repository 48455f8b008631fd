"""The vLLM connector's worker half on vLLM-shaped paged caches, without vLLM: bit-exact and timed.

    python benchmarks/connector_gpu.py --out DIR                 # CUDA, Llama-3-8B-shaped KV
    python benchmarks/connector_gpu.py --out DIR --device cpu    # the same logic, small, on the CPU

For every layout vLLM hands a connector (0.32's per-layer ``[blocks, heads,
block, K||V]`` views over one LBNHC buffer, the older ``[2, blocks, block,
heads, dim]``, and CPU_ATTN's split slabs), it drives
:class:`lmcache_core.integrations.vllm.worker.VLLMWorker` exactly as vLLM's
model runner does (bind a step plan, ``start_load``, per layer ``wait_layer``
then ``save_layer``, ``wait_for_save``, ``get_finished``) and checks:

1. store: every prompt token's K and V gathered into chunks (async save,
   reported through ``get_finished``), timed to the report;
2. load (sync, layer by layer) into other blocks of a second cache, with the
   first ``--skip`` tokens left to "vLLM's prefix cache" (redirected to the
   null block): the loaded tokens equal the source bit for bit, the skipped
   ones are untouched;
3. the same as an async load (a thread; reported through ``get_finished``);
4. a load whose middle chunk vanished: the right block ids are reported for
   recompute and the blocks before it are still correct;
5. pipelining: layer ``i``'s wait then a stand-in compute per layer (a matmul),
   against load-everything-first; the hidden share of the shorter side.

Imports no vLLM (the GPU host has none). Writes ``connector_gpu.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lmcache_core import CacheEngine, Config  # noqa: E402
from lmcache_core.integrations.vllm.common import LoadSpec, SaveSpec, StepPlan  # noqa: E402
from lmcache_core.integrations.vllm.layout import bind_vllm_caches, geometry_from_spec  # noqa: E402
from lmcache_core.integrations.vllm.worker import VLLMWorker  # noqa: E402


def make_caches(layout: str, layers: int, blocks: int, heads: int, block: int, dim: int, dtype: torch.dtype,
                device: str, fill: bool, seed: int) -> tuple[dict[str, torch.Tensor], str | None]:
    """Per-layer tensors as vLLM would register them, plus the attention backend name."""
    g = torch.Generator(device=device).manual_seed(seed)

    def buf(*shape: int) -> torch.Tensor:
        if fill:
            return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        return torch.zeros(*shape, device=device, dtype=dtype)

    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    if layout == "vllm032_flash":  # LBNHC buffer, logical [B, H, N, 2D] views (non-contiguous)
        b = buf(layers, blocks, block, heads, 2 * dim)
        return {n: b[i].permute(0, 2, 1, 3) for i, n in enumerate(names)}, "FLASH_ATTN"
    if layout == "vllm_flash_old":  # [2, B, N, H, D] per layer
        return {n: buf(2, blocks, block, heads, dim) for n in names}, "FLASH_ATTN"
    if layout == "cpu_attn":  # LBHNC buffer, [B, H, N, 2D] views, K rows then V rows per slab
        b = buf(layers, blocks, heads, block, 2 * dim)
        return {n: b[i] for i, n in enumerate(names)}, "CPU_ATTN"
    raise SystemExit(f"unknown layout {layout}")


def token_kv(worker: VLLMWorker, blocks: list[int], start: int, end: int) -> torch.Tensor:
    dev = worker.kv.device
    idx = torch.arange(start, end, device=dev)
    b = torch.tensor(blocks, device=dev)[idx // worker.kv.block_size]
    off = idx % worker.kv.block_size
    return torch.stack([torch.stack([lp.k[b, off], lp.v[b, off]]) for lp in worker.kv.layers])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(w: VLLMWorker, plan: StepPlan, compute: Callable[[int], None] | None = None) -> None:
    w.bind(plan)
    w.start_load()
    for i, name in enumerate(w.layer_names):
        w.wait_layer(name)
        if compute is not None:
            compute(i)
        w.save_layer(name)
    w.wait_for_save()


def wait_finished(w: VLLMWorker, req: str, kind: int, timeout: float = 120.0) -> float:
    t0 = time.perf_counter()
    seen: set[str] = set()
    while req not in seen:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{req} not reported finished in {timeout}s")
        seen |= w.get_finished({req})[kind]
        if req not in seen:
            time.sleep(0.0005)
    return time.perf_counter()


def pool_marks(engine: CacheEngine) -> tuple[int, int]:
    """The pool's allocator calls so far: all of them, and those made on a caller's thread (the
    reserve's background pinning holds the driver's lock beside a timed phase; the caller's
    stalls the phase itself)."""
    return getattr(engine.pool, "host_allocations", 0), getattr(engine.pool, "sync_allocations", 0)


def pool_during(engine: CacheEngine, before: tuple[int, int]) -> dict[str, int]:
    now = pool_marks(engine)
    return {"allocator_calls": now[0] - before[0], "on_the_step": now[1] - before[1]}


def run_layout(layout: str, a: argparse.Namespace, engine: CacheEngine, seed: int) -> dict[str, Any]:
    dtype = getattr(torch, a.dtype)
    nblocks = (a.tokens + a.block - 1) // a.block
    total_blocks = 2 * nblocks + 8
    src_caches, backend = make_caches(layout, a.layers, total_blocks, a.heads, a.block, a.dim, dtype, a.device,
                                      True, seed)
    dst_caches, _ = make_caches(layout, a.layers, total_blocks, a.heads, a.block, a.dim, dtype, a.device, False,
                                seed)
    kv_src, names = bind_vllm_caches(src_caches, head_dim=a.dim, backend=backend, block_size=a.block)
    kv_dst, _ = bind_vllm_caches(dst_caches, head_dim=a.dim, backend=backend, block_size=a.block)
    src, dst = VLLMWorker(engine, kv_src, names), VLLMWorker(engine, kv_dst, names)
    perm = torch.randperm(total_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1  # 0 = null block
    src_blocks, dst_blocks = perm[:nblocks].tolist(), perm[nblocks : 2 * nblocks].tolist()
    tokens = tuple(int(x) for x in torch.randint(1, 50000, (a.tokens,), generator=torch.Generator().manual_seed(seed)))
    nbytes = engine.geometry.nbytes(a.tokens)
    out: dict[str, Any] = {"layout": kv_src.kind, "backend": backend, "tokens": a.tokens, "bytes": nbytes}

    # 1. store (async save: timed until get_finished reports the request), after an untimed warm-up
    warm = tuple(t + 1 for t in tokens)
    step(src, StepPlan(saves=(SaveSpec("warm", warm, tuple(src_blocks)),)))
    wait_finished(src, "warm", 0)
    engine.flush()
    src.take_stats()
    sync(a.device)
    reserve_ready = engine.pool.wait_reserve(30)  # the pool's background reserve, refilled after the warm-up
    sync_allocs = engine.pool.sync_allocations
    t0 = time.perf_counter()
    step(src, StepPlan(saves=(SaveSpec("store", tokens, tuple(src_blocks)),)))
    t_done = wait_finished(src, "store", 0)
    out["store_s"] = t_done - t0
    out["store_reserve_ready"] = reserve_ready
    out["store_sync_allocations"] = engine.pool.sync_allocations - sync_allocs
    engine.flush()
    out["store_GBps"] = nbytes / out["store_s"] / 1e9
    out["stored_tokens"] = src.take_stats()["stored_tokens"]
    # 1b. the same store with a warm pool: the memory tier gives its buffers back first, so no
    # pinned allocation happens on the timed path (the cold figure above pays cudaHostAlloc).
    engine.tiers.delete(engine.keys(warm))
    sync(a.device)
    allocs = engine.pool.allocations
    marks = pool_marks(engine)
    t0 = time.perf_counter()
    step(src, StepPlan(saves=(SaveSpec("store_warm", warm, tuple(src_blocks)),)))
    out["store_warm_s"] = wait_finished(src, "store_warm", 0) - t0
    out["pool_during"] = {"store_warm": pool_during(engine, marks)}
    engine.flush()
    out["store_warm_GBps"] = nbytes / out["store_warm_s"] / 1e9
    out["store_warm_fresh_allocations"] = engine.pool.allocations - allocs
    src.take_stats()

    # 2. sync layer-wise load with a skipped (locally cached) prefix
    skip = min(a.skip, a.tokens - 1)
    before = token_kv(dst, dst_blocks, 0, skip).clone() if skip else None
    times = []
    step(dst, StepPlan(loads=(LoadSpec("warm", tokens, tuple(dst_blocks), skip, a.tokens),)))  # warm the pool
    dst.load_errors()
    for _ in range(a.repeat):
        sync(a.device)
        t0 = time.perf_counter()
        step(dst, StepPlan(loads=(LoadSpec("load", tokens, tuple(dst_blocks), skip, a.tokens),)))
        sync(a.device)
        times.append(time.perf_counter() - t0)
    out["load_s"] = min(times)
    out["load_GBps"] = engine.geometry.nbytes(a.tokens - skip) / out["load_s"] / 1e9
    out["load_bit_exact"] = bool(torch.equal(token_kv(dst, dst_blocks, skip, a.tokens),
                                             token_kv(src, src_blocks, skip, a.tokens)))
    out["skipped_untouched"] = before is None or bool(torch.equal(token_kv(dst, dst_blocks, 0, skip), before))
    out["load_errors"] = sorted(dst.load_errors())

    # 3. async load into fresh zeros
    for t in dst_caches.values():
        t.zero_()
    marks = pool_marks(engine)
    t0 = time.perf_counter()
    step(dst, StepPlan(loads=(LoadSpec("aload", tokens, tuple(dst_blocks), 0, a.tokens, is_async=True),)))
    out["async_load_s"] = wait_finished(dst, "aload", 1) - t0
    out["pool_during"]["async_load"] = pool_during(engine, marks)
    sync(a.device)
    out["async_bit_exact"] = bool(torch.equal(token_kv(dst, dst_blocks, 0, a.tokens),
                                              token_kv(src, src_blocks, 0, a.tokens)))

    # 4. a vanished middle chunk -> block ids to recompute
    keys = engine.keys(tokens)
    mid = len(keys) // 2
    engine.tiers.delete([keys[mid]])
    for t in dst_caches.values():
        t.zero_()
    step(dst, StepPlan(loads=(LoadSpec("fail", tokens, tuple(dst_blocks), 0, a.tokens),)))
    chunk = engine.config.chunk_size
    expect = set(dst_blocks[mid * chunk // a.block : (a.tokens - 1) // a.block + 1])
    errors = dst.load_errors()
    out["failure_blocks_ok"] = errors == expect
    out["failure_prefix_exact"] = bool(torch.equal(token_kv(dst, dst_blocks, 0, mid * chunk),
                                                   token_kv(src, src_blocks, 0, mid * chunk)))
    # re-store the whole prompt for the pipelining section
    step(src, StepPlan(saves=(SaveSpec("store2", tokens, tuple(src_blocks)),)))
    wait_finished(src, "store2", 0)
    engine.flush()

    # 5. pipelining: per-layer wait + stand-in compute, vs all layers first. The compute per
    # layer is sized to the layer's load (as many matmuls as take load_s / layers), so neither
    # side is negligible; every figure is the best of --repeat runs after an untimed warm-up.
    if a.compute_dim:
        x = torch.randn(a.compute_dim, a.compute_dim, device=a.device, dtype=dtype)
        for _ in range(3):
            torch.mm(x, x)
        sync(a.device)
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(x, x)
        sync(a.device)
        mm_s = (time.perf_counter() - t0) / 10
        iters = max(1, round(out["load_s"] / a.layers / mm_s)) if a.compute_iters == 0 else a.compute_iters

        def compute(_: int) -> None:
            for _ in range(iters):
                torch.mm(x, x)

        def best(fn: Callable[[], None]) -> float:
            fn()  # warm-up
            times = []
            for _ in range(a.repeat):
                sync(a.device)
                t0 = time.perf_counter()
                fn()
                sync(a.device)
                times.append(time.perf_counter() - t0)
            return min(times)

        compute_s = best(lambda: [compute(i) for i in range(a.layers)])
        marks = pool_marks(engine)
        piped_s = best(lambda: step(dst, StepPlan(loads=(LoadSpec("pipe", tokens, tuple(dst_blocks), 0,
                                                                  a.tokens),)), compute))
        out["pool_during"]["pipelined"] = pool_during(engine, marks)
        shorter = min(compute_s, out["load_s"])
        out["pipeline"] = {"compute_s": compute_s, "load_s": out["load_s"], "pipelined_s": piped_s,
                           "matmul_n": a.compute_dim, "matmuls_per_layer": iters, "matmul_ms": mm_s * 1e3,
                           "hidden_share": min(1.0, max(0.0, (compute_s + out["load_s"] - piped_s) / shorter))
                           if shorter else 0.0}
        for t in dst_caches.values():  # the pipelined load itself must be exact too
            t.zero_()
        step(dst, StepPlan(loads=(LoadSpec("pipe", tokens, tuple(dst_blocks), 0, a.tokens),)), compute)
        sync(a.device)
        out["pipeline"]["bit_exact"] = bool(torch.equal(token_kv(dst, dst_blocks, 0, a.tokens),
                                                        token_kv(src, src_blocks, 0, a.tokens)))
    out["transfer"] = engine.device.describe().get("transfer") if hasattr(engine.device, "describe") else None
    src.close()
    dst.close()
    engine.tiers.delete(engine.keys(tokens) + engine.keys(warm))  # room for the next size
    out["ok"] = bool(out["load_bit_exact"] and out["skipped_untouched"] and out["async_bit_exact"]
                     and out["failure_blocks_ok"] and out["failure_prefix_exact"] and not out["load_errors"]
                     and out["stored_tokens"] == a.tokens and out.get("pipeline", {}).get("bit_exact", True))
    return out


def pinned_ceiling(nbytes: int, repeat: int = 5) -> dict[str, float]:
    """Best of ``repeat`` pinned D2H and H2D copies of ``nbytes`` (one DMA each)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out: dict[str, float] = {}
    for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
        best = float("inf")
        for _ in range(repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_GBps"] = nbytes / best / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--device-plugin", default=None, help="lmcache device plugin (default: auto on GPU, cpu on CPU)")
    p.add_argument("--layouts", default="vllm032_flash,vllm_flash_old,cpu_attn")
    p.add_argument("--tokens", default=None,
                   help="comma-separated prompt lengths (default 4096,16384,32768 on a GPU, 1000 on the CPU)")
    p.add_argument("--compute-dim", type=int, default=None,
                   help="stand-in compute: matmuls of this size per layer (default 4096 on a GPU, 256 on the CPU)")
    p.add_argument("--compute-iters", type=int, default=0,
                   help="matmuls per layer; 0 (default): as many as one layer's load takes")
    p.add_argument("--skip", type=int, default=None, help="tokens already in vLLM's prefix cache")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--daemon", action="store_true",
                   help="through an `lmcache serve` started here (the arena as the host memory)")
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    # Llama-3-8B KV on the GPU; a small model on the CPU so the check runs in seconds.
    a.layers, a.heads, a.dim, a.block, a.dtype = (32, 8, 128, 16, "bfloat16") if gpu else (4, 2, 64, 16, "bfloat16")
    token_counts = [int(t) for t in (a.tokens or ("4096,16384,32768" if gpu else "1000")).split(",")]
    a.tokens = max(token_counts)
    a.skip = a.skip if a.skip is not None else 256
    a.compute_dim = a.compute_dim or (4096 if gpu else 256)
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    memory = "16GiB" if gpu else "1GiB"
    daemon = None
    extra: dict[str, Any] = {"tiers": [f"memory://?capacity={memory}"], "host_pool_size": memory}
    if a.daemon:
        from lmcache_core.testing.daemon import DaemonProcess

        daemon = DaemonProcess(outdir / "daemon", tiers=[f"memory://?capacity={memory}"],
                               config={"chunk_size": 256}, http=False).start()
        extra = {"daemon": daemon.url}
    cfg = Config.from_dict({"chunk_size": 256, "device": a.device_plugin or ("auto" if gpu else "cpu"),
                            "max_inflight_bytes": memory, **extra})
    geometry = geometry_from_spec(a.layers, a.heads, a.dim, getattr(torch, a.dtype), False)
    report: dict[str, Any] = {
        "host": platform.node(), "torch": torch.__version__, "device": a.device,
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "shape": {"layers": a.layers, "kv_heads": a.heads, "head_dim": a.dim, "block": a.block, "dtype": a.dtype,
                  "tokens": token_counts, "chunk": 256}, "results": [], "errors": []}
    if gpu:  # the ceiling of this run: pinned host <-> device copies of the same size
        report["ceiling"] = pinned_ceiling(engine_bytes := geometry.nbytes(a.tokens))
        print(f"ceiling: D2H {report['ceiling']['d2h_GBps']:.1f} GB/s, H2D {report['ceiling']['h2d_GBps']:.1f} GB/s "
              f"({engine_bytes / 2**20:.0f} MiB)", flush=True)
    engine = CacheEngine(geometry, cfg, model="connector-gpu-bench")
    report["device_plugin"] = engine.device.name
    report["async_copy"] = engine.device.capabilities.async_copy
    for seed, (layout, count) in enumerate((lay, t) for lay in a.layouts.split(",") for t in token_counts):
        try:
            a.tokens = count
            res = run_layout(layout, a, engine, seed)
            report["results"].append(res)
            print(f"{res['layout']:>18} {count:>6}: store {res['store_GBps']:6.2f} GB/s ({res['store_sync_allocations']} allocations "
                  f"on the step; warm pool {res['store_warm_GBps']:6.2f})  "
                  f"load {res['load_GBps']:6.2f} GB/s  "
                  f"async {res['async_load_s'] * 1e3:7.1f} ms  ok={res['ok']}"
                  + (f"  hidden={res['pipeline']['hidden_share']:.0%}" if "pipeline" in res else ""), flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next layout
            report["errors"].append({"layout": layout, "tokens": count, "error": f"{type(exc).__name__}: {exc}",
                                     "trace": traceback.format_exc()})
            print(f"{layout}: FAILED {type(exc).__name__}: {exc}", flush=True)
    engine.close()
    if daemon is not None:
        daemon.stop()
    report["mode"] = "daemon" if a.daemon else "embedded"
    report["ok"] = not report["errors"] and all(r["ok"] for r in report["results"])
    name = "connector_gpu-daemon.json" if a.daemon else "connector_gpu.json"
    (outdir / name).write_text(json.dumps(report, indent=2))
    print(f"ok={report['ok']} -> {outdir / name} (device plugin {report['device_plugin']}, {report['mode']})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
