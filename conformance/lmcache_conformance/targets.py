"""What the suite runs over: registered devices, storage URLs and transports, resolved once.

A target is a value (frozen dataclass) naming one plugin under test, where it
came from (distribution, version) and, when it cannot run here, why: a device
whose ``detect()`` says unavailable, a plugin whose dependency is missing, a
store the user gave no URL for. Tests over an unrunnable target skip with that
reason, so the report shows every registered plugin, run or not.

A run cannot pass by accident: a plugin or URL named on the command line that
cannot be resolved or loaded (not registered, its plugin broken or blocked, its
factory failing to import, a missing dependency) is an ``error`` target, and
its tests fail with the import error and the distribution the plugin came from.
So is a registered factory whose own code fails to import (a bug, not a missing
package) when every plugin is run.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from lmcache_core.errors import MissingDependencyError
from lmcache_core.plugins import PluginManager, Registration

from .capabilities import default_url

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One plugin under test. ``skip`` is the reason it cannot run here ("" when it can)."""

    kind: str  # "device" | "storage" | "transport"
    name: str  # registration name (device, transport) or store id (storage)
    plugin: str = ""  # registration name of the plugin that provides it
    distribution: str = ""
    version: str = ""
    url: str | None = None  # storage only: the URL template ({tmp} is filled per test)
    skip: str = ""
    details: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    error: str = ""  # why a target that must run cannot: its tests fail with this (non-zero exit)

    @property
    def id(self) -> str:
        return self.name

    def require(self, what: str = "") -> None:
        """Inside a test: fail with :attr:`error`, or skip with :attr:`skip` (prefixed with
        ``what``), when the target cannot run."""
        import pytest

        if self.error:
            who = f" ({self.distribution} {self.version})" if self.distribution else ""
            pytest.fail(f"{self.kind} {self.name!r}{who} cannot be used: {self.error}", pytrace=False)
        if self.skip:
            pytest.skip(f"{what}{self.skip}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "plugin": self.plugin,
                               "distribution": self.distribution, "version": self.version,
                               "runnable": not (self.skip or self.error), "reason": self.error or self.skip,
                               "error": self.error}
        if self.url is not None:
            out["url"] = redact(self.url)
        if self.details:
            out["details"] = self.details
        return out


_SECRET_OPTION = re.compile(r"secret|password|passwd|token|credential|private", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL without a password or secret query options, fit for a published report."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@")
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_OPTION.search(k) for k, _ in pairs):
            query = urllib.parse.urlencode([(k, "***" if _SECRET_OPTION.search(k) else v) for k, v in pairs],
                                           safe="*:/")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # untouched (urlunsplit would also drop the "//" of an empty host)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line arguments with every URL redacted."""
    return [redact(a) if "://" in a else a for a in argv]


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "?"


def _load(reg: Registration) -> tuple[Any | None, str, bool]:
    """(factory, why it cannot load, whether that is the plugin's own bug)."""
    try:
        return reg.load(), "", False
    except MissingDependencyError as exc:
        return None, f"{type(exc).__name__}: {exc}", False
    except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, never fatal to the run
        return None, f"{type(exc).__name__}: {exc}", True


def _unresolved(pm: PluginManager, kind: str, name: str, message: str) -> Target:
    """A named plugin nobody registered: an error target, credited to the plugin that most
    likely should have provided it (a broken or blocked one) so the report names its
    distribution; that plugin's own error comes first in the message."""
    sus = pm.suspects(name)
    base: dict[str, Any] = {}
    if len(sus) == 1:
        base = dict(plugin=sus[0].name, distribution=sus[0].distribution, version=sus[0].version)
    details = {"plugins_not_loaded": [{"plugin": p.name, "distribution": p.distribution, "version": p.version,
                                       "status": p.status, "reason": p.reason} for p in sus]} if sus else {}
    head = "; ".join(f"plugin {p.name!r} ({p.distribution} {p.version}) is {p.status}: {p.reason}" for p in sus)
    if head:
        message = f"{head}; {message.split('; plugins that did not load:')[0]}"
    return Target(kind, name, error=message, details=details, **base)


