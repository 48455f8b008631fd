"""lmcache-example: the smallest complete lmcache plugin (see docs/plugins.md).

It contributes a device (``example``), a store (``example://NAME``) and a
transport (``example``), each as small as the contracts allow, and passes
``lmcache conformance``.
"""

from __future__ import annotations

__version__ = "0.1.0"
