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
import traceback
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import pluggy

from . import hookspecs
from .errors import ConfigError, DuplicatePluginError, MissingDependencyError, PluginError

if TYPE_CHECKING:
    from .device import Device
    from .storage import Store, StoreContext

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lmcache"
CORE_DISTRIBUTION = "lmcache-core"
KINDS = ("device", "storage", "transport", "codec")


class PluginImportError(PluginError):
    """A plugin's own code failed to import (a bug in the plugin, not a missing package)."""


@dataclass(frozen=True)
class Registration:
    """One named factory contributed by a plugin."""

    kind: str  # "device" | "storage" | "transport" | "codec"
    name: str
    factory: str  # "package.module:Attr"
    plugin: str  # entry-point name of the contributing plugin
    distribution: str
    extra: str | None = None
    requires: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    description: str = ""

    conflict: str = ""  # set when another plugin registered the same name or scheme: load() refuses
    wire_id: str = ""  # codecs: what chunk headers record

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
        """Import and return the factory.

        A package that is not installed (a ``requires`` module, or a module the
        factory imports that cannot be found) is a :class:`MissingDependencyError`
        naming what to install; any other failure of the plugin's own code (an
        ImportError inside it, a SyntaxError, a missing attribute) is a
        :class:`PluginImportError` with the real error and where it happened,
        and no install hint. A name two plugins registered is refused.
        """
        if self.conflict:
            raise DuplicatePluginError(self.conflict)
        missing = self.missing_modules()
        what = f"{self.kind} {self.name!r} (from {self.distribution})"
        if missing:
            raise MissingDependencyError(
                f"{what} needs {', '.join(missing)}; install it with: {self.install_hint()}"
            )
        module_name, _, attr = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            absent = _absent_module(exc)
            if absent is not None and not _same_package(absent, module_name):
                raise MissingDependencyError(f"{what} imports {absent!r}, which is not installed; {self._dep_hint()}") \
                    from exc
            if absent is not None and not _distribution_installed(self.distribution):
                raise MissingDependencyError(
                    f"{what}: {module_name!r} is not installed; install it with: {self.install_hint()}"
                ) from exc
            raise PluginImportError(f"{what} failed to import {module_name}: {_describe(exc)}") from exc
        except Exception as exc:  # SyntaxError, NameError, RuntimeError at import time: the plugin's bug
            raise PluginImportError(f"{what} failed to import {module_name}: {_describe(exc)}") from exc
        obj: Any = module
        for part in attr.split(".") if attr else ():
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise PluginImportError(
                    f"{what}: module {module_name} has no attribute {attr!r} (the factory it registered)"
                ) from None
        return obj

    def problem(self) -> str:
        """Why :meth:`load` fails ("" when the factory imports); imports the factory module."""
        try:
            self.load()
        except Exception as exc:  # noqa: BLE001 - reported, never raised: listing must not crash
            return str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
        return ""

    def _dep_hint(self) -> str:
        if self.extra:
            return f"install it with: {self.install_hint()}"
        return f"install the package that provides it (a dependency of {self.distribution})"


