"""Capabilities the suite reads from a plugin, and the skip reasons when one is missing.

Core capabilities are the frozen flags of the contracts (``DeviceCapabilities``,
``StoreCapabilities``, ``TransportCapabilities``). A few facts only the
conformance suite needs are optional runtime-checkable protocols: a plugin
class that has the attribute declares the fact, one that lacks it gets the
default (everything is supported). A test for a capability the plugin lacks is
a skip that says which declaration made it so, never a pass.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from .groundtruth import DTYPES, LAYOUTS


@runtime_checkable
class DeclaresLayouts(Protocol):
    """A device that handles only some engine layouts: ``supported_layouts = frozenset({...})``."""

    supported_layouts: ClassVar[frozenset[str]]


@runtime_checkable
class DeclaresDtypes(Protocol):
    """A device that handles only some KV dtypes: ``supported_dtypes = frozenset({...})``."""

    supported_dtypes: ClassVar[frozenset[str]]


@runtime_checkable
class HasConformanceURL(Protocol):
    """A store that can run the suite without a server: ``conformance_url = "scheme://..."``.

    ``{tmp}`` in the URL is replaced with a fresh temporary directory.
    """

    conformance_url: ClassVar[str]


@runtime_checkable
class DeclaresUnavailableURL(Protocol):
    """A store that says how to reach it while its backend is down, for the availability test::

        @classmethod
        def conformance_unavailable_url(cls, url: str) -> str | None:
            return url.replace("://", "://127.0.0.1:9/", 1)   # whatever "unreachable" is for you

    Given the URL under test, return a URL of the same store whose backend cannot be
    reached (a closed port, an absent mount, a revoked endpoint), or None when there
    is no such state (the test then skips and says so). Without it the suite points
    every ``host:port`` of the URL at a closed loopback port, and skips a URL that has
    none.
    """

    @classmethod
    def conformance_unavailable_url(cls, url: str) -> str | None: ...


def layouts_of(device: Any) -> frozenset[str]:
    return frozenset(device.supported_layouts) if isinstance(device, DeclaresLayouts) else frozenset(LAYOUTS)


def dtypes_of(device: Any) -> frozenset[str]:
    return frozenset(device.supported_dtypes) if isinstance(device, DeclaresDtypes) else frozenset(DTYPES)


def layout_skip_reason(device: Any, layout: str, dtype: str) -> str | None:
    """Why this device is not asked for ``layout``/``dtype``, or None when it must handle it."""
    name = getattr(device, "name", type(device).__name__)
    if layout not in layouts_of(device):
        return f"device {name!r} declares supported_layouts={sorted(layouts_of(device))}; {layout} is not among them"
    if dtype not in dtypes_of(device):
        return f"device {name!r} declares supported_dtypes={sorted(dtypes_of(device))}; {dtype} is not among them"
    return None


# URLs for the built-in stores, which need no server (the core cannot carry suite facts).
BUILTIN_URLS: dict[str, str] = {
    "memory": "memory://?capacity=512MiB",
    "disk": "disk://{tmp}/disk",
}


def default_url(name: str, store_cls: Any | None) -> str | None:
    """The URL the suite uses for a registered store when the user names none."""
    if name in BUILTIN_URLS:
        return BUILTIN_URLS[name]
    if store_cls is not None and isinstance(store_cls, HasConformanceURL):
        return str(store_cls.conformance_url)
    return None


__all__ = ["BUILTIN_URLS", "DeclaresDtypes", "DeclaresLayouts", "DeclaresUnavailableURL", "HasConformanceURL",
           "default_url", "dtypes_of", "layout_skip_reason", "layouts_of"]
