"""Daemon mode against a real ``lmcache serve`` process: sharing, fate, tenants, bad input, admin API."""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lmcache_core.daemon import protocol
from lmcache_core.daemon.settings import hash_token
from lmcache_core.errors import ConfigError
from lmcache_core.testing.daemon import DaemonProcess, wait_for

from . import daemon_driver as drv

DRIVER = str(Path(__file__).with_name("daemon_driver.py"))
ADMIN = "admin-token"


def run_driver(*args: str, timeout: float = 120) -> dict:
    out = subprocess.run([sys.executable, DRIVER, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def stats(d: DaemonProcess) -> dict:
    return json.loads(urllib.request.urlopen(d.admin_url + "/stats", timeout=10).read())


def post(d: DaemonProcess, path: str, body: dict, token: str = "") -> tuple[int, dict]:
    req = urllib.request.Request(d.admin_url + path, data=json.dumps(body).encode(), method="POST")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("daemon"), tiers=["memory://?capacity=32MiB"],
                      serve={"admin_token_sha256": hash_token(ADMIN)}).start()
    yield d
    d.stop()


def test_two_processes_share_the_memory_tier(shared_daemon):
    """A second engine process is served from the daemon's memory (no disk tier), bit for bit."""
    d = shared_daemon
    stored = run_driver("store", "--url", d.url, "--seeds", "11,12,13", "--tokens", "200")
    assert stored["stored"] == [200, 200, 200]
    loaded = run_driver("load", "--url", d.url, "--seeds", "11,12,13,14", "--tokens", "200")
    assert [tuple(x[:2]) for x in loaded["loads"]] == [(200, True)] * 3 + [(0, True)]
    assert loaded["loads"][0][2] == {"memory": 200}
    t = stats(d)["tenants"]["default"]
    assert t["sessions"] == 0 and t["session_slots"] == 0 and t["session_pins"] == 0
    # every arena byte in use belongs to the memory tier: nothing leaked by the two clients
    assert t["arena_used"] == t["tiers"]["memory"]["used_bytes"]


def test_engine_killed_mid_store_leaves_nothing_half_visible(shared_daemon):
    d = shared_daemon
    before = stats(d)["tenants"]["default"]
    out = subprocess.run([sys.executable, DRIVER, "store-then-die", "--url", d.url, "--seeds", "21,22"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1])["slots"] == 7  # slots held in the daemon when it died
    t = wait_for(lambda: (s := stats(d)["tenants"]["default"])["sessions"] == 0 and s)
    assert t["session_slots"] == 0 and t["arena_used"] == t["tiers"]["memory"]["used_bytes"]
    assert t["tiers"]["memory"]["items"] == before["tiers"]["memory"]["items"] + 7  # only the committed prompt
    eng = drv.engine(d.url)
    try:
        assert drv.load(eng, drv.prompt(21, 200))[:2] == (200, True)
        assert eng.lookup(drv.prompt(22, 200)).hit_tokens == 0  # the uncommitted store is not visible
    finally:
        eng.close()


def test_close_leaves_no_thread_running(shared_daemon):
    """After ``close()`` no thread of the engine is left: a daemon thread still running at
    interpreter exit can abort the process (std::terminate inside a native call)."""
    import threading

    before = set(threading.enumerate())
    eng = drv.engine(shared_daemon.url)
    drv.store(eng, drv.prompt(31, 100))
    assert drv.load(eng, drv.prompt(31, 100))[:2] == (100, True)
    started = [t for t in threading.enumerate() if t not in before]
    assert any(t.name == "lmcache-daemon-client" for t in started), started
    eng.close()
    alive = [t.name for t in started if t.is_alive()]
    assert not alive, alive


def test_daemon_killed_and_restarted(tmp_path):
    """Misses and dropped stores while it is down, never an error; the disk tier is found again."""
    d = DaemonProcess(tmp_path / "d", tiers=["memory://?capacity=16MiB",
                                             f"disk://{tmp_path / 'disk'}?capacity=64MiB"]).start()
    eng = drv.engine(d.url)
    try:
        a, b = drv.prompt(31, 200), drv.prompt(32, 200)
        assert drv.store(eng, a) == 200
        assert eng.flush(30)
        d.kill()
        assert eng.lookup(a).hit_tokens == 0
        assert drv.load(eng, a)[:2] == (0, True)
        dropped = eng.metrics.value("lmcache_dropped_stores", tier="memory")
        drv.store(eng, b)
        assert eng.metrics.value("lmcache_dropped_stores", tier="memory") == dropped + 1
        d.start()
        assert wait_for(lambda: eng.lookup(a).hit_tokens == 200, timeout=20)
        n, ok, by_tier = drv.load(eng, a)
        assert (n, ok) == (200, True) and by_tier == {"disk": 200}
    finally:
        eng.close()
        d.stop()


@pytest.fixture(scope="module")
def tenant_daemon(tmp_path_factory):
    serve = {"tenants": [{"name": "a", "token_sha256": hash_token("token-a"), "memory": "8MiB"},
                         {"name": "b", "token_sha256": hash_token("token-b"), "memory": "8MiB"}],
             "admin_token_sha256": hash_token("admin-token"), "audit_log": "AUDIT"}
    work = tmp_path_factory.mktemp("tenants")
    serve["audit_log"] = str(work / "audit.jsonl")
    d = DaemonProcess(work, serve=serve).start()
    yield d
    d.stop()


def raw_session(d: DaemonProcess, token: str, version: int = protocol.PROTOCOL_VERSION):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(d.socket)
    protocol.send(sock, {"op": "hello", "v": version, "kind": "test", "token": token, "pid": 1})
    fds: list[int] = []
    reply = protocol.recv(sock, fds)
    for fd in fds:
        import os

        os.close(fd)
    return sock, reply


def test_tenants_cannot_read_or_evict_each_other(tenant_daemon):
    d = tenant_daemon
    ea, eb = drv.engine(d.url, "token-a"), drv.engine(d.url, "token-b")
    try:
        assert ea.namespace.tenant == "a" and eb.namespace.tenant == "b"  # from the token, not the config
        tokens = drv.prompt(41, 200)
        assert drv.store(ea, tokens) == 200
        assert eb.lookup(tokens).hit_tokens == 0  # same model and tokens, other tenant
        # forged: b's session asks for a's keys through the socket
        sock, hello = raw_session(d, "token-b")
        assert hello["ok"] and hello["tenant"] == "b"
        a_keys = [k.to_bytes() for k in ea.keys(tokens)]
        for op in ({"op": "lookup", "keys": a_keys, "fast": False, "pin": True}, {"op": "get", "keys": a_keys},
                   {"op": "delete", "keys": a_keys}):
            protocol.send(sock, op)
            reply = protocol.recv(sock)
            assert not reply["ok"] and "namespace" in reply["error"]
        protocol.send(sock, {"op": "clear", "ns": ea.namespace.id})
        assert not protocol.recv(sock)["ok"]
        sock.close()
        # forged through HTTP: b's token acting on a, no token, a wrong token
        assert post(d, "/invalidate", {"tenant": "a"}, "token-b")[0] == 403
        assert post(d, "/evict", {"tenant": "a"})[0] == 401
        assert post(d, "/invalidate", {"tenant": "a"}, "token-x")[0] == 401
        assert ea.lookup(tokens).hit_tokens == 200  # all of that left a's chunks alone
        # a wrong token is refused at the handshake with a reason
        sock, hello = raw_session(d, "not-a-token")
        assert not hello["ok"] and "token" in hello["error"]
        sock.close()
        audit = [json.loads(x) for x in Path(d.config_file.parent / "audit.jsonl").read_text().splitlines()]
        refused = [e for e in audit if e["result"] == "refused"]
        assert any(e["who"] == "b/test" for e in refused) and any(e.get("tenant") == "a" for e in refused)
        # the admin token may act on any tenant
        assert post(d, "/invalidate", {"tenant": "a"}, "admin-token")[0] == 200
        assert ea.lookup(tokens).hit_tokens == 0
    finally:
        ea.close()
        eb.close()


def test_config_tenant_must_match_the_token(tenant_daemon):
    with pytest.raises(ConfigError, match="belongs to tenant 'a'"):
        drv.engine(tenant_daemon.url, "token-a", tenant="b")


def test_bad_messages_are_refused_and_the_daemon_keeps_serving(shared_daemon):
    d = shared_daemon
    eng = drv.engine(d.url)
    try:
        tokens = drv.prompt(51, 100)
        assert drv.store(eng, tokens) == 100

        def send_raw(data: bytes, read: bool = True) -> bytes:
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.socket)
            s.settimeout(10)
            try:
                # the daemon may close on a bad header before the rest is sent
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                got = s.recv(65536) if read else b""
            except OSError:
                got = b""
            s.close()
            return got

        send_raw(b"\x00\x00\x00\x05garbage")  # undecodable
        send_raw(struct.pack(">I", 1 << 30))  # oversized frame
        send_raw(struct.pack(">I", 100) + b"\x81")  # truncated
        frame = protocol.encode({"op": "lookup", "keys": [], "fast": False, "pin": False})
        assert b"must be hello" in send_raw(frame)  # lookup before hello: refused, with the reason
        sock, hello = raw_session(d, "", version=99)
        assert not hello["ok"] and "protocol version 99" in hello["error"]
        sock.close()
        sock, hello = raw_session(d, "")
        protocol.send(sock, {"op": "lookup", "keys": ["not bytes"], "fast": False, "pin": False})
        assert "must be keys" in protocol.recv(sock)["error"]
        sock.close()
        log = wait_for(lambda: (t := d.log.read_text()).count("refused") >= 5 and t)
        for reason in ("undecodable", "exceeds", "truncated", "must be hello", "protocol version 99"):
            assert reason in log, reason
        assert eng.lookup(tokens).hit_tokens == 100  # the well-behaved client never noticed
        assert stats(d)["refused"]
    finally:
        eng.close()