def _select(pm: PluginManager, kind: str, names: Sequence[str] | None,
            out: list[Target]) -> Iterator[tuple[str, Registration]]:
    """The registrations named (or every one of ``kind``); a name that does not resolve
    becomes an error target in ``out``."""
    regs = pm.registrations(kind)
    for name in sorted(regs) if not names else list(names):
        if name not in regs:
            try:
                pm.get(kind, name)
            except Exception as exc:  # noqa: BLE001 - the message says what is registered and what broke
                out.append(_unresolved(pm, kind, name, str(exc)))
            continue
        yield name, regs[name]


def _base(reg: Registration) -> dict[str, Any]:
    return dict(plugin=reg.plugin, distribution=reg.distribution, version=_version(reg.distribution))


def device_targets(pm: PluginManager, names: Sequence[str] | None) -> list[Target]:
    """Devices named (or every registered one), each with its detection result."""
    out = []
    for name, reg in _select(pm, "device", names, out):
        base = _base(reg)
        cls, err, bug = _load(reg)
        if cls is None:
            out.append(Target("device", name, error=err, **base) if names or bug else
                       Target("device", name, skip=err, **base))
            continue
        try:
            det = cls.detect()
        except Exception as exc:  # noqa: BLE001 - detect() must not raise; that it did is a failure
            out.append(Target("device", name, error=f"detect() raised {type(exc).__name__}: {exc}", **base))
            continue
        details = {"detection": {"available": det.available, "reason": det.reason, "count": det.count,
                                 "details": _jsonable(det.details)},
                   "capabilities": dict(vars(cls.capabilities))}
        skip = "" if det.available else f"detect(): unavailable: {det.reason or 'no reason given'}"
        out.append(Target("device", name, skip=skip, details=details, **base))
    return out


def storage_targets(pm: PluginManager, urls: Sequence[str] | None) -> list[Target]:
    """Stores for the URLs given, or one per registered store with a URL the suite can make."""
    out: list[Target] = []
    seen: dict[str, int] = {}
    if urls:
        for url in urls:
            scheme = url.split("://", 1)[0].lower()
            try:
                reg = pm.storage_for_scheme(scheme)
            except Exception as exc:  # noqa: BLE001
                t = _unresolved(pm, "storage", scheme, str(exc))
                out.append(Target("storage", _unique(scheme, seen), t.plugin, t.distribution, t.version, url,
                                  details=t.details, error=t.error))
                continue
            cls, err, _ = _load(reg)
            out.append(Target("storage", _unique(reg.name, seen), reg.plugin, reg.distribution,
                              _version(reg.distribution), url, details=_store_details(cls), error=err))
        return out
    for name, reg in sorted(pm.registrations("storage").items()):
        cls, err, bug = _load(reg)
        default = default_url(name, cls)
        skip = "" if bug else err
        if not err and default is None:
            skip = (f"needs a server: pass --storage {reg.schemes[0]}://HOST:PORT/... "
                    f"(the store declares no conformance_url)")
        out.append(Target("storage", _unique(name, seen), reg.plugin, reg.distribution,
                          _version(reg.distribution), default, skip, _store_details(cls),
                          error=err if bug else ""))
    return out


def transport_targets(pm: PluginManager, names: Sequence[str] | None) -> list[Target]:
    out: list[Target] = []
    for name, reg in _select(pm, "transport", names, out):
        cls, err, bug = _load(reg)
        details = {"capabilities": dict(vars(cls.capabilities))} if cls is not None else {}
        fail = bool(err) and (bool(names) or bug)
        out.append(Target("transport", name, reg.plugin, reg.distribution, _version(reg.distribution),
                          skip="" if fail else err, details=details, error=err if fail else ""))
    return out


def _store_details(cls: Any | None) -> dict[str, Any]:
    if cls is None:
        return {}
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "capabilities": dict(vars(cls.capabilities))}


def _unique(name: str, seen: dict[str, int]) -> str:
    seen[name] = seen.get(name, 0) + 1
    return name if seen[name] == 1 else f"{name}-{seen[name]}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


__all__ = ["Target", "device_targets", "redact", "redact_argv", "storage_targets", "transport_targets"]
