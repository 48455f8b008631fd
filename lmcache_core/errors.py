"""Exceptions with messages that name the thing, the value and the fix."""

from __future__ import annotations


class LMCacheError(Exception):
    """Base class of every error lmcache-core raises on purpose."""


class ConfigError(LMCacheError, ValueError):
    """A configuration value is invalid; the message names key, value and what is allowed."""


class PluginError(LMCacheError):
    """A plugin could not be loaded, registered or chosen."""


class DuplicatePluginError(PluginError):
    """Two plugins registered the same name."""


class MissingDependencyError(PluginError, ImportError):
    """A plugin's factory needs a package that is not installed."""


class LayoutError(LMCacheError, ValueError):
    """A KV cache's shape, strides or dtype cannot be described or does not match."""


class ChunkError(LMCacheError):
    """A stored chunk failed verification; callers treat it as a miss."""


class StoreUnavailable(LMCacheError):
    """A storage tier cannot be reached; callers treat it as a miss."""
