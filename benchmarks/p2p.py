"""P2P fetch throughput beside the transport's raw transfer of the same bytes, in the same run.

A holder process (``serve``) runs an embedded CacheEngine with memory and p2p tiers, stores
``--chunks`` chunks of ``--tokens`` tokens (bf16, ``--layers`` x 8 heads x 128) and also
hands out raw descriptors of the very same chunk images. This process then, per transport:

- ``raw``: ``transport.read`` of every image into one registered buffer (the ceiling:
  the transport alone, no control plane, no verification);
- ``p2p get``: ``P2PStore.get`` of every key (directory lookup, control round trip,
  lease, the same transport read, ``decode_image`` verification), sequential;
- ``stack get``: the tier stack's parallel ``get_many`` of every key from the p2p tier (the
  engine's reader threads; verification; promotion into the memory tier, cleared each round);
- ``engine retrieve``: ``CacheEngine.retrieve`` of the whole prompt from the p2p tier, which
  adds the device's scatter into a paged KV cache (on CPU the torch scatter dominates).

Each figure is the best of ``--reps`` rounds. A Redis directory is started on loopback (where
no redis-server is installed, the GPU host, a rendezvous ``peers=`` list names the holder instead).

    python benchmarks/p2p.py                         # tcp and nixl where it imports
    python benchmarks/p2p.py --transports tcp --chunks 8 --json out.json
    python benchmarks/p2p.py --device cuda ...       # GPU host: engine retrieve scatters into VRAM
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HEADS, DIM, BLOCK = 8, 128, 16


def paged(layers: int, tokens: int, seed: int, device: str = "cpu") -> tuple[list[torch.Tensor], Any]:
    from lmcache_core.layout import PagedKV

    g = torch.Generator().manual_seed(seed)
    nb = (tokens + BLOCK - 1) // BLOCK
    caches = [(torch.randn((2, nb, BLOCK, HEADS, DIM), generator=g) + 0.5).to(torch.bfloat16).to(device)
              for _ in range(layers)]
    return caches, PagedKV.from_vllm_flash(caches)


def config(args: argparse.Namespace, listen: str, transport: str, device: str = "cpu") -> Any:
    from lmcache_core import Config

    return Config.from_dict({
        "tiers": [f"memory://?capacity={4 * args.chunks * args.tokens * args.layers * 8 * HEADS * DIM}",
                  f"p2p://{listen}?{args.directory}&token_file={args.token_file}&transport={transport}"
                  f"&timeout=30"],
        "chunk_size": args.tokens, "device": device, "max_inflight_bytes": 8 << 30,
        "host_pool_size": 8 << 30})


def serve(args: argparse.Namespace) -> None:
    """The holder: store the prompt, print the p2p address, the raw descriptors and the endpoint."""
    from lmcache_core import CacheEngine

    total = args.chunks * args.tokens
    _, kv = paged(args.layers, total, 1)
    # With a rendezvous peer list (no Redis) the holder listens where the list says.
    listen = args.directory.removeprefix("peers=") if args.directory.startswith("peers=") else "127.0.0.1"
    eng = CacheEngine(kv.geometry, config(args, listen, args.transport), model="bench-p2p")
    tokens = list(range(total))
    eng.store(tokens, kv, torch.arange((total + BLOCK - 1) // BLOCK), wait=True)
    eng.flush()
    p2p, mem = eng.tiers.by_name("p2p"), eng.tiers.by_name("memory")
    raw = []
    for key in eng.keys(tokens):
        chunk = mem.get(key)
        d = p2p.transport.register(chunk.image())
        raw.append([d.agent, d.handle, d.nbytes, d.meta.hex()])
    print(json.dumps({"address": p2p.address, "endpoint": p2p.transport.endpoint().hex(), "raw": raw}), flush=True)
    sys.stdin.readline()
    eng.close()


def child_json(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The next JSON line a child process prints (NIXL logs to stdout too)."""
    while True:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the holder process ended (exit {proc.wait()})")
        if line.startswith("{"):
            return json.loads(line)


