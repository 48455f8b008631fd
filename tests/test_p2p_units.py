"""P2P parts in one process: rendezvous placement, eviction withdrawing directory entries,
the peer server refusing malformed and unauthenticated messages, URL checks.

Two engines in this process, each with its own p2p tier, real Redis and real sockets.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
import torch

from lmcache_core import CacheEngine, Config
from lmcache_core.errors import ConfigError
from lmcache_core.keys import ChunkKey
from lmcache_core.p2p import protocol as proto
from lmcache_core.p2p.directory import RendezvousDirectory, RespDirectory

from . import p2p_peer as peer

TOKEN = "unit-test-cluster-token-0123456789"


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LMCACHE_P2P_TOKEN", TOKEN)
    return TOKEN


@pytest.fixture
def engines(token):  # type: ignore[no-untyped-def]
    made: list[CacheEngine] = []

    def make(p2p_url: str, capacity: str = "64MiB", **extra: str) -> CacheEngine:
        _, kv = peer.paged(1)
        cfg = Config.from_dict({"tiers": [f"memory://?capacity={capacity}", p2p_url], "chunk_size": peer.CHUNK,
                                "device": "cpu", "tenant": "t", **extra})
        eng = CacheEngine(kv.geometry, cfg, model="p2p-unit-model")
        made.append(eng)
        return eng

    yield make
    for e in made:
        e.close()


def assert_served(a: CacheEngine, b: CacheEngine) -> None:
    """Two chunks stored at ``a`` load at ``b`` from the p2p tier."""
    _, kv = peer.paged(1)
    tokens = list(range(2 * peer.CHUNK))
    a.store(tokens, kv, torch.arange(4), wait=True)
    a.flush()
    _, dst = peer.paged(3)
    assert b.retrieve(tokens, dst, torch.arange(4)).by_tier == {"p2p": len(tokens)}


def keys(n: int) -> list[ChunkKey]:
    return [ChunkKey(bytes(16), i.to_bytes(16, "little"), 32) for i in range(n)]


def test_rendezvous_is_deterministic_and_moves_only_the_leavers_share() -> None:
    peers = [f"10.0.0.{i}:7100" for i in range(1, 6)]
    d = RendezvousDirectory(peers, replicas=1)
    ks = keys(2000)
    before = [h[0] for h in d.holders(ks)]
    assert before == [h[0] for h in RendezvousDirectory(list(reversed(peers)), replicas=1).holders(ks)]
    assert all(400 - 120 < before.count(p) < 400 + 120 for p in peers), "rendezvous spreads keys unevenly"
    after = [h[0] for h in RendezvousDirectory(peers[:-1], replicas=1).holders(ks)]
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert moved and all(b == peers[-1] for b, _ in moved), "a key of a peer that stayed moved"


def test_rendezvous_tier_fetches_from_a_candidate(engines) -> None:  # type: ignore[no-untyped-def]
    caches, kv = peer.paged(1)
    a = engines("p2p://127.0.0.1?peers=127.0.0.1:1&replicas=1")  # A's candidates list is irrelevant
    addr = a.tiers.by_name("p2p").address
    b = engines(f"p2p://?peers={addr}")
    tokens = list(range(3 * peer.CHUNK))
    blocks = torch.arange(3 * peer.CHUNK // peer.BS)
    a.store(tokens, kv, blocks, wait=True)
    a.flush()
    dst_c, dst = peer.paged(2)
    res = b.retrieve(tokens, dst, blocks)
    assert res.by_tier == {"p2p": len(tokens)}
    assert all(torch.equal(x[:, blocks], y[:, blocks]) for x, y in zip(caches, dst_c))


def test_kv_codec_fp8_chunks_cross_between_peers_coded(engines) -> None:  # type: ignore[no-untyped-def]
    """Two kv_codec fp8 engines: B fetches A's chunks from A's memory tier over p2p as fp8 images
    (what crosses is the coded form) and loads the host codec's values bit for bit; an exact
    engine asking the same peer finds nothing (another namespace)."""
    from lmcache_core.codecs import fp8

    caches, kv = peer.paged(1)
    a = engines("p2p://127.0.0.1?peers=127.0.0.1:1&replicas=1", kv_codec="fp8")
    addr = a.tiers.by_name("p2p").address
    b = engines(f"p2p://?peers={addr}", kv_codec="fp8")
    exact = engines(f"p2p://?peers={addr}")
    tokens = list(range(3 * peer.CHUNK))
    blocks = torch.arange(3 * peer.CHUNK // peer.BS)
    a.store(tokens, kv, blocks, wait=True)
    a.flush()
    held = a.tiers.by_name("memory").get(a.keys(tokens)[0])
    assert held is not None and held.header.codec == "fp8-e4m3-th/1"
    assert held.header.stored_len == fp8.encoded_len(kv.geometry, peer.CHUNK)
    held.release()
    dst_c, dst = peer.paged(2)
    assert b.retrieve(tokens, dst, blocks).by_tier == {"p2p": len(tokens)}
    for x, y in zip(caches, dst_c):
        src = x[:, blocks].reshape(2, -1, peer.H * peer.D)
        want = fp8.dequantize(*fp8.quantize(src, peer.D), peer.D, torch.bfloat16)
        assert torch.equal(y[:, blocks].reshape(2, -1, peer.H * peer.D).view(torch.int16), want.view(torch.int16))
    assert exact.lookup(tokens).hit_tokens == 0


def test_evicted_chunks_leave_the_directory(engines, redis_server) -> None:  # type: ignore[no-untyped-def]
    _, kv = peer.paged(1)
    url = f"p2p://127.0.0.1?directory={redis_server.url}/0&reconcile=3600"
    a = engines(url, capacity="200KiB")  # room for a few 16 KiB chunks only
    p2p = a.tiers.by_name("p2p")
    first = list(range(6 * peer.CHUNK))  # fits: every chunk is announced
    a.store(first, kv, torch.arange(len(first) // peer.BS), wait=True)
    a.flush()
    d = RespDirectory(f"{redis_server.url}/0")
    assert all(p2p.address in h for h in d.holders(a.keys(first))), "every stored chunk should be announced"
    tokens = first + list(range(10**6, 10**6 + 30 * peer.CHUNK))  # evicts the first ones
    a.store(tokens, kv, torch.arange(len(tokens) // peer.BS) % 48, wait=True)
    a.flush()
    ks = a.keys(tokens)
    gone = p2p.reconcile()
    held = a.tiers.by_name("memory").exists(ks)
    assert gone >= 6 and held.count(False) >= 6  # the first six were announced, then evicted
    assert [p2p.address in h for h in d.holders(ks)] == held, "directory and memory tier disagree after eviction"
    d.close()


def test_malformed_and_unauthenticated_messages_are_refused(engines, redis_server) -> None:  # type: ignore[no-untyped-def]
    a = engines(f"p2p://127.0.0.1?directory={redis_server.url}/0")
    server = a.tiers.by_name("p2p").server
    host, port = server.address.rsplit(":", 1)

    def session(payload: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            proto.recv(s)  # the server's hello
            try:
                # the server may refuse a bad header and close before the rest
                # is sent: then sendall or shutdown fails, which is a refusal too
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                return s.recv(4096)
            except OSError:
                return b""

    import msgpack

    rng = os.urandom
    bad = [struct.pack("<I", 1 << 30) + b"x", struct.pack("<I", 4) + b"\xc1\xc1\xc1\xc1", rng(64),
           struct.pack("<I", 3) + msgpack.packb([1, 2]),
           struct.pack("<I", 200) + b"short"]
    for payload in bad:
        session(payload)
    hello = msgpack.packb({"v": 1, "peer": "x", "tenant": "t", "nonce": bytes(16), "proof": bytes(32)})
    answer = session(struct.pack("<I", len(hello)) + hello)
    assert b"authentication failed" in answer
    stats = server.stats.as_dict()
    assert stats["auth_failures"] == 1 and stats["protocol_errors"] >= 2
    # and it still serves a real peer afterwards
    b = engines(f"p2p://?directory={redis_server.url}/0")
    assert_served(a, b)


@pytest.mark.parametrize("url,needle", [
    ("p2p://?peers=a:1&directory=redis://x:1", "exactly one of"),
    ("p2p://", "exactly one of"),
    ("p2p://?peers=a:1&bogus=1", "unknown option"),
    ("p2p://?peers=a:1&timeout=0", "timeout"),
])
def test_bad_urls_name_the_fix(engines, url: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=needle):
        engines(url)


def test_a_second_engine_on_a_taken_port_fetches_only(engines, redis_server) -> None:  # type: ignore[no-untyped-def]
    a = engines(f"p2p://127.0.0.1?directory={redis_server.url}/0")
    port = a.tiers.by_name("p2p").address.rsplit(":", 1)[1]
    b = engines(f"p2p://127.0.0.1:{port}?directory={redis_server.url}/0")  # starts; only lends nothing
    assert b.tiers.by_name("p2p").server is None
    assert_served(a, b)


def test_a_missing_token_is_refused(engines, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("LMCACHE_P2P_TOKEN")
    with pytest.raises(ConfigError, match="cluster token of at least 16 bytes"):
        engines("p2p://?peers=a:1")


def test_a_stale_entry_is_a_miss_and_is_removed(engines, redis_server) -> None:  # type: ignore[no-untyped-def]
    url = f"{redis_server.url}/0"
    a = engines(f"p2p://127.0.0.1?directory={url}&reconcile=3600")
    b = engines(f"p2p://?directory={url}")
    _, kv = peer.paged(1)
    tokens = list(range(7000, 7000 + 2 * peer.CHUNK))
    a.store(tokens, kv, torch.arange(4), wait=True)
    a.flush()
    a.tiers.by_name("memory").clear()  # evicted, not yet withdrawn
    _, dst = peer.paged(3)
    assert b.retrieve(tokens, dst, torch.arange(4)).hit_tokens == 0
    assert b.tiers.by_name("p2p").stats["absent"] >= 1
    d = RespDirectory(url)
    assert d.holders(b.keys(tokens)[:1]) == [[]], "the stale entry is still listed"
    d.close()


def test_a_dead_directory_is_a_miss(engines, server_factory) -> None:  # type: ignore[no-untyped-def]
    redis = server_factory.redis()
    b = engines(f"p2p://?directory={redis.url}/0&timeout=0.5")
    redis.kill()
    t0 = time.monotonic()
    assert b.lookup(list(range(2 * peer.CHUNK))).hit_tokens == 0
    assert time.monotonic() - t0 < 5
    assert b.tiers.by_name("p2p").stats["directory_errors"] >= 1
