from __future__ import annotations

import pytest

from lmcache_core.config import Config, parse_size
from lmcache_core.errors import ConfigError


def test_precedence_yaml_env_dict(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("chunk_size: 128\ntenant: from-yaml\nsalt: yaml\n")
    env = {"LMCACHE_TENANT": "from-env", "LMCACHE_SAVE_PARTIAL": "false", "LMCACHE_UNRELATED_THING": "x"}
    cfg = Config.load(f, {"salt": "from-dict"}, env=env)
    assert cfg.chunk_size == 128 and cfg.tenant == "from-env" and cfg.salt == "from-dict"
    assert cfg.save_partial is False


def test_env_config_file_and_lists(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("tiers: ['memory://?capacity=1GiB', 'disk:///tmp/x']\nhost_pool_size: 1GiB\n")
    cfg = Config.load(env={"LMCACHE_CONFIG_FILE": str(f)})
    assert cfg.tiers == ("memory://?capacity=1GiB", "disk:///tmp/x")
    assert cfg.host_pool_size == 1 << 30
    assert Config.load(env={"LMCACHE_TIERS": "memory://,disk:///a"}).tiers == ("memory://", "disk:///a")


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"chunk_size": "abc"}, "chunk_size: expected an integer, got 'abc'"),
        ({"chunk_size": 0}, "chunk_size: must be >= 1"),
        ({"hash_algorithm": "md5"}, "hash_algorithm: 'md5' is not allowed; choose one of xxh3_128, blake2b"),
        ({"chunk_sise": 4}, "unknown config key 'chunk_sise'"),
        ({"tiers": ["localhost:6379"]}, "is not a URL"),
        ({"tiers": []}, "at least one storage tier"),
        ({"save_partial": "maybe"}, "save_partial: expected true or false"),
        ({"host_pool_size": "lots"}, "host_pool_size: expected a byte size"),
        ({"log_level": "loud"}, "log_level: 'LOUD' is not allowed"),
    ],
)
def test_errors_name_key_value_and_fix(raw, message):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(raw)
    assert message in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load(bad, env={})
    with pytest.raises(ConfigError, match="cannot be read"):
        Config.load(tmp_path / "nope.yaml", env={})
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        Config.load(lst, env={})


def test_block_size_error_names_the_fix():
    with pytest.raises(ConfigError, match="chunk_size must be a multiple of the engine block size 16, got 250; use e.g. 240"):
        Config.from_dict({"chunk_size": 250}).check_block_size(16)
    Config.from_dict({"chunk_size": 256}).check_block_size(16)


def test_sizes():
    assert parse_size("4GiB") == 4 << 30 and parse_size("500MB") == 500_000_000 and parse_size(12) == 12
    assert parse_size("1.5 KiB") == 1536
    with pytest.raises(ConfigError):
        parse_size(-1)


def test_every_key_is_documented():
    from dataclasses import fields
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    missing = [f.name for f in fields(Config) if f"`{f.name}`" not in doc]
    assert not missing, f"document these keys in docs/configuration.md: {missing}"
