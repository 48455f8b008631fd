"""lmcache-dummy-storage: a test plugin proving the storage contracts can fail.

An in-process byte store (``dummy://NAME``; stores with the same NAME share one
table, like clients of one server) with one defect per contract switched on by
``LMCACHE_DUMMY_STORAGE_DEFECT`` (see :mod:`.store`).
"""

from __future__ import annotations

__version__ = "0.1.0"
