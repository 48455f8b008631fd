"""What the suite runs over: registered devices, storage URLs and transports, resolved once.

A target is a value (frozen dataclass) naming one plugin under test, where it
came from (distribution, version) and, when it cannot run here, why: a device
whose ``detect()`` says unavailable, a plugin whose dependency is missing, a
store the user gave no URL for. Tests over an unrunnable target skip with that
reason, so the report shows every registered plugin, run or not.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

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

    @property
    def id(self) -> str:
        return self.name

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "plugin": self.plugin,
                               "distribution": self.distribution, "version": self.version,
                               "runnable": not self.skip, "reason": self.skip}
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


def _load(reg: Registration) -> tuple[Any | None, str]:
    try:
        return reg.load(), ""
    except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, never fatal to the run
        return None, f"{type(exc).__name__}: {exc}"


def _select(pm: PluginManager, kind: str, names: Sequence[str] | None,
            out: list[Target]) -> Iterator[tuple[str, Registration]]:
    """The registrations named (or every one of ``kind``); a name nobody registered becomes a
    skipped target in ``out`` that lists what is registered."""
    regs = pm.registrations(kind)
    for name in sorted(regs) if not names else list(names):
        reg = regs.get(name)
        if reg is None:
            known = ", ".join(sorted(regs)) or "none"
            out.append(Target(kind, name, skip=f"no {kind} named {name!r} is registered (registered: {known})"))
            continue
        yield name, reg


def device_targets(pm: PluginManager, names: Sequence[str] | None) -> list[Target]:
    """Devices named (or every registered one), each with its detection result."""
    out = []
    for name, reg in _select(pm, "device", names, out):
        base: dict[str, Any] = dict(plugin=reg.plugin, distribution=reg.distribution,
                                    version=_version(reg.distribution))
        cls, err = _load(reg)
        if cls is None:
            out.append(Target("device", name, skip=err, **base))
            continue
        try:
            det = cls.detect()
        except Exception as exc:  # noqa: BLE001 - detect() must not raise; report that it did
            out.append(Target("device", name, skip=f"detect() raised {type(exc).__name__}: {exc}", **base))
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
                out.append(Target("storage", _unique(scheme, seen), url=url, skip=str(exc)))
                continue
            cls, err = _load(reg)
            out.append(Target("storage", _unique(reg.name, seen), reg.plugin, reg.distribution,
                              _version(reg.distribution), url, err, _store_details(cls)))
        return out
    for name, reg in sorted(pm.registrations("storage").items()):
        cls, err = _load(reg)
        default = default_url(name, cls)
        skip = err
        if not skip and default is None:
            skip = (f"needs a server: pass --storage {reg.schemes[0]}://HOST:PORT/... "
                    f"(the store declares no conformance_url)")
        out.append(Target("storage", _unique(name, seen), reg.plugin, reg.distribution,
                          _version(reg.distribution), default, skip, _store_details(cls)))
    return out


def transport_targets(pm: PluginManager, names: Sequence[str] | None) -> list[Target]:
    out: list[Target] = []
    for name, reg in _select(pm, "transport", names, out):
        cls, err = _load(reg)
        details = {"capabilities": dict(vars(cls.capabilities))} if cls is not None else {}
        out.append(Target("transport", name, reg.plugin, reg.distribution, _version(reg.distribution),
                          skip=err, details=details))
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
