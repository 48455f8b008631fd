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
    # Only the connector's names: anything else (a submodule such as compat) is imported as usual.
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.connector"), name)  # imports vLLM
