"""What one small table upload costs the host, call by call: the torch calls a staged batch's first
layer makes to put its kernel tables and slots on the device (a pinned buffer, a copy into it, a
host-to-device copy, an event), each timed alone over many calls, at the sizes the conformance
pipelining shape (8 chunks of 1024 tokens) and a 32K-token request (128 chunks of 256) upload.
Prints a table; ``--json`` writes it.

Usage: python benchmarks/upload_cost.py --device cuda --json out/upload-cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable


def _per_call_us(fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> float:
    """Median of five rounds of ``reps`` calls, host time per call in microseconds."""
    for _ in range(10):
        fn()
    sync()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t) / reps * 1e6)
        sync()
    return statistics.median(rounds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import torch

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "rows": {}}
    for label, chunks, per in (("8 x 1024 tokens", 8, 1024), ("128 x 256 tokens", 128, 256)):
        n = chunks * per + chunks * 4 * 6  # the slots and one table per chunk and ring slot
        whole = torch.arange(chunks * per, dtype=torch.int64)
        parts = list(whole.split(per))
        pinned = torch.empty(n, dtype=torch.int64, pin_memory=cuda)
        dst = torch.empty(n, dtype=torch.int64, device=dev)
        row = {
            "empty_pinned": _per_call_us(lambda: torch.empty(n, dtype=torch.int64, pin_memory=cuda), args.reps, sync),
            "cat_into_pinned": _per_call_us(lambda: torch.cat(parts, out=pinned[: chunks * per]), args.reps, sync),
            "to_device_new": _per_call_us(lambda: pinned.to(dev, non_blocking=True), args.reps, sync),
            "copy_into_device": _per_call_us(lambda: dst.copy_(pinned, non_blocking=True), args.reps, sync),
            "pin_memory_of_new": _per_call_us(lambda: torch.cat(parts).pin_memory() if cuda else torch.cat(parts),
                                              args.reps, sync),
        }
        if cuda:
            row["event_record"] = _per_call_us(lambda: torch.cuda.Event().record(), args.reps, sync)
            row["current_stream"] = _per_call_us(lambda: torch.cuda.current_stream(dev), args.reps, sync)
            # the whole upload as the transfer layer makes it
            import numpy as np
            from lmcache_kernels import triton_copy

            rows = np.zeros((4, chunks, 6), dtype=np.int64)
            row["upload_with_slots"] = _per_call_us(lambda: triton_copy.upload_with_slots(rows, parts, dev),
                                                    args.reps, sync)
        out["rows"][label] = row
    names = list(next(iter(out["rows"].values())))
    print(f"host time per call, us ({out['device']}, median of 5 rounds of {args.reps})")
    print(f"{'call':<20}" + "".join(f"{k:>20}" for k in out["rows"]))
    for name in names:
        print(f"{name:<20}" + "".join(f"{r[name]:>20.1f}" for r in out["rows"].values()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
