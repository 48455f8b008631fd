"""Runs one real vLLM engine (one process role of the connector tests) and writes JSON results.

    python vllm_driver.py make-model DIR
    python vllm_driver.py run SPEC.json OUT.json
    python vllm_driver.py probe-layout OUT.json

SPEC: ``{"model": DIR, "connector": {extra_config} | null, "prefix_caching": bool,
"num_blocks": int | null, "failure_policy": "recompute" | "fail", "phases":
[{"name": str, "max_tokens": int, "prompts": {id: [token ids]}}]}``. OUT holds,
per phase and prompt id, the greedy tokens and ``num_cached_tokens``, plus a
snapshot of vLLM's Prometheus counters (``llm.get_metrics()``). Run with the
interpreter that has vLLM; one process per engine, so that several scenarios
share the 30-60 s startup.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def make_model(path: str) -> None:
    """A tiny random-weight Llama (2 layers, 2 KV heads of 32, fp32), saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        # Random init gives nearly flat logits, where batch-order rounding (fp32, ~1e-7) flips greedy
        # near-ties; a sharper head makes "same tokens as the reference" a test of the KV, not of luck.
        model.lm_head.weight.mul_(64.0)
    model.save_pretrained(path)


def probe_layout(out_path: str) -> None:
    """Write K/V with vLLM's own CPU_ATTN kernel, read them back through our layout binding."""
    import torch
    from vllm import _custom_ops as ops

    from lmcache_core.integrations._vllm_layout import bind_vllm_caches

    result: dict[str, Any] = {}
    for isa in ("vec", "vec16"):
        for n, d in ((128, 32), (32, 64)):
            layers, blocks, heads = 2, 6, 2
            buf = torch.zeros(layers, blocks, heads, n, 2 * d)
            caches = {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(layers)}
            slots = torch.tensor([n + 0, n + 5, 3 * n + n - 1, 4 * n + 7, 2 * n + 1])
            keys, values = [], []
            for i in range(layers):
                k = torch.randn(len(slots), heads, d)
                v = torch.randn(len(slots), heads, d)
                kc, vc = buf[i].view(blocks, heads, 2 * n, d).chunk(2, dim=2)
                ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)
                keys.append(k)
                values.append(v)
            kv, _ = bind_vllm_caches(caches, head_dim=d, backend="CPU_ATTN", block_size=n, isa=isa)
            b, off = slots // n, slots % n
            ok = all(torch.equal(kv.layers[i].k[b, off], keys[i]) and torch.equal(kv.layers[i].v[b, off], values[i])
                     for i in range(layers))
            result[f"{isa}-N{n}-D{d}"] = bool(ok)
    with open(out_path, "w") as f:
        json.dump(result, f)


def metrics_snapshot(llm: Any) -> dict[str, float]:
    """Counters and gauges summed over labels, by metric name."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        value = getattr(m, "value", None)
        if isinstance(value, (int, float)):
            out[m.name] = out.get(m.name, 0.0) + float(value)
    return out


def run(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    with open(spec_path) as f:
        spec = json.load(f)
    kwargs: dict[str, Any] = dict(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True,
                                  dtype="float32", max_model_len=spec.get("max_model_len", 2048), seed=0, disable_log_stats=False,
                                  enable_prefix_caching=spec.get("prefix_caching", True))
    if spec.get("num_blocks"):
        kwargs["num_gpu_blocks_override"] = spec["num_blocks"]
    if spec.get("max_num_seqs"):
        kwargs["max_num_seqs"] = spec["max_num_seqs"]
    if spec.get("connector") is not None:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "LMCacheCoreConnector",
            "kv_connector_module_path": "lmcache_core.integrations.vllm",
            "kv_role": spec.get("kv_role", "kv_both"),
            "kv_connector_extra_config": spec["connector"],
            "kv_load_failure_policy": spec.get("failure_policy", "fail"),
        }
    t0 = time.time()
    llm = LLM(**kwargs)
    result: dict[str, Any] = {"startup_s": round(time.time() - t0, 1), "phases": {}, "pid": os.getpid()}
    if spec.get("connector") is not None:  # the model identity the connector keys chunks under
        from lmcache_core.integrations.vllm import vllm_model_fingerprint

        result["fingerprint"] = vllm_model_fingerprint(llm.llm_engine.vllm_config)
    for phase in spec["phases"]:
        ids = list(phase["prompts"])
        prompts = [{"prompt_token_ids": phase["prompts"][i]} for i in ids]
        params = SamplingParams(max_tokens=phase["max_tokens"], temperature=0.0, ignore_eos=True)
        t1 = time.time()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        result["phases"][phase["name"]] = {
            i: {"tokens": list(o.outputs[0].token_ids), "num_cached_tokens": o.num_cached_tokens}
            for i, o in zip(ids, outputs)
        }
        result["phases"][phase["name"]]["_seconds"] = round(time.time() - t1, 2)
        print(f"phase {phase['name']}: {len(ids)} prompts in {time.time() - t1:.1f}s", flush=True)
    # Stats reach the frontend's Prometheus registry with the engine's next outputs.
    time.sleep(0.5)
    result["metrics"] = metrics_snapshot(llm)
    with open(out_path, "w") as f:
        json.dump(result, f)
    llm.llm_engine.engine_core.shutdown()  # flushes the connector's stores before exit
    print("done", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "make-model":
        make_model(sys.argv[2])
    elif sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "probe-layout":
        probe_layout(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}; use make-model or run")
