"""lmcache-core: a tiered, content-addressed KV cache for LLM serving, with vendor plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import Config
    from .engine import CacheEngine
    from .keys import KeyExtras, MMItem
    from .layout import ChunkGeometry, PagedKV

__all__ = ["CacheEngine", "ChunkGeometry", "Config", "KeyExtras", "MMItem", "PagedKV", "hookimpl", "__version__"]

_LAZY = {"CacheEngine": "engine", "Config": "config", "ChunkGeometry": "layout", "PagedKV": "layout",
         "KeyExtras": "keys", "MMItem": "keys"}


def __getattr__(name: str) -> Any:
    # Keep `import lmcache_core` light: torch and friends load only when used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
