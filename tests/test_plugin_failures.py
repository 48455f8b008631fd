"""A broken plugin is reported for what it is, and never takes a listing command down.

Each case builds a throwaway distribution (a dist-info with an ``lmcache`` entry
point beside its module) in a temporary directory on ``sys.path``, or on
``PYTHONPATH`` for the CLI, which runs in a subprocess as a user would run it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmcache_core.errors import DuplicatePluginError, MissingDependencyError
from lmcache_core.plugins import PluginImportError, PluginManager

STORE = """
from lmcache_core import hookimpl

@hookimpl
def lmcache_register_storage(register):
    register("{name}", "{factory}", schemes=({schemes}), {kw})
"""

DEVICE = """
from lmcache_core import hookimpl

@hookimpl
def lmcache_register_devices(register):
    register("{name}", "{factory}")
"""


def make_dist(root: Path, dist: str, ep_name: str, module: str, body: str,
              files: dict[str, str] | None = None) -> None:
    """A minimal installed distribution: dist-info with an `lmcache` entry point, its plugin
    module, and any other module files (``files``: relative path -> source)."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[lmcache]\n{ep_name} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    for rel, text in (files or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def store_plugin(root: Path, factory_source: str, *, extra: str | None = None, dist: str = "acme-kvstore") -> None:
    kw = f'extra="{extra}"' if extra else ""
    make_dist(root, dist, "acme", "acme_plugin",
              STORE.format(name="acme", factory="acme_store:Store", schemes="'acme',", kw=kw),
              {"acme_store.py": factory_source})


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LMCACHE_PLUGINS", raising=False)
    monkeypatch.delenv("LMCACHE_BLOCK_PLUGINS", raising=False)
    for mod in ("acme_plugin", "acme_store", "bad_device_plugin", "bad_device"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    return tmp_path


def cli(args: list[str], site: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            "COLUMNS": "400", **env}
    for var in ("LMCACHE_PLUGINS", "LMCACHE_BLOCK_PLUGINS"):
        if var not in env:
            full.pop(var, None)
    return subprocess.run([sys.executable, "-m", "lmcache_core.cli", *args], capture_output=True, text=True,
                          env=full, timeout=300)


# -- an ImportError inside the factory module -------------------------------------------------
def test_import_error_inside_an_installed_factory_is_the_real_error_without_install_hint(site):
    store_plugin(site, "from json import no_such_name\nclass Store: ...\n")
    pm = PluginManager()
    reg = pm.storage_for_scheme("acme")
    with pytest.raises(PluginImportError) as err:
        reg.load()
    text = str(err.value)
    assert "cannot import name 'no_such_name' from 'json'" in text, text
    assert "acme-kvstore" in text and "acme_store.py:1" in text, text
    assert "install it with" not in text, text
    assert not isinstance(err.value, MissingDependencyError)


def test_missing_third_party_package_names_what_to_install(site):
    store_plugin(site, "import acme_client_that_is_not_installed\nclass Store: ...\n", extra="acme")
    with pytest.raises(MissingDependencyError) as err:
        PluginManager().storage_for_scheme("acme").load()
    assert "'acme_client_that_is_not_installed', which is not installed" in str(err.value)
    assert 'install it with: pip install "lmcache-core[acme]"' in str(err.value)


def test_missing_package_without_an_extra_does_not_tell_to_install_the_installed_plugin(site):
    store_plugin(site, "import acme_client_that_is_not_installed\nclass Store: ...\n")
    with pytest.raises(MissingDependencyError) as err:
        PluginManager().storage_for_scheme("acme").load()
    assert "pip install acme-kvstore" not in str(err.value)
    assert "a dependency of acme-kvstore" in str(err.value)


def test_factory_naming_a_missing_attribute_is_a_plugin_error(site):
    store_plugin(site, "class Other: ...\n")
    with pytest.raises(PluginImportError, match=r"has no attribute 'Store'"):
        PluginManager().storage_for_scheme("acme").load()


def test_plugins_command_shows_the_import_error_not_available(site):
    store_plugin(site, "from json import no_such_name\nclass Store: ...\n")
    proc = cli(["plugins", "--json"], site)
    assert proc.returncode == 0, proc.stderr
    acme = {p["name"]: p for p in json.loads(proc.stdout)}["acme"]
    reg = acme["registrations"][0]
    assert reg["available"] is False and "cannot import name 'no_such_name'" in reg["problem"]
    assert "install it with" not in reg["problem"]
    table = cli(["plugins"], site)
    assert table.returncode == 0 and "cannot import name 'no_such_name'" in table.stdout, table.stdout


def test_plugins_table_prints_extras_literally():
    """`lmcache-core[ascend]` is text, not rich markup (which would print `lmcache-core`)."""
    from rich.markup import escape

    assert escape('pip install "lmcache-core[ascend]"') != 'pip install "lmcache-core[ascend]"'
    proc = subprocess.run([sys.executable, "-m", "lmcache_core.cli", "plugins"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if "torch_npu" in proc.stdout:  # the ascend plugin is installed here and its dependency is not
        assert 'pip install "lmcache-core[ascend]"' in proc.stdout, proc.stdout


# -- a SyntaxError in a device module -----------------------------------------------------------
def test_syntax_error_in_a_device_module_never_crashes_a_listing(site):
    make_dist(site, "lmcache-device-bad", "bad_device", "bad_device_plugin",
              DEVICE.format(name="bad", factory="bad_device:BadDevice"),
              {"bad_device.py": "class BadDevice(:\n    pass\n"})
    with pytest.raises(PluginImportError, match="SyntaxError"):
        PluginManager().get("device", "bad").load()
    devices = cli(["devices", "--json"], site)
    assert devices.returncode == 0, devices.stderr
    assert "Traceback" not in devices.stderr
    row = {r["device"]: r for r in json.loads(devices.stdout)}["bad"]
    assert row["available"] is False and "SyntaxError" in row["reason"] and "bad_device.py" in row["reason"]
    assert row["distribution"] == "lmcache-device-bad"
    for args in (["plugins"], ["plugins", "--json"]):
        proc = cli(args, site)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "SyntaxError" in proc.stdout


def test_syntax_error_in_a_plugin_module_is_listed_as_broken(site):
    make_dist(site, "lmcache-device-bad", "bad_device", "bad_device_plugin", "def (:\n")
    pm = PluginManager()
    assert pm.plugins["bad_device"].status == "broken"
    assert "SyntaxError" in pm.plugins["bad_device"].reason
    proc = cli(["devices"], site)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_detect_that_raises_is_a_row_not_a_crash(site):
    make_dist(site, "lmcache-device-bad", "bad_device", "bad_device_plugin",
              DEVICE.format(name="bad", factory="bad_device:BadDevice"),
              {"bad_device.py": "class BadDevice:\n    @classmethod\n    def detect(cls):\n"
                                "        raise RuntimeError('probe exploded')\n"})
    proc = cli(["devices", "--json"], site)
    assert proc.returncode == 0, proc.stderr
    row = {r["device"]: r for r in json.loads(proc.stdout)}["bad"]
    assert row["reason"] == "detect() raised RuntimeError: probe exploded"


# -- two plugins registering one name or scheme -------------------------------------------------
def test_duplicate_scheme_is_listed_and_refused_only_where_used(site):
    make_dist(site, "lmcache-storage-a", "a", "lmc_dup_a",
              STORE.format(name="a", factory="lmc_dup_a:Store", schemes="'disk',", kw=""))
    pm = PluginManager()  # no error: engines that do not use disk:// are unaffected
    assert pm.storage_for_scheme("memory").distribution == "lmcache-core"
    assert pm.get("device", "cpu").load().__name__
    with pytest.raises(DuplicatePluginError) as err:
        pm.storage_for_scheme("disk")
    text = str(err.value)
    assert "storage scheme disk:// is registered by both lmcache-core (plugin 'builtin') and " \
           "lmcache-storage-a (plugin 'a')" in text, text
    assert "LMCACHE_BLOCK_PLUGINS=a" in text and "LMCACHE_BLOCK_PLUGINS=builtin" not in text
    assert "'disk'://" not in text
    assert [c.name for c in pm.collisions] == ["disk"]
    # the store named "disk" still resolves by name, but its URL scheme is refused
    assert pm.registrations("storage")["disk"].distribution == "lmcache-core"


def test_duplicate_name_between_two_third_party_plugins_suggests_blocking_either(site):
    for dist, ep, mod in (("lmcache-storage-one", "one", "lmc_dup_one"), ("lmcache-storage-two", "two", "lmc_dup_two")):
        make_dist(site, dist, ep, mod, STORE.format(name="same", factory=f"{mod}:Store", schemes=f"'{ep}',", kw=""))
    pm = PluginManager()
    with pytest.raises(DuplicatePluginError) as err:
        pm.get("storage", "same")
    assert "LMCACHE_BLOCK_PLUGINS=one or LMCACHE_BLOCK_PLUGINS=two" in str(err.value)
    with pytest.raises(DuplicatePluginError):
        pm.registrations("storage")["same"].load()  # the registry entry itself refuses, too
    assert pm.storage_for_scheme("one").name == "same"  # each scheme is still one plugin's


def test_cache_engine_without_the_collided_scheme_starts(site):
    from lmcache_core import CacheEngine, ChunkGeometry, Config
    from lmcache_core import plugins as plugins_mod

    make_dist(site, "lmcache-storage-a", "a", "lmc_dup_a",
              STORE.format(name="a", factory="lmc_dup_a:Store", schemes="'disk',", kw=""))
    plugins_mod.reset_plugin_manager()
    try:
        cfg = Config.from_dict({"tiers": ["memory://?capacity=64MiB"], "device": "cpu", "chunk_size": 16})
        eng = CacheEngine(ChunkGeometry(num_layers=1, num_heads=1, head_dim=8, dtype="float16"), cfg, model="m")
        eng.close()
        bad = Config.from_dict({"tiers": ["memory://?capacity=64MiB", f"disk://{site}/d"], "device": "cpu",
                                "chunk_size": 16})
        with pytest.raises(DuplicatePluginError, match="disk://"):
            CacheEngine(ChunkGeometry(num_layers=1, num_heads=1, head_dim=8, dtype="float16"), bad, model="m")
    finally:
        plugins_mod.reset_plugin_manager()


def test_plugins_command_reports_the_collision(site):
    make_dist(site, "lmcache-storage-a", "a", "lmc_dup_a",
              STORE.format(name="a", factory="lmc_dup_a:Store", schemes="'disk',", kw=""))
    proc = cli(["plugins", "--json"], site)
    assert proc.returncode == 0, proc.stderr
    data = {p["name"]: p for p in json.loads(proc.stdout)}
    reg = data["a"]["registrations"][0]
    assert reg["available"] is False and "disk:// is registered by both" in reg["problem"]
    disk = next(r for r in data["builtin"]["registrations"] if r["name"] == "disk")
    assert "disk:// is registered by both" in disk["problem"]
    assert "error: storage scheme disk:// is registered by both" in proc.stderr
    table = cli(["plugins"], site)
    assert table.returncode == 0 and "conflict:" in table.stdout, table.stdout
    assert cli(["devices"], site).returncode == 0


def test_two_distributions_with_one_entry_point_name_do_not_crash(site):
    for dist, mod in (("lmcache-storage-x1", "lmc_x1"), ("lmcache-storage-x2", "lmc_x2")):
        make_dist(site, dist, "samename", mod, STORE.format(name=mod, factory=f"{mod}:Store",
                                                             schemes=f"'{mod}',", kw=""))
    pm = PluginManager()
    broken = [p for p in pm.plugins.values() if p.status == "broken"]
    assert len(broken) == 1 and "entry point name 'samename' is also used by" in broken[0].reason
