"""Plugin manager: entry points from real (temporary) distributions on sys.path."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmcache_core.errors import DuplicatePluginError, MissingDependencyError
from lmcache_core.plugins import PluginManager

GOOD = """
from lmcache_core import hookimpl

@hookimpl
def lmcache_register_storage(register):
    register("{name}", "{module}:Store", schemes=({schemes}), extra="{extra}", requires=({requires}))
"""


def make_dist(root: Path, dist: str, ep_name: str, module: str, body: str) -> None:
    """A minimal installed distribution: dist-info with an `lmcache` entry point, plus its module."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[lmcache]\n{ep_name} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(body))


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LMCACHE_PLUGINS", raising=False)
    monkeypatch.delenv("LMCACHE_BLOCK_PLUGINS", raising=False)
    return tmp_path


def test_builtins_load_through_the_entry_point_group(site):
    pm = PluginManager()
    info = pm.plugins["builtin"]
    assert info.builtin and info.distribution == "lmcache-core" and info.status == "loaded"
    assert {"lmcache_register_devices", "lmcache_register_storage", "lmcache_register_transports"} <= set(info.hooks)
    assert pm.storage_for_scheme("disk").name == "disk"
    assert pm.get("device", "cpu").distribution == "lmcache-core"


def test_broken_plugin_is_listed_and_others_survive(site):
    make_dist(site, "lmcache-storage-broken", "broken", "lmc_broken", "raise RuntimeError('boom at import')\n")
    make_dist(site, "lmcache-storage-fine", "fine", "lmc_fine",
              GOOD.format(name="fine", module="lmc_fine", schemes="'fine',", extra="fine", requires=""))
    pm = PluginManager()
    assert pm.plugins["broken"].status == "broken"
    assert "boom at import" in pm.plugins["broken"].reason
    assert pm.plugins["fine"].status == "loaded"
    assert pm.storage_for_scheme("fine").distribution == "lmcache-storage-fine"
    assert [p.name for p in pm.broken()] == ["broken"]


def test_duplicate_name_names_both_distributions(site):
    for dist, ep, mod in (("lmcache-storage-one", "one", "lmc_one"), ("lmcache-storage-two", "two", "lmc_two")):
        make_dist(site, dist, ep, mod, GOOD.format(name="same", module=mod, schemes=f"'{ep}',", extra="x",
                                                    requires=""))
    pm = PluginManager()  # listed and refused where used, not an error for every command
    with pytest.raises(DuplicatePluginError) as err:
        pm.get("storage", "same")
    assert "lmcache-storage-one" in str(err.value) and "lmcache-storage-two" in str(err.value)
    assert [(c.kind, c.name) for c in pm.collisions] == [("storage", "same")]
    # blocking one of them resolves it
    pm = PluginManager(block="two")
    assert pm.plugins["two"].status == "blocked"
    assert pm.get("storage", "same").distribution == "lmcache-storage-one"


def test_duplicate_scheme_is_refused(site):
    make_dist(site, "lmcache-storage-a", "a", "lmc_a", GOOD.format(name="a", module="lmc_a", schemes="'disk',",
                                                                    extra="x", requires=""))
    with pytest.raises(DuplicatePluginError, match=r"disk:// .*lmcache-core.*lmcache-storage-a"):
        PluginManager().storage_for_scheme("disk")


def test_allow_list_limits_third_party_not_builtins(site, monkeypatch):
    make_dist(site, "lmcache-storage-fine", "fine", "lmc_fine",
              GOOD.format(name="fine", module="lmc_fine", schemes="'fine',", extra="fine", requires=""))
    monkeypatch.setenv("LMCACHE_PLUGINS", "cuda,redis")
    pm = PluginManager()
    assert pm.plugins["fine"].status == "not-allowed"
    assert pm.plugins["builtin"].status == "loaded"
    assert "fine" not in pm.registrations("storage")
    monkeypatch.setenv("LMCACHE_BLOCK_PLUGINS", "builtin")
    assert PluginManager().plugins["builtin"].status == "blocked"


def test_missing_dependency_names_the_extra(site):
    make_dist(site, "lmcache-storage-needy", "needy", "lmc_needy",
              GOOD.format(name="needy", module="lmc_needy", schemes="'needy',", extra="needy",
                          requires="'a_module_that_is_not_installed',"))
    pm = PluginManager()
    reg = pm.storage_for_scheme("needy")
    with pytest.raises(MissingDependencyError) as err:
        reg.load()
    assert 'install it with: pip install "lmcache-core[needy]"' in str(err.value)
    assert "a_module_that_is_not_installed" in str(err.value)


def test_cli_plugins_json_lists_builtins_with_distribution_and_hooks():
    out = subprocess.run([sys.executable, "-m", "lmcache_core.cli", "plugins", "--json"], capture_output=True,
                         text=True, check=True).stdout
    data = {p["name"]: p for p in json.loads(out)}
    b = data["builtin"]
    assert b["distribution"] == "lmcache-core" and b["builtin"] is True
    assert "lmcache_register_storage" in b["hooks"]
    regs = {(r["kind"], r["name"]) for r in b["registrations"]}
    assert {("device", "cpu"), ("storage", "memory"), ("storage", "disk"), ("transport", "local")} <= regs


def test_cli_config_errors_exit_2_with_the_message():
    proc = subprocess.run([sys.executable, "-m", "lmcache_core.cli", "config", "show", "--set", "chunk_size=abc"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "chunk_size: expected an integer, got 'abc'" in proc.stderr


def test_local_transport_round_trip_and_failure():
    import torch

    from lmcache_core.builtin.local_transport import LocalTransport
    from lmcache_core.errors import LMCacheError

    a, b = LocalTransport("a"), LocalTransport("b")
    src = torch.arange(4096, dtype=torch.uint8)
    dst = torch.zeros(4096, dtype=torch.uint8)
    ds, dd = a.register(memoryview(src.numpy())), b.register(memoryview(dst.numpy()))
    assert a.poll(a.write(ds, dd))
    assert torch.equal(src, dst)
    b.deregister(dd)
    with pytest.raises(LMCacheError, match="not registered"):
        a.write(ds, dd)
