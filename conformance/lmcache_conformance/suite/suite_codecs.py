"""Every selected codec (``lmcache conformance --codec NAME``; default: every registered codec,
and the chain lossless+aesgcm) against the codec contract."""

from __future__ import annotations

import os

import pytest

from lmcache_conformance.codec_tests import CodecTests


def _specs() -> list[str]:
    chosen = [s for s in os.environ.get("LMCACHE_CONFORMANCE_CODECS", "").split(",") if s]
    if chosen:
        return chosen
    from lmcache_core.codecs.registry import REGISTRY, register_from_plugins
    from lmcache_core.plugins import get_plugin_manager

    register_from_plugins(get_plugin_manager())
    return [*REGISTRY.names(), "lossless+aesgcm"]


class TestCodec(CodecTests):
    @pytest.fixture(params=_specs())
    def codec_spec(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)
