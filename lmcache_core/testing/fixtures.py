"""Pytest plugin: real storage servers as fixtures (``pytest_plugins = ["lmcache_core.testing.fixtures"]``).

Public fixtures (stable; the conformance suite uses them):

- ``redis_server`` (session): a :class:`~lmcache_core.testing.servers.RedisServer`
  running Debian's redis-server; ``.url`` is ``redis://127.0.0.1:PORT``.
- ``redis_cluster`` (session): a 3-node Redis Cluster; ``.url`` is ``redis+cluster://...``.
- ``redis_tls_server`` (session): redis-server serving TLS only; ``.url`` is
  ``rediss://127.0.0.1:PORT``, ``.ca_file`` the CA to verify it with.
- ``valkey_server`` (session), ``valkey_cluster`` (session): the same with valkey-server.
- ``s3_server`` (session): a :class:`~lmcache_core.testing.servers.SeaweedS3`.
- ``s3_bucket`` (function): a fresh bucket name on ``s3_server``.
- ``server_factory`` (function): a :class:`ServerFactory` whose ``redis()``,
  ``valkey()``, ``redis_cluster()``, ``seaweedfs()`` start private servers
  (for fault tests that kill, fill or corrupt them); all are stopped after the test.
- ``unique_prefix`` (function): a short string unique to the test, for key
  prefixes on the shared servers so tests never see each other's keys.

A missing server binary skips the test with the fix in the reason, unless
``LMCACHE_REQUIRE_SERVERS=1`` is set (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Iterator, TypeVar

import pytest

from .servers import RedisCluster, RedisServer, SeaweedS3, ServerUnavailable

T = TypeVar("T")


def _start(factory: Callable[[], T]) -> T:
    """Start a server, turning ServerUnavailable into a skip (or a failure under LMCACHE_REQUIRE_SERVERS)."""
    try:
        return factory()
    except ServerUnavailable as exc:
        if os.environ.get("LMCACHE_REQUIRE_SERVERS", "") not in ("", "0"):
            pytest.fail(f"server required (LMCACHE_REQUIRE_SERVERS=1) but unavailable: {exc}")
        pytest.skip(f"server unavailable: {exc}")


class ServerFactory:
    """Starts private servers for one test and stops them all at its end."""

    def __init__(self) -> None:
        self._started: list[Any] = []

    def _keep(self, server: T) -> T:
        self._started.append(server)
        return server

    def redis(self, **kw: Any) -> RedisServer:
        return self._keep(_start(lambda: RedisServer.redis(**kw).start()))

    def valkey(self, **kw: Any) -> RedisServer:
        return self._keep(_start(lambda: RedisServer.valkey(**kw).start()))

    def redis_cluster(self) -> RedisCluster:
        return self._keep(_start(lambda: RedisCluster.redis().start()))

    def valkey_cluster(self) -> RedisCluster:
        return self._keep(_start(lambda: RedisCluster.valkey().start()))

    def seaweedfs(self) -> SeaweedS3:
        return self._keep(_start(lambda: SeaweedS3().start()))

    def close(self) -> None:
        for server in reversed(self._started):
            server.close()
        self._started.clear()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = _start(lambda: RedisServer.redis().start())
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = _start(lambda: RedisCluster.redis().start())
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def redis_tls_server() -> Iterator[RedisServer]:
    server = _start(lambda: RedisServer.redis(tls=True).start())
    yield server
    server.close()


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[RedisServer]:
    server = _start(lambda: RedisServer.valkey().start())
    yield server
    server.close()


@pytest.fixture(scope="session")
def valkey_cluster() -> Iterator[RedisCluster]:
    cluster = _start(lambda: RedisCluster.valkey().start())
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    server = _start(lambda: SeaweedS3().start())
    yield server
    server.close()


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> str:
    return s3_server.create_bucket(f"lmcache-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def server_factory() -> Iterator[ServerFactory]:
    factory = ServerFactory()
    yield factory
    factory.close()


@pytest.fixture
def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


__all__ = ["ServerFactory", "redis_cluster", "redis_server", "redis_tls_server", "s3_bucket", "s3_server", "server_factory",
           "unique_prefix", "valkey_cluster", "valkey_server"]
