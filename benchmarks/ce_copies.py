"""What one copy-engine batch (``cuMemcpyBatchAsync``) costs per copy, by direction and size.

The staged path's ``ring_copy="dma"`` moves the device ring's half of a transfer as
device-to-device copies, one per run of tokens (32 KiB for a 16-token Llama-3-8B block); it ran
at 5-7 GB/s on an H100 (docs/benchmarks.md, run L). This measures why: the same bytes as one
batch of N copies of a given size, device to device and host to device, with the overlap flag
and location hints and without, beside one large copy and one torch copy per piece, so the
per-copy cost of each way is a measured figure. Prints a table; ``--json`` writes the rows.

Usage: python benchmarks/ce_copies.py --json out/ce-copies.json [--total-mib 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kernels"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="")
    ap.add_argument("--total-mib", type=int, default=64, help="bytes moved per timed call")
    ap.add_argument("--sizes-kib", default="32,128,512,2048")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import numpy as np
    import torch

    from lmcache_kernels import dma

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    copier, why = dma.copier(dev)
    if not isinstance(copier, dma.DriverCopier):
        print(f"no copy-engine batches here: {why}", file=sys.stderr)
        return 2
    total = args.total_mib << 20
    src_d = torch.empty(2 * total, dtype=torch.uint8, device=dev)
    dst_d = torch.empty(2 * total, dtype=torch.uint8, device=dev)
    src_h = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.Stream(dev)
    rng = np.random.default_rng(0)

    def timed(fn: Any) -> float:
        """Best of ``reps`` wall times of ``fn`` queued on ``stream`` then synchronised, in s."""
        best = float("inf")
        for _ in range(args.reps + 1):  # the first is a warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                fn()
            stream.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    def batch(dsts: Any, srcs: Any, sizes: Any, to_device: bool | None, plain: bool) -> Any:
        def run() -> None:
            copier.plain = plain
            copier.copy(dsts.view(np.uint64), srcs.view(np.uint64), sizes.view(np.uint64), stream.cuda_stream,
                        to_device, dev.index or 0)
        return run

    rows: list[dict[str, Any]] = []
    one = timed(lambda: dst_d[:total].copy_(src_d[:total], non_blocking=True))
    one_h = timed(lambda: dst_d[:total].copy_(src_h, non_blocking=True))
    rows.append({"way": "one copy", "size_kib": total >> 10, "copies": 1, "d2d_GBps": total / one / 1e9,
                 "h2d_GBps": total / one_h / 1e9})
    for kib in (int(x) for x in args.sizes_kib.split(",")):
        size = kib << 10
        n = total // size
        # scattered destinations (as a paged cache's blocks), sources packed (as a ring slot)
        slots = rng.permutation(2 * total // size)[:n].astype(np.int64)
        dst = int(dst_d.data_ptr()) + slots * size
        src = int(src_d.data_ptr()) + np.arange(n, dtype=np.int64) * size
        srch = int(src_h.data_ptr()) + np.arange(n, dtype=np.int64) * size
        sizes = np.full(n, size, dtype=np.int64)
        row: dict[str, Any] = {"way": "batch", "size_kib": kib, "copies": n}
        for label, fn in (("d2d_GBps", batch(dst, src, sizes, None, False)),
                          ("d2d_plain_GBps", batch(dst, src, sizes, None, True)),
                          ("h2d_GBps", batch(dst, srch, sizes, True, False)),
                          ("h2d_plain_GBps", batch(dst, srch, sizes, True, True))):
            try:
                row[label] = total / timed(fn) / 1e9
            except Exception as exc:  # noqa: BLE001 - a refused form is a result too
                row[label] = None
                row[label.replace("GBps", "error")] = f"{type(exc).__name__}: {exc}"
        copier.plain = False
        views = [(dst_d[int(s) * size:(int(s) + 1) * size], src_d[i * size:(i + 1) * size])
                 for i, s in enumerate(slots.tolist())]

        def each() -> None:
            for d, s in views:
                d.copy_(s, non_blocking=True)

        row["d2d_torch_each_GBps"] = total / timed(each) / 1e9
        for k in [k for k in row if k.endswith("GBps")]:
            if row[k]:
                row[k.replace("GBps", "us_per_copy")] = size / (row[k] * 1e9) * 1e6
        rows.append(row)
    print(f"{'way':<8} {'KiB':>6} {'copies':>7} {'d2d':>7} {'d2d plain':>9} {'h2d':>7} {'h2d plain':>9} "
          f"{'d2d torch each':>14}  (GB/s)")
    for r in rows:
        def f(k: str) -> str:
            v = r.get(k)
            return f"{v:7.1f}" if isinstance(v, float) else "      -"
        print(f"{r['way']:<8} {r['size_kib']:>6} {r['copies']:>7} {f('d2d_GBps')} {f('d2d_plain_GBps'):>9} "
              f"{f('h2d_GBps')} {f('h2d_plain_GBps'):>9} {f('d2d_torch_each_GBps'):>14}")
    if args.json:
        out = {"device": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "torch": torch.__version__, "copier": why, "total_bytes": total, "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
