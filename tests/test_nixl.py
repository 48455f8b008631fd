"""The nixl transport (lmcache-backend-nixl) against the conformance suite's transport contract,
in one process and between two, on DRAM: what `lmcache conformance --transport nixl` runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_nixl_passes_the_transport_contract_on_dram(tmp_path: Path) -> None:
    try:
        import lmcache_backend_nixl  # noqa: F401
        import nixl._api  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"nixl is not usable here ({type(exc).__name__}: {exc}); "
                    f'pip install "lmcache-core[nixl]" (torch first); the tcp transport covers P2P in CI')
    report = tmp_path / "nixl.json"
    proc = subprocess.run([sys.executable, "-m", "lmcache_core.cli", "conformance", "--transport", "nixl",
                           "--report", str(report)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = json.loads(report.read_text())["results"]
    outcomes = {r["test"]: r["outcome"] for r in results if r["plugin"] == "nixl"}
    assert len(outcomes) >= 11 and set(outcomes.values()) == {"passed"}, outcomes
    assert any("another_process" in t for t in outcomes), "the two-process test did not run"
