"""The SGLang HiCache backend against the real sglang 0.5.23 classes (CPU host pools).

The driver runs in an interpreter that has sglang (installed ``--no-deps`` by
scripts/vllm-env.sh, since sglang's full dependency set needs CUDA): SGLang's
own StorageBackendFactory loads the backend the ``dynamic`` way, SGLang's
MHA and MLA host pools hold the KV in each layout, page keys come from
SGLang's hash chain. What is not run here: a full ``sglang.launch_server``
(its kernels need a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from lmcache_core.testing.daemon import DaemonProcess

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results(vh: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python, why = vh.sglang_python()
    if python is None:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("sglang")
    out = work / "out.json"
    daemon = DaemonProcess(work / "daemon", http=False).start()  # the daemon scenario's lmcache serve
    try:
        proc = subprocess.run([python, str(HERE / "sglang_driver.py"), str(out), str(work)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "LMCACHE_TEST_DAEMON_URL": daemon.url})
    finally:
        daemon.stop()
    assert proc.returncode == 0 and out.exists(), f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_backend_through_the_daemon(results: dict[str, Any]) -> None:
    d = results["daemon"]
    assert d["writer_tiers"] == ["daemon"]  # the daemon's tiers, not in-process ones
    assert d["set"] == [True] * d["pages"] and d["exists"] == d["pages"] and d["get"] == [True] * d["pages"]
    assert d["bit_exact"]


@pytest.mark.parametrize("case", ["page_first-mha", "layer_first-mla"])
def test_kv_codec_fp8_pages(results: dict[str, Any], case: str) -> None:
    r = results["kv_codec"][case]
    assert r["set"] == [True] * 3 and r["get"] == [True] * 3
    assert r["disk_codecs"] == ["fp8-e4m3-th/1"] and r["disk_pages"] == 3  # the disk holds fp8 pages
    assert r["fp8_bit_exact"] and r["not_exact"]  # the host codec's values, not the exact KV
    assert r["exact_exists"] == 0  # an exact backend never finds fp8 pages


def test_real_sglang_version(results: dict[str, Any]) -> None:
    assert results["sglang"] == "0.5.23"
    assert not results["errors"], results["errors"]


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_zero_copy_round_trip_between_two_backends(results: dict[str, Any], layout: str, mla: bool) -> None:
    found = [s for s in results["scenarios"] if s["layout"] == layout and s["mla"] == mla]
    assert found, f"scenario {layout}/{'mla' if mla else 'mha'} did not run: {results['errors']}"
    s = found[0]
    assert s["backend_class"] == "LMCacheCoreHiCacheStorage"  # loaded by SGLang's dynamic factory
    assert s["set"] == [True] * s["pages"] and s["set_again"] == [True] * s["pages"]
    assert s["exists"] == s["pages"] and s["exists_other"] == 0
    assert s["get"] == [True] * s["pages"]
    assert s["bit_exact"], "pages read back differ from the pages written"
    assert s["others_untouched"], "batch_get_v1 wrote outside the given host indices"


def test_corrupt_page_is_a_miss_and_is_deleted(results: dict[str, Any]) -> None:
    for s in results["scenarios"]:
        assert s["corrupt_file_found"]
        assert s["get_after_corruption"] == [True, True, False, True, True]
        assert s["exists_after_corruption"] == 2


def _identity(results: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in results.get("identity", {}), f"{name} did not run: {results['errors']}"
    return results["identity"][name]


def test_two_tp_ranks_never_read_each_others_bytes(results: dict[str, Any]) -> None:
    """Ranks 0 and 1 of a TP-2 config store the same page hashes (each holds other heads):
    disjoint keys, and a fresh reader of each rank gets its own rank's bytes back."""
    s = _identity(results, "tp_ranks")
    assert s["shards"] == ["tp0of2.pp0of1", "tp1of2.pp0of1"]  # lmcache_core.keys.shard_id, as vLLM's workers
    assert s["keys_disjoint"]
    assert s["set"] == [[True] * 3, [True] * 3] and s["exists"] == [3, 3] and s["get"] == [[True] * 3, [True] * 3]
    assert s["own_bytes"] == [True, True] and s["other_bytes"] == [False, False]
    assert s["tp1_exists"] == 0  # a TP-1 server has all heads: other bytes, other keys


def test_two_pp_stages_key_their_layers(results: dict[str, Any]) -> None:
    s = _identity(results, "pp_stages")
    assert s["shards"] == ["tp0of1.pp0of2.layers0-3", "tp0of1.pp1of2.layers3-6"]
    assert s["keys_disjoint"] and s["stage1_exists_before"] == 0
    assert s["get"] == [[True, True], [True, True]] and s["own_bytes"] == [True, True]


def test_mla_ranks_share_one_writers_pages(results: dict[str, Any]) -> None:
    """SGLang's MLA pools hold the same bytes on every TP rank: one shard, only SGLang's
    writer rank writes, another rank reads them bit for bit."""
    s = _identity(results, "mla_ranks")
    assert s["shards"] == ["", ""] and s["same_keys"]
    assert s["writers"] == [True, False]
    assert s["set_rank1"] == [True, True] and s["exists_after_rank1"] == 0  # rank 1 wrote nothing
    assert s["get_rank1"] == [True, True] and s["bit_exact"]


def test_extra_key_and_cache_salt_never_share_pages(results: dict[str, Any]) -> None:
    """SGLang's own get_storage_hash_str folds extra_key (where SGLang puts the LoRA id) and
    cache_salt into the page hashes: one prompt under two extra keys, a salt and none never
    meets in the tier, and each extra key reads back its own bytes."""
    s = _identity(results, "request_namespaces")
    assert s["distinct_hashes"]
    assert s["exists_after_a"] == {"lora-a": 3, "lora-b": 0, "salt": 0, "plain": 0}
    assert s["read"]["lora-a"] == {"get": [True] * 3, "own": True}
    assert s["read"]["lora-b"] == {"get": [True] * 3, "own": True}
    assert s["exists_end"] == {"lora-a": 3, "lora-b": 3, "salt": 0, "plain": 0}


def test_model_fingerprint_and_startup_errors(results: dict[str, Any]) -> None:
    s = _identity(results, "identity")
    assert '"model"' in s["missing_model_error"] and "extra-config" in s["missing_model_error"]
    assert s["from_model_name"] and s["explicit"] and s["explicit_ignores_model_name"]
    assert s["explicit_keeps_quantization"]
    assert s["runtime_fingerprints_distinct"], s["runtime_fingerprints"]  # dtype, quant, revision, KV format...
    assert "nvfp4" in s["nvfp4_error"] and "--kv-cache-dtype" in s["nvfp4_error"] and "fp8_e5m2" in s["nvfp4_error"]
    assert s["shard_strings"] == {
        "tp1": "", "tp2r1": "tp1of2.pp0of1", "tp2r1pp2s1": "tp1of2.pp1of2.layers3-6",
        "mla_tp4r3": "", "mla_tp4r3pp2s1": "tp0of1.pp1of2.layers3-6", "mla_dcp2r1": "dcp1of2",
        "tp2r0cp2r1": "tp0of2.pp0of1.cp1of2", "dp_rank3": "tp1of2.pp0of1",  # DP replicas share
    }
