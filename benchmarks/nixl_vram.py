"""NIXL transport on a GPU host: two processes, one-sided READ of VRAM and DRAM, against torch copies.

A holder process registers a CUDA tensor (VRAM) and a pinned host tensor (DRAM) of ``--mib``
MiB each through :class:`lmcache_backend_nixl.transport.NixlTransport`; this process reads
them into its own VRAM and DRAM tensors (VRAM->VRAM, VRAM->DRAM, DRAM->VRAM, DRAM->DRAM),
checks the bytes, and times each against the copy torch makes of the same bytes in this
process in the same run (device-to-device, device-to-pinned-host, host-to-device, host). Best
of ``--reps``. Writes JSON (``--json``) and prints a table.

    python benchmarks/nixl_vram.py --mib 256 --json out/nixl-vram.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch


def holder(mib: int) -> None:
    from lmcache_backend_nixl.transport import NixlTransport

    t = NixlTransport()
    n = mib << 20
    g = torch.Generator(device="cuda").manual_seed(3)
    vram = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=g)
    dram = vram.cpu().pin_memory()
    dv, dd = t.register(vram), t.register(dram)
    enc = lambda d: [d.agent, d.handle, d.nbytes, d.meta.hex()]  # noqa: E731
    print(json.dumps({"endpoint": t.endpoint().hex(), "vram": enc(dv), "dram": enc(dd)}), flush=True)
    sys.stdin.readline()
    t.close()


def best(fn: Any, reps: int) -> float:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return min(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", default="run", choices=("run", "holder"))
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.mode == "holder":
        holder(args.mib)
        return
    from lmcache_backend_nixl.transport import NixlTransport
    from lmcache_core.transport import Descriptor

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from p2p import child_json, stop_child

    proc = subprocess.Popen([sys.executable, __file__, "holder", "--mib", str(args.mib)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        info = child_json(proc)
        t = NixlTransport()
        t.connect(bytes.fromhex(info["endpoint"]))
        n = args.mib << 20
        mine = {"vram": torch.empty(n, dtype=torch.uint8, device="cuda"),
                "dram": torch.empty(n, dtype=torch.uint8).pin_memory()}
        local = {k: t.register(v, private=True) for k, v in mine.items()}
        remote = {k: Descriptor(a, h, m, bytes.fromhex(x)) for k, (a, h, m, x) in
                  ((k, info[k]) for k in ("vram", "dram"))}
        ref = None
        rows = []
        ceilings = {("vram", "vram"): ("torch d2d", lambda a, b: b.copy_(a)),
                    ("vram", "dram"): ("torch d2h pinned", lambda a, b: b.copy_(a)),
                    ("dram", "vram"): ("torch h2d pinned", lambda a, b: b.copy_(a)),
                    ("dram", "dram"): ("torch host copy", lambda a, b: b.copy_(a))}
        for (src, dst), (what, copy) in ceilings.items():
            def read(src: str = src, dst: str = dst) -> None:
                t.wait(t.read(local[dst], remote[src]), 60)
            secs = best(read, args.reps)
            got = mine[dst].cpu() if dst == "vram" else mine[dst]
            if ref is None:
                ref = got.clone()
            exact = bool(torch.equal(got, ref))
            a = torch.empty(n, dtype=torch.uint8, device="cuda" if src == "vram" else "cpu")
            a = a.pin_memory() if src == "dram" else a
            b = torch.empty_like(mine[dst])
            ceil = best(lambda: copy(a, b), args.reps)
            rows.append({"src": src, "dst": dst, "nixl_gibs": round(n / secs / (1 << 30), 2),
                         "ceiling": what, "ceiling_gibs": round(n / ceil / (1 << 30), 2),
                         "ratio": round(ceil / secs, 3), "bit_exact": exact})
        t.close()
    finally:
        stop_child(proc)
    print(f"{'read':14} {'nixl GiB/s':>10} {'ceiling':>18} {'GiB/s':>7} {'ratio':>6} exact")
    for r in rows:
        print(f"{r['src'] + '->' + r['dst']:14} {r['nixl_gibs']:10.2f} {r['ceiling']:>18} "
              f"{r['ceiling_gibs']:7.2f} {r['ratio']:6.2f} {r['bit_exact']}")
    report = {"benchmark": "nixl_vram", "date": time.strftime("%Y-%m-%d"), "mib": args.mib, "reps": args.reps,
              "gpu": torch.cuda.get_device_name(0), "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
