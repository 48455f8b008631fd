"""The daemon's own settings: the ``serve:`` section of the config file, then CLI flags.

::

    tiers: ["memory://?capacity=8GiB", "disk:///var/cache/lmcache?capacity=200GiB"]
    serve:
      socket: /run/lmcache/lmcache.sock
      http: 127.0.0.1:8089
      tenants:
        - {name: team-a, token_sha256: 9f86d0..., memory: 4GiB}
        - {name: team-b, token_sha256: 60303a..., memory: 2GiB, ttl_s: 3600}
      admin_token_sha256: 2c26b4...

Tokens are stored only as SHA-256 hex digests (``lmcache serve --hash-token`` prints one).
Without ``tenants`` there is one tenant, ``default``, that needs no token: the socket's file
permissions are then the only access control.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


from ..config import _read_yaml, parse_size
from ..errors import ConfigError
from .address import DEFAULT_SOCKET

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TenantSettings:
    name: str
    token_sha256: str = ""  # empty: no token needed (only for a lone default tenant)
    memory: int = 0  # memory-tier bytes of this tenant (its arena is larger by the in-flight headroom)
    ttl_s: float = 0.0  # chunks older than this leave every tier; 0: no expiry


@dataclass(frozen=True)
class ServeSettings:
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    tcp: str = ""  # host:port for clients in another network namespace (needs arena_dir)
    http: str = ""  # host:port of the admin API; empty disables it
    arena_dir: str = ""  # back arenas with files here (e.g. /dev/shm) instead of memfds
    memory: int = 2 << 30  # default memory tier per tenant
    headroom: float = 0.25  # arena bytes beyond the memory tier, for stores and loads in flight
    lease_s: float = 60.0  # a client silent this long loses its pins and slots
    populate: bool = True  # touch the arenas' pages at start (clients then page-lock them fast)
    admin_token_sha256: str = ""
    audit_log: str = ""  # JSON lines; empty: the log only
    tenants: tuple[TenantSettings, ...] = field(default_factory=lambda: (TenantSettings("default"),))

    def tenant_for_token(self, token: str) -> TenantSettings | None:
        import hmac

        digest = hash_token(token) if token else ""
        for t in self.tenants:
            if not t.token_sha256:
                if len(self.tenants) == 1:
                    return t
                continue
            if digest and hmac.compare_digest(digest, t.token_sha256):
                return t
        return None

    def is_admin(self, token: str) -> bool:
        import hmac

        return bool(token and self.admin_token_sha256
                    and hmac.compare_digest(hash_token(token), self.admin_token_sha256))


def _tenant(raw: Any, default_memory: int) -> TenantSettings:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"serve.tenants: each tenant is a mapping with name and token_sha256, got {raw!r}")
    unknown = set(raw) - {"name", "token_sha256", "memory", "ttl_s"}
    if unknown:
        raise ConfigError(f"serve.tenants: unknown key(s) {sorted(unknown)}; allowed: name, token_sha256, "
                          "memory, ttl_s")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"serve.tenants: name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    digest = str(raw.get("token_sha256", "")).lower()
    if digest and not _HEX64.match(digest):
        raise ConfigError(f"serve.tenants[{name}]: token_sha256 must be 64 hex digits (the SHA-256 of the "
                          "token: `lmcache serve --hash-token TOKEN`), never the token itself")
    memory = parse_size(raw["memory"], key=f"serve.tenants[{name}].memory") if "memory" in raw else default_memory
    ttl = raw.get("ttl_s", 0)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl < 0:
        raise ConfigError(f"serve.tenants[{name}].ttl_s must be seconds >= 0, got {ttl!r}")
    return TenantSettings(name, digest, memory, float(ttl))


def load_settings(path: str | os.PathLike[str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> ServeSettings:
    raw: dict[str, Any] = {}
    if path:
        section = _read_yaml(Path(path)).get("serve") or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"serve: must be a mapping in {str(path)!r}")
        raw.update(section)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = set(ServeSettings.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"serve: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(known))}")
    memory = parse_size(raw.get("memory", ServeSettings.memory), key="serve.memory")
    # a tenant without its own memory size takes the memory tier's capacity (tiers), else serve.memory
    explicit = memory if "memory" in raw else 0
    tenants_raw = raw.get("tenants")
    if tenants_raw is None:
        tenants: tuple[TenantSettings, ...] = (TenantSettings("default", memory=explicit),)
    else:
        if not isinstance(tenants_raw, list) or not tenants_raw:
            raise ConfigError("serve.tenants: a non-empty list of {name, token_sha256, memory}")
        tenants = tuple(_tenant(t, explicit) for t in tenants_raw)
        names = [t.name for t in tenants]
        if len(set(names)) != len(names):
            raise ConfigError(f"serve.tenants: duplicate tenant names in {names}")
        if len(tenants) > 1 and any(not t.token_sha256 for t in tenants):
            raise ConfigError("serve.tenants: with several tenants every tenant needs a token_sha256 (a client's "
                              "tenant comes from its token)")
        digests = [t.token_sha256 for t in tenants if t.token_sha256]
        if len(set(digests)) != len(digests):
            raise ConfigError("serve.tenants: two tenants share a token")
    mode = raw.get("socket_mode", ServeSettings.socket_mode)
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            raise ConfigError(f"serve.socket_mode: {mode!r} is not an octal mode like 0660") from None
    admin = str(raw.get("admin_token_sha256", "")).lower()
    if admin and not _HEX64.match(admin):
        raise ConfigError("serve.admin_token_sha256 must be 64 hex digits (`lmcache serve --hash-token TOKEN`)")
    settings = ServeSettings(
        socket=str(raw.get("socket", DEFAULT_SOCKET)), socket_mode=int(mode), tcp=str(raw.get("tcp", "")),
        http=str(raw.get("http", "")), arena_dir=str(raw.get("arena_dir", "")), memory=memory,
        headroom=float(raw.get("headroom", ServeSettings.headroom)),
        lease_s=float(raw.get("lease_s", ServeSettings.lease_s)), admin_token_sha256=admin,
        audit_log=str(raw.get("audit_log", "")), populate=bool(raw.get("populate", True)), tenants=tenants)
    if settings.tcp and not settings.arena_dir:
        raise ConfigError("serve.tcp: TCP clients cannot receive the arena's memfd; set serve.arena_dir to a "
                          "shared-memory directory both sides mount (e.g. /dev/shm)")
    for hostport, name in ((settings.tcp, "tcp"), (settings.http, "http")):
        if hostport and not re.match(r"^[^:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$", hostport):
            raise ConfigError(f"serve.{name}: {hostport!r} must be host:port, e.g. 127.0.0.1:8089")
    if not 0 < settings.lease_s < 86400:
        raise ConfigError(f"serve.lease_s must be between 0 and 86400 seconds, got {settings.lease_s}")
    if not 0.05 <= settings.headroom <= 4:
        raise ConfigError(f"serve.headroom must be between 0.05 and 4, got {settings.headroom}")
    return settings


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


__all__ = ["ServeSettings", "TenantSettings", "hash_token", "load_settings", "split_hostport"]