def _absent_module(exc: ImportError) -> str | None:
    """The module an ImportError is about when that module cannot be found at all, else None
    (an ImportError of a module that exists is a bug inside it, not a missing package)."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name:
        return None
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        found = None
    return name if found is None else None


def _same_package(module: str, factory_module: str) -> bool:
    top = factory_module.split(".")[0]
    return module == top or module.startswith(top + ".") or factory_module.startswith(module + ".") \
        or module == factory_module


def _distribution_installed(dist: str) -> bool:
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        return False
    return True


def _describe(exc: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame, so the real error is visible."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError):
        return text  # its message already names the file and line
    frames = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in frames if "importlib" not in f.filename]
    if frames:
        text += f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return text


@dataclass(frozen=True)
class Collision:
    """Two or more plugins registered one name (``kind`` device/storage/transport) or one
    storage URL scheme (``kind`` "scheme"); every use of it is refused with :attr:`message`."""

    kind: str
    name: str
    registrations: tuple[Registration, ...]

    @property
    def message(self) -> str:
        what = f"storage scheme {self.name}://" if self.kind == "scheme" else f"{self.kind} {self.name!r}"
        regs = sorted(self.registrations, key=lambda r: r.distribution != CORE_DISTRIBUTION)  # built-in first
        who = " and ".join(f"{r.distribution} (plugin {r.plugin!r})" for r in regs)
        third = [r for r in self.registrations if r.distribution != CORE_DISTRIBUTION]
        if len(third) == 1:
            fix = (f"uninstall {third[0].distribution} or block it with "
                   f"LMCACHE_BLOCK_PLUGINS={third[0].plugin}")
        else:
            fix = "uninstall one of them or block one with " + " or ".join(
                f"LMCACHE_BLOCK_PLUGINS={r.plugin}" for r in third)
        both = "both" if len(self.registrations) == 2 else "each of"
        return f"{what} is registered by {both} {who}; {fix}"


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
    module: str = ""  # the entry point's value (what it imports)

    def to_json(self, problems: dict[Registration, str] | None = None) -> dict[str, Any]:
        """The plugin as JSON. ``problems`` (registration -> why it cannot be used, from
        :meth:`PluginManager.problems`) sets each registration's ``available`` and ``problem``;
        without it only ``requires`` is checked, nothing is imported."""
        out = []
        for r in self.registrations:
            problem = problems.get(r, "") if problems is not None else (
                "" if not r.missing_modules() else
                f"needs {', '.join(r.missing_modules())}; install it with: {r.install_hint()}")
            out.append({
                "kind": r.kind,
                "name": r.name,
                "factory": r.factory,
                "schemes": list(r.schemes),
                "extra": r.extra,
                "requires": list(r.requires),
                "available": not problem,
                "problem": problem,
                "description": r.description,
            })
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "status": self.status,
            "reason": self.reason,
            "module": self.module,
            "hooks": self.hooks,
            "registrations": out,
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
        self._collisions: dict[tuple[str, str], Collision] = {}
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
        info = PluginInfo(ep.name, dist_name, version, "loaded", builtin=builtin, module=ep.value)
        other = self.plugins.get(ep.name)
        if other is not None:
            # Two distributions with one entry-point name: keep the first, list the second as broken.
            self.plugins[f"{ep.name} ({dist_name})"] = info
            info.status = "broken"
            info.reason = (f"entry point name {ep.name!r} is also used by {other.distribution}; "
                           f"uninstall one of them (LMCACHE_BLOCK_PLUGINS={ep.name} would block both)")
            logger.warning("plugin %s from %s not loaded: %s", ep.name, dist_name, info.reason)
            return
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
            info.status, info.reason = "broken", _describe(exc)
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
                except Exception as exc:
                    info.status, info.reason = "broken", _describe(exc)
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
            wire_id: str = "",
        ) -> None:
            if kind == "storage" and not schemes:
                raise PluginError(f"storage {name!r} from {distribution} registered no URL schemes")
            if kind == "codec" and not wire_id:
                raise PluginError(f"codec {name!r} from {distribution} registered no wire_id")
            reg = Registration(
                kind, name, factory, plugin, distribution, extra, tuple(requires), tuple(schemes), description,
                wire_id=wire_id,
            )
            with _LOCK:
                info.registrations.append(reg)
                existing = self._registry[kind].get(name)
                if existing is None:
                    self._registry[kind][name] = reg
                else:
                    self._registry[kind][name] = self._collide(kind, name, existing, reg)
                for scheme in reg.schemes:
                    other = self._schemes.get(scheme)
                    self._schemes[scheme] = reg if other is None else self._collide("scheme", scheme, other, reg)

        return register

    def _collide(self, kind: str, name: str, existing: Registration, new: Registration) -> Registration:
        """Record a second registration of one name or scheme; the entry becomes a refusal.

        Nothing is raised here: the collision is listed by ``lmcache plugins`` and refused
        where the name is used, so an engine that never uses it is not affected."""
        prev = self._collisions.get((kind, name))
        regs = (*(prev.registrations if prev else (replace(existing, conflict=""),)), new)
        col = Collision(kind, name, regs)
        self._collisions[(kind, name)] = col
        logger.warning("%s", col.message)
        return replace(existing, conflict=col.message)

    # -- queries -------------------------------------------------------------------
    @property
    def collisions(self) -> list[Collision]:
        """Names and schemes that several plugins registered (each refused where used)."""
        return list(self._collisions.values())

    def registrations(self, kind: str) -> dict[str, Registration]:
        """Every registration of ``kind``; one whose name collided has ``conflict`` set and
        refuses to load."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return dict(self._registry[kind])

    def get(self, kind: str, name: str) -> Registration:
        reg = self._registry[kind].get(name)
        if reg is None:
            known = ", ".join(sorted(self._registry[kind])) or "none"
            raise PluginError(
                f"no {kind} named {name!r} is registered (registered: {known}); "
                f"install its plugin or check `lmcache plugins`{self._not_loaded_note(name)}"
            )
        if reg.conflict:
            raise DuplicatePluginError(reg.conflict)
        return reg

    def storage_for_scheme(self, scheme: str) -> Registration:
        reg = self._schemes.get(scheme)
        if reg is None:
            known = ", ".join(f"{s}://" for s in sorted(self._schemes)) or "none"
            hint = _SCHEME_EXTRAS.get(scheme)
            fix = f'; install it with: pip install "lmcache-core[{hint}]"' if hint else ""
            raise PluginError(f"no storage plugin handles {scheme}:// (registered: {known}){fix}"
                              f"{self._not_loaded_note(scheme)}")
        if reg.conflict:
            raise DuplicatePluginError(reg.conflict)
        return reg

    def broken(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.status == "broken"]

    def suspects(self, name: str) -> list[PluginInfo]:
        """Plugins that did not load (broken, blocked, not allowed) and may be the one that
        provides ``name``: those whose entry point, distribution or module mentions it, else
        every broken plugin (a broken plugin registered nothing, so any name may be its)."""
        def norm(text: str) -> str:
            return text.lower().replace("-", "_").replace(".", "_")

        down = [p for p in self.plugins.values() if p.status != "loaded"]
        key = norm(name)
        named = [p for p in down if key and any(key in norm(t) for t in (p.name, p.distribution, p.module))]
        return named or [p for p in down if p.status == "broken"]

    def _not_loaded_note(self, name: str) -> str:
        sus = self.suspects(name)
        if not sus:
            return ""
        return "; plugins that did not load: " + "; ".join(
            f"{p.name} ({p.distribution} {p.version}) is {p.status}: {p.reason}" for p in sus)

    def problems(self) -> dict[Registration, str]:
        """Registration -> why it cannot be used ("" when its factory imports), for listings.

        Imports every factory module (what ``lmcache plugins`` shows is what a user would
        get); never raises."""
        out: dict[Registration, str] = {}
        for info in self.plugins.values():
            for reg in info.registrations:
                conflicts = [c.message for c in self._collisions.values() if reg in c.registrations]
                out[reg] = "; ".join(conflicts) if conflicts else reg.problem()
        return out


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


