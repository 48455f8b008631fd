"""lmcache-conformance: the contract suite every device, storage and transport plugin runs.

Subclass a contract class in your plugin's tests and supply its fixture (see
docs/plugins.md), or run ``lmcache conformance`` over the installed plugins and
publish the JSON report (see docs/vendors.md).

The contract classes are imported on first use (PEP 562), not with the package:
the modules holding test assertions must be imported after pytest has registered
them for assertion rewriting (:data:`ASSERTION_MODULES`), so that a failing
check reports its values, not a bare ``AssertionError``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

#: Modules whose ``assert`` statements are checks of a contract: pytest rewrites them.
ASSERTION_MODULES = (
    "lmcache_conformance.device_tests",
    "lmcache_conformance.store_tests",
    "lmcache_conformance.transport_tests",
    "lmcache_conformance.zerocopy",
    "lmcache_core.testing.storage_tests",
    "lmcache_core.testing.fault_tests",
)

_EXPORTS = {
    "DeclaresDtypes": "capabilities",
    "DeclaresLayouts": "capabilities",
    "DeclaresUnavailableURL": "capabilities",
    "HasConformanceURL": "capabilities",
    "SupportsRawAccess": "backdoors",
    "ContractTests": "device_tests",
    "DeviceChunkTests": "device_tests",
    "DeviceCorruptionTests": "device_tests",
    "DeviceKeyTests": "device_tests",
    "DeviceZeroCopyTests": "device_tests",
    "PipeliningTests": "device_tests",
    "StorageSemanticsTests": "store_tests",
    "StoreAvailabilityTests": "store_tests",
    "StoreChunkTests": "store_tests",
    "StoreCorruptionTests": "store_tests",
    "StoreSharingTests": "store_tests",
    "StoreZeroCopyTests": "store_tests",
    "TransportTests": "transport_tests",
}


def register_assertion_rewrite() -> None:
    """Ask pytest to rewrite :data:`ASSERTION_MODULES` (a no-op outside a pytest run)."""
    if "pytest" not in sys.modules:
        return
    import pytest

    pytest.register_assert_rewrite(*ASSERTION_MODULES)


register_assertion_rewrite()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmcache_conformance' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [*sorted(_EXPORTS), "ASSERTION_MODULES", "__version__", "register_assertion_rewrite"]
