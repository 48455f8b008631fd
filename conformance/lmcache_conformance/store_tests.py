"""Contract tests every storage plugin runs.

Semantics come from the storage issue's shared tests: :class:`StorageSemanticsTests`
is ``lmcache_core.testing.storage_tests.StoreTests`` (basics, batches, large
values, concurrency, the Hypothesis state machine against an in-memory model,
corrupt values through a backdoor) with the store built from the URL under
test. Added here, through the real engine and the reference CPU device:

- chunk: a bit-exact round trip of every dtype through the store, read back by
  a second engine (and by a second process for shared stores); a damaged
  payload at rest is a miss;
- zero-copy: the fan-out check of :mod:`zerocopy` with the store behind memory;
- storage: behaviour when the backend is unavailable (the engine keeps serving
  from its other tiers, nothing hangs, nothing wrong is returned).

A vendor's test file subclasses these and overrides ``store_url`` (and, for the
shared tests, ``raw_get``/``raw_set`` backdoors); under ``lmcache conformance``
the URL comes from ``--storage``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

import pytest

from lmcache_core.storage import Store, StoreContext
from lmcache_core.testing.storage_tests import StoreTests

from lmcache_core.keys import ChunkKey

from . import harness as h
from .backdoors import Backdoor, backdoor_for
from .capabilities import DeclaresUnavailableURL
from .device_tests import ContractTests, store_url
from .groundtruth import DTYPES, build
from .targets import Target

if TYPE_CHECKING:
    from lmcache_core.device import Device


def reference_device() -> "Device":
    """The built-in CPU device: storage tests need a gather/scatter that is known to be right."""
    from lmcache_core.builtin.cpu import CPUDevice

    return CPUDevice()


class StoreContract(ContractTests):
    kind = "storage"

    @pytest.fixture
    def store_url(self, lmcache_storage: Target, tmp_path: Any) -> str:
        """The URL under test ({tmp} filled); override in a vendor test file."""
        return store_url(lmcache_storage, tmp_path)

    @staticmethod
    def store_class(url: str) -> type[Store]:
        from lmcache_core.plugins import get_plugin_manager

        return get_plugin_manager().storage_for_scheme(url.split("://", 1)[0].lower()).load()  # type: ignore[no-any-return]


class StorageSemanticsTests(StoreContract, StoreTests):
    """The shared storage tests and state machine, over the URL under test."""

    contract = "storage"
    large_nbytes = 16 << 20
    state_machine_examples = 10

    @pytest.fixture
    def store_factory(self, store_url: str) -> Callable[[StoreContext], Store]:
        cls = self.store_class(store_url)
        return lambda ctx: cls.from_url(store_url, ctx)

    def _backdoor(self, store: Store) -> Backdoor:
        door = backdoor_for(store)
        if door is None:
            pytest.skip(f"{type(store).__qualname__} offers no backdoor: define raw_get(key) -> bytes | None and "
                        f"raw_set(key, data) on the store class (SupportsRawAccess, docs/plugins.md) to run the "
                        f"ground-truth and corrupt-value tests")
        return door

    def raw_get(self, store: Store, key: ChunkKey) -> bytes | None:
        """Through :func:`backdoor_for`; a store adds its own by implementing ``SupportsRawAccess``."""
        return self._backdoor(store).get(key)

    def raw_set(self, store: Store, key: ChunkKey, data: bytes) -> None:
        self._backdoor(store).set(key, data)


def dead_url(url: str) -> str | None:
    """``url`` with every ``host:port`` pointed at a closed port on loopback; None if it has none."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    out, n = re.subn(r"(?<=[/@=,])(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}", f"127.0.0.1:{port}", url)
    # endpoints inside query values are often percent-encoded (endpoint_url=http%3A%2F%2Fhost%3A9000)
    out, m = re.subn(r"(?<=%2F)[A-Za-z0-9.\-]+%3A\d{1,5}", f"127.0.0.1%3A{port}", out, flags=re.IGNORECASE)
    return out if n + m else None


