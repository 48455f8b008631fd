"""Make the example's plugin known when it runs from a source checkout without `pip install -e`.

Installed, the entry point registers it and this does nothing.
"""

from __future__ import annotations

from lmcache_core.plugins import get_plugin_manager


def pytest_configure() -> None:
    pm = get_plugin_manager()
    if "example" not in pm.registrations("device"):
        from lmcache_example import plugin

        pm.register_plugin(plugin, "example", "lmcache-example")
