"""Fault tests for a remote tier under a real CacheEngine: dead, restarted, hung, corrupted servers.

Public names (stable):

- :class:`RemoteTier` - what a plugin's test module hands the tests: the tier
  URL, the engine's tier name, how to stop and start the server, and a raw
  writer around the store (to plant garbage under a key).
- :class:`RemoteTierFaultTests` - subclass and supply a fixture ``remote``
  returning a :class:`RemoteTier`. Each test runs an engine with
  ``["memory://...", remote.url]`` and checks that the engine keeps answering
  (hits from memory, misses from the remote), nothing raises into the caller,
  errors are counted, the tier comes back by itself, and no wrong KV is ever
  loaded.
- :func:`kv_for`, :func:`engine_for`, :func:`retrieve_into_zeros`: the helpers
  those tests use (also used by the two-process end-to-end tests).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest

from ..config import Config
from ..engine import CacheEngine
from ..keys import ChunkKey
from ..layout import ChunkGeometry, PagedKV
from ..storage import Store

GEOMETRY = ChunkGeometry(num_layers=2, num_heads=2, head_dim=64, dtype="float32")  # 2 KiB per token
CHUNK = 64  # tokens per chunk: 128 KiB chunk payloads


@dataclass
class RemoteTier:
    url: str
    name: str  # the tier name the engine gives the store ("redis", "valkey", "s3", ...)
    stop: Callable[[], None]
    start: Callable[[], None]
    raw_set: Callable[[Store, ChunkKey, bytes], None]
    pid: Callable[[], int | None] = lambda: None  # for SIGSTOP (hung server); None skips that test
    call_timeout_s: float = 5.0  # the longest one store call may wait on a hung server (the URL's timeouts)


def kv_for(tokens: list[int], seed: int = 0, geometry: ChunkGeometry = GEOMETRY) -> tuple[PagedKV, list[Any]]:
    """A random HF-style KV for ``tokens`` (the layers are returned too, for comparisons)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (1, geometry.num_heads, len(tokens), geometry.head_dim)
    layers = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(geometry.num_layers)]
    return PagedKV.from_hf(layers), layers


def empty_kv(n: int, geometry: ChunkGeometry = GEOMETRY) -> tuple[PagedKV, list[Any]]:
    import torch

    shape = (1, geometry.num_heads, n, geometry.head_dim)
    layers = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(geometry.num_layers)]
    return PagedKV.from_hf(layers), layers


def engine_for(tiers: list[str], **overrides: Any) -> CacheEngine:
    cfg = Config.from_dict({"tiers": tiers, "chunk_size": CHUNK, "device": "cpu", **overrides})
    return CacheEngine(GEOMETRY, cfg, model="fault-test-model")


def retrieve_into_zeros(engine: CacheEngine, tokens: list[int], expected: list[Any]) -> tuple[int, dict[str, int]]:
    """Retrieve into a zeroed cache; assert the hit prefix equals ``expected`` and the rest is untouched."""
    import torch

    kv, layers = empty_kv(len(tokens))
    res = engine.retrieve(tokens, kv, slots=torch.arange(len(tokens)))
    n = res.hit_tokens
    for (k, v), (ek, ev) in zip(layers, expected):
        assert torch.equal(k[:, :, :n], ek[:, :, :n]) and torch.equal(v[:, :, :n], ev[:, :, :n]), "wrong KV loaded"
        assert not k[:, :, n:].any() and not v[:, :, n:].any(), "KV written beyond the reported hits"
    return n, res.by_tier


def _store(engine: CacheEngine, tokens: list[int], seed: int) -> list[Any]:
    import torch

    kv, layers = kv_for(tokens, seed)
    engine.store(tokens, kv, slots=torch.arange(len(tokens)))
    return layers