class StoreAvailabilityTests(StoreContract):
    """An unreachable backend is a miss and never a hang or a crash of the engine."""

    contract = "storage"
    MAX_SECONDS = 30.0

    def unavailable_url(self, url: str) -> str | None:
        """A URL of this store whose backend is down: the store class's own
        ``conformance_unavailable_url(url)`` where it declares one (:class:`DeclaresUnavailableURL`,
        what CLI runs use), else ``url`` with every ``host:port`` pointed at a closed port."""
        cls = self.store_class(url)
        if isinstance(cls, DeclaresUnavailableURL):
            return cls.conformance_unavailable_url(url)
        return dead_url(url)

    def test_unavailable_backend_is_a_miss(self, store_url: str) -> None:
        dead = self.unavailable_url(store_url)
        if dead is None:
            cls = self.store_class(store_url)
            if isinstance(cls, DeclaresUnavailableURL):
                pytest.skip(f"{cls.__qualname__}.conformance_unavailable_url() returned None: the store declares "
                            "no unreachable state")
            pytest.skip(f"{store_url.split('://')[0]}:// has no host:port the suite can take down; declare "
                        f"conformance_unavailable_url(url) on {cls.__qualname__} (docs/plugins.md) to test it")
        dev = reference_device()
        kv = build("vllm_flash", "float16", dev.torch_device, seed=81)
        truth = kv.logical()
        sp = h.place(kv, h.NUM_TOKENS, seed=81)
        tokens = h.tokens_for(seed=81)
        t0 = time.monotonic()
        try:
            eng = h.make_engine(dev, kv, ["memory://?capacity=256MiB", dead])
        except Exception as exc:  # noqa: BLE001 - reported with the reason below
            pytest.fail(f"an engine with an unreachable {dead} tier did not start: {type(exc).__name__}: {exc}")
        try:
            eng.store(tokens, kv.kv, list(sp.block_ids), wait=True)
            eng.flush(timeout=self.MAX_SECONDS)
            dst = build("vllm_flash", "float16", dev.torch_device, seed=82)
            dst.fill_raw(h.SENTINEL)
            before = dst.logical()
            dp = h.place(dst, h.NUM_TOKENS, seed=82)
            got = eng.retrieve(tokens, dst.kv, list(dp.block_ids))
            assert got.hit_tokens == h.NUM_TOKENS, "the memory tier stopped serving because another tier is down"
            assert h.check_loaded(dst, before, truth, sp, dp, h.NUM_TOKENS) is None
        finally:
            eng.close()
        elapsed = time.monotonic() - t0
        assert elapsed < self.MAX_SECONDS, f"an unreachable backend cost {elapsed:.1f} s"
        # Alone, the dead store must answer "absent" (or fail), never a chunk.
        cls = self.store_class(dead)
        ctx = StoreContext(eng.pool)
        try:
            store = cls.from_url(dead, ctx)
        except Exception:  # noqa: BLE001 - refusing to build is a fine answer
            return
        try:
            assert not store.health().ok, f"health() of {dead} says ok while nothing listens there"
            key = eng.keys(tokens)[0]
            try:
                result = store.get(key)
            except Exception:  # noqa: BLE001 - raising is how a store reports I/O errors
                result = None
            assert result is None, "an unreachable store returned a chunk"
        finally:
            store.close()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["vllm_flash", "mla", "sglang_page_first"])
class StoreChunkTests(StoreContract):
    """Chunks of every dtype through this store, bit-exact, decoded by a second engine."""

    contract = "chunk"

    def test_roundtrip(self, store_url: str, layout: str, dtype: str) -> None:
        dev = reference_device()
        src = build(layout, dtype, dev.torch_device, seed=91)
        truth = src.logical()
        sp = h.place(src, h.NUM_TOKENS, seed=91)
        tokens = h.tokens_for(seed=91)
        salt = f"st-{time.time_ns()}"
        dst = build(layout, dtype, dev.torch_device, seed=92)
        dst.fill_raw(h.SENTINEL)
        before = dst.logical()
        dp = h.place(dst, h.NUM_TOKENS, seed=92)
        with h.make_engine(dev, src, [store_url], salt=salt) as eng:
            assert eng.store(tokens, src.kv, list(sp.block_ids), wait=True) == h.NUM_TOKENS
            assert eng.flush(timeout=60)
            caps = eng.tiers.tiers[0].store.capabilities
            if not (caps.shared or caps.persistent):
                got = eng.retrieve(tokens, dst.kv, list(dp.block_ids))
        if caps.shared or caps.persistent:
            with h.make_engine(dev, src, [store_url], salt=salt) as eng2:
                got = eng2.retrieve(tokens, dst.kv, list(dp.block_ids))
        assert got.hit_tokens == h.NUM_TOKENS, f"retrieved {got.hit_tokens} of {h.NUM_TOKENS} tokens"
        problem = h.check_loaded(dst, before, truth, sp, dp, h.NUM_TOKENS)
        assert problem is None, f"{store_url}: {problem}"


