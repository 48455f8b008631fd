"""lmcache-device-arm: the aarch64 host device plugin (``device: arm``)."""

from __future__ import annotations

__version__ = "0.1.0"
