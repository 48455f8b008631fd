"""Fixtures of the suite's own tests: running `lmcache conformance` in a subprocess, as a vendor or CI would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class Run:
    """One finished ``lmcache conformance`` run: exit status, output and the parsed JSON report."""

    returncode: int
    stdout: str
    stderr: str
    report: dict[str, Any]

    def outcomes(self, **match: str) -> dict[str, str]:
        """Test id -> outcome for results whose fields equal ``match`` (e.g. plugin="dummy")."""
        return {r["id"]: r["outcome"] for r in self.report["results"]
                if all(r.get(k) == v for k, v in match.items())}

    def failed(self, **match: str) -> list[str]:
        return sorted(i for i, o in self.outcomes(**match).items() if o in ("failed", "error"))

    def failures(self) -> dict[str, str]:
        """Failing test id -> its message (for assertion messages that explain themselves)."""
        return {r["id"]: r["reason"] for r in self.report.get("results", []) if r["outcome"] in ("failed", "error")}


def run_cli(args: Sequence[str], tmp_path: Path, env: dict[str, str] | None = None, timeout: int = 600) -> Run:
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*.json')))}.json"
    full_env = {**os.environ, **(env or {})}
    for var in ("LMCACHE_DUMMY_DEVICE_DEFECT", "LMCACHE_DUMMY_STORAGE_DEFECT"):
        if var not in (env or {}):
            full_env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "lmcache_conformance", *args, "--report", str(report)],
                          capture_output=True, text=True, env=full_env, timeout=timeout, cwd=tmp_path)
    data = json.loads(report.read_text()) if report.exists() else {}
    return Run(proc.returncode, proc.stdout, proc.stderr, data)


import pytest  # noqa: E402


@pytest.fixture
def conformance_cli(tmp_path: Path) -> Any:
    """``conformance_cli([...], env={...})`` runs the CLI in a subprocess and returns a :class:`Run`."""

    def call(args: Sequence[str], env: dict[str, str] | None = None, timeout: int = 600) -> Run:
        return run_cli(args, tmp_path, env, timeout)

    return call
