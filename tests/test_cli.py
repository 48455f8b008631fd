"""`lmcache config import` and `lmcache devices`, run as a user runs them (the console script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lmcache_core.config import Config

UPSTREAM = """\
chunk_size: 512
local_cpu: true
max_local_cpu_size: 2.5
local_disk: "file://{disk}/"
max_local_disk_size: 10
remote_url: "lm://localhost:65432"
save_unfull_chunk: true
enable_p2p: false
"""


def lmcache(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}  # no LMCACHE_* of the caller
    return subprocess.run([sys.executable, "-m", "lmcache_core.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_config_import_writes_a_config_that_loads(tmp_path: Path) -> None:
    up = tmp_path / "lmcache-upstream.yaml"
    up.write_text(UPSTREAM.format(disk=tmp_path / "disk"))
    out = tmp_path / "lmcache-core.yaml"
    proc = lmcache("config", "import", str(up), "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = Config.load(out, env={})
    assert cfg.chunk_size == 512 and cfg.save_partial is True
    assert cfg.tiers == ("memory://?capacity=2560MiB", f"disk://{tmp_path}/disk?capacity=10GiB")
    text = out.read_text()
    assert "remote_url: 'lm://localhost:65432': lmcache-core has no lm:// tier" in text
    assert "enable_p2p: no equivalent" in text
    # never overwrites without --force; the upstream file itself is refused by our loader, naming our key
    assert lmcache("config", "import", str(up), "-o", str(out), cwd=tmp_path).returncode == 2
    assert lmcache("config", "import", str(up), "-o", str(out), "--force", cwd=tmp_path).returncode == 0
    show = lmcache("config", "show", "--file", str(up), cwd=tmp_path)
    assert show.returncode == 2
    assert "'max_local_cpu_size' is an upstream LMCache key; use tiers" in show.stderr
    assert "lmcache config import FILE" in show.stderr


def test_config_import_refuses_what_it_cannot_convert(tmp_path: Path) -> None:
    up = tmp_path / "up.yaml"
    up.write_text("local_cpu: false\nremote_url: mooncakestore://m:50051\n")
    proc = lmcache("config", "import", str(up), cwd=tmp_path)
    assert proc.returncode == 2 and "keeps no cache lmcache-core can use" in proc.stderr
    assert proc.stdout == ""


def test_devices_is_a_table_and_json(tmp_path: Path) -> None:
    table = lmcache("devices", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "lmcache devices" in table.stdout and "available" in table.stdout
    rows = json.loads(lmcache("devices", "--json", cwd=tmp_path).stdout)
    cpu = next(r for r in rows if r["device"] == "cpu")
    assert cpu["available"] is True and cpu["distribution"] == "lmcache-core"
    line = next(ln for ln in table.stdout.splitlines() if "│ cpu " in ln or ln.startswith("│ cpu"))
    assert "lmcache-core" in line and "yes" in line