def stop_child(proc: subprocess.Popen[str]) -> None:
    """Tell a holder waiting on stdin to close, and wait for it."""
    if proc.poll() is None:
        proc.stdin.write("\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        proc.wait(timeout=60)


def best(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(args: argparse.Namespace, transport: str) -> dict[str, Any]:
    from lmcache_core import CacheEngine
    from lmcache_core.transport import Descriptor

    child = subprocess.Popen([sys.executable, __file__, "serve", "--transport", transport, "--directory",
                              args.directory, "--token-file", args.token_file, "--chunks", str(args.chunks),
                              "--tokens", str(args.tokens), "--layers", str(args.layers)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = child_json(child)
        total = args.chunks * args.tokens
        caches, kv = paged(args.layers, total, 2, args.device)
        eng = CacheEngine(kv.geometry, config(args, "", transport, args.device), model="bench-p2p")
        p2p, mem = eng.tiers.by_name("p2p"), eng.tiers.by_name("memory")
        tokens = list(range(total))
        keys = eng.keys(tokens)
        raws = [Descriptor(a, h, n, bytes.fromhex(m)) for a, h, n, m in info["raw"]]
        nbytes = sum(d.nbytes for d in raws)
        t = p2p.transport
        t.connect(bytes.fromhex(info["endpoint"]))
        landing = bytearray(max(d.nbytes for d in raws))
        local = t.register(memoryview(landing), private=True)

        def raw_round() -> None:
            for d in raws:
                t.wait(t.read(Descriptor(local.agent, local.handle, d.nbytes, local.meta), d), 30)

        def get_round() -> None:
            for k in keys:
                c = p2p.get(k)
                assert c is not None, f"p2p get of {k} missed"
                c.release()

        def stack_round() -> None:
            mem.clear()
            got = eng.tiers.get_many(keys)
            assert all(g is not None and g[1] == "p2p" for g in got), "a p2p fetch missed"
            for g in got:
                g[0].release()

        def retrieve_round() -> None:
            mem.clear()
            res = eng.retrieve(tokens, kv, torch.arange((total + BLOCK - 1) // BLOCK))
            assert res.by_tier == {"p2p": total}, res

        raw_round()  # connections and metadata, once
        rows = {"raw": best(raw_round, args.reps), "p2p_get": best(get_round, args.reps),
                "stack_get": best(stack_round, args.reps), "engine_retrieve": best(retrieve_round, args.reps)}
        ref, _ = paged(args.layers, total, 1, args.device)
        exact = all(torch.equal(a, b) for a, b in zip(caches, ref))
        t.deregister(local)
        eng.close()
    finally:
        stop_child(child)
    gib = nbytes / (1 << 30)
    out = {k: round(gib / v, 3) for k, v in rows.items()}
    return {"transport": transport, "bytes": nbytes, "chunk_bytes": raws[0].nbytes, "chunks": len(raws),
            "gibs": out, "ratio_p2p_get": round(out["p2p_get"] / out["raw"], 3),
            "ratio_stack_get": round(out["stack_get"] / out["raw"], 3),
            "ratio_engine_retrieve": round(out["engine_retrieve"] / out["raw"], 3), "bit_exact": exact}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", default="run", choices=("run", "serve"))
    p.add_argument("--transports", nargs="+", default=["tcp", "nixl"])
    p.add_argument("--transport", default="tcp")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--directory", default="")
    p.add_argument("--token-file", default="")
    p.add_argument("--machine", default=os.environ.get("LMCACHE_MACHINE", "cpu"))
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.mode == "serve":
        serve(args)
        return
    from contextlib import ExitStack

    from lmcache_core.testing.servers import RedisServer, free_port

    results, skipped = [], {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        try:
            redis = stack.enter_context(RedisServer.redis())
            redis.start()
            args.directory = f"directory={redis.url}/0"
        except Exception as exc:  # noqa: BLE001 - no redis-server here (the GPU host): rendezvous instead
            print(f"no Redis directory ({type(exc).__name__}: {exc}); using a rendezvous peer list")
            args.directory = f"peers=127.0.0.1:{free_port()}"
        args.token_file = str(Path(tmp) / "token")
        Path(args.token_file).write_text("benchmark-cluster-token-0123456789")
        for tr in args.transports:
            if args.directory.startswith("peers="):
                args.directory = f"peers=127.0.0.1:{free_port()}"  # a fresh holder address per transport
            try:
                results.append(measure(args, tr))
            except Exception as exc:  # noqa: BLE001 - one transport failing still reports the others
                skipped[tr] = f"{type(exc).__name__}: {exc}"
    print(f"{'transport':10} {'chunk MiB':>9} {'raw GiB/s':>10} {'p2p get':>9} {'ratio':>6} "
          f"{'stack get':>9} {'ratio':>6} {'retrieve':>9} {'ratio':>6} exact")
    for r in results:
        g = r["gibs"]
        print(f"{r['transport']:10} {r['chunk_bytes'] / (1 << 20):9.1f} {g['raw']:10.2f} {g['p2p_get']:9.2f} "
              f"{r['ratio_p2p_get']:6.2f} {g['stack_get']:9.2f} {r['ratio_stack_get']:6.2f} "
              f"{g['engine_retrieve']:9.2f} {r['ratio_engine_retrieve']:6.2f} {r['bit_exact']}")
    for tr, why in skipped.items():
        print(f"{tr}: not measured: {why}")
    report = {"benchmark": "p2p", "machine": args.machine, "directory": args.directory.split("=", 1)[0], "host": platform.node(), "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "device": args.device, "layers": args.layers,
              "tokens_per_chunk": args.tokens, "reps": args.reps, "results": results, "skipped": skipped}
    path = args.json or str(Path(__file__).parent / "results" / f"p2p-{args.machine}-{report['date']}.json")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
