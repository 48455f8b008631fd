"""Every selected store against the storage, chunk and zero-copy contracts."""

from __future__ import annotations

from lmcache_conformance.store_tests import (
    StorageSemanticsTests,
    StoreAvailabilityTests,
    StoreChunkTests,
    StoreCorruptionTests,
    StoreSharingTests,
    StoreZeroCopyTests,
)


class TestSemantics(StorageSemanticsTests):
    pass


class TestAvailability(StoreAvailabilityTests):
    pass


class TestChunk(StoreChunkTests):
    pass


class TestSharing(StoreSharingTests):
    pass


class TestCorruption(StoreCorruptionTests):
    pass


class TestZeroCopy(StoreZeroCopyTests):
    pass
