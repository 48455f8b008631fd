"""`lmcache conformance`: discovery through entry points, the xfail file, the report, exit codes."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lmcache_conformance.cli import main
from lmcache_conformance.pytest_plugin import XfailEntry, parse_xfail_file
from lmcache_conformance.report import SCHEMA, ContractResult, render_table, table_cells
from lmcache_conformance.targets import redact
from lmcache_core.plugins import PluginManager

GATHER = ["--device", "dummy", "--contract", "chunk", "-k", "test_gather and vllm_flash and float16"]


def test_test_plugins_are_discovered_through_entry_points() -> None:
    eps = {ep.name: ep for ep in md.entry_points(group="lmcache")}
    assert eps["dummy_device"].dist is not None and eps["dummy_device"].dist.metadata["Name"] == "lmcache-dummy-device"
    assert eps["dummy_storage"].dist is not None
    pm = PluginManager(allow=None, block=())  # a fresh manager: entry points only
    dev = pm.registrations("device")["dummy"]
    assert (dev.plugin, dev.distribution) == ("dummy_device", "lmcache-dummy-device")
    store = pm.storage_for_scheme("dummy")
    assert (store.plugin, store.distribution) == ("dummy_storage", "lmcache-dummy-storage")
    pytest_eps = {ep.value for ep in md.entry_points(group="pytest11")}
    assert "lmcache_conformance.pytest_plugin" in pytest_eps


def test_xfail_file_turns_known_failures_into_xfails_and_reports_stale_entries(
        conformance_cli: Any, tmp_path: Path) -> None:
    xf = tmp_path / "known.txt"
    xf.write_text("# known failures of the dummy device\n"
                  "device/dummy/chunk/test_gather*   # DUMMY-1: last token read from slot 0\n"
                  "device/nosuch/*                   # stale entry\n")
    run = conformance_cli([*GATHER, "--xfail-file", str(xf)], env={"LMCACHE_DUMMY_DEVICE_DEFECT": "gather-shift"})
    assert run.returncode == 0, run.stdout[-2000:]
    outcomes = set(run.outcomes(plugin="dummy").values())
    assert outcomes == {"xfailed"}, outcomes
    assert any("DUMMY-1" in r["reason"] for r in run.report["results"])
    assert run.report["xfail"]["unmatched"] == [{"line": 3, "pattern": "device/nosuch/*", "reason": "stale entry"}]
    assert "'device/nosuch/*' matched no test" in run.stdout
    clean = conformance_cli([*GATHER, "--xfail-file", str(xf)])
    assert clean.returncode == 0
    assert set(clean.outcomes(plugin="dummy").values()) == {"xpassed"}


def test_failure_exit_status_table_and_report(conformance_cli: Any) -> None:
    run = conformance_cli(GATHER, env={"LMCACHE_DUMMY_DEVICE_DEFECT": "gather-shift"})
    assert run.returncode == 1
    assert "device:dummy" in run.stdout and "FAIL" in run.stdout
    r = run.report
    assert r["schema"] == SCHEMA and r["exit_status"] == 1
    assert r["summary"]["failed"] >= 1 and r["summary"]["total"] == len(r["results"])
    assert {"platform", "python", "torch", "cpu_count"} <= set(r["machine"])
    assert r["versions"]["lmcache-core"] and r["versions"]["lmcache-dummy-device"] == "0.1.0"
    dummy = next(p for p in r["plugins"] if p["name"] == "dummy")
    assert dummy["details"]["capabilities"]["async_copy"] is True
    assert r["telemetry"]["dummy"]["telemetry"]["defect"] == "gather-shift"
    ids = [x["id"] for x in r["results"]]
    assert all(i.startswith("device/dummy/chunk/test_gather") for i in ids), ids


# A named plugin that is unknown, blocked or broken fails the run: tests/test_named_plugins.py.


def test_missing_xfail_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--xfail-file", str(tmp_path / "absent.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_list_names_every_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for needle in ("device    cpu", "device    dummy", "storage   memory", "storage   dummy", "transport local"):
        assert needle in out, out


def test_python_dash_m_and_lmcache_subcommand_agree() -> None:
    a = subprocess.run([sys.executable, "-m", "lmcache_conformance", "--help"], capture_output=True, text=True)
    assert a.returncode == 0 and "--xfail-file" in a.stdout
    lmcache = Path(sys.executable).with_name("lmcache")
    if not lmcache.exists():
        pytest.skip(f"no lmcache console script next to {sys.executable}")
    b = subprocess.run([str(lmcache), "conformance", "--help"], capture_output=True, text=True)
    assert b.returncode == 0 and "--xfail-file" in b.stdout


def test_xfail_patterns() -> None:
    e = XfailEntry("device/*/chunk/test_scatter[*-float8_e5m2]", "r", 1)
    assert e.matches("device/cuda/chunk/test_scatter[mla-float8_e5m2]")
    assert not e.matches("device/cuda/chunk/test_scatter[mla-float16]")
    assert not e.matches("xdevice/cuda/chunk/test_scatter[mla-float8_e5m2]")


def test_parse_xfail_file(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    p.write_text("\n# comment only\n  a/b/c/d   # why\ne/f\n")
    assert parse_xfail_file(p) == [XfailEntry("a/b/c/d", "why", 3), XfailEntry("e/f", "known failure (xfail file)", 4)]


def test_table_folds_results_per_plugin_and_contract() -> None:
    rs = [ContractResult("device/x/chunk/a", "device", "x", "chunk", "a", "passed"),
          ContractResult("device/x/chunk/b", "device", "x", "chunk", "b", "skipped", "no fp8"),
          ContractResult("device/x/pipelining/c", "device", "x", "pipelining", "c", "failed", "late"),
          ContractResult("device/y/chunk/a", "device", "y", "chunk", "a", "skipped", "absent")]
    rows, cols, cells = table_cells(rs)
    assert rows == ["device:x", "device:y"] and cols == ["chunk", "pipelining"]
    assert cells[("device:x", "chunk")].text == "pass 1/2, 1 skipped"
    assert cells[("device:x", "pipelining")].status == "fail" and "late" in cells[("device:x", "pipelining")].text
    assert cells[("device:y", "chunk")].text == "skip: absent"
    assert "device:y" in render_table(rs)


def test_redact_hides_passwords() -> None:
    assert redact("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    assert redact("disk:///x") == "disk:///x"
    s3 = redact("s3://b/p?endpoint_url=http%3A%2F%2Fh%3A1&access_key_id=AK&secret_access_key=SK&region=r")
    assert "SK" not in s3 and "secret_access_key=***" in s3 and "region=r" in s3 and "h:1" in s3
