"""TTFT with and without lmcache-core on the demo workload (real SmolLM2-135M, CPU).

Runs `lmcache demo --json`, then prints a Markdown table, writes JSON and a PNG
plot. The ceiling is the same run's cache-less prefill of the same prompt: the
speed-up is a ratio of two figures measured back to back on one machine.

    python benchmarks/demo_ttft.py --out out/demo [--quick | --full]

The default runs the demo's default (short) workload; ``--full`` the whole document and
every request (the workload of the figures in docs/benchmarks.md before 2026-12).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--plot", default=None, help="PNG path (default OUT/demo_ttft.png)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = out / "demo.json"
    cmd = [sys.executable, "-m", "lmcache_core.cli", "demo", "--json", str(result), "--cache-dir", str(out / "cache")]
    if args.quick:
        cmd.append("--quick")
    if args.full:
        cmd.append("--full")
    t0 = time.time()
    subprocess.run(cmd, check=True)
    data = json.loads(result.read_text())
    data["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - t0, 1)}
    result.write_text(json.dumps(data, indent=2))

    print(f"\nmodel: {data['model']}; machine: {data['machine']}")
    print("| process | request | prompt tokens | TTFT no cache (ms) | TTFT cached (ms) | hit tokens (memory/disk) | speed-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for proc in ("first", "second"):
        for r in data[proc]:
            print(f"| {proc} | {r['request']} | {r['prompt_tokens']} | {r['ttft_no_cache_s'] * 1000:.0f} | "
                  f"{r['ttft_cache_s'] * 1000:.0f} | {r['hit_tokens']} ({r['hit_memory']}/{r['hit_disk']}) | "
                  f"{r['speedup']:.1f}x |")
    if data.get("rag"):
        print("\n| RAG request | documents | prompt tokens | TTFT full prefill (ms) | TTFT blended (ms) | reused | "
              "recomputed | speed-up | answer full/blend | same tokens |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
        for r in data["rag"]:
            print(f"| {r['request']} | {r['documents']} | {r['prompt_tokens']} | {r['ttft_full_s'] * 1000:.0f} | "
                  f"{r['ttft_blend_s'] * 1000:.0f} | {r['reused_tokens']} | {r['recomputed_tokens']} | "
                  f"{r['speedup']:.1f}x | {'ok' if r['correct_full'] else 'wrong'}/"
                  f"{'ok' if r['correct_blend'] else 'wrong'} | {'yes' if r['same_output'] else 'no'} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{p[0]}:{r['request']}", r) for p in ("first", "second") for r in data[p]]
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["ttft_no_cache_s"] * 1000 for _, r in rows], 0.4, label="no cache")
    ax.bar([x + 0.2 for x in xs], [r["ttft_cache_s"] * 1000 for _, r in rows], 0.4, label="lmcache-core")
    ax.set_xticks(list(xs), [n for n, _ in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"{data['model']} on {data['machine']['cpus']} CPU cores: TTFT per request")
    ax.legend()
    fig.tight_layout()
    plot = Path(args.plot) if args.plot else out / "demo_ttft.png"
    fig.savefig(plot, dpi=110)
    print(f"wrote {result} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
