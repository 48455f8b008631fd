"""Issue 10, unclear or missing errors in tier URLs: each reproduction is a ConfigError at config
load (the checks every store shares, in ``storage.parse_url``) or at tier creation (the disk
tier's own), naming the URL, the option or part, the value and the fix."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from lmcache_core.builtin.disk_store import DiskStore
from lmcache_core.builtin.memory_store import MemoryStore
from lmcache_core.config import Config
from lmcache_core.plugins import build_stores
from lmcache_core.errors import ConfigError
from lmcache_core.memory import BufferPool
from lmcache_core.plugins import PluginManager
from lmcache_core.storage import MAX_TIMEOUT_S, StoreContext, parse_url


def ctx() -> StoreContext:
    return StoreContext(BufferPool())


def config_error(url: str) -> str:
    """The error of a config holding ``url``; the same check runs again when the tier is built."""
    with pytest.raises(ConfigError) as at_load:
        Config.from_dict({"tiers": ["memory://", url]})
    with pytest.raises(ConfigError) as at_parse:
        parse_url(url)
    assert str(at_load.value) == f"tiers: {at_parse.value}"
    return str(at_parse.value)


# -- checks every store gets from parse_url --------------------------------------------------
@pytest.mark.parametrize("url, port", [("redis://:99999", "99999"), ("redis://h:0", "0"),
                                       ("valkey+cluster://a:7000,b:70000", "70000"), ("s3://b:65536", "65536")])
def test_a_port_out_of_range_is_an_error_at_load(url, port):
    # issue: redis://:99999 was accepted and failed later as connection refused
    msg = config_error(url)
    assert msg.startswith(url) and f"port {port} is out of range; a port is 1 to 65535" in msg


@pytest.mark.parametrize("url, match", [
    ("redis://[::1", r"the IPv6 literal '\[::1' has no closing '\]'; write it like \[::1\]"),
    ("redis://u:p@[::1/0", r"'\[::1' has no closing"),
    ("redis://[zz]:6379", r"holds 'zz', which is not an IPv6 address"),
    ("redis://[::1]x", r"'x' after '\[::1\]' is neither a port"),
    ("redis://::1:6379", r"IPv6 address without brackets; write it in brackets"),
    ("redis://h]:1", r"unbalanced bracket"),
    ("redis://h:notaport", r"port must be a number from 1 to 65535, got 'notaport'"),
])
def test_a_bad_host_literal_is_an_error_at_load(url, match):
    # issue: redis://[::1 was dropped with a warning and the engine ran without that tier
    assert url in config_error(url)
    with pytest.raises(ConfigError, match=match):
        parse_url(url)


def test_a_malformed_url_never_becomes_a_dropped_tier(caplog):
    # build_stores turns only non-ConfigError exceptions into "running without it" warnings
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError, match="no closing"):
        build_stores(["memory://", "redis://[::1"], PluginManager(), ctx())
    assert "running without it" not in caplog.text


@pytest.mark.parametrize("url", ["redis://[::1]:6379/0", "redis://u:p@[2001:db8::5]:6380",
                                 "redis://[fe80::1%25eth0]:6379", "redis+cluster://a:7000,b:7001,[::1]:7002",
                                 "redis://h", "unix:///run/redis.sock?db=2", "s3://bucket/prefix",
                                 "memory://?capacity=1GiB", "redis://h:65535"])
def test_well_formed_urls_pass(url):
    assert parse_url(url).raw == url
    Config.from_dict({"tiers": [url]})


@pytest.mark.parametrize("option", ["timeout", "connect_timeout", "read_timeout"])
@pytest.mark.parametrize("value", ["0", "-1", "3601", "nan", "inf"])
def test_a_timeout_outside_its_range_names_the_option_and_the_range(option, value):
    # issue: timeout=0 named no option
    msg = config_error(f"redis://h?{option}={value}")
    assert f"option {option} must be" in msg and f"got {value!r}" in msg
    if value not in ("nan", "inf"):
        assert f"greater than 0 and at most {MAX_TIMEOUT_S:g}" in msg and f"e.g. {option}=5" in msg
    assert parse_url(f"redis://h?{option}=0.5").float_option(option, 5.0) == 0.5


def test_a_non_numeric_timeout_names_the_option():
    assert "option timeout must be a number, got 'soon'" in config_error("redis://h?timeout=soon")


def test_an_option_given_twice_is_an_error():
    # issue: ?capacity=1GiB&capacity=2GiB silently kept the last one
    msg = config_error("disk:///tmp/x?capacity=1GiB&capacity=2GiB")
    assert "option capacity is given 2 times ('1GiB', '2GiB'); give it once" in msg
    assert "option ttl is given 2 times" in config_error("redis://h?ttl=1&ttl=1")


@pytest.mark.parametrize("url", ["memory://?capacity=0", "disk:///tmp/x?capacity=0B", "memory://?capacity=0.4"])
def test_a_zero_capacity_is_an_error(url):
    # issue: capacity=0 was accepted (a tier that stores nothing)
    msg = config_error(url)
    assert "option capacity must be at least 1 byte" in msg and "capacity=1GiB" in msg
    with pytest.raises(ConfigError, match="option capacity must be at least 1 byte"):
        MemoryStore.from_url(url, ctx()) if url.startswith("memory") else DiskStore.from_url(url, ctx())


def test_size_and_int_option_bounds_name_the_range():
    u = parse_url("s3://b?part_size=0&concurrency=0")
    with pytest.raises(ConfigError, match="option part_size must be at least 1 byte, got '0'"):
        u.size_option("part_size", 16 << 20)
    with pytest.raises(ConfigError, match="option concurrency must be from 1 to 64, got '0'"):
        u.int_option("concurrency", 8, minimum=1, maximum=64)
    assert u.int_option("absent", 8, minimum=10) == 8  # a default is the store's own business
    assert parse_url("memory://").size_option("capacity", 2 << 30) == 2 << 30


@pytest.mark.parametrize("url, kept", [("disk:///tmp/a#b", "disk:///tmp/a"), ("disk:///tmp/a#", "disk:///tmp/a"),
                                       ("redis://h?prefix=a#b", "redis://h?prefix=a")])
def test_a_fragment_is_an_error_not_dropped(url, kept):
    # issue: disk:///tmp/a#b silently became /tmp/a
    msg = config_error(url)
    assert "starts a URL fragment" in msg and f"leaving {kept})" in msg and "write it as %23" in msg


def test_a_percent_encoded_hash_stays_in_the_path(tmp_path):
    store = DiskStore.from_url(f"disk://{tmp_path}/a%23b", ctx())
    assert store.root == tmp_path / "a#b"
    store.close()


# -- the disk tier's own checks (DiskStore.from_url) -----------------------------------------
@pytest.mark.parametrize("url", ["disk:///", "disk:////", "file:///", "disk:///tmp/..", "disk:///."])
def test_the_filesystem_root_is_not_a_disk_tier(url):
    # issue: disk:/// was accepted (a tier that creates, scans and deletes files under /)
    with pytest.raises(ConfigError, match=r"root would be the root of the filesystem.*directory of its own, "
                                          r"e\.g\. (disk|file):///var/cache/lmcache"):
        DiskStore.from_url(url, ctx())


def test_a_symlink_to_the_root_is_not_a_disk_tier(tmp_path):
    (tmp_path / "slash").symlink_to("/")
    with pytest.raises(ConfigError, match="root of the filesystem"):
        DiskStore.from_url(f"disk://{tmp_path}/slash", ctx())


@pytest.mark.parametrize("url, rel, query", [("disk://relative/dir", "relative/dir", ""),
                                             ("file://relative/dir?capacity=1GiB", "relative/dir", "?capacity=1GiB"),
                                             ("disk://./x", "./x", "")])
def test_a_relative_disk_path_is_an_error_showing_the_absolute_form(tmp_path, monkeypatch, url, rel, query):
    # issue: disk://relative/dir was resolved against whatever the working directory was
    monkeypatch.chdir(tmp_path)
    absolute = Path(os.path.abspath(rel)) if not rel.startswith("./") else tmp_path / rel[2:]
    with pytest.raises(ConfigError) as err:
        DiskStore.from_url(url, ctx())
    msg = str(err.value)
    scheme = url.split("://")[0]
    assert f"{rel!r} is a relative path" in msg and str(tmp_path) in msg
    assert msg.endswith(f"write the absolute path after three slashes: {scheme}://{absolute}{query}")
    assert not (tmp_path / "relative").exists()


def test_a_home_relative_disk_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    store = DiskStore.from_url("disk://~/cache", ctx())
    assert store.root == tmp_path / "cache"
    store.close()


def test_the_default_disk_tier_survives_odd_cache_dirs(tmp_path, monkeypatch):
    odd = tmp_path / "a#b?c%d"
    monkeypatch.setenv("XDG_CACHE_HOME", str(odd))
    (tier,) = [t for t in Config.from_dict({}).tiers if t.startswith("disk")]
    store = DiskStore.from_url(tier, ctx())
    assert store.root == odd / "lmcache-core" / "chunks" and store.capacity == 20 << 30
    store.close()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path))
    assert str(tmp_path / ".cache" / "lmcache-core" / "chunks") in Config.from_dict({}).tiers[1]
