"""The GPU transfer benchmark's dry run: the same sections on the CPU with toy shapes (kernels in
the Triton interpreter), so the script the GPU session spends its minutes on cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_measures_every_cpu_section_and_checks_bits(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_transfer.py"), "--dry-run", "--out", str(tmp_path),
         "--sections", "ceilings,store_load,layouts,concurrent,layerwise", "--variants",
         "direct_hi_p16,dma,staged_8s,auto,staged_8s_ringdma", "--timeline", "2", "--profile"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_transfer.json").read_text())
    assert res["errors"] == {}
    assert all(row["store_bit_exact"] and row["load_bit_exact"] for row in res["store_load"].values()
               if "skipped" not in row)
    for name in ("engine_fp8", "batched_fp8"):  # kv_codec=fp8's copies: the fused kernel, bit for bit
        assert res["store_load"][name]["fp8_kernel_off"] == ""
        assert res["store_load"][name]["normal_store_bit_exact"] and res["store_load"][name]["normal_load_bit_exact"]
    for row in res["concurrent"]["rows"].values():
        assert row["default"]["bit_exact"] and row["dma"]["bit_exact"] and row["staged"]["bit_exact"]
    for row in res["layerwise"]["rows"].values():
        assert row["direct_hi_p16"]["bit_exact"] and row["dma"]["bit_exact"]
        assert row["dma"]["transfer_stats"]["dma"] > 0  # the copy-engine path really ran (memmove on a CPU)
        assert row["direct_hi_p16"]["transfer_stats"]["direct"] > 0
        assert row["auto"]["bit_exact"]  # the defaults (on a host device without streams: the kernel)
        line = row["auto"]["timeline"]  # per-layer issue times of each extra pipelined run
        assert line["reps"] == 2 and all(len(r["issued_ms"]) == res["shape"]["layers"] for r in line["runs"])
        assert all(len(r["in_task_ms"]) == res["shape"]["layers"] for r in line["runs"])
        prof = line["profiled_run"]["profile"]  # --profile: an extra run's host functions by own time
        assert prof and (any("wait_layer" in f["function"] for f in prof) or len(prof) == 25)
        assert not any("profile" in r for r in line["runs"])  # the timed runs ran unprofiled
        staged = row["staged_8s"]
        assert staged["bit_exact"] and staged["transfer_stats"]["staged"] > 0
        assert staged["transfer_stats"]["batches"] > 0  # the ring's copies went as batches
        ringdma = row["staged_8s_ringdma"]  # the ring's device half on the copy engines too
        assert ringdma["bit_exact"] and ringdma["transfer_stats"]["ring_batches"] > 0
    cases = res["layouts"]["rows"]
    assert {"vllm_blocks_heads/float8_e4m3fn", "mla/bfloat16", "flashinfer/bfloat16"} <= set(cases)
    for case in cases.values():
        for name in ("engine_default", "engine_staged", "batched_default"):
            cells = [v for t, v in case[name].items() if t.isdigit()]
            assert cells and all(v["store_bit_exact"] and v["load_bit_exact"] for v in cells), (case["kind"], name)


def test_start_profile_times_each_phase_of_a_layer_wise_start_on_the_host_queued_device(tmp_path: Path) -> None:
    # the profile the GPU session runs (STEPS=start_layerwise), on the host stream device that queues
    # its copies layer by layer: every wrapped step is restored (a kernel fault would show as the
    # transfer's fallback) and the phases add up to the start
    import os

    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "start_profile.py"), "--device", "host-queued", "--small",
         "--shape", "layerwise", "--tokens", "256", "--reps", "2", "--json", str(tmp_path / "sp.json")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "sp.json").read_text())
    assert res["shape"] == "layerwise" and res["tokens"] == 256 and res["layers"] == 8
    assert res["transfer"]["transfer"]["kernel"], res["transfer"]  # no wrapper broke the kernel path
    ph = res["phases_ms"]
    for step in ("lookup", "fetch", "slots", "copy_batch", "queue_layers", "queue_layers.stage_preps",
                 "queue_layers.kernel_launch", "queue_layers.check_slots"):
        assert ph[step] > 0, (step, ph)
    assert ph["queue_layers.stage_preps"] <= ph["queue_layers"]
    top = ph["start"] - ph["other"]
    assert abs(top - sum(v for k, v in ph.items() if k not in ("start", "other") and "." not in k)) < 1e-6
    assert len(res["first_waits_ms"]) == 6
    calls = res["calls"]  # how often each step ran in the start (the waits not counted)
    assert calls["lookup"] == 1 and calls["queue_layers"] == 1 and calls["queue_layers.upload"] >= 1, calls


def test_upload_cost_prints_each_call_on_the_cpu(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "upload_cost.py"), "--device", "cpu", "--reps",
                          "5", "--json", str(tmp_path / "u.json")], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "u.json").read_text())["rows"]
    assert set(rows) == {"8 x 1024 tokens", "128 x 256 tokens"}
    assert all(v > 0 for r in rows.values() for v in r.values())
