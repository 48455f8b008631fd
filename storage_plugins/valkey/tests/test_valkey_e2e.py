"""Two processes share KV through Valkey with the transformers integration."""

from __future__ import annotations

import pytest

from lmcache_core.testing.e2e import run_two_process
from lmcache_core.testing.servers import RedisServer

pytestmark = pytest.mark.slow


def test_two_processes_share_kv_through_valkey(valkey_server: RedisServer, unique_prefix: str) -> None:
    report = run_two_process(f"{valkey_server.url}?prefix={unique_prefix}", "valkey")
    assert report["hit_tokens"] >= 256
