"""P2P between two processes: a real Redis directory, a real peer process serving its memory tier.

Peer A runs in a child process (tests/p2p_peer.py): an embedded CacheEngine with memory and
p2p tiers that stores a prompt and serves it. Engine B (this process) has a memory tier and a
fetch-only p2p tier. Faults are injected in A's own process (half a transfer then SIGKILL,
a flipped byte), so B sees exactly what a dying or corrupt real peer would send.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from lmcache_core import CacheEngine, Config
from lmcache_core.keys import Namespace
from lmcache_core.layout import slot_mapping
from lmcache_core.p2p.directory import RespDirectory

from . import p2p_peer as peer

TOKENS = list(range(5000, 5000 + 4 * peer.CHUNK + 8))  # 4 full chunks and a partial one
SEED = 7


def nixl_problem() -> str:
    try:
        import nixl._api  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"nixl cannot be imported here ({type(exc).__name__}: {exc}); pip install lmcache-core[nixl]"
    return ""


class Peer:
    """Peer A: a child process serving TOKENS' chunks."""

    def __init__(self, spec: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(peer.__file__)), json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        info = self._reply()
        self.address, self.stored = info["address"], info["stored"]

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._reply()

    def _reply(self) -> dict:
        """The next JSON line of the peer (NIXL logs to stdout too)."""
        while True:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise AssertionError(f"peer ended: {self.proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
            if line.startswith("{"):
                return json.loads(line)

    def log(self) -> str:
        return self.proc.stderr.read() if self.proc.poll() is not None else ""  # type: ignore[union-attr]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("p2p") / "cluster.token"
    path.write_text("p2p-test-cluster-token-0123456789\n")
    return path


@pytest.fixture
def directory(redis_server, unique_prefix: str) -> str:  # type: ignore[no-untyped-def]
    return f"{redis_server.url}/0"


def start_peer(directory: str, token_file: Path, *, transport: str = "tcp", tenant: str = "alice",
               fault: str = "") -> Peer:
    return Peer({"directory": directory, "token_file": str(token_file), "transport": transport, "tenant": tenant,
                 "tokens": TOKENS, "seed": SEED, "fault": fault})


@pytest.fixture
def engine_b(directory: str, token_file: Path) -> Iterator:  # type: ignore[type-arg]
    made: list[CacheEngine] = []

    def make(transport: str = "tcp", tenant: str = "alice", token: Path | None = None,
             timeout: float = 2.0) -> CacheEngine:
        _, kv = peer.paged(SEED + 1)
        tiers = peer.tiers(directory, str(token or token_file), transport, listen="", timeout=timeout)
        cfg = Config.from_dict({"tiers": tiers, "chunk_size": peer.CHUNK, "device": "cpu", "tenant": tenant})
        eng = CacheEngine(kv.geometry, cfg, model="p2p-test-model")
        made.append(eng)
        return eng

    yield make
    for e in made:
        e.close()


def fresh_kv():  # type: ignore[no-untyped-def]
    caches = [torch.zeros_like(c) for c in peer.paged(SEED)[0]]
    from lmcache_core.layout import PagedKV

    return caches, PagedKV.from_vllm_flash(caches)


BLOCKS = torch.arange((len(TOKENS) + peer.BS - 1) // peer.BS)


def same_kv(got: list[torch.Tensor], n: int) -> bool:
    ref, _ = peer.paged(SEED)
    s = slot_mapping(BLOCKS, peer.BS, 0, n)
    return all(torch.equal(a[:, s // peer.BS, s % peer.BS], b[:, s // peer.BS, s % peer.BS]) for a, b in zip(got, ref))


@pytest.mark.parametrize("transport", ["tcp", "nixl"])
def test_chunk_stored_at_a_is_served_at_b_bit_for_bit(directory, token_file, engine_b, transport) -> None:  # type: ignore[no-untyped-def]
    if transport == "nixl" and nixl_problem():
        pytest.skip(nixl_problem() + "; the built-in tcp transport ran instead")
    a = start_peer(directory, token_file, transport=transport)
    try:
        assert a.stored == len(TOKENS)
        b = engine_b(transport)
        assert b.lookup(TOKENS).hit_tokens == len(TOKENS)
        caches, kv = fresh_kv()
        res = b.retrieve(TOKENS, kv, BLOCKS)
        assert res.hit_tokens == len(TOKENS) and res.by_tier == {"p2p": len(TOKENS)}
        assert same_kv(caches, len(TOKENS)), "KV fetched from the peer differs from what it stored"
        assert b.metrics.value("lmcache_hit_tokens", tier="p2p") == len(TOKENS)
        assert a.stats()["served"] == 5
        caches2, kv2 = fresh_kv()  # the copy was promoted: the second load is local
        assert b.retrieve(TOKENS, kv2, BLOCKS).by_tier == {"memory": len(TOKENS)}
    finally:
        a.close()


def test_peer_killed_mid_read_is_a_miss(directory, token_file, engine_b) -> None:  # type: ignore[no-untyped-def]
    a = start_peer(directory, token_file, fault="die-mid-read")
    try:
        b = engine_b()
        assert b.lookup(TOKENS).hit_tokens == len(TOKENS)  # the directory still names A
        caches, kv = fresh_kv()
        t0 = time.monotonic()
        res = b.retrieve(TOKENS, kv, BLOCKS)
        assert res.hit_tokens == 0, "a peer killed mid-transfer must be a miss"
        assert time.monotonic() - t0 < 10
        assert all(not c.any() for c in caches), "a half-read chunk reached the engine's KV"
        assert b.pool.live_count() == 0, "a buffer of the broken transfer was not released"
        assert a.proc.wait(timeout=10) == -9
        assert b.tiers.by_name("p2p").stats["peer_errors"] >= 1
        t0 = time.monotonic()  # the dead peer is backing off: the next load costs nothing
        assert b.retrieve(TOKENS, kv, BLOCKS).hit_tokens == 0 and time.monotonic() - t0 < 1
    finally:
        a.close()


def test_slow_peer_is_a_miss_within_the_timeout(directory, token_file, engine_b) -> None:  # type: ignore[no-untyped-def]
    a = start_peer(directory, token_file)
    try:
        b = engine_b(timeout=0.5)
        assert b.lookup(TOKENS).hit_tokens == len(TOKENS)
        a.proc.send_signal(19)  # SIGSTOP: the peer's process hangs
        caches, kv = fresh_kv()
        t0 = time.monotonic()
        assert b.retrieve(TOKENS, kv, BLOCKS).hit_tokens == 0
        assert time.monotonic() - t0 < 5
        a.proc.send_signal(18)  # SIGCONT
    finally:
        a.close()


def test_corrupt_bytes_from_a_peer_are_a_miss(directory, token_file, engine_b) -> None:  # type: ignore[no-untyped-def]
    a = start_peer(directory, token_file, fault="corrupt")
    try:
        b = engine_b()
        caches, kv = fresh_kv()
        assert b.retrieve(TOKENS, kv, BLOCKS).hit_tokens == 0
        assert all(not c.any() for c in caches), "a corrupt chunk reached the engine's KV"
        assert b.metrics.value("lmcache_corrupt_chunks", tier="p2p") >= 1
        assert b.pool.live_count() == 0, "a buffer of the corrupt chunk was not released"
        assert a.stats()["leases"] == 0, "the holder still lends chunks the fetcher is done with"
        first = b.keys(TOKENS)[0]
        d = RespDirectory(directory)
        assert a.address not in d.holders([first])[0], "the corrupt holder's entry was not dropped"
        d.close()
    finally:
        a.close()


def test_a_forged_tenant_cannot_fetch_another_tenants_chunks(directory, token_file, engine_b, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = start_peer(directory, token_file, tenant="alice")
    try:
        mallory = engine_b(tenant="mallory")
        assert mallory.lookup(TOKENS).hit_tokens == 0  # its own namespace: nothing
        ns = mallory.namespace
        alice_ns = Namespace(ns.model, ns.layout, "alice", ns.salt, ns.shard)
        forged = mallory.keys(TOKENS, namespace=alice_ns)
        p2p = mallory.tiers.by_name("p2p")
        assert p2p.exists(forged[:1]) == [True]  # the directory says where; the holder must refuse
        assert p2p.get(forged[0]) is None
        assert p2p.stats["refused"] == 1
        assert a.stats()["refused"] == 1
        wrong = tmp_path / "wrong.token"
        wrong.write_text("not-the-cluster-token-at-all-000")
        impostor = engine_b(tenant="alice", token=wrong)  # claims alice without the cluster token
        caches, kv = fresh_kv()
        assert impostor.retrieve(TOKENS, kv, BLOCKS).hit_tokens == 0
        assert all(not c.any() for c in caches)
        assert a.stats()["auth_failures"] >= 1
    finally:
        a.close()
