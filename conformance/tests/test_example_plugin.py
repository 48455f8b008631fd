"""The plugin guide's example distribution (examples/example_plugin) passes the contract classes.

It runs from the source tree in a subprocess (its conftest registers the plugin
when it is not installed), exactly as docs/plugins.md tells an author to run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "example_plugin"


def test_example_plugin_passes_its_contract_tests() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLE), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
         "--rootdir", str(EXAMPLE), "-c", os.devnull, "-k", "not (test_roundtrip_through_store and disk)", "tests"],
        cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 100, summary
