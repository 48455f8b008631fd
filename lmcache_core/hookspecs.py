"""Hook specifications: the four registration hooks every plugin may implement.

Each hook receives a ``register`` callback, so one plugin can contribute several
devices, storage schemes, transports or codecs. Registrations name a factory by import
path (``"package.module:Class"``); it is imported only when the plugin is chosen,
so a plugin whose dependencies are absent still lists, detects and explains
itself. See ``docs/plugins.md`` for a worked example.
"""

from __future__ import annotations

from typing import Protocol

import pluggy

PROJECT = "lmcache"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegisterDevice(Protocol):
    def __call__(
        self,
        name: str,
        factory: str,
        *,
        extra: str | None = None,
        requires: tuple[str, ...] = (),
        description: str = "",
    ) -> None: ...


class RegisterStorage(Protocol):
    def __call__(
        self,
        name: str,
        factory: str,
        *,
        schemes: tuple[str, ...],
        extra: str | None = None,
        requires: tuple[str, ...] = (),
        description: str = "",
    ) -> None: ...


class RegisterTransport(Protocol):
    def __call__(
        self,
        name: str,
        factory: str,
        *,
        extra: str | None = None,
        requires: tuple[str, ...] = (),
        description: str = "",
    ) -> None: ...


class RegisterCodec(Protocol):
    def __call__(
        self,
        name: str,
        factory: str,
        *,
        wire_id: str,
        extra: str | None = None,
        requires: tuple[str, ...] = (),
        description: str = "",
    ) -> None: ...


@hookspec
def lmcache_register_devices(register: RegisterDevice) -> None:
    """Register device implementations (accelerators or host CPUs).

    Purpose: make a device class selectable by ``device: NAME`` in the config
    and by ``device: auto`` when its ``detect()`` reports the hardware present.

    :param register: call ``register(name, "pkg.module:Class", extra=...,
        requires=(...), description=...)`` once per device. ``Class`` subclasses
        :class:`lmcache_core.device.Device`. ``requires`` lists the modules the
        class imports; when one is missing the user is told to install
        ``lmcache-core[extra]``.

    Return value: ignored. All implementations are called (not firstresult).
    """


@hookspec
def lmcache_register_storage(register: RegisterStorage) -> None:
    """Register storage backends (cache tiers) by URL scheme.

    Purpose: make ``scheme://...`` usable in the ``tiers`` list of the config.

    :param register: call ``register(name, "pkg.module:Class",
        schemes=("redis", "rediss"), extra=..., requires=(...),
        description=...)`` once per backend. ``Class`` subclasses
        :class:`lmcache_core.storage.Store` and is built with
        ``Class.from_url(url, context)``.

    Return value: ignored. All implementations are called (not firstresult).
    """


@hookspec
def lmcache_register_transports(register: RegisterTransport) -> None:
    """Register transports that move registered buffers between processes or nodes.

    Purpose: make a transport selectable by name (daemon mode, peer-to-peer
    sharing, NIXL).

    :param register: call ``register(name, "pkg.module:Class", extra=...,
        requires=(...), description=...)`` once per transport. ``Class``
        subclasses :class:`lmcache_core.transport.Transport`.

    Return value: ignored. All implementations are called (not firstresult).
    """


@hookspec
def lmcache_register_codecs(register: RegisterCodec) -> None:
    """Register KV codecs (compression, quantisation, encryption of stored chunks).

    Purpose: make ``codec=NAME`` usable on a tier URL (``disk:///x?codec=NAME``,
    chains joined by ``+``).

    :param register: call ``register(name, "pkg.module:Class", wire_id="name/1",
        extra=..., requires=(...), description=...)`` once per codec. ``Class``
        subclasses :class:`lmcache_core.codecs.Codec` and declares the same
        ``name`` and ``wire_id``; the wire id is what chunk headers record, so a
        new stored format is a new wire id.

    Return value: ignored. All implementations are called (not firstresult).
    """
