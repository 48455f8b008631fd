"""lmcache-device-rocm: the AMD GPU device plugin (``device: rocm``)."""

from __future__ import annotations

__version__ = "0.1.0"
