"""Upstream LMCache configs: each key recognised with the key of ours that replaces it, and
`convert` (behind `lmcache config import`) giving a config that loads and keeps the same caches."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from lmcache_core.config import Config
from lmcache_core.errors import ConfigError
from lmcache_core.upstream_config import UPSTREAM_KEYS, convert, hint, render

ROOT = Path(__file__).resolve().parents[1]

# As upstream's examples write it (lmcache/v1/config.py keys; sizes in GiB).
UPSTREAM_YAML = """
chunk_size: 256
local_cpu: true
max_local_cpu_size: 5.0
local_disk: "file:///var/cache/lmcache-up/"
max_local_disk_size: 20
remote_url: "redis://cache.internal:6379"
remote_serde: "naive"
save_unfull_chunk: false
use_layerwise: true
enable_blending: false
"""


def test_upstream_yaml_converts_to_a_config_that_loads() -> None:
    out = convert(yaml.safe_load(UPSTREAM_YAML))
    cfg = Config.from_dict(out.config)
    assert cfg.chunk_size == 256
    assert cfg.tiers == ("memory://?capacity=5GiB", "disk:///var/cache/lmcache-up?capacity=20GiB",
                         "redis://cache.internal:6379")
    assert cfg.save_partial is False
    assert any(d.startswith("use_layerwise:") for d in out.dropped)
    assert any(d.startswith("enable_blending:") for d in out.dropped)
    text = render(out, "up.yaml")
    assert Config.from_dict(yaml.safe_load(text)).tiers == cfg.tiers  # comments + YAML round-trip
    assert "Not carried over" in text and "use_layerwise" in text


@pytest.mark.parametrize("raw, tiers", [
    ({}, ["memory://?capacity=5GiB"]),  # upstream's defaults: local_cpu true, 5 GiB
    ({"max_local_cpu_size": 0.5}, ["memory://?capacity=512MiB"]),
    ({"local_cpu": False, "remote_url": "valkey://v:6379"}, ["valkey://v:6379"]),
    ({"local_disk": "/mnt/nvme/", "max_local_disk_size": 0}, ["memory://?capacity=5GiB"]),
    ({"remote_url": "lm://localhost:65432"}, ["memory://?capacity=5GiB"]),
])
def test_tiers_from_upstream_storage_keys(raw: dict, tiers: list[str]) -> None:
    out = convert(raw)
    assert out.config["tiers"] == tiers
    Config.from_dict(out.config)


@pytest.mark.parametrize("raw, match", [
    ({"local_cpu": False}, "keeps no cache"),
    ({"local_disk": "relative/dir", "max_local_disk_size": 1}, "not an absolute path"),
    ({"max_local_cpu_size": "lots"}, "max_local_cpu_size: expected a number of GiB"),
    ({"max_local_cpu_size": -1}, "finite number of GiB >= 0"),
    ({"tiers": ["memory://"], "local_disk": "/x"}, "both tiers"),
    ({"chunk_sise": 256}, "neither an upstream LMCache key nor an lmcache-core key"),
])
def test_conversion_errors_name_the_key(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        convert(raw)


def test_upstream_key_in_our_config_names_our_key() -> None:
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"chunk_size": 256, "max_local_cpu_size": 5, "save_unfull_chunk": True})
    msg = str(err.value)
    assert "'max_local_cpu_size' is an upstream LMCache key; use tiers" in msg
    assert "'save_unfull_chunk' is an upstream LMCache key; use save_partial" in msg
    assert "lmcache config import FILE" in msg
    with pytest.raises(ConfigError, match="'enable_pd' is an upstream LMCache key with no lmcache-core equivalent"):
        Config.from_dict({"enable_pd": True})
    with pytest.raises(ConfigError, match="unknown config key 'chunk_sise'"):  # not upstream: the old message
        Config.from_dict({"chunk_sise": 4})


def test_upstream_env_variable_is_ignored_with_a_warning_naming_our_key(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lmcache_core.config"):
        cfg = Config.load(env={"LMCACHE_MAX_LOCAL_CPU_SIZE": "40", "LMCACHE_CHUNK_SIZE": "512"})
    assert cfg.chunk_size == 512  # the same key in both projects
    assert "LMCACHE_MAX_LOCAL_CPU_SIZE is ignored" in caplog.text and "use tiers" in caplog.text


def test_same_key_has_no_hint_and_every_hint_names_a_key_of_ours() -> None:
    assert hint("chunk_size") is None and hint("tiers") is None
    ours = set(Config.__dataclass_fields__)
    assert all(k.ours in ours for k in UPSTREAM_KEYS.values() if k.ours)


def test_docs_table_lists_every_mapped_upstream_key() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.M))
    mapped = {k.name for k in UPSTREAM_KEYS.values() if k.ours or k.how != "no equivalent in lmcache-core"}
    assert mapped <= rows, f"docs/configuration.md lacks upstream keys {sorted(mapped - rows)}"
