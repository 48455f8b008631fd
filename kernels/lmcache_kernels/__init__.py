"""lmcache-kernels: move KV between paged caches and lmcache chunk tensors.

``reference`` (torch ops, the CPU path and the ground truth), ``triton_copy`` (one
Triton kernel for every layout), ``transfer.KVTransfer`` (direct, staged or torch
path per call) and ``accel.StreamDevice`` (the shared half of accelerator device
plugins). A library: device plugins import it; it registers nothing itself.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
