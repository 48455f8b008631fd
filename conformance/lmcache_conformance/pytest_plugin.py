"""The pytest plugin (entry point ``pytest11``): plugin selection, target fixtures, the xfail file.

Options choose the plugins under test (``--lmcache-device``, ``--lmcache-storage``,
``--lmcache-transport``; default: every registered one). Contract classes ask for
``lmcache_device``, ``lmcache_storage``, ``lmcache_chunk_store`` or
``lmcache_transport``; each is parametrised here with one :class:`Target` per
selected plugin. A vendor's own test file that subclasses a contract class and
overrides ``device``/``store_url``/``transport`` never asks for them, so nothing
is parametrised there. The plugin does nothing for tests that are not contract
tests, so it is safe to have installed in any project.

Every contract test gets a stable id, ``kind/plugin/contract/test[params]``,
used by the report and matched by ``--lmcache-xfail-file`` entries.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import register_assertion_rewrite

# Before any contract module is imported (collection imports them), so their asserts show values.
register_assertion_rewrite()

from .targets import Target  # noqa: E402

logger = logging.getLogger(__name__)

TARGET_PARAMS = {"lmcache_device": "device", "lmcache_storage": "storage", "lmcache_transport": "transport"}
_BUILTIN_CHUNK_STORES = ("memory", "disk")


@dataclass
class Selection:
    """The resolved targets of one session (built on first use; loading plugins costs imports)."""

    devices: list[Target]
    storage: list[Target]
    transports: list[Target]
    chunk_stores: list[Target]


@dataclass(frozen=True)
class XfailEntry:
    pattern: str
    reason: str
    line: int

    def matches(self, cid: str) -> bool:
        rx = "^" + ".*".join(re.escape(p) for p in self.pattern.split("*")) + "$"
        return re.match(rx, cid) is not None


@dataclass
class XfailState:
    path: str
    entries: list[XfailEntry]
    matched: dict[str, list[str]] = field(default_factory=dict)  # pattern -> cids

    def unmatched(self) -> list[XfailEntry]:
        return [e for e in self.entries if not self.matched.get(e.pattern)]


def parse_xfail_file(path: str | Path) -> list[XfailEntry]:
    """Lines ``PATTERN  # reason``; ``*`` matches any text; blank and ``#`` lines are ignored."""
    entries = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        text, _, reason = line.partition("#")
        text = text.strip()
        if not text:
            continue
        entries.append(XfailEntry(text, reason.strip() or "known failure (xfail file)", i))
    return entries


_SELECTION = pytest.StashKey[Selection]()
_XFAIL = pytest.StashKey[XfailState]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("lmcache-conformance", "lmcache conformance suite")
    g.addoption("--lmcache-device", action="append", default=[], metavar="NAME",
                help="device plugin to test (repeatable); default: every registered device")
    g.addoption("--lmcache-storage", action="append", default=[], metavar="URL",
                help="storage URL to test (repeatable); default: every registered store the suite can build")
    g.addoption("--lmcache-transport", action="append", default=[], metavar="NAME",
                help="transport plugin to test (repeatable); default: every registered transport")
    g.addoption("--lmcache-xfail-file", default=None, metavar="FILE",
                help="known failures, one test-id pattern per line ('*' wildcards, '# reason')")


def pytest_configure(config: pytest.Config) -> None:
    for contract in ("chunk", "pipelining", "zero_copy", "storage", "transport"):
        config.addinivalue_line("markers", f"lmcache_{contract}: a test of the lmcache {contract} contract")
    path = config.getoption("--lmcache-xfail-file", None)
    if path:
        config.stash[_XFAIL] = XfailState(str(path), parse_xfail_file(path))


