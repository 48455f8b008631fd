"""The plugin manager: entry points, built-ins, allow/block lists, registries.

Every plugin, built-in or third-party, is an object in the ``lmcache`` entry
point group implementing the hooks of :mod:`lmcache_core.hookspecs`. Built-ins
live in the distribution ``lmcache-core`` and are loaded through the same group,
so ``lmcache plugins`` lists and ``LMCACHE_BLOCK_PLUGINS`` blocks them alike.
"""

from __future__ import annotations

import importlib
import importlib.util
import importlib.metadata as md
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pluggy

from . import hookspecs
from .errors import DuplicatePluginError, MissingDependencyError, PluginError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lmcache"
CORE_DISTRIBUTION = "lmcache-core"
KINDS = ("device", "storage", "transport")


@dataclass(frozen=True)
class Registration:
    """One named factory contributed by a plugin."""

    kind: str  # "device" | "storage" | "transport"
    name: str
    factory: str  # "package.module:Attr"
    plugin: str  # entry-point name of the contributing plugin
    distribution: str
    extra: str | None = None
    requires: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    description: str = ""

    def install_hint(self) -> str:
        if self.extra:
            return f'pip install "lmcache-core[{self.extra}]"'
        return f"pip install {self.distribution}"

    def missing_modules(self) -> list[str]:
        """Modules from ``requires`` that cannot be found, without importing them."""
        missing = []
        for mod in self.requires:
            try:
                if importlib.util.find_spec(mod) is None:
                    missing.append(mod)
            except (ImportError, ValueError):
                missing.append(mod)
        return missing

    def load(self) -> Any:
        """Import and return the factory; a missing dependency names the extra to install."""
        missing = self.missing_modules()
        if missing:
            raise MissingDependencyError(
                f"{self.kind} {self.name!r} (from {self.distribution}) needs "
                f"{', '.join(missing)}; install it with: {self.install_hint()}"
            )
        module_name, _, attr = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise MissingDependencyError(
                f"{self.kind} {self.name!r} (from {self.distribution}) could not import "
                f"{exc.name or module_name!r}: {exc}; install it with: {self.install_hint()}"
            ) from exc
        obj: Any = module
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
        return obj


@dataclass
class PluginInfo:
    """What ``lmcache plugins`` shows about one entry point."""

    name: str
    distribution: str
    version: str
    status: str  # "loaded" | "broken" | "blocked" | "not-allowed"
    hooks: list[str] = field(default_factory=list)
    registrations: list[Registration] = field(default_factory=list)
    reason: str = ""
    builtin: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "status": self.status,
            "reason": self.reason,
            "hooks": self.hooks,
            "registrations": [
                {
                    "kind": r.kind,
                    "name": r.name,
                    "factory": r.factory,
                    "schemes": list(r.schemes),
                    "extra": r.extra,
                    "requires": list(r.requires),
                    "available": not r.missing_modules(),
                    "description": r.description,
                }
                for r in self.registrations
            ],
        }


