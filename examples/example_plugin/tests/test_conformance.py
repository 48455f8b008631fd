"""The example plugin against the conformance contracts: each class is one fixture away from the suite."""

from __future__ import annotations

from typing import Iterator

import pytest

from lmcache_conformance import (
    DeviceChunkTests,
    DeviceZeroCopyTests,
    PipeliningTests,
    StorageSemanticsTests,
    StoreChunkTests,
    StoreZeroCopyTests,
    TransportTests,
)
from lmcache_example.device import ExampleDevice
from lmcache_example.transport import ExampleTransport


class TestExampleDeviceChunks(DeviceChunkTests):
    @pytest.fixture
    def device(self) -> ExampleDevice:
        return ExampleDevice()


class TestExampleDevicePipelining(PipeliningTests):
    @pytest.fixture
    def device(self) -> ExampleDevice:
        return ExampleDevice()


class TestExampleDeviceZeroCopy(DeviceZeroCopyTests):
    @pytest.fixture
    def device(self) -> ExampleDevice:
        return ExampleDevice()


class TestExampleStoreSemantics(StorageSemanticsTests):
    @pytest.fixture
    def store_url(self) -> str:
        return "example://tests"


class TestExampleStoreChunks(StoreChunkTests):
    @pytest.fixture
    def store_url(self) -> str:
        return "example://tests"


class TestExampleStoreZeroCopy(StoreZeroCopyTests):
    @pytest.fixture
    def store_url(self) -> str:
        return "example://tests"


class TestExampleTransport(TransportTests):
    @pytest.fixture
    def transport_pair(self) -> Iterator[tuple[ExampleTransport, ExampleTransport]]:
        a, b = ExampleTransport(), ExampleTransport()
        yield a, b
        a.close()
        b.close()
