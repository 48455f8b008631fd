"""Plot a connector_gpu.json (benchmarks/connector_gpu.py) as GB/s per layout beside the
pinned-copy ceilings of the same run.

    python benchmarks/plot_connector.py benchmarks/results/connector_gpu-h200-2026-12-01.json docs/benchmarks-connector-gpu.png
"""

from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.load(open(src))
    rows = report["results"]
    names = [f"{r['layout']}\n{r['tokens']}" for r in rows]
    series = [("store (cold pool)", "store_GBps"), ("store (warm pool)", "store_warm_GBps"), ("load", "load_GBps")]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(rows)), 4))
    width = 0.25
    for i, (label, key) in enumerate(series):
        ax.bar([x + (i - 1) * width for x in range(len(rows))], [r[key] for r in rows], width, label=label)
    ceil = report.get("ceiling", {})
    if ceil:
        ax.axhline(ceil["d2h_GBps"], color="k", linestyle="--", linewidth=1,
                   label=f"pinned D2H ceiling {ceil['d2h_GBps']:.1f} GB/s")
        ax.axhline(ceil["h2d_GBps"], color="grey", linestyle=":", linewidth=1,
                   label=f"pinned H2D ceiling {ceil['h2d_GBps']:.1f} GB/s")
    ax.set_xticks(range(len(rows)), names, fontsize=7)
    ax.set_ylabel("GB/s")
    ax.set_title(f"vLLM connector worker half, tokens per request below each bar, {report.get('gpu')}")
    ax.set_ylim(0, 1.4 * max([ceil.get("d2h_GBps", 0.0)] + [r[k] for r in rows for _, k in series]))
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