def _split_names(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {v.strip() for v in value.split(",") if v.strip()}
    return {v.strip() for v in value if v.strip()}


class PluginManager:
    """Loads plugins and holds the device, storage and transport registries.

    ``allow`` limits third-party plugins to the named entry points (built-ins
    always load unless blocked); ``block`` excludes any plugin, built-in or not.
    Both default to ``LMCACHE_PLUGINS`` and ``LMCACHE_BLOCK_PLUGINS``.
    """

    def __init__(
        self,
        allow: str | Iterable[str] | None = None,
        block: str | Iterable[str] | None = None,
        *,
        entry_points: Iterable[md.EntryPoint] | None = None,
        load_entry_points: bool = True,
    ) -> None:
        self.allow = _split_names(allow if allow is not None else os.environ.get("LMCACHE_PLUGINS"))
        self.block = _split_names(block if block is not None else os.environ.get("LMCACHE_BLOCK_PLUGINS")) or set()
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._registry: dict[str, dict[str, Registration]] = {k: {} for k in KINDS}
        self._schemes: dict[str, Registration] = {}
        if load_entry_points:
            eps = entry_points if entry_points is not None else md.entry_points(group=ENTRY_POINT_GROUP)
            for ep in sorted(eps, key=lambda e: e.name):
                self._load_entry_point(ep)

    # -- loading -----------------------------------------------------------------
    def _load_entry_point(self, ep: md.EntryPoint) -> None:
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "unknown"
        version = dist.version if dist is not None else "?"
        builtin = dist_name == CORE_DISTRIBUTION
        info = PluginInfo(ep.name, dist_name, version, "loaded", builtin=builtin)
        self.plugins[ep.name] = info
        if ep.name in self.block:
            info.status, info.reason = "blocked", "named in LMCACHE_BLOCK_PLUGINS"
            logger.debug("plugin %s blocked", ep.name)
            return
        if not builtin and self.allow is not None and ep.name not in self.allow:
            info.status, info.reason = "not-allowed", "not named in LMCACHE_PLUGINS"
            logger.debug("plugin %s not in allow-list %s", ep.name, sorted(self.allow))
            return
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            info.status, info.reason = "broken", f"{type(exc).__name__}: {exc}"
            logger.warning("plugin %s from %s failed to load: %s", ep.name, dist_name, info.reason)
            return
        self.register_plugin(module, ep.name, dist_name, info=info)

    def register_plugin(
        self, module: object, name: str, distribution: str, *, info: PluginInfo | None = None
    ) -> None:
        """Register a plugin object directly (tests, embedding, built-in fallback)."""
        if info is None:
            info = PluginInfo(name, distribution, "?", "loaded")
            self.plugins[name] = info
        try:
            self._pm.register(module, name=name)
        except ValueError as exc:
            raise PluginError(f"plugin {name!r} from {distribution} is registered twice: {exc}") from exc
        info.hooks = sorted(
            h.name for h in self._pm.get_hookcallers(module) or [] if h.name.startswith("lmcache_")
        )
        for kind in KINDS:
            hook = getattr(self._pm.hook, f"lmcache_register_{'storage' if kind == 'storage' else kind + 's'}")
            impls = [i for i in hook.get_hookimpls() if i.plugin is module]
            for impl in impls:
                try:
                    impl.function(register=self._make_register(kind, name, distribution, info))
                except DuplicatePluginError:
                    raise
                except Exception as exc:
                    info.status, info.reason = "broken", f"{type(exc).__name__}: {exc}"
                    logger.warning("plugin %s from %s failed to register: %s", name, distribution, info.reason)

    def _make_register(self, kind: str, plugin: str, distribution: str, info: PluginInfo) -> Callable[..., None]:
        def register(
            name: str,
            factory: str,
            *,
            schemes: tuple[str, ...] = (),
            extra: str | None = None,
            requires: tuple[str, ...] = (),
            description: str = "",
        ) -> None:
            if kind == "storage" and not schemes:
                raise PluginError(f"storage {name!r} from {distribution} registered no URL schemes")
            reg = Registration(
                kind, name, factory, plugin, distribution, extra, tuple(requires), tuple(schemes), description
            )
            with _LOCK:
                existing = self._registry[kind].get(name)
                if existing is not None:
                    raise DuplicatePluginError(
                        f"{kind} {name!r} is registered by both {existing.distribution} "
                        f"(plugin {existing.plugin!r}) and {distribution} (plugin {plugin!r}); "
                        f"uninstall one or block it with LMCACHE_BLOCK_PLUGINS={plugin}"
                    )
                for scheme in reg.schemes:
                    other = self._schemes.get(scheme)
                    if other is not None:
                        raise DuplicatePluginError(
                            f"storage scheme {scheme!r}:// is registered by both {other.distribution} "
                            f"(plugin {other.plugin!r}) and {distribution} (plugin {plugin!r}); "
                            f"uninstall one or block it with LMCACHE_BLOCK_PLUGINS={plugin}"
                        )
                self._registry[kind][name] = reg
                for scheme in reg.schemes:
                    self._schemes[scheme] = reg
                info.registrations.append(reg)

        return register

    # -- queries -------------------------------------------------------------------
    def registrations(self, kind: str) -> dict[str, Registration]:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return dict(self._registry[kind])

    def get(self, kind: str, name: str) -> Registration:
        try:
            return self._registry[kind][name]
        except KeyError:
            known = ", ".join(sorted(self._registry[kind])) or "none"
            raise PluginError(
                f"no {kind} named {name!r} is registered (registered: {known}); "
                f"install its plugin or check `lmcache plugins`"
            ) from None

    def storage_for_scheme(self, scheme: str) -> Registration:
        try:
            return self._schemes[scheme]
        except KeyError:
            known = ", ".join(f"{s}://" for s in sorted(self._schemes)) or "none"
            hint = _SCHEME_EXTRAS.get(scheme)
            fix = f'; install it with: pip install "lmcache-core[{hint}]"' if hint else ""
            raise PluginError(f"no storage plugin handles {scheme}:// (registered: {known}){fix}") from None

    def broken(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.status == "broken"]


# Schemes that a known extra provides, so an unregistered scheme can name its fix.
_SCHEME_EXTRAS = {
    "redis": "redis", "rediss": "redis", "redis+cluster": "redis", "unix": "redis",
    "valkey": "valkey", "valkeys": "valkey", "valkey+cluster": "valkey",
    "s3": "s3",
}

_LOCK = threading.RLock()
_DEFAULT: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, built on first use from the environment."""
    global _DEFAULT
    with _LOCK:
        if _DEFAULT is None:
            _DEFAULT = PluginManager()
            if "builtin" not in _DEFAULT.plugins:
                # Running from a source tree without `pip install -e .`: the entry
                # point is absent, so register the built-ins the same way by hand.
                from . import builtin

                _DEFAULT.plugins["builtin"] = PluginInfo(
                    "builtin", CORE_DISTRIBUTION, _core_version(), "loaded", builtin=True
                )
                _DEFAULT.register_plugin(builtin, "builtin", CORE_DISTRIBUTION, info=_DEFAULT.plugins["builtin"])
        return _DEFAULT


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests; after changing LMCACHE_PLUGINS)."""
    global _DEFAULT
    with _LOCK:
        _DEFAULT = None


def _core_version() -> str:
    try:
        return md.version(CORE_DISTRIBUTION)
    except md.PackageNotFoundError:
        return "0+source"
