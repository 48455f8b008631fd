"""P2P between two ``lmcache serve`` daemons (issue 13): a chunk an engine stored through daemon A
is served to an engine on daemon B from A's memory, through B's ``p2p://`` tier and a real Redis
directory, bit for bit, and B's metrics count it as a peer hit."""
from __future__ import annotations

import json
import urllib.request

from lmcache_core.testing.daemon import DaemonProcess, _free_port, wait_for

from . import daemon_driver as drv


def test_chunk_stored_through_daemon_a_is_served_through_daemon_b(tmp_path, redis_server):
    token = tmp_path / "cluster.token"
    token.write_text("daemon-p2p-cluster-token-0123456789\n")
    directory = f"{redis_server.url}/0"

    def daemon(name: str) -> DaemonProcess:
        port = _free_port()
        p2p = (f"p2p://127.0.0.1:{port}?directory={directory}&token_file={token}&transport=tcp"
               f"&advertise=127.0.0.1:{port}")
        return DaemonProcess(tmp_path / name, tiers=["memory://?capacity=32MiB", p2p]).start()

    a, b = daemon("a"), daemon("b")
    ea = eb = None
    try:
        ea = drv.engine(a.url)
        tokens = drv.prompt(81, 200)
        assert drv.store(ea, tokens) == 200
        assert ea.flush(30)
        eb = drv.engine(b.url)
        n, exact, by_tier = drv.load(eb, tokens)
        assert (n, exact) == (200, True)
        assert by_tier == {"p2p": 200}
        metrics = urllib.request.urlopen(b.admin_url + "/metrics", timeout=10).read().decode()
        assert 'lmcache_daemon_hit_tokens_total{model="daemon-test-model",tenant="default",tier="p2p"} 200.0' in metrics
        again = drv.load(eb, tokens)  # promoted into B's memory tier by the first fetch
        assert again[:2] == (200, True) and again[2] == {"memory": 200}
        def slots() -> int:
            stats = json.loads(urllib.request.urlopen(b.admin_url + "/stats", timeout=10).read())
            return stats["tenants"]["default"]["session_slots"]

        assert wait_for(lambda: slots() == 0, timeout=5)  # releases ride on the next request or a 50 ms ping
    finally:
        for e in (ea, eb):
            if e is not None:
                e.close()
        a.stop()
        b.stop()
