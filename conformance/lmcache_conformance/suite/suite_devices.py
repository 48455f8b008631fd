"""Every selected device plugin against the chunk, pipelining and zero-copy contracts."""

from __future__ import annotations

from lmcache_conformance.device_tests import (
    DeviceChunkTests,
    DeviceCorruptionTests,
    DeviceKeyTests,
    DeviceZeroCopyTests,
    PipeliningTests,
)


class TestChunk(DeviceChunkTests):
    pass


class TestKeys(DeviceKeyTests):
    pass


class TestCorruption(DeviceCorruptionTests):
    pass


class TestPipelining(PipeliningTests):
    pass


class TestZeroCopy(DeviceZeroCopyTests):
    pass
