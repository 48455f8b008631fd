"""Figures of a bench run: per configuration TTFT (mean, p50, p95, p99), throughput, hit rate
(by tier where the target says), prefill tokens saved; a table, JSON, and optional plots."""

from __future__ import annotations

import json
import platform
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .runner import Result


@dataclass
class Summary:
    config: str
    workload: str
    requests: int
    errors: int
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    prompt_tokens: int
    cached_tokens: int | None  # None: the target does not say
    hit_rate: float | None
    by_tier: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(config: str, workload: str, results: Sequence[Result], wall_s: float) -> Summary:
    ok = [r for r in results if not r.error]
    ttft = np.array([r.ttft_s for r in ok]) if ok else np.array([float("nan")])
    known = [r for r in ok if r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(int(r.cached_tokens or 0) for r in known) if known else None
    by_tier: dict[str, int] = {}
    for r in ok:
        for tier, n in r.by_tier.items():
            by_tier[tier] = by_tier.get(tier, 0) + n
    wall = max(wall_s, 1e-9)
    return Summary(config, workload, len(results), len(results) - len(ok), float(np.mean(ttft)),
                   float(np.percentile(ttft, 50)), float(np.percentile(ttft, 95)), float(np.percentile(ttft, 99)),
                   wall_s, len(ok) / wall, sum(r.output_tokens for r in ok) / wall, prompt, cached,
                   (cached / prompt if prompt and cached is not None else None), by_tier)


def table(summaries: Sequence[Summary], title: str = "lmcache bench") -> Any:
    """A rich Table; the first row of each workload is the baseline the speedup is against."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("workload", "config", "req", "err", "TTFT mean ms", "p50", "p95", "p99", "x vs first",
                "req/s", "hit rate", "tokens saved", "by tier"):
        t.add_column(col, justify="left" if col in ("workload", "config", "by tier") else "right")
    base: dict[str, float] = {}
    for s in summaries:
        base.setdefault(s.workload, s.ttft_mean_s)
        speed = base[s.workload] / s.ttft_mean_s if s.ttft_mean_s > 0 else float("nan")
        t.add_row(s.workload, s.config, str(s.requests), str(s.errors), f"{s.ttft_mean_s * 1e3:.1f}",
                  f"{s.ttft_p50_s * 1e3:.1f}", f"{s.ttft_p95_s * 1e3:.1f}", f"{s.ttft_p99_s * 1e3:.1f}",
                  f"{speed:.2f}", f"{s.requests_per_s:.2f}",
                  "-" if s.hit_rate is None else f"{s.hit_rate:.1%}",
                  "-" if s.cached_tokens is None else str(s.cached_tokens),
                  ", ".join(f"{k} {v}" for k, v in sorted(s.by_tier.items())))
    return t


def machine() -> dict[str, Any]:
    import os

    return {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}


def write_json(path: Path, *, summaries: Sequence[Summary], results: dict[str, list[Result]],
               params: dict[str, Any], notes: Sequence[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "params": params,
           "notes": list(notes), "summaries": [s.to_json() for s in summaries],
           "results": {k: [r.to_json() for r in v] for k, v in results.items()}}
    path.write_text(json.dumps(doc, indent=1))
    return path


def read_results(path: Path) -> dict[str, list[Result]]:
    """The per-request results of a JSON written by :func:`write_json` (to plot them elsewhere)."""
    doc = json.loads(Path(path).read_text())
    return {k: [Result(**r) for r in v] for k, v in doc["results"].items()}


def plot(path: Path, results: dict[str, list[Result]]) -> Path | None:
    """TTFT CDF per configuration, hit rate over time, prefill tokens saved; None (and nothing
    written) when matplotlib is not importable: it is never a dependency of lmcache-core."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    saved: dict[str, int] = {}
    # results without start times (lmcache bench policy before it kept them) are drawn by request number
    timed = any(r.start_s > 0 for rs in results.values() for r in rs)
    for name, rs in results.items():
        ok = sorted((r for r in rs if not r.error), key=lambda r: r.start_s)
        if not ok:
            continue
        ttft = np.sort([r.ttft_s * 1e3 for r in ok])
        a.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=name)
        if all(r.cached_tokens is not None for r in ok):
            cum_hit = np.cumsum([r.cached_tokens or 0 for r in ok])
            cum_prompt = np.cumsum([r.prompt_tokens for r in ok])
            x = [r.start_s for r in ok] if timed else list(range(1, len(ok) + 1))
            b.plot(x, cum_hit / np.maximum(cum_prompt, 1), label=name)
            saved[name] = int(cum_hit[-1])
    a.set(xlabel="TTFT (ms, log scale)", ylabel="fraction of requests", title="TTFT CDF", xscale="log")
    b.set(xlabel="time since start (s)" if timed else "request", ylabel="hit rate so far",
          title="hit rate over time", ylim=(0, 1))
    c.bar(list(saved), list(saved.values()))
    c.set(ylabel="prompt tokens not computed", title="prefill tokens saved")
    c.tick_params(axis="x", rotation=30)
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
