"""lmcache-conformance: the contract suite every device, storage and transport plugin runs.

Subclass a contract class in your plugin's tests and supply its fixture (see
docs/plugins.md), or run ``lmcache conformance`` over the installed plugins and
publish the JSON report (see docs/vendors.md).
"""

from __future__ import annotations

from .capabilities import DeclaresDtypes, DeclaresLayouts, HasConformanceURL
from .device_tests import (
    ContractTests,
    DeviceChunkTests,
    DeviceCorruptionTests,
    DeviceKeyTests,
    DeviceZeroCopyTests,
    PipeliningTests,
)
from .store_tests import (
    StorageSemanticsTests,
    StoreAvailabilityTests,
    StoreChunkTests,
    StoreCorruptionTests,
    StoreSharingTests,
    StoreZeroCopyTests,
)
from .transport_tests import TransportTests

__version__ = "0.1.0"

__all__ = [
    "ContractTests",
    "DeclaresDtypes",
    "DeclaresLayouts",
    "DeviceChunkTests",
    "DeviceCorruptionTests",
    "DeviceKeyTests",
    "DeviceZeroCopyTests",
    "HasConformanceURL",
    "PipeliningTests",
    "StorageSemanticsTests",
    "StoreAvailabilityTests",
    "StoreChunkTests",
    "StoreCorruptionTests",
    "StoreSharingTests",
    "StoreZeroCopyTests",
    "TransportTests",
    "__version__",
]
