"""Capture a small real-KV sample from SmolLM2-135M on the CPU (the demo's model and document).

Writes ``benchmarks/data/smollm2_kv.npy`` (bf16 bits as uint16, ``[layers, 2, tokens, heads*dim]``)
and ``smollm2_kv.json`` (geometry, token positions, model). Random weights give incompressible
KV; this is what the codec tests and the GPU benchmark measure on.

    .venv/bin/python benchmarks/codecs_capture.py [--tokens 128] [--start 256]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"


def load_smollm2():  # -> (model, tokenizer wrapper, label)
    from rich.console import Console

    from lmcache_core.config import default_cache_dir
    from lmcache_core.demo import load_model

    model, tok, label = load_model(default_cache_dir(), False, Console(stderr=True))
    if "SmolLM2" not in label:
        raise SystemExit(f"SmolLM2 is not available here ({label}); install lmcache-core[transformers]")
    return model, tok, label


def document_prompt(tok, question: int = 0) -> list[int]:
    """The demo's document question ``question`` as the demo asks it (its data files)."""
    from importlib import resources

    from lmcache_core.demo import SYSTEM

    data = resources.files("lmcache_core") / "data"
    doc = (data / "demo_document.md").read_text()
    work = json.loads((data / "demo_workload.json").read_text())
    return tok.encode_chat([{"role": "system", "content": SYSTEM + doc},
                            {"role": "user", "content": work["questions"][question]}])


def prompt_kv(model, ids: list[int]) -> torch.Tensor:
    """``[layers, 2, tokens, heads*dim]`` float32 KV the model computes for ``ids``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return torch.stack([torch.stack([k[0].transpose(0, 1).reshape(len(ids), -1),
                                     v[0].transpose(0, 1).reshape(len(ids), -1)]) for k, v in layers])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--start", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok, label = load_smollm2()
    ids = document_prompt(tok)
    kv = prompt_kv(model, ids)[:, :, args.start: args.start + args.tokens]
    cfg = model.config
    DATA.mkdir(exist_ok=True)
    np.save(DATA / "smollm2_kv.npy", kv.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16))
    meta = {"model": label, "num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_key_value_heads,
            "head_dim": cfg.hidden_size // cfg.num_attention_heads, "dtype": "bfloat16",
            "layout": "[layers, 2, tokens, heads*dim], keys after RoPE (as HF DynamicCache and vLLM keep them)",
            "prompt": "demo document, question 1 (lmcache_core/data)", "start": args.start, "tokens": args.tokens,
            "prompt_tokens": len(ids), "script": "benchmarks/codecs_capture.py"}
    (DATA / "smollm2_kv.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
