"""Where a daemon listens: ``daemon:///run/lmcache.sock`` (Unix socket) or ``daemon+tcp://host:port``."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

from ..errors import ConfigError

DEFAULT_SOCKET = "/tmp/lmcache-core.sock"


@dataclass(frozen=True)
class Address:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"daemon://{self.path}" if self.kind == "unix" else f"daemon+tcp://{self.host}:{self.port}"


def parse_address(value: str) -> Address:
    """Parse a daemon address; an absolute path alone is a Unix socket."""
    text = str(value).strip()
    if text.startswith("/"):
        return Address("unix", os.path.normpath(text))
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("daemon", "unix"):
        path = urllib.parse.unquote(parts.path)
        if parts.netloc or not path.startswith("/"):
            raise ConfigError(f"daemon: {value!r} needs an absolute socket path after the scheme, e.g. "
                              "daemon:///run/lmcache/lmcache.sock (three slashes)")
        return Address("unix", os.path.normpath(path))
    if scheme in ("daemon+tcp", "tcp"):
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ConfigError(f"daemon: {value!r} has a bad port ({exc}); write daemon+tcp://host:port") from None
        if not host or not port:
            raise ConfigError(f"daemon: {value!r} needs a host and a port, e.g. daemon+tcp://127.0.0.1:7070")
        return Address("tcp", host=host, port=port)
    raise ConfigError(f"daemon: {value!r} is not a daemon address; write daemon:///path/to/socket or "
                      "daemon+tcp://host:port")
