"""Soak: client processes store and load random prompts through one daemon with a small memory
tier (evicting all the time) while some are SIGKILLed; every load is checked bit for bit."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

from lmcache_core.testing.daemon import DaemonProcess

from lmcache_core.testing.daemon import wait_for

from .test_daemon import DRIVER, stats

CLIENTS = 3
SECONDS = 45  # bounded: CI runs it every time


def test_soak_with_eviction_and_kills(tmp_path):
    d = DaemonProcess(tmp_path / "d", tiers=["memory://?capacity=2MiB"], serve={"headroom": 1.0}).start()
    rnd = random.Random(5)
    procs: dict[int, tuple[subprocess.Popen, str]] = {}
    results: list[str] = []
    n = 0

    def spawn(seconds: float) -> None:
        nonlocal n
        out = str(tmp_path / f"client{n}.json")
        n += 1
        p = subprocess.Popen([sys.executable, DRIVER, "soak", "--url", d.url, "--seeds", "1,2,3,4,5,6,7,8",
                              "--seconds", str(seconds), "--out", out],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs[p.pid] = (p, out)
        results.append(out)

    try:
        for _ in range(CLIENTS):
            spawn(SECONDS)
        start = time.monotonic()
        rss_early = None
        kills = 0
        while time.monotonic() - start < SECONDS:
            time.sleep(rnd.uniform(2, 5))
            if rss_early is None and time.monotonic() - start > SECONDS / 3:
                rss_early = d.rss_bytes()
            pid = rnd.choice(list(procs))
            p, _ = procs.pop(pid)
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            left = SECONDS - (time.monotonic() - start)
            if left > 3:
                spawn(left)
        for p, _ in procs.values():
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
            assert "MISMATCH" not in err
        totals = {"loads": 0, "bad": 0, "stored": 0, "checked_tokens": 0}
        for path in results:
            try:
                with open(path) as f:
                    r = json.load(f)
            except FileNotFoundError:  # killed before its first round
                continue
            for k in totals:
                totals[k] += r[k]
        assert totals["bad"] == 0, totals
        assert totals["loads"] > 20 and totals["stored"] > 0, totals
        t = wait_for(lambda: (s := stats(d)["tenants"]["default"])["sessions"] == 0 and s, timeout=20)
        assert t, "sessions of killed clients were not closed"
        mem = t["tiers"]["memory"]
        assert t["session_slots"] == 0 and t["session_pins"] == 0
        assert t["arena_used"] == mem["used_bytes"], t  # no slot leaked
        assert t["metrics"].get('lmcache_evictions_total{tier=memory}', 0) > 0  # it really evicted
        assert kills >= 5
        rss_end = d.rss_bytes()
        assert rss_early is not None and rss_end - rss_early < 24 << 20, (rss_early, rss_end)
    finally:
        for p, _ in procs.values():
            p.kill()
        d.stop()