# -- resolving what the config names --------------------------------------------------------
def resolve_device(name: str, plugins: PluginManager, index: int = 0) -> Device:
    """``auto``: the one accelerator present, else a host device other than cpu, else cpu.
    ``index`` is the local device the engine's KV lives on (a worker's own GPU, never 0 by
    assumption); host devices ignore it."""
    regs = plugins.registrations("device")
    if name != "auto":
        cls = plugins.get("device", name).load()
        det = cls.detect()
        if not det.available:
            raise PluginError(f"device {name!r} is not available: {det.reason}")
        return cls(index) if cls.capabilities.accelerator else cls()
    accel: list[tuple[str, type[Device]]] = []
    host: list[tuple[str, type[Device]]] = []
    for reg_name, reg in sorted(regs.items()):
        if reg_name == "cpu":
            continue
        try:
            cls = reg.load()
            det = cls.detect()
        except MissingDependencyError as exc:
            logger.debug("device %s skipped: %s", reg_name, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - detection must never take the engine down
            # A broken or colliding plugin is the operator's to fix: say so, then go on without it.
            logger.warning("device plugin %s skipped by device: auto (%s: %s); see `lmcache plugins`",
                           reg_name, type(exc).__name__, exc)
            continue
        if not det.available:
            logger.debug("device %s not available: %s", reg_name, det.reason)
            continue
        if not getattr(cls, "auto_select", True):
            logger.debug("device %s is only used when named", reg_name)
            continue
        (accel if cls.capabilities.accelerator else host).append((reg_name, cls))
    if len(accel) > 1:
        names = ", ".join(n for n, _ in accel)
        raise PluginError(f"device: auto found several accelerators ({names}); set device to one of them")
    if accel:
        return accel[0][1](index)
    if len(host) == 1:
        return host[0][1]()
    return plugins.get("device", "cpu").load()()


def build_stores(urls: Sequence[str], plugins: PluginManager, context: StoreContext) -> list[Store]:
    from .codecs.registry import register_from_plugins, split_codec

    register_from_plugins(plugins)
    stores: list[Store] = []
    names: set[str] = set()
    for url in urls:
        scheme = url.split("://", 1)[0].lower()
        reg = plugins.storage_for_scheme(scheme)
        cls = reg.load()
        url, codec, codec_key_file = split_codec(url)  # the tier stack's business, not the store's
        try:
            store = cls.from_url(url, context)
            store.codec, store.codec_key_file = codec, codec_key_file
        except (ConfigError, PluginError):
            raise
        except Exception as exc:  # noqa: BLE001 - an unreachable remote tier must not stop the engine
            logger.warning("tier %s could not be created (%s: %s); running without it",
                           url, type(exc).__name__, exc)
            continue
        base, n = store.name, 2
        while store.name in names:
            store.name = f"{base}{n}"
            n += 1
        names.add(store.name)
        stores.append(store)
    if not stores:
        raise ConfigError(f"tiers: none of {list(urls)} could be created; see the log above")
    for store in stores:  # a tier that works with the others of its stack (p2p serves from memory)
        bind = getattr(store, "bind_tiers", None)
        if bind is not None:
            bind(stores)
    return stores
