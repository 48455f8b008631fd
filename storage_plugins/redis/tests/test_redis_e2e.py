"""Two processes share KV through Redis (standalone and cluster) with the transformers integration."""

from __future__ import annotations

import pytest

from lmcache_core.testing.e2e import run_two_process
from lmcache_core.testing.servers import RedisCluster, RedisServer

pytestmark = pytest.mark.slow


def test_two_processes_share_kv_through_redis(redis_server: RedisServer, unique_prefix: str) -> None:
    report = run_two_process(f"{redis_server.url}?prefix={unique_prefix}", "redis")
    assert report["hit_tokens"] >= 256


def test_two_processes_share_kv_through_redis_cluster(redis_cluster: RedisCluster, unique_prefix: str) -> None:
    report = run_two_process(f"{redis_cluster.url}?prefix={unique_prefix}", "redis-cluster")
    assert report["hit_tokens"] >= 256
