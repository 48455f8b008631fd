"""URL parsing and lazy connection of the Redis tier (no server needed except where named)."""

from __future__ import annotations

import pytest

from lmcache_core.errors import ConfigError, PluginError
from lmcache_core.memory import BufferPool
from lmcache_core.plugins import PluginManager
from lmcache_core.storage import StoreContext
from lmcache_core.testing.servers import free_port
from lmcache_storage_redis.store import RedisStore, parse_options

KINDS = RedisStore.scheme_kinds


def test_standalone_url_with_user_password_db_and_options() -> None:
    o = parse_options("redis://alice:pw@10.0.0.5:6380/3?ttl=60&timeout=1.5&max_connections=8&prefix=p",
                      KINDS, "X_UNSET")
    assert (o.mode, o.hosts, o.db, o.username, o.password) == ("tcp", (("10.0.0.5", 6380),), 3, "alice", "pw")
    assert (o.ttl, o.timeout, o.max_connections, o.prefix, o.tls) == (60, 1.5, 8, "p", False)


def test_tls_unix_and_cluster_urls() -> None:
    assert parse_options("rediss://h", KINDS, "X").tls
    u = parse_options("unix:///run/redis.sock?db=2", KINDS, "X")
    assert (u.mode, u.path, u.db) == ("unix", "/run/redis.sock", 2)
    c = parse_options("redis+cluster://a:7000,b:7001", KINDS, "X")
    assert (c.mode, c.hosts) == ("cluster", (("a", 7000), ("b", 7001)))


def test_password_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_REDIS_PASSWORD", "fromenv")
    assert parse_options("redis://h", KINDS, "LMCACHE_REDIS_PASSWORD").password == "fromenv"


@pytest.mark.parametrize("url,match", [
    ("redis://h?colour=red", "unknown option"),
    ("redis://h:notaport", "port must be a number"),
    ("unix://", "needs a path"),
    ("redis+cluster://h/2", "database 0"),
    ("redis://h/x", "database number"),
    ("redis://h?ttl=-1", "ttl"),
])
def test_bad_urls_name_the_problem(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RedisStore.from_url(url, StoreContext(BufferPool()))


def test_from_url_does_not_connect_and_health_names_the_server() -> None:
    port = free_port()  # nothing listens here
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}?connect_timeout=0.5", StoreContext(BufferPool()))
    h = store.health()
    store.close()
    assert not h.ok
    assert f"127.0.0.1:{port}" in h.reason and "ConnectionError" in h.reason


def test_registered_through_the_entry_point() -> None:
    pm = PluginManager()
    for scheme in ("redis", "rediss", "unix", "redis+cluster"):
        reg = pm.storage_for_scheme(scheme)
        assert reg.distribution == "lmcache-storage-redis" and reg.extra == "redis"
    assert pm.storage_for_scheme("redis").load() is RedisStore
    with pytest.raises(PluginError):
        pm.storage_for_scheme("nosuch")
