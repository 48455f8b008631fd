"""The demo end to end with the real SmolLM2 model (quick workload): a TTFT drop and disk hits
in a second process, with identical output."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
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
    first, second = data["first"], data["second"]
    assert all(r["same_output"] for r in first + second)
    # questions 2+ share the document prefix with question 1: hits from memory, TTFT drops
    later = [r for r in first if r["request"].startswith("doc") and r["hit_tokens"]]
    assert later and all(r["hit_memory"] > 0 for r in later)
    assert max(r["speedup"] for r in later) > 1.5
    # the second process starts with an empty memory tier and finds the chunks on disk
    assert second[0]["hit_disk"] > 0 and second[0]["hit_memory"] == 0
