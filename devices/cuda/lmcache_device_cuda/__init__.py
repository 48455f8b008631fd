"""lmcache-device-cuda: the NVIDIA GPU device plugin (``device: cuda``)."""

from __future__ import annotations

__version__ = "0.1.0"
