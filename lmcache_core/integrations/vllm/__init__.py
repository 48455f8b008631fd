"""lmcache-core as a vLLM KV connector: ``kv_connector_module_path`` is this package.

The connector class lives in :mod:`.connector`, which imports vLLM; it is loaded on
first attribute access, so the parts that do not need vLLM (``common``, ``layout``,
``scheduler``, ``worker``) import without it. See docs/vllm.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LMCacheCoreConnector", "vllm_model_fingerprint"]


def __getattr__(name: str) -> Any:
    # vLLM's connector factory does getattr(import_module(kv_connector_module_path), kv_connector).
    if name.startswith("__") or name in ("common", "connector", "layout", "scheduler", "worker"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    connector = importlib.import_module(f"{__name__}.connector")  # imports vLLM
    try:
        return getattr(connector, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
