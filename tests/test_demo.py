"""The demo end to end with the real SmolLM2 model (quick workload): prefix hits from memory with
identical output, RAG documents reused in a new order (blended), and disk hits in a second
process. No timed speed-up is asserted here (the CI machine is loaded; the speed-up is
measured by benchmarks/demo_ttft.py and benchmarks/blend_eval.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)  # the subprocess's own limit; a loaded 2-core machine needs it
def test_demo_quick_real_model(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lmcache_core.cli", "demo", "--quick", "--max-new-tokens", "6",
         "--cache-dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["model"].startswith("SmolLM2"), "SmolLM2 did not load: " + proc.stdout[-2000:]
    first, second, rag = data["first"], data["second"], data["rag"]
    assert all(r["same_output"] for r in first + second)
    # question 1 is cold; question 2 and the chat share the document prefix: whole chunks from memory
    assert first[0]["hit_tokens"] == 0
    later = first[1:]
    assert later and all(r["hit_memory"] >= 256 and r["hit_memory"] % 256 == 0 for r in later)
    assert all(r["prompt_tokens"] - r["hit_tokens"] < 256 for r in first[1:2])
    # the second process starts with an empty memory tier and finds every prompt chunk on disk
    assert second[0]["hit_disk"] == second[0]["prompt_tokens"] - 1 and second[0]["hit_memory"] == 0
    # RAG: the first prompt computes its documents on their own; the second, in the other order,
    # reuses all of them and recomputes only a share (the default 15%) plus the question
    assert rag[0]["reused_tokens"] == 0
    assert rag[1]["documents"] == "D2 + D1" and rag[1]["reused_tokens"] > 0.8 * rag[1]["prompt_tokens"]
    assert 0 < rag[1]["recomputed_tokens"] < 0.3 * rag[1]["prompt_tokens"]
