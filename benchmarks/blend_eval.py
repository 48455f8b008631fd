"""CacheBlend RAG evaluation on the CPU with SmolLM2-135M-Instruct's real weights.

Five documents of about 1K tokens (lmcache_core/data/rag_documents.json, written for this
evaluation: fictional facts the model cannot know) and fifteen questions answerable from
one of them (ordered round-robin over the documents, so ``--questions 10`` asks two about each). Each prompt is the system line, a new subset and order of the documents (the
one holding the answer plus ``--docs - 1`` others, shuffled with a per-question seed) and
the question. Every prompt is run as:

- full: full prefill, no cache (the reference and the TTFT baseline);
- prefix: prefix-only caching (chunk keys; hits where an earlier prompt shared the start);
- naive: cached segments laid end to end as computed, no re-rotation, no recompute;
- blend-R%: CacheBlend with re-rotation and R% of the cached tokens recomputed.

Each document's segment KV is computed once on its own (a warm-up request per document)
before the timed requests. Correct: the answer (one of its accepted spellings) is in the
decoded text. Agreement: the share of full prefill's greedy tokens a mode reproduces before
its first differing token.

    nice python -u benchmarks/blend_eval.py --questions 5 --out benchmarks/results/blend-cpu-DATE.json
    /tmp/plotvenv/bin/python benchmarks/blend_eval.py --plot RESULT.json --png docs/benchmarks-blend.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RATIOS = (0.0, 0.05, 0.15, 0.30)


def prompt_orders(data: dict[str, Any], per_prompt: int, seed: int) -> list[list[int]]:
    """For each question: the document holding its answer plus others, in a new order."""
    n = len(data["documents"])
    out = []
    for qi, q in enumerate(data["questions"]):
        rng = random.Random(seed * 1000 + qi)
        others = rng.sample([d for d in range(n) if d != q["doc"]], per_prompt - 1)
        order = others + [q["doc"]]
        rng.shuffle(order)
        out.append(order)
    return out


def agreement(ref: list[int], got: list[int]) -> float:
    same = 0
    for a, b in zip(ref, got):
        if a != b:
            break
        same += 1
    return same / len(ref) if ref else 1.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from lmcache_core import Config
    from lmcache_core.blend import BlendConfig
    from lmcache_core.demo import answer_found, load_model, rag_data, rag_segments
    from lmcache_core.integrations.transformers import CachedModel

    console = Console()
    cache_dir = Path(args.cache_dir or os.environ.get("LMCACHE_DEMO_DIR") or Path.home() / ".cache" / "lmcache-core")
    model, tok, label = load_model(cache_dir, False, console)
    if not label.startswith("SmolLM2"):
        raise SystemExit("SmolLM2 did not load; this evaluation needs its real weights")
    data = rag_data()
    docs, questions = data["documents"], data["questions"][: args.questions]
    orders = prompt_orders(data, args.docs, args.seed)
    modes: list[tuple[str, BlendConfig | None]] = [("full", None), ("prefix", None),
                                                   ("naive", BlendConfig(ratio=0.0, rerotate=False))]
    modes += [(f"blend-{round(r * 100)}%", BlendConfig(ratio=r)) for r in RATIOS]
    if True:
        cfg = Config.load(overrides={"tiers": ["memory://?capacity=4GiB"], "device": "cpu"})
        cm = CachedModel(model, config=cfg)
        eos, n = tok.eos_token_id, args.max_new_tokens
        rows = []
        try:
            t0 = time.perf_counter()
            for d in range(len(docs)):  # warm-up: each document's segment KV, computed once on its own
                segs = rag_segments(tok, docs, [d], "Hello?")
                cm.generate(segments=segs, max_new_tokens=1)
            warm_s = time.perf_counter() - t0
            for qi, (q, order) in enumerate(zip(questions, orders)):
                segs = rag_segments(tok, docs, order, q["question"])
                ids = [t for s in segs for t in s]
                row: dict[str, Any] = {"question": q["question"], "answers": q["answers"], "docs": order,
                                       "prompt_tokens": len(ids), "modes": {}}
                ref: list[int] = []
                for name, blend in modes:
                    if name == "full":
                        res = cm.generate(ids, n, use_cache=False, eos_token_id=eos)
                        ref = res.tokens
                    elif name == "prefix":
                        res = cm.generate(ids, n, eos_token_id=eos)
                    else:
                        res = cm.generate(segments=segs, max_new_tokens=n, blend=blend, eos_token_id=eos)
                    text = tok.decode(res.tokens).strip()
                    row["modes"][name] = {
                        "ttft_s": res.ttft_s, "ttft_cpu_s": res.ttft_cpu_s, "hit_tokens": res.hit_tokens, "recomputed_tokens": res.recomputed_tokens,
                        "correct": answer_found(text, q["answers"]),
                        "agreement": agreement(ref, res.tokens), "same_tokens": res.tokens == ref, "text": text,
                    }
                rows.append(row)
                m = row["modes"]
                console.print(f"Q{qi + 1:2d} {len(ids)} tok  full {m['full']['ttft_s']:.2f}s "
                              f"{'ok ' if m['full']['correct'] else 'BAD'}  blend-15% {m['blend-15%']['ttft_s']:.2f}s "
                              f"{'ok ' if m['blend-15%']['correct'] else 'BAD'} agree {m['blend-15%']['agreement']:.2f}"
                              f"  | {m['full']['text'][:50]!r}")
        finally:
            cm.close()
    summary = {}
    for name, _ in modes:
        ms = [r["modes"][name] for r in rows]
        summary[name] = {
            "correct": sum(m["correct"] for m in ms) / len(ms),
            "agreement": statistics.mean(m["agreement"] for m in ms),
            "same_tokens": sum(m["same_tokens"] for m in ms) / len(ms),
            "same_correctness_as_full": sum(m["correct"] == r["modes"]["full"]["correct"] for m, r in zip(ms, rows)) / len(ms),
            "ttft_median_s": statistics.median(m["ttft_s"] for m in ms),
            "ttft_mean_s": statistics.mean(m["ttft_s"] for m in ms),
            # per prompt, against the full prefill of the same prompt run just before it
            "speedup_median": statistics.median(r["modes"]["full"]["ttft_s"] / m["ttft_s"] for m, r in zip(ms, rows)),
            # the same in CPU seconds (all threads) to the first token: robust to other load on the machine
            "ttft_cpu_median_s": statistics.median(m["ttft_cpu_s"] for m in ms),
            "cpu_speedup_median": statistics.median(r["modes"]["full"]["ttft_cpu_s"] / m["ttft_cpu_s"]
                                                    for m, r in zip(ms, rows)),
        }
    return {"model": label, "docs_per_prompt": args.docs, "max_new_tokens": n, "warmup_s": warm_s,
            "document_tokens": [len(rag_segments(tok, docs, [d], "")[1]) for d in range(len(docs))],
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "load_avg_start": os.getloadavg()[0]},
            "summary": summary, "rows": rows}


def print_table(data: dict[str, Any]) -> None:
    print(f"\nmodel: {data['model']}; {len(data['rows'])} prompts, {data['docs_per_prompt']} documents each "
          f"(document tokens {data['document_tokens']}); machine: {data['machine']}")
    print("| mode | correct | same correctness as full | greedy-token agreement | identical tokens | "
          "TTFT median (s) | speed-up vs full (median per prompt) | CPU s to first token | CPU speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, s in data["summary"].items():
        print(f"| {name} | {s['correct']:.0%} | {s['same_correctness_as_full']:.0%} | {s['agreement']:.2f} | "
              f"{s['same_tokens']:.0%} | {s['ttft_median_s']:.2f} | {s['speedup_median']:.1f}x | "
              f"{s.get('ttft_cpu_median_s', float('nan')):.2f} | {s.get('cpu_speedup_median', float('nan')):.1f}x |")


def plot(data: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["summary"])
    s = data["summary"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.bar(names, [s[n]["ttft_median_s"] for n in names], color="tab:blue")
    a1.set_ylabel("TTFT, median (s)")
    a1.set_title("time to first token")
    x = range(len(names))
    a2.bar([i - 0.2 for i in x], [s[n]["correct"] * 100 for n in names], 0.4, label="answer correct")
    a2.bar([i + 0.2 for i in x], [s[n]["agreement"] * 100 for n in names], 0.4, label="greedy-token agreement")
    a2.set_xticks(list(x), names)
    a2.set_ylabel("%")
    a2.set_title("quality (agreement: with full prefill)")
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"CacheBlend, {data['model']}, {len(data['rows'])} RAG prompts of "
                 f"{data['docs_per_prompt']} documents, {data['machine']['cpus']} CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the JSON here (benchmarks/results/blend-cpu-DATE.json)")
    ap.add_argument("--cache-dir", help="where the converted model lives (default ~/.cache/lmcache-core)")
    ap.add_argument("--docs", type=int, default=3, help="documents per prompt")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", help="only draw: read this result JSON")
    ap.add_argument("--png", default="docs/benchmarks-blend.png")
    args = ap.parse_args()
    if args.plot:
        data = json.loads(Path(args.plot).read_text())
        print_table(data)
        plot(data, Path(args.png))
        print(f"wrote {args.png}")
        return 0
    data = run(args)
    print_table(data)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(data, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
