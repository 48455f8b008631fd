"""Runs one real vLLM engine (one process role of the connector tests) and writes JSON results.

    python vllm_driver.py make-model DIR [--sliding-window N]
    python vllm_driver.py make-lora DIR SEED
    python vllm_driver.py run SPEC.json OUT.json
    python vllm_driver.py probe-layout OUT.json

SPEC: ``{"model": DIR, "connector": {extra_config} | null, "prefix_caching": bool,
"num_blocks": int | null, "failure_policy": "recompute" | "fail", "loras": {name: dir},
"phases": [{"name": str, "max_tokens": int, "prompts": {id: [token ids] | {"tokens": [...],
"lora": name, "cache_salt": str}}}]}``. OUT holds,
per phase and prompt id, the greedy tokens and ``num_cached_tokens``, plus a
snapshot of vLLM's Prometheus counters (``llm.get_metrics()``). Run with the
interpreter that has vLLM; one process per engine, so that several scenarios
share the 30-60 s startup.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Any


def make_model(path: str, sliding_window: int | None = None) -> None:
    """A tiny random-weight Llama (2 layers, 2 KV heads of 32, fp32), saved with save_pretrained;
    with ``sliding_window`` a Mistral of the same shape whose layers attend over that window."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    shape = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(1234)
    if sliding_window:
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **shape)).to(torch.float32)
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.float32)
    with torch.no_grad():
        # Random init gives nearly flat logits, where batch-order rounding (fp32, ~1e-7) flips greedy
        # near-ties; a sharper head makes "same tokens as the reference" a test of the KV, not of luck.
        model.lm_head.weight.mul_(64.0)
    model.save_pretrained(path)


def make_lora(path: str, seed: int) -> None:
    """A random LoRA adapter (rank 8, q/k/v/o of both layers) for the tiny model, in PEFT's format;
    its B matrices are not zero, so it changes every K and V."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    r, hidden, q_out, kv_out = 8, 128, 128, 64
    tensors = {}
    for layer in range(2):
        for mod, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out), ("o_proj", hidden)):
            base = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(r, hidden, generator=g) * 0.2
            tensors[f"{base}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.2
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "task_type": "CAUSAL_LM",
                   "fan_in_fan_out": False, "base_model_name_or_path": None, "modules_to_save": None}, f)


def probe_layout(out_path: str) -> None:
    """Write K/V with vLLM's own CPU_ATTN kernel, read them back through our layout binding."""
    import torch
    from vllm import _custom_ops as ops

    from lmcache_core.integrations.vllm.layout import bind_vllm_caches

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
    if spec.get("executor"):
        kwargs["distributed_executor_backend"] = spec["executor"]
    loras = spec.get("loras") or {}
    if loras:
        kwargs.update(enable_lora=True, max_lora_rank=8, max_loras=len(loras))
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
    lora_ids = {name: i + 1 for i, name in enumerate(sorted(loras))}
    for phase in spec["phases"]:
        if phase.get("wait_for"):  # paced by the test (e.g. a daemon killed between two phases)
            deadline = time.time() + 600
            while not os.path.exists(phase["wait_for"]) and time.time() < deadline:
                time.sleep(0.05)
        if phase.get("wait_files"):  # {"glob": pattern, "count": n}: e.g. an earlier phase's stores on disk
            want = phase["wait_files"]
            deadline, found = time.time() + float(want.get("timeout_s", 120)), 0
            while time.time() < deadline:
                found = len(glob.glob(want["glob"], recursive=True))
                if found >= want["count"]:
                    break
                time.sleep(0.05)
            print(f"phase {phase['name']}: {found} of {want['count']} files {want['glob']!r} present", flush=True)
        ids = list(phase["prompts"])
        prompts, lora_requests = [], []
        for i in ids:
            p = phase["prompts"][i]
            p = p if isinstance(p, dict) else {"tokens": p}
            prompt: dict[str, Any] = {"prompt_token_ids": p["tokens"]}
            if p.get("cache_salt"):
                prompt["cache_salt"] = p["cache_salt"]
            prompts.append(prompt)
            name = p.get("lora")
            if name:
                from vllm.lora.request import LoRARequest

                lora_requests.append(LoRARequest(name, lora_ids[name], loras[name]))
            else:
                lora_requests.append(None)
        params = SamplingParams(max_tokens=phase["max_tokens"], temperature=0.0, ignore_eos=True)
        t1 = time.time()
        extra = {"lora_request": lora_requests} if loras else {}
        outputs = llm.generate(prompts, params, use_tqdm=False, **extra)
        result["phases"][phase["name"]] = {
            i: {"tokens": list(o.outputs[0].token_ids), "num_cached_tokens": o.num_cached_tokens}
            for i, o in zip(ids, outputs)
        }
        result["phases"][phase["name"]]["_seconds"] = round(time.time() - t1, 2)
        print(f"phase {phase['name']}: {len(ids)} prompts in {time.time() - t1:.1f}s", flush=True)
        with open(f"{out_path}.{phase['name']}.done", "w") as f:  # the test may act between phases
            json.dump(result["phases"][phase["name"]], f)
    # Stats reach the frontend's Prometheus registry with the engine's next outputs.
    time.sleep(0.5)
    result["metrics"] = metrics_snapshot(llm)
    with open(out_path, "w") as f:
        json.dump(result, f)
    llm.llm_engine.engine_core.shutdown()  # flushes the connector's stores before exit
    print("done", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "make-model":
        make_model(sys.argv[2], int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--sliding-window"
                   else None)
    elif sys.argv[1] == "make-lora":
        make_lora(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "probe-layout":
        probe_layout(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}; use make-model or run")
