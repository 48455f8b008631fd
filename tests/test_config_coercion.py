"""Issue 10, config coercion and unclear errors: every reproduction is an error (or, for an
environment typo, a warning) at load that names the key, the value and the fix."""
from __future__ import annotations

import logging
import re

import pytest

from lmcache_core import chunk as chunkmod
from lmcache_core.config import Config
from lmcache_core.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_process_key():
    chunkmod.set_integrity_key(None)
    yield
    chunkmod.set_integrity_key(None)


def load_yaml(tmp_path, text: str) -> Config:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    return Config.load(f, env={})


@pytest.mark.parametrize("line", ["salt: 1.10", "salt: 1.1", "tenant: 010", "tenant: 8", "tenant: yes",
                                  "model: 3", "tenant: null", "salt: [a]"])
def test_a_yaml_number_in_a_namespace_field_is_an_error_that_says_to_quote_it(tmp_path, line):
    # issue: salt 1.10 and 1.1 both became '1.1', tenant 010 and 8 both '8', yes became 'True'
    with pytest.raises(ConfigError, match=r"expected a string.*quote it"):
        load_yaml(tmp_path, line + "\n")


def test_quoted_namespace_fields_stay_distinct(tmp_path):
    a = load_yaml(tmp_path, 'salt: "1.10"\ntenant: "010"\n')
    b = load_yaml(tmp_path, 'salt: "1.1"\ntenant: "8"\n')
    assert (a.salt, a.tenant) == ("1.10", "010") and (b.salt, b.tenant) == ("1.1", "8")
    assert Config.load(env={"LMCACHE_SALT": "1.10"}).salt == "1.10"  # the environment holds strings


@pytest.mark.parametrize("raw", [{"chunk_size": 1.9}, {"chunk_size": 256.0}, {"writer_threads": 2.5},
                                 {"chunk_size": "1.9"}, {"chunk_size": True}])
def test_integer_keys_reject_floats(raw):
    # issue: chunk_size 1.9 became 1
    with pytest.raises(ConfigError, match="expected an integer"):
        Config.from_dict(raw)
    assert Config.from_dict({"chunk_size": " 128 "}).chunk_size == 128


def test_metrics_port_above_65535_is_an_error_at_load():
    # issue: metrics_port 99999 passed the config, then failed at start with OverflowError
    with pytest.raises(ConfigError, match="metrics_port: must be <= 65535, got 99999"):
        Config.from_dict({"metrics_port": 99999})
    assert Config.from_dict({"metrics_port": 65535}).metrics_port == 65535


@pytest.mark.parametrize("key", ["tenant", "salt", "model"])
def test_a_lone_surrogate_is_an_error_at_load(key):
    # issue: raised UnicodeEncodeError at the first lookup
    with pytest.raises(ConfigError, match=f"{key}: .* is not valid text"):
        Config.from_dict({key: "team-\udc80"})
    with pytest.raises(ConfigError, match="not valid text"):
        Config.load(env={f"LMCACHE_{key.upper()}": "a\ud800b"})


@pytest.mark.parametrize("name, hint", [("LMCACHE_CHUNKSIZE", "LMCACHE_CHUNK_SIZE"),
                                        ("LMCACHE_chunk_size", "LMCACHE_CHUNK_SIZE"),
                                        ("LMCACHE_Tenant", "LMCACHE_TENANT"),
                                        ("LMCACHE_TENANTS", "LMCACHE_TENANT"),
                                        ("LMCACHE_CHUNK_SISE", "LMCACHE_CHUNK_SIZE")])
def test_env_typos_warn_naming_the_closest_key(caplog, name, hint):
    with caplog.at_level(logging.WARNING, logger="lmcache_core.config"):
        cfg = Config.load(env={name: "128"})
    assert cfg == Config.load(env={})  # ignored, not guessed
    assert f"{name} is not an lmcache config key" in caplog.text and f"did you mean {hint}?" in caplog.text


def test_unrelated_lmcache_variables_do_not_warn(caplog):
    env = {"LMCACHE_PLUGINS": "cuda", "LMCACHE_BLOCK_PLUGINS": "x", "LMCACHE_KV_STORE_MODE": "direct",
           "LMCACHE_REQUIRE_SERVERS": "1", "LMCACHE_UNRELATED_THING": "x", "LMCACHE_CHUNK_SIZE": "128"}
    with caplog.at_level(logging.WARNING, logger="lmcache_core.config"):
        assert Config.load(env=env).chunk_size == 128
    assert caplog.text == ""


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'tenant' appears twice \(lines 1 and 3\); keep one"):
        load_yaml(tmp_path, "tenant: a\nchunk_size: 128\ntenant: b\n")
    cfg = load_yaml(tmp_path, "tiers:\n  - memory://\n  - memory://\n")
    assert cfg.tiers == ("memory://", "memory://")  # a list may repeat; only mapping keys may not


def test_integrity_key_errors_never_show_the_secret(tmp_path):
    secret = "s3cr3t-s3cr3t-s3cr3t"
    with pytest.raises(ConfigError, match="both set"):
        Config.from_dict({"integrity_key": secret, "integrity_key_file": str(tmp_path / "k")})
    with pytest.raises(ConfigError, match="at least 16 bytes, got 5") as err:
        Config.from_dict({"integrity_key": "short"})
    assert "short" not in str(err.value)
    with pytest.raises(ConfigError, match="expected a string, got <redacted>") as err:
        Config.from_dict({"integrity_key": 12345678901234567890})
    assert "1234567890" not in str(err.value)
    with pytest.raises(ConfigError, match="cannot be read"):
        Config.from_dict({"integrity_key_file": str(tmp_path / "missing")})
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match="holds 3 bytes"):
        Config.from_dict({"integrity_key_file": str(tmp_path / "short")})
    cfg = Config.from_dict({"integrity_key": secret})
    assert secret not in repr(cfg) and cfg.to_dict()["integrity_key"] == "<redacted>"
    assert cfg.replace(chunk_size=128).integrity_secret() == secret.encode()
    with pytest.raises(ConfigError, match="redacted placeholder"):
        Config.from_dict(cfg.to_dict())
    assert chunkmod.integrity_keyed()


@pytest.mark.parametrize("url, match", [("redis://:99999", "port 99999 is out of range"),
                                        ("redis://[::1", "no closing"),
                                        ("redis://h?timeout=0", "option timeout must be seconds greater than 0"),
                                        ("memory://?capacity=0", "option capacity must be at least 1 byte"),
                                        ("disk:///tmp/a#b", "starts a URL fragment")])
def test_a_malformed_tier_url_is_an_error_at_load_from_every_source(tmp_path, url, match):
    # the checks every store shares run at load, naming the key; see tests/test_tier_urls.py
    with pytest.raises(ConfigError, match=rf"^tiers: {re.escape(url)}: .*{match}"):
        load_yaml(tmp_path, f"tiers: ['{url}']\n")
    with pytest.raises(ConfigError, match=match):
        Config.load(env={"LMCACHE_TIERS": f"memory://,{url}"})
    with pytest.raises(ConfigError, match=match):
        Config.load(overrides={"tiers": [url]}, env={})
