"""lmcache-device-ascend: the Huawei Ascend NPU device plugin (``device: ascend``)."""

from __future__ import annotations

__version__ = "0.1.0"
