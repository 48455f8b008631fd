"""Shared tests for any :class:`~lmcache_core.storage.Store`: a test class and a state machine.

Public names (stable; the conformance suite imports them):

- :class:`StoreTests` - subclass it in a test module and supply a fixture
  ``store_factory`` returning ``Callable[[StoreContext], Store]``; every test
  then runs against that store. Optionally override :meth:`StoreTests.raw_get`
  and :meth:`StoreTests.raw_set` (a backdoor around the store: a file read, a
  plain redis GET, a boto3 get_object) so the tests can check the store against
  ground truth and plant corrupt values; without them those tests skip with a
  reason. Class attributes tune sizes: ``large_nbytes``, ``state_machine_examples``.
- :func:`state_machine_for` - a Hypothesis ``RuleBasedStateMachine`` class that
  drives a fresh store from a factory and compares it with an in-memory model;
  :func:`run_state_machine` runs it as a test.
- :func:`make_key`, :func:`make_chunk`, :func:`expected_kv`,
  :data:`SMALL_GEOMETRY`: deterministic chunks whose KV content is known, so a
  read can be compared bit for bit with what was written.

The model: chunks are content-addressed, so a key always maps to the same
bytes; a store must return exactly those bytes or nothing, never others.

Assertion rewriting: the checks here are plain ``assert`` statements, which report
their values only when pytest rewrote this module, and pytest rewrites it only if
it was registered before the first import. ``lmcache_conformance`` (a pytest
plugin, loaded before collection) registers it; a project using this module
without that plugin calls ``pytest.register_assert_rewrite(
"lmcache_core.testing.storage_tests")`` in its ``conftest.py`` before importing it.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import pytest

from ..chunk import HEADER_SIZE, ChunkBuffer, new_chunk, seal
from ..errors import ChunkError
from ..keys import ChunkKey
from ..layout import ChunkGeometry, torch_dtype
from ..memory import BufferPool
from ..storage import Store, StoreContext

SMALL_GEOMETRY = ChunkGeometry(num_layers=2, num_heads=2, head_dim=16, dtype="float16")
LARGE_GEOMETRY = ChunkGeometry(num_layers=4, num_heads=8, head_dim=128, dtype="bfloat16")  # 16 KiB/token

StoreFactory = Callable[[StoreContext], Store]


# -- deterministic chunks -----------------------------------------------------------------
def make_key(i: int, namespace: bytes | str = b"ns-default", num_tokens: int = 16) -> ChunkKey:
    """Key number ``i`` in ``namespace`` (any bytes or text; hashed to 16 bytes)."""
    ns = namespace.encode() if isinstance(namespace, str) else namespace
    ns_id = hashlib.blake2b(ns, digest_size=16).digest()
    digest = hashlib.blake2b(ns_id + i.to_bytes(8, "little"), digest_size=16).digest()
    return ChunkKey(ns_id, digest, num_tokens)


def _seed_of(key: ChunkKey) -> int:
    return int.from_bytes(key.digest[:8], "little") & 0x7FFF_FFFF


def expected_kv(key: ChunkKey, geometry: ChunkGeometry = SMALL_GEOMETRY):  # type: ignore[no-untyped-def]
    """The KV tensor that :func:`make_chunk` writes for ``key`` (derived from the key alone)."""
    import torch

    g = torch.Generator().manual_seed(_seed_of(key))
    n = geometry.nbytes(key.num_tokens)
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(torch_dtype(geometry.dtype)).view(geometry.shape(key.num_tokens))


def make_chunk(pool: BufferPool, key: ChunkKey, geometry: ChunkGeometry = SMALL_GEOMETRY,
               codec: str = "none") -> ChunkBuffer:
    """A sealed chunk for ``key`` holding :func:`expected_kv` (caller releases it)."""
    c = new_chunk(pool, key, geometry, key.num_tokens)
    c.kv().copy_(expected_kv(key, geometry))
    return seal(c, codec, pool)


def assert_chunk_is(chunk: ChunkBuffer | None, key: ChunkKey, geometry: ChunkGeometry = SMALL_GEOMETRY) -> None:
    """``chunk`` is present, carries ``key`` and holds exactly the expected KV bytes."""
    import torch

    assert chunk is not None, f"{key} is missing"
    assert chunk.key == key, f"asked for {key}, got {chunk.key}"
    assert chunk.num_tokens == key.num_tokens
    assert chunk.header.geometry == geometry
    assert torch.equal(chunk.kv().view(torch.uint8), expected_kv(key, geometry).view(torch.uint8)), \
        f"{key}: KV bytes differ from what was stored"


# -- the shared test class ------------------------------------------------------------------
class StoreTests:
    """The storage contract. Subclass, provide the ``store_factory`` fixture, and run pytest."""

    #: size of the "large value" test image (the issue asks for tens of MiB)
    large_nbytes: int = 32 << 20
    #: Hypothesis examples of the state machine (each runs up to 25 steps)
    state_machine_examples: int = 15
    #: threads in the concurrency test
    threads: int = 8

    # -- fixtures ---------------------------------------------------------------------------
    @pytest.fixture
    def pool(self) -> Iterator[BufferPool]:
        p = BufferPool(max_idle_bytes=256 << 20)
        yield p
        assert p.live_count() == 0, f"{p.live_count()} pool buffers leaked (a store kept or lost a reference)"

    @pytest.fixture
    def store_context(self, pool: BufferPool) -> StoreContext:
        return StoreContext(pool)

    @pytest.fixture
    def store(self, store_factory: StoreFactory, store_context: StoreContext) -> Iterator[Store]:
        s = store_factory(store_context)
        yield s
        try:
            s.clear()
        except NotImplementedError:
            pass
        s.close()

    @pytest.fixture
    def namespace(self) -> str:
        return uuid.uuid4().hex

    # -- backdoor (override where the backend allows) -----------------------------------------
    def raw_get(self, store: Store, key: ChunkKey) -> bytes | None:
        """The chunk image held under ``key``, read around the store; None if absent.

        Exactly the bytes the store's ``_write`` received (zero padding after them is
        allowed). A store that frames the image at rest (its own header, compression,
        encryption) returns the unframed image here."""
        raise NotImplementedError

    def raw_set(self, store: Store, key: ChunkKey, data: bytes) -> None:
        """Hold ``data`` under ``key`` around the store, as a put would have written it
        (framed the store's way), so that ``get`` reads back exactly ``data``, damaged or not."""
        raise NotImplementedError

    def _raw_get(self, store: Store, key: ChunkKey) -> bytes | None:
        try:
            return self.raw_get(store, key)
        except NotImplementedError:
            pytest.skip(f"no backdoor for {type(store).__name__}: override raw_get(store, key) on "
                        f"{type(self).__name__} to check the store against the bytes its backend holds")

    def _raw_set(self, store: Store, key: ChunkKey, data: bytes) -> None:
        try:
            self.raw_set(store, key, data)
        except NotImplementedError:
            pytest.skip(f"no backdoor for {type(store).__name__}: override raw_set(store, key, data) on "
                        f"{type(self).__name__} to plant damaged values")

    def _put(self, store: Store, pool: BufferPool, key: ChunkKey, geometry: ChunkGeometry = SMALL_GEOMETRY) -> None:
        c = make_chunk(pool, key, geometry)
        try:
            assert store.put(key, c) is True, f"{type(store).__name__} declined a put of {key}"
        finally:
            c.release()

    def _get_check(self, store: Store, key: ChunkKey, geometry: ChunkGeometry = SMALL_GEOMETRY) -> None:
        got = store.get(key)
        try:
            assert_chunk_is(got, key, geometry)
        finally:
            if got is not None:
                got.release()

    # -- basics -------------------------------------------------------------------------------
    def test_put_get_roundtrip(self, store: Store, pool: BufferPool, namespace: str) -> None:
        key = make_key(1, namespace)
        self._put(store, pool, key)
        self._get_check(store, key)

    def test_get_missing_is_none(self, store: Store, namespace: str) -> None:
        assert store.get(make_key(404, namespace)) is None

    def test_exists_and_contains(self, store: Store, pool: BufferPool, namespace: str) -> None:
        keys = [make_key(i, namespace) for i in range(5)]
        for k in (keys[0], keys[1], keys[3]):
            self._put(store, pool, k)
        assert store.exists(keys) == [True, True, False, True, False]
        assert store.contains(keys) == 2
        assert store.contains(keys[2:]) == 0
        assert store.exists([]) == []

    def test_delete(self, store: Store, pool: BufferPool, namespace: str) -> None:
        keys = [make_key(i, namespace) for i in range(3)]
        for k in keys[:2]:
            self._put(store, pool, k)
        assert store.delete(keys) == 2
        assert store.exists(keys) == [False, False, False]
        assert store.get(keys[0]) is None
        assert store.delete(keys) == 0

    def test_put_twice_is_idempotent(self, store: Store, pool: BufferPool, namespace: str) -> None:
        key = make_key(7, namespace)
        self._put(store, pool, key)
        self._put(store, pool, key)
        self._get_check(store, key)
        assert store.delete([key]) == 1

    def test_batches(self, store: Store, pool: BufferPool, namespace: str) -> None:
        keys = [make_key(i, namespace) for i in range(12)]
        chunks = [make_chunk(pool, k) for k in keys[:8]]
        try:
            assert store.put_many(list(zip(keys[:8], chunks))) == [True] * 8
        finally:
            for c in chunks:
                c.release()
        got = store.get_many(keys)
        try:
            assert len(got) == len(keys)
            for k, g in zip(keys[:8], got[:8]):
                assert_chunk_is(g, k)
            assert got[8:] == [None] * 4
        finally:
            for g in got:
                if g is not None:
                    g.release()
        assert store.contains(keys) == 8

    def test_partial_chunk_and_dtypes(self, store: Store, pool: BufferPool, namespace: str) -> None:
        for i, dtype in enumerate(("float32", "bfloat16", "float8_e4m3fn")):
            g = ChunkGeometry(2, 2, 8, dtype)
            key = make_key(100 + i, namespace, num_tokens=5)  # a partial last chunk
            self._put(store, pool, key, g)
            self._get_check(store, key, g)

    def test_namespaces_do_not_collide(self, store: Store, pool: BufferPool, namespace: str) -> None:
        a, b = make_key(1, namespace + "-a"), make_key(1, namespace + "-b")
        self._put(store, pool, a)
        assert store.exists([b]) == [False]
        assert store.get(b) is None
        self._put(store, pool, b)
        self._get_check(store, a)
        self._get_check(store, b)

    def test_large_value(self, store: Store, pool: BufferPool, namespace: str) -> None:
        tokens = max(1, self.large_nbytes // LARGE_GEOMETRY.bytes_per_token)
        key = make_key(1, namespace, num_tokens=tokens)
        self._put(store, pool, key, LARGE_GEOMETRY)
        self._get_check(store, key, LARGE_GEOMETRY)

    def test_put_leaves_buffer_unchanged_and_unkept(self, store: Store, pool: BufferPool, namespace: str) -> None:
        key = make_key(3, namespace)
        c = make_chunk(pool, key)
        before = bytes(c.image())
        refs = c.buf.refs
        try:
            assert store.put(key, c)
            assert bytes(c.image()) == before, "put changed the caller's buffer"
            if not store.capabilities.holds_buffers:
                assert c.buf.refs == refs, "put kept a reference to the caller's buffer"
        finally:
            c.release()
        self._get_check(store, key)

    def test_concurrency(self, store: Store, pool: BufferPool, namespace: str) -> None:
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker(t: int) -> None:
            try:
                keys = [make_key(t * 100 + i, namespace) for i in range(6)]
                for k in keys:
                    self._put(store, pool, k)
                for k in keys:
                    self._get_check(store, k)
                assert store.contains(keys) == len(keys)
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
                with lock:
                    errors.append(exc)

        with ThreadPoolExecutor(self.threads) as ex:
            list(ex.map(worker, range(self.threads)))
        assert not errors, errors[0]

    def test_health_and_usage(self, store: Store, pool: BufferPool, namespace: str) -> None:
        assert store.health().ok, store.health().reason
        self._put(store, pool, make_key(1, namespace))
        u = store.usage()
        assert u.used_bytes >= 0 and u.items >= 0

    def test_close_is_idempotent(self, store_factory: StoreFactory, store_context: StoreContext) -> None:
        s = store_factory(store_context)
        s.close()
        s.close()

    def test_matches_model(self, store_factory: StoreFactory) -> None:
        """Hypothesis: random put/get/exists/contains/delete sequences agree with a set model."""
        run_state_machine(store_factory, max_examples=self.state_machine_examples)

    # -- ground truth through the backdoor --------------------------------------------------------
    def test_stored_bytes_are_the_chunk_image(self, store: Store, pool: BufferPool, namespace: str) -> None:
        key = make_key(11, namespace)
        c = make_chunk(pool, key)
        image = bytes(c.image())
        try:
            store.put(key, c)
        finally:
            c.release()
        raw = self._raw_get(store, key)
        assert raw is not None, "the store reported success but the backend holds nothing"
        assert raw[: len(image)] == image, "the backend holds other bytes than the chunk image"
        assert not any(raw[len(image):]), "bytes after the image must be zero padding"

    def test_value_written_around_the_store_is_read(self, store: Store, pool: BufferPool, namespace: str) -> None:
        key = make_key(12, namespace)
        c = make_chunk(pool, key)
        try:
            self._raw_set(store, key, bytes(c.image()))
        finally:
            c.release()
        assert store.exists([key]) == [True]
        self._get_check(store, key)

    @pytest.mark.parametrize("damage", ["garbage", "flipped-payload", "truncated", "foreign-key", "empty"])
    def test_corrupt_value_is_never_returned(self, store: Store, pool: BufferPool, namespace: str,
                                             damage: str) -> None:
        key, other = make_key(13, namespace), make_key(14, namespace)
        c = make_chunk(pool, other if damage == "foreign-key" else key)
        data = bytearray(c.image())
        c.release()
        if damage == "garbage":
            data = bytearray(b"\x5a" * len(data))
        elif damage == "flipped-payload":
            data[HEADER_SIZE + 17] ^= 0xFF
        elif damage == "truncated":
            data = data[: HEADER_SIZE + 100]
        elif damage == "empty":
            data = bytearray()
        self._raw_set(store, key, bytes(data))
        try:
            got = store.get(key)
        except ChunkError:
            return  # the contract: the tier stack counts it and deletes the value
        assert got is None, f"a {damage} value was returned as a chunk"


# -- the state machine ---------------------------------------------------------------------------
def state_machine_for(factory: StoreFactory, *, keys: int = 6):  # type: ignore[no-untyped-def]
    """A RuleBasedStateMachine class comparing a fresh store from ``factory`` with a set model."""
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

    indices = st.integers(0, keys - 1)
    key_lists = st.lists(indices, min_size=0, max_size=keys, unique=True)

    class StoreStateMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.pool = BufferPool(max_idle_bytes=16 << 20)
            self.store = factory(StoreContext(self.pool))
            ns = uuid.uuid4().hex  # every example starts from an empty namespace
            self.keys = [make_key(i, ns, num_tokens=16 if i % 3 else 7) for i in range(keys)]
            self.model: set[int] = set()

        @rule(i=indices)
        def put(self, i: int) -> None:
            c = make_chunk(self.pool, self.keys[i])
            try:
                assert self.store.put(self.keys[i], c) is True
            finally:
                c.release()
            self.model.add(i)

        @rule(ids=key_lists)
        def put_many(self, ids: list[int]) -> None:
            chunks = [make_chunk(self.pool, self.keys[i]) for i in ids]
            try:
                assert self.store.put_many([(self.keys[i], c) for i, c in zip(ids, chunks)]) == [True] * len(ids)
            finally:
                for c in chunks:
                    c.release()
            self.model.update(ids)

        @rule(i=indices)
        def get(self, i: int) -> None:
            got = self.store.get(self.keys[i])
            try:
                if i in self.model:
                    assert_chunk_is(got, self.keys[i])
                else:
                    assert got is None, f"key {i} was deleted or never stored but came back"
            finally:
                if got is not None:
                    got.release()

        @rule(ids=key_lists)
        def get_many(self, ids: list[int]) -> None:
            got = self.store.get_many([self.keys[i] for i in ids])
            try:
                for i, c in zip(ids, got):
                    if i in self.model:
                        assert_chunk_is(c, self.keys[i])
                    else:
                        assert c is None
            finally:
                for c in got:
                    if c is not None:
                        c.release()

        @rule(ids=key_lists)
        def exists_and_contains(self, ids: list[int]) -> None:
            ks = [self.keys[i] for i in ids]
            assert self.store.exists(ks) == [i in self.model for i in ids]
            expected = 0
            for i in ids:
                if i not in self.model:
                    break
                expected += 1
            assert self.store.contains(ks) == expected

        @rule(ids=key_lists)
        def delete(self, ids: list[int]) -> None:
            n = self.store.delete([self.keys[i] for i in ids])
            assert n == len(self.model & set(ids))
            self.model -= set(ids)

        @invariant()
        def no_leak_beyond_held(self) -> None:
            if not self.store.capabilities.holds_buffers:
                assert self.pool.live_count() == 0

        def teardown(self) -> None:
            try:
                self.store.delete(self.keys)
            finally:
                self.store.close()
            assert self.pool.live_count() == 0

    return StoreStateMachine


def run_state_machine(factory: StoreFactory, *, max_examples: int = 15, steps: int = 25) -> None:
    """Run :func:`state_machine_for` as a test (raises the shrunk failing example)."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    machine = state_machine_for(factory)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=max_examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=list(HealthCheck), database=None))


__all__ = ["LARGE_GEOMETRY", "SMALL_GEOMETRY", "StoreFactory", "StoreTests", "assert_chunk_is", "expected_kv",
           "make_chunk", "make_key", "run_state_machine", "state_machine_for"]
