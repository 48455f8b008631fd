"""The ``lmcache`` entry point of lmcache-kernels: a plugin with no hook implementations.

lmcache-kernels provides functions, not devices: the CUDA, ROCm and Ascend device
plugins import it. Registering a device here would duplicate theirs, and a hook
implementation that registers nothing would be noise in ``lmcache plugins``.
The entry point exists so that ``lmcache plugins`` lists the distribution, its
version and (through ``KERNELS``) what it offers, and so that
``LMCACHE_BLOCK_PLUGINS=kernels`` is honoured like any other plugin name.
"""

from __future__ import annotations

from . import __version__

KERNELS = ("gather", "scatter", "gather_layer", "scatter_layer")
VERSION = __version__
