"""Meta-test: every hook in ``hookspecs.py`` is documented in docs/ and exercised by tests.

A hook nobody documents is a hook vendors guess at; a hook no test drives is
one that can break unseen. For each hook specification this checks that

- docs/plugins.md has a section for it (the name in a heading or a code span)
  and the guide names its ``register`` callback's keyword arguments;
- at least one loaded plugin implements it, so the conformance suite, which
  runs over every registration, exercises it;
- a test outside this file implements or calls it by name (a test plugin, a
  plugin-manager test), so it is exercised even without extra plugins installed.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from lmcache_core import hookspecs
from lmcache_core.plugins import get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
TEST_DIRS = ("tests", "conformance", "devices", "storage_plugins", "backends", "kernels", "examples")


def hook_names() -> list[str]:
    marker = f"{hookspecs.PROJECT}_spec"
    names = [n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, marker)]
    assert names, "no hook specifications found in lmcache_core.hookspecs"
    return sorted(names)


def register_keywords(name: str) -> set[str]:
    """Keyword arguments of the hook's ``register`` callback protocol (e.g. schemes, extra)."""
    fn = getattr(hookspecs, name)
    proto = inspect.get_annotations(fn, eval_str=True)["register"]
    params = inspect.signature(proto.__call__).parameters
    return {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}


def test_every_hook_is_a_spec() -> None:
    assert set(hook_names()) >= {"lmcache_register_devices", "lmcache_register_storage",
                                 "lmcache_register_transports"}


@pytest.mark.parametrize("name", hook_names())
def test_hook_is_documented(name: str) -> None:
    guide = ROOT / "docs" / "plugins.md"
    assert guide.is_file(), "docs/plugins.md (the plugin author's guide) is missing"
    text = guide.read_text()
    heading = re.search(rf"^#+ .*`?{name}`?", text, flags=re.MULTILINE)
    assert heading, f"docs/plugins.md has no heading for {name}"
    for kw in register_keywords(name):
        assert f"{kw}=" in text or f"`{kw}`" in text, f"docs/plugins.md never explains register(..., {kw}=...)"
    assert getattr(hookspecs, name).__doc__, f"{name} has no docstring in hookspecs.py"


@pytest.mark.parametrize("name", hook_names())
def test_hook_is_implemented_by_a_loaded_plugin(name: str) -> None:
    pm = get_plugin_manager()
    implementers = [p.name for p in pm.plugins.values() if p.status == "loaded" and name in p.hooks]
    assert implementers, f"no loaded plugin implements {name}; the conformance suite cannot exercise it"


@pytest.mark.parametrize("name", hook_names())
def test_hook_is_exercised_by_a_test(name: str) -> None:
    me = Path(__file__).resolve()
    hits = []
    for d in TEST_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            if path.resolve() == me or ".venv" in path.parts:
                continue
            in_tests = "tests" in path.parts or path.name.startswith("test_") or "testing_plugins" in path.parts
            if in_tests and name in path.read_text(errors="ignore"):
                hits.append(str(path.relative_to(ROOT)))
    assert hits, f"no test or test plugin implements or calls {name}"