def selection(config: pytest.Config) -> Selection:
    """The targets chosen by the options, resolved once per session."""
    if _SELECTION not in config.stash:
        from lmcache_core.plugins import get_plugin_manager

        from .targets import device_targets, storage_targets, transport_targets

        pm = get_plugin_manager()
        urls = config.getoption("--lmcache-storage") or None
        storage = storage_targets(pm, urls)
        builtin = storage_targets(pm, None)
        chunk = [t for t in builtin if t.name in _BUILTIN_CHUNK_STORES and not (t.skip or t.error)]
        for t in storage if urls else builtin:
            if not (t.skip or t.error) and t.name not in {c.name for c in chunk}:
                chunk.append(t)
        config.stash[_SELECTION] = Selection(
            device_targets(pm, config.getoption("--lmcache-device") or None),
            storage,
            transport_targets(pm, config.getoption("--lmcache-transport") or None),
            chunk,
        )
    return config.stash[_SELECTION]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    wanted = [n for n in ("lmcache_device", "lmcache_storage", "lmcache_transport", "lmcache_chunk_store")
              if n in names]
    if not wanted:
        return
    sel = selection(metafunc.config)
    pools = {"lmcache_device": sel.devices, "lmcache_storage": sel.storage,
             "lmcache_transport": sel.transports, "lmcache_chunk_store": sel.chunk_stores}
    for name in wanted:
        targets = pools[name]
        metafunc.parametrize(name, targets, ids=[t.id for t in targets], scope="function")


@pytest.fixture
def lmcache_device(request: pytest.FixtureRequest) -> Target:
    """The device under test (a :class:`Target`); parametrised by this plugin."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def lmcache_storage(request: pytest.FixtureRequest) -> Target:
    """The store under test (a :class:`Target` with its URL); parametrised by this plugin."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def lmcache_chunk_store(request: pytest.FixtureRequest) -> Target:
    """A store a device round trip goes through; parametrised over the built-ins and the selection."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def lmcache_transport(request: pytest.FixtureRequest) -> Target:
    """The transport under test (a :class:`Target`); parametrised by this plugin."""
    return request.param  # type: ignore[no-any-return]


def contract_id(item: pytest.Item) -> dict[str, Any] | None:
    """``{"id", "kind", "plugin", "contract", "test", "params"}`` for a contract test, else None."""
    from .device_tests import ContractTests

    cls = getattr(item, "cls", None)
    if cls is None or not issubclass(cls, ContractTests) or not cls.contract:
        return None
    callspec = getattr(item, "callspec", None)
    params: dict[str, Any] = dict(callspec.params) if callspec is not None else {}
    plugin = cls.__name__
    for pname in TARGET_PARAMS:
        if pname in params:
            plugin = params.pop(pname).name
    rest = [v.name if isinstance(v, Target) else str(v) for v in params.values()]
    name = getattr(item, "originalname", item.name)
    test = f"{name}[{'-'.join(rest)}]" if rest else name
    cid = f"{cls.kind}/{plugin}/{cls.contract}/{test}"
    return {"id": cid, "kind": cls.kind, "plugin": plugin, "contract": cls.contract, "test": test,
            "params": rest}


@pytest.hookimpl(tryfirst=True)  # before -m/-k deselection sees the contract markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    xf = config.stash.get(_XFAIL, None)
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    unrunnable: set[tuple[str, str, str]] = set()
    for item in items:
        info = contract_id(item)
        if info is None:
            kept.append(item)
            continue
        if _target_skip(item):
            # A plugin that cannot run here is reported once per contract, not once per test
            # (a skip, or a failure for a plugin that was named and cannot load).
            group = (info["kind"], info["plugin"], info["contract"])
            if group in unrunnable:
                dropped.append(item)
                continue
            unrunnable.add(group)
        kept.append(item)
        item.user_properties.append(("lmcache", info))
        item.add_marker(getattr(pytest.mark, "lmcache_" + info["contract"].replace("-", "_")))
        if xf is None:
            continue
        for entry in xf.entries:
            if entry.matches(info["id"]):
                xf.matched.setdefault(entry.pattern, []).append(info["id"])
                item.add_marker(pytest.mark.xfail(reason=f"xfail file line {entry.line}: {entry.reason}",
                                                  strict=False))
                break
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _target_skip(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return ""
    for name in TARGET_PARAMS:
        target = callspec.params.get(name)
        if isinstance(target, Target) and (target.error or target.skip):
            return target.error or target.skip
    return ""


def xfail_state(config: pytest.Config) -> XfailState | None:
    return config.stash.get(_XFAIL, None)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    xf = config.stash.get(_XFAIL, None)
    if xf is None:
        return
    for e in xf.unmatched():
        terminalreporter.write_line(f"lmcache xfail file {xf.path}:{e.line}: entry {e.pattern!r} matched no test",
                                    yellow=True)


__all__ = ["Selection", "XfailEntry", "XfailState", "contract_id", "parse_xfail_file", "selection",
           "xfail_state"]