def test_silent_client_loses_its_slots_when_the_lease_ends(tmp_path):
    d = DaemonProcess(tmp_path / "d", serve={"lease_s": 1}).start()
    try:
        sock, hello = raw_session(d, "")
        protocol.send(sock, {"op": "alloc", "sizes": [8192, 8192, 8192]})
        assert all(protocol.recv(sock)["slots"])
        assert stats(d)["tenants"]["default"]["session_slots"] == 3
        t = wait_for(lambda: (s := stats(d)["tenants"]["default"])["sessions"] == 0 and s, timeout=10)
        assert t and t["arena_used"] == 0
        sock.close()
    finally:
        d.stop()


def test_admin_api(shared_daemon):
    d = shared_daemon
    eng = drv.engine(d.url, model="admin-model")
    try:
        tokens = drv.prompt(61, 128)
        drv.store(eng, tokens)
        assert drv.load(eng, tokens)[:2] == (128, True)
        health = json.loads(urllib.request.urlopen(d.admin_url + "/health").read())
        assert health["status"] == "ok" and health["tenants"] == ["default"]
        metrics = urllib.request.urlopen(d.admin_url + "/metrics").read().decode()
        assert 'lmcache_daemon_hit_tokens_total{model="admin-model",tenant="default",tier="memory"} 128.0' in metrics
        assert 'tenant="default"' in metrics and "lmcache_daemon_lookup_seconds_bucket" in metrics
        key = eng.keys(tokens)[0]
        trace = json.loads(urllib.request.urlopen(f"{d.admin_url}/trace?key={key.to_bytes().hex()}").read())
        assert trace["tiers"] == ["memory"] and trace["model"] == "admin-model" and trace["stored_by"] == "engine"
        code, body = post(d, "/invalidate", {"model": "admin-model", "tokens": tokens[:64]}, ADMIN)
        assert code == 200 and body["deleted"] == 2
        assert eng.lookup(tokens).hit_tokens == 0
        drv.store(eng, tokens)
        assert post(d, "/ttl", {"seconds": 0.5}, ADMIN)[0] == 200
        assert wait_for(lambda: eng.lookup(tokens).hit_tokens == 0, timeout=5)
        assert post(d, "/ttl", {"seconds": 0}, ADMIN)[0] == 200
        out = subprocess.run([sys.executable, "-m", "lmcache_core.cli", "status", "--url", d.admin_url],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "tenant default" in out.stdout
    finally:
        eng.close()


def test_cached_model_through_the_daemon(shared_daemon):
    """CachedModel (transformers) with daemon: two model instances, one daemon memory tier."""
    import torch

    from lmcache_core import Config
    from lmcache_core.integrations.transformers import CachedModel, random_llama

    model = random_llama(num_layers=2, hidden=64, heads=4, kv_heads=2, vocab=300, seed=3)
    cfg = Config.from_dict({"daemon": shared_daemon.url, "chunk_size": 32, "device": "cpu"})
    g = torch.Generator().manual_seed(1)
    doc = torch.randint(0, 300, (100,), generator=g).tolist()
    q = torch.randint(0, 300, (9,), generator=g).tolist()
    first = CachedModel(model, config=cfg, model_name="tiny-daemon")
    try:
        ref = first.generate(doc + q, 6, use_cache=False)
        out = first.generate(doc + q, 6)
        assert out.tokens == ref.tokens and out.hit_tokens == 0
        first.engine.flush()
    finally:
        first.close()
    second = CachedModel(model, config=cfg, model_name="tiny-daemon")
    try:
        again = second.generate(doc + q, 6)
        assert again.tokens == ref.tokens
        assert again.hit_tokens == 108 and again.by_tier == {"memory": 108}
    finally:
        second.close()


def test_autostart_starts_a_daemon_when_none_answers(tmp_path, monkeypatch):
    cfg = tmp_path / "daemon.yaml"
    cfg.write_text("tiers: ['memory://?capacity=16MiB']\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(cfg))  # what the started daemon reads
    sock = tmp_path / "auto.sock"
    eng = drv.engine(f"daemon://{sock}", daemon_autostart=True)
    proc = eng.daemon.conn._autostarted
    try:
        assert proc is not None and proc.poll() is None and sock.exists()
        tokens = drv.prompt(71, 100)
        assert drv.store(eng, tokens) == 100
        assert drv.load(eng, tokens)[:2] == (100, True)
    finally:
        eng.close()
        if proc is not None:
            proc.terminate()
            proc.wait(30)


def test_kv_codec_fp8_through_the_daemon(shared_daemon):
    """Engines with kv_codec fp8 on the daemon: the arena holds the fp8 images (half the bytes), a
    second engine loads them bit for bit what the host codec makes of the KV, and an exact engine
    on the same daemon never sees them (nor they its chunks)."""
    import torch

    from lmcache_core import Config
    from lmcache_core.codecs import fp8
    from lmcache_core.engine import CacheEngine
    from lmcache_core.layout import PagedKV, slot_mapping

    L, H, D, BS, NB = 3, 2, 16, 16, 24
    gen = torch.Generator().manual_seed(4)
    src_c = [torch.randn((2, NB, BS, H, D), generator=gen).to(torch.bfloat16) for _ in range(L)]
    src = PagedKV.from_vllm_flash(src_c)
    tokens = list(range(5000, 5090))  # 2 chunks of 32 and a partial of 26
    blocks = torch.arange(6)
    base = {"daemon": shared_daemon.url, "chunk_size": 32, "device": "cpu"}

    def engine(**extra):
        return CacheEngine(src.geometry, Config.from_dict({**base, **extra}), model="daemon-kv-codec")

    a = engine(kv_codec="fp8")
    try:
        assert a.store(tokens, src, blocks, wait=True) == 90
        a.flush()
    finally:
        a.close()
    info = stats(shared_daemon)["tenants"]["default"]["tiers"]["memory"]
    assert info["used_bytes"] >= sum(fp8.encoded_len(src.geometry, n) for n in (32, 32, 26))
    dst_c = [torch.zeros_like(c) for c in src_c]
    b = engine(kv_codec="fp8")
    exact = engine()
    try:
        res = b.retrieve(tokens, PagedKV.from_vllm_flash(dst_c), blocks)
        assert res.hit_tokens == 90 and res.by_tier == {"memory": 90}
        s = slot_mapping(blocks, BS, 0, 90)
        for c, d in zip(src_c, dst_c):
            x = c[:, s // BS, s % BS].reshape(2, 90, H * D)
            q, sc = fp8.quantize(x, D)
            want = fp8.dequantize(q, sc, D, torch.bfloat16)
            got = d[:, s // BS, s % BS].reshape(2, 90, H * D)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        assert exact.lookup(tokens).hit_tokens == 0  # fp8 chunks live in their own namespace
        exact.store(tokens[:64], src, blocks, wait=True)
        exact.flush()
        assert b.lookup(tokens[:64]).hit_tokens == 64  # its fp8 chunks, not the exact ones
        b.clear()
        assert b.lookup(tokens).hit_tokens == 0 and exact.lookup(tokens[:64]).hit_tokens == 64
    finally:
        b.close()
        exact.close()


# two daemon tests below: a 1 MiB memory tier in front of a coded disk tier, 10 chunks of KV
# (256 KiB each in bf16) that overflow it, so the first chunks come back from the disk
BIG = dict(L=4, H=8, D=64, BS=16, NB=24)


def _evicting_daemon(tmp_path, disk_codec: str) -> DaemonProcess:
    tiers = ["memory://?capacity=1MiB", f"disk://{tmp_path}/disk?codec={disk_codec}"]
    return DaemonProcess(tmp_path / "d", tiers=tiers, serve={"headroom": 4.0}).start()


def _big_kv(seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    shape = (2, BIG["NB"], BIG["BS"], BIG["H"], BIG["D"])
    return [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(BIG["L"])]


def _store_then_load(url: str, src_c, tokens, blocks, **extra):
    """One engine stores ``tokens``, a fresh one retrieves them into zeroed caches: its result and
    those caches (engines closed)."""
    import torch

    from lmcache_core import Config
    from lmcache_core.engine import CacheEngine
    from lmcache_core.layout import PagedKV

    cfg = Config.from_dict({"daemon": url, "chunk_size": 32, "device": "cpu", **extra})
    geometry = PagedKV.from_vllm_flash(src_c).geometry
    a = CacheEngine(geometry, cfg, model="coded-disk-tier")
    try:
        assert a.store(tokens, PagedKV.from_vllm_flash(src_c), blocks, wait=True) == len(tokens)
        a.flush()
    finally:
        a.close()
    dst_c = [torch.zeros_like(c) for c in src_c]
    b = CacheEngine(geometry, cfg, model="coded-disk-tier")
    try:
        res = b.retrieve(tokens, PagedKV.from_vllm_flash(dst_c), blocks)
        corrupt = sum(v for k, v in b.metrics.snapshot().items() if k.startswith("lmcache_corrupt_chunks"))
    finally:
        b.close()
    return res, dst_c, corrupt


def _tokens_of(c, slots):
    """``[planes, tokens, hidden]`` of cache ``c`` at ``slots``."""
    return c[:, slots // BIG["BS"], slots % BIG["BS"]].reshape(2, len(slots), BIG["H"] * BIG["D"])


def _fp8_values(x):
    import torch

    from lmcache_core.codecs import fp8

    return fp8.dequantize(*fp8.quantize(x, BIG["D"]), BIG["D"], torch.bfloat16)


def _same(a, b) -> bool:
    import torch

    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_a_daemon_tier_with_a_lossy_codec_serves_exact_engines(tmp_path):
    """The daemon's disk tier codes fp8 (``?codec=fp8``): what its small memory tier evicted comes
    back from the disk in the codec's namespace; the client takes it as the lossy form of the key
    it asked for (before, it refused the key as another chunk's: a miss counted as corrupt)."""
    import torch

    from lmcache_core.layout import slot_mapping

    d = _evicting_daemon(tmp_path, "fp8")
    try:
        src_c, tokens, blocks = _big_kv(6), list(range(100, 420)), torch.arange(20)
        res, dst_c, corrupt = _store_then_load(d.url, src_c, tokens, blocks)
    finally:
        d.stop()
    assert res.hit_tokens == 320 and res.by_tier.get("disk", 0) >= 32, res.by_tier
    assert corrupt == 0
    s = slot_mapping(blocks, BIG["BS"], 0, 320)
    from_disk = 0
    for i in range(10):  # each chunk is exact (memory) or the fp8 codec's values (disk)
        cs = s[i * 32:(i + 1) * 32]
        pairs = [(_tokens_of(c, cs), _tokens_of(dd, cs)) for c, dd in zip(src_c, dst_c)]
        exact = all(_same(got, x) for x, got in pairs)
        lossy = all(_same(got, _fp8_values(x)) for x, got in pairs)
        assert exact or lossy, f"chunk {i} is neither the stored KV nor its fp8 form"
        from_disk += lossy and not exact
    assert from_disk * 32 == res.by_tier.get("disk", 0)


def test_kv_codec_fp8_from_a_daemon_disk_tier_with_lossless(tmp_path):
    """A kv_codec fp8 engine on a daemon whose disk tier codes lossless: the disk holds the fp8
    images zstd-coded, and what the small memory tier evicted comes back from the disk still fp8
    (decoded by the client's device), bit for bit the host codec's values."""
    import torch

    from lmcache_core import chunk as chunkmod
    from lmcache_core.layout import slot_mapping

    d = _evicting_daemon(tmp_path, "lossless")
    try:
        src_c, tokens, blocks = _big_kv(8), list(range(900, 1220)), torch.arange(20)
        res, dst_c, corrupt = _store_then_load(d.url, src_c, tokens, blocks, kv_codec="fp8")
    finally:
        d.stop()
    heads = [chunkmod.decode_header(f.read_bytes()[:chunkmod.HEADER_SIZE]) for f in (tmp_path / "disk").rglob("*.kv")]
    assert len(heads) == 10 and {h.codec for h in heads} == {"fp8-e4m3-th/1+lossless-zstd/2"}
    assert res.hit_tokens == 320 and res.by_tier.get("disk", 0) >= 32 and corrupt == 0, res.by_tier
    s = slot_mapping(blocks, BIG["BS"], 0, 320)
    for c, dd in zip(src_c, dst_c):
        assert _same(_tokens_of(dd, s), _fp8_values(_tokens_of(c, s)))