class StoreSharingTests(StoreContract):
    """Chunk contract across processes: what one process stores, another loads bit-exact."""

    contract = "chunk"

    def test_chunk_from_another_process(self, store_url: str) -> None:
        cls = self.store_class(store_url)
        if not (cls.capabilities.shared or cls.capabilities.persistent):
            pytest.skip(f"{cls.__name__} is neither shared nor persistent; other processes cannot see its chunks")
        salt = f"xp-{time.time_ns()}"
        code = (
            "import sys, json\n"
            "from lmcache_conformance import harness as h\n"
            "from lmcache_conformance.groundtruth import build\n"
            "from lmcache_core.builtin.cpu import CPUDevice\n"
            "a = json.loads(sys.argv[1]); dev = CPUDevice()\n"
            "kv = build('vllm_flash', 'bfloat16', dev.torch_device, seed=101)\n"
            "p = h.place(kv, h.NUM_TOKENS, seed=101)\n"
            "with h.make_engine(dev, kv, [a['url']], salt=a['salt']) as e:\n"
            "    n = e.store(h.tokens_for(seed=101), kv.kv, list(p.block_ids), wait=True); e.flush(60)\n"
            "print(n)\n"
        )
        env = {**os.environ, "PYTHONHASHSEED": "4242"}
        out = subprocess.run([sys.executable, "-c", code, json.dumps({"url": store_url, "salt": salt})],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, f"the writer process failed: {out.stderr[-2000:]}"
        assert out.stdout.split()[-1] == str(h.NUM_TOKENS)
        dev = reference_device()
        src = build("vllm_flash", "bfloat16", dev.torch_device, seed=101)
        truth = src.logical()
        sp = h.place(src, h.NUM_TOKENS, seed=101)
        dst = build("vllm_flash", "bfloat16", dev.torch_device, seed=102)
        dst.fill_raw(h.SENTINEL)
        before = dst.logical()
        dp = h.place(dst, h.NUM_TOKENS, seed=102)
        with h.make_engine(dev, src, [store_url], salt=salt) as eng:
            got = eng.retrieve(h.tokens_for(seed=101), dst.kv, list(dp.block_ids))
        assert got.hit_tokens == h.NUM_TOKENS, f"this process found {got.hit_tokens} of {h.NUM_TOKENS} tokens"
        assert h.check_loaded(dst, before, truth, sp, dp, h.NUM_TOKENS) is None


class StoreCorruptionTests(StoreContract):
    """A payload damaged at rest is a miss, counted, and deleted; earlier chunks still load."""

    contract = "chunk"

    def test_corrupted_payload_is_miss(self, store_url: str) -> None:
        dev = reference_device()
        src = build("vllm_flash", "float16", dev.torch_device, seed=111)
        truth = src.logical()
        sp = h.place(src, h.NUM_TOKENS, seed=111)
        tokens = h.tokens_for(seed=111)
        with h.make_engine(dev, src, [store_url]) as eng:
            store = eng.tiers.tiers[0].store
            if store.capabilities.holds_buffers:
                pytest.skip(f"{store.name} holds buffers in process memory; no bytes rest there to corrupt")
            eng.store(tokens, src.kv, list(sp.block_ids), wait=True)
            assert eng.flush(timeout=60)
            keys = eng.keys(tokens)
            if not h.corrupt_stored(store, keys[1]):
                pytest.skip(f"{type(store).__name__} is not a ByteStore; the suite has no backdoor to damage it")
            dst = build("vllm_flash", "float16", dev.torch_device, seed=112)
            dst.fill_raw(h.SENTINEL)
            before = dst.logical()
            dp = h.place(dst, h.NUM_TOKENS, seed=112)
            got = eng.retrieve(tokens, dst.kv, list(dp.block_ids))
            assert got.hit_tokens == h.CHUNK_SIZE, f"{got.hit_tokens} tokens loaded past a corrupt chunk"
            assert h.check_loaded(dst, before, truth, sp, dp, h.CHUNK_SIZE) is None
            assert store.exists([keys[1]]) == [False], "the corrupt object was not deleted"


class StoreZeroCopyTests(StoreContract):
    """Zero-copy with this store behind the memory tier: one buffer, no mutation, no keeping, no leak."""

    contract = "zero-copy"

    def test_fanout(self, store_url: str) -> None:
        from .zerocopy import check_fanout

        dev = reference_device()
        urls = [store_url] if store_url.startswith(("memory:", "cpu:")) else ["memory://?capacity=256MiB", store_url]
        check_fanout(dev, build("vllm_flash", "bfloat16", dev.torch_device, seed=121), urls)

    def test_store_alone(self, store_url: str) -> None:
        """Without a buffer-holding tier in front, every buffer returns as soon as writes finish."""
        from .zerocopy import check_fanout

        dev = reference_device()
        check_fanout(dev, build("mla", "float16", dev.torch_device, seed=122), [store_url])


__all__ = ["StorageSemanticsTests", "StoreAvailabilityTests", "StoreChunkTests", "StoreContract",
           "StoreCorruptionTests", "StoreSharingTests", "StoreZeroCopyTests", "dead_url", "reference_device"]
