"""The dummy store itself: the shared contract with a backdoor, and its defect switch."""

from __future__ import annotations

import pytest

from lmcache_conformance import StorageSemanticsTests
from lmcache_core.memory import BufferPool
from lmcache_core.storage import StoreContext
from lmcache_dummy_storage.store import DEFECT_ENV, DummyStore


class TestDummySemantics(StorageSemanticsTests):
    """The vendor pattern; the store's own ``raw_get``/``raw_set`` serve as the backdoor."""

    @pytest.fixture
    def store_url(self, monkeypatch: pytest.MonkeyPatch) -> str:
        monkeypatch.delenv(DEFECT_ENV, raising=False)
        return "dummy://own-tests"


def test_unknown_defect_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEFECT_ENV, "bogus")
    with pytest.raises(ValueError, match="keep-view"):
        DummyStore.from_url("dummy://x", StoreContext(BufferPool()))


def test_same_name_shares_a_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEFECT_ENV, raising=False)
    from lmcache_core.testing.storage_tests import make_chunk, make_key

    pool = BufferPool()
    a = DummyStore.from_url("dummy://shared-t", StoreContext(pool))
    b = DummyStore.from_url("dummy://shared-t", StoreContext(pool))
    c = DummyStore.from_url("dummy://other-t", StoreContext(pool))
    key = make_key(1, "shared")
    chunk = make_chunk(pool, key)
    try:
        assert a.put(key, chunk)
    finally:
        chunk.release()
    assert b.exists([key]) == [True] and c.exists([key]) == [False]
    a.clear()
    assert pool.live_count() == 0
