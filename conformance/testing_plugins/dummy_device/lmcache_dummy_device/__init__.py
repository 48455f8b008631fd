"""lmcache-dummy-device: a test plugin proving the conformance suite can fail.

A CPU device whose copies run on a worker thread (a real asynchronous "stream",
so the pipelining contract has overlap to measure on a CPU), with one defect per
contract switched on by ``LMCACHE_DUMMY_DEVICE_DEFECT`` (see :mod:`.device`).
"""

from __future__ import annotations

__version__ = "0.1.0"