def _wait_back(engine: CacheEngine, tier: str, timeout: float = 30.0) -> None:
    """Poll until the tier stack has re-probed the tier and marked it healthy."""
    deadline = time.monotonic() + timeout
    stack = engine.tiers
    t = next(t for t in stack.tiers if t.name == tier)
    while time.monotonic() < deadline:
        if stack._usable(t) and engine.metrics.registry.get_sample_value("lmcache_tier_healthy", {"tier": tier}) == 1:
            return
        time.sleep(0.2)
    raise AssertionError(f"tier {tier} did not come back within {timeout}s")


class RemoteTierFaultTests:
    """Fault behaviour of a remote tier, through the engine. Subclass and provide ``remote``."""

    @pytest.fixture
    def tokens(self) -> Iterator[list[int]]:
        import random

        yield [random.randrange(1, 50_000) for _ in range(CHUNK * 4)]

    def _engine(self, remote: RemoteTier, **kw: Any) -> CacheEngine:
        return engine_for(["memory://?capacity=64MiB", remote.url], **kw)

    def test_down_at_start_runs_on_other_tiers(self, remote: RemoteTier, tokens: list[int]) -> None:
        remote.stop()
        try:
            eng = self._engine(remote)
            try:
                assert eng.metrics.registry.get_sample_value("lmcache_tier_healthy", {"tier": remote.name}) == 0
                expected = _store(eng, tokens, seed=1)
                assert eng.flush(30)
                hits, by_tier = retrieve_into_zeros(eng, tokens, expected)
                assert hits == len(tokens) and by_tier == {"memory": len(tokens)}
            finally:
                eng.close()
        finally:
            remote.start()

    def test_shared_through_remote_tier(self, remote: RemoteTier, tokens: list[int]) -> None:
        a, b = self._engine(remote), self._engine(remote)
        try:
            expected = _store(a, tokens, seed=2)
            assert a.flush(30)
            hits, by_tier = retrieve_into_zeros(b, tokens, expected)  # b's memory tier is cold
            assert hits == len(tokens) and by_tier == {remote.name: len(tokens)}
        finally:
            a.close()
            b.close()

    def test_server_dies_mid_run_and_comes_back(self, remote: RemoteTier, tokens: list[int]) -> None:
        a = self._engine(remote)
        try:
            first = _store(a, tokens, seed=3)
            assert a.flush(30)
            remote.stop()
            # The engine keeps answering: stores and lookups do not raise, memory still hits.
            more = [t + 1 for t in tokens]
            second = _store(a, more, seed=4)
            assert a.flush(60)
            assert retrieve_into_zeros(a, tokens, first)[0] == len(tokens)
            assert retrieve_into_zeros(a, more, second)[0] == len(more)
            b = self._engine(remote)  # a cold engine sees misses, never errors
            try:
                assert retrieve_into_zeros(b, tokens, first)[0] == 0
            finally:
                b.close()
            errors = sum(a.metrics.value("lmcache_errors", tier=remote.name, op=op)
                         for op in ("put", "get", "exists"))
            assert errors >= 1, "failed operations must be counted"
            remote.start()
            _wait_back(a, remote.name)
            third_tokens = [t + 2 for t in tokens]
            third = _store(a, third_tokens, seed=5)
            assert a.flush(60)
            c = self._engine(remote)
            try:
                hits, by_tier = retrieve_into_zeros(c, third_tokens, third)
                assert hits == len(third_tokens) and by_tier == {remote.name: hits}, "tier did not reconnect"
            finally:
                c.close()
        finally:
            a.close()

    @pytest.mark.parametrize("damage", ["garbage", "foreign"])
    def test_corrupt_value_is_a_miss_and_deleted(self, remote: RemoteTier, tokens: list[int], damage: str) -> None:
        a, b = self._engine(remote), self._engine(remote)
        try:
            expected = _store(a, tokens, seed=6)
            assert a.flush(30)
            keys = a.keys(tokens)
            store = b.tiers.by_name(remote.name)
            if damage == "garbage":
                remote.raw_set(store, keys[1], os.urandom(CHUNK * GEOMETRY.bytes_per_token + 4096))
            else:  # a valid image of chunk 3 under chunk 1's key
                got = store.get(keys[3])
                assert got is not None
                try:
                    remote.raw_set(store, keys[1], bytes(got.image()))
                finally:
                    got.release()
            hits, _ = retrieve_into_zeros(b, tokens, expected)
            assert hits == CHUNK, "the prefix must stop at the damaged chunk"
            assert b.metrics.value("lmcache_corrupt_chunks", tier=remote.name) >= 1
            assert store.exists([keys[1]]) == [False], "a corrupt value must be deleted"
        finally:
            a.close()
            b.close()

    def test_killed_during_reads_never_returns_wrong_kv(self, remote: RemoteTier) -> None:
        """Kill the server while a cold engine keeps loading 8 MiB prompts from it: every load is a
        bit-exact prefix (possibly empty), nothing raises, and no pooled buffer leaks."""
        import threading

        tokens = list(range(1, CHUNK * 64 + 1))  # 64 chunks, 8 MiB of KV
        a = self._engine(remote)
        b = engine_for(["memory://?capacity=64MiB", remote.url], promote=False)
        errors: list[BaseException] = []
        loads: list[int] = []
        try:
            expected = _store(a, tokens, seed=21)
            assert a.flush(60)
            stop, first_done = threading.Event(), threading.Event()

            def reader() -> None:
                try:
                    while not stop.is_set():
                        loads.append(retrieve_into_zeros(b, tokens, expected)[0])
                        first_done.set()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    first_done.set()

            t = threading.Thread(target=reader)
            t.start()
            assert first_done.wait(120), "the first load did not finish"
            time.sleep(0.05)  # the kill lands inside a later load
            remote.stop()
            time.sleep(0.5)
            stop.set()
            t.join(120)
            assert not t.is_alive(), "a load hung after the server died"
            assert not errors, f"a load raised into the caller: {errors[0]!r}"
            assert loads and loads[0] == len(tokens), f"loads before the kill must hit fully: {loads}"
            assert b.pool.live_count() == 0, f"{b.pool.live_count()} pooled buffers leaked"
        finally:
            remote.start()
            a.close()
            b.close()

    def test_hung_server_bounds_the_wait(self, remote: RemoteTier, tokens: list[int]) -> None:
        """SIGSTOP the server: each call waits at most the tier timeout, the tier then backs off and
        later stores run at memory speed; the write queue never grows past its bound."""
        pid = remote.pid()
        if pid is None:
            pytest.skip("this RemoteTier gives no pid to SIGSTOP")
        eng = self._engine(remote, store_queue_size=2, writer_threads=1)
        os.kill(pid, signal.SIGSTOP)
        durations = []
        try:
            for i in range(12):
                t0 = time.monotonic()
                _store(eng, [t + 10 * i for t in tokens], seed=10 + i)
                durations.append(time.monotonic() - t0)
                queued = eng.metrics.registry.get_sample_value("lmcache_store_queue", {"tier": remote.name}) or 0
                assert queued <= 2, f"write queue grew to {queued} past its bound of 2"
        finally:
            os.kill(pid, signal.SIGCONT)
        try:
            assert max(durations) < 2 * remote.call_timeout_s + 1, durations
            waited = [d for d in durations if d > min(1.0, remote.call_timeout_s / 2)]
            assert len(waited) <= len(durations) // 2, f"most stores must skip a backed-off tier: {durations}"
            assert eng.flush(60)
            failed = eng.metrics.value("lmcache_dropped_stores", tier=remote.name) + sum(
                eng.metrics.value("lmcache_errors", tier=remote.name, op=op) for op in ("put", "exists"))
            assert failed >= 1, "timeouts and drops must be counted"
        finally:
            eng.close()


__all__ = ["CHUNK", "GEOMETRY", "RemoteTier", "RemoteTierFaultTests", "empty_kv", "engine_for", "kv_for",
           "retrieve_into_zeros"]
