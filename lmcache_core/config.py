"""One typed, validated configuration from defaults, a YAML file, ``LMCACHE_*`` env and a dict.

Precedence, lowest first: defaults, the YAML file (``path`` or
``LMCACHE_CONFIG_FILE``), environment variables ``LMCACHE_<KEY>``, then the
dict an engine passes (e.g. vLLM's ``kv_connector_extra_config``). Every error
names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError

ENV_PREFIX = "LMCACHE_"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mi": 1024**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "ti": 1024**4, "tib": 1024**4,
}


def parse_size(value: Any, *, key: str = "size") -> int:
    """``"4GiB"`` -> 4294967296; integers pass through. Errors name the key."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a byte size like 4GiB or 500MB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: a byte size cannot be negative, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{key}: expected a byte size like 4GiB, 500MB or 1048576, got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmcache-core"


def _default_tiers() -> list[str]:
    return ["memory://?capacity=2GiB", f"disk://{default_cache_dir() / 'chunks'}?capacity=20GiB"]


def _meta(help: str, *, choices: tuple[Any, ...] | None = None, minimum: int | None = None,
          size: bool = False) -> dict[str, Any]:
    return {"help": help, "choices": choices, "minimum": minimum, "size": size}


@dataclass(frozen=True)
class Config:
    """Every setting of lmcache-core. ``lmcache config show`` prints the resolved values."""

    chunk_size: int = field(default=256, metadata=_meta(
        "Tokens per chunk; a multiple of the engine's KV block size.", minimum=1))
    tiers: tuple[str, ...] = field(default_factory=lambda: tuple(_default_tiers()), metadata=_meta(
        "Storage tiers, fastest first, as URLs: memory://?capacity=2GiB, disk:///path?capacity=20GiB, "
        "redis://host:6379, s3://bucket/prefix ..."))
    device: str = field(default="auto", metadata=_meta(
        "Device plugin name, or auto (the one accelerator present, else cpu)."))
    save_partial: bool = field(default=True, metadata=_meta(
        "Also store the last, partial chunk of a request."))
    hash_algorithm: str = field(default="xxh3_128", metadata=_meta(
        "128-bit prefix hash.", choices=("xxh3_128", "blake2b")))
    key_scheme: str = field(default="lmcache", metadata=_meta(
        "How chunks are named: lmcache (own prefix hash chain) or sglang (SGLang's SHA-256 page "
        "hashes, so vLLM and SGLang share chunks; whole chunks only, save_partial is off).",
        choices=("lmcache", "sglang")))
    model: str = field(default="", metadata=_meta(
        "Model identity in the key namespace; integrations fill it from the engine."))
    tenant: str = field(default="default", metadata=_meta("Tenant in the key namespace."))
    salt: str = field(default="", metadata=_meta("Extra salt in the key namespace (e.g. a LoRA id)."))
    codec: str = field(default="none", metadata=_meta(
        "Payload codec of stored chunks.", choices=("none", "zlib")))
    store_queue_size: int = field(default=64, metadata=_meta(
        "Most queued writes per slow tier; beyond it stores are dropped and counted.", minimum=1))
    writer_threads: int = field(default=2, metadata=_meta(
        "Background writer threads per slow tier.", minimum=1))
    reader_threads: int = field(default=4, metadata=_meta(
        "Threads that fetch chunks from slow tiers in parallel.", minimum=1))
    promote: bool = field(default=True, metadata=_meta(
        "Copy hits from slower tiers into the fastest tier."))
    host_pool_size: int = field(default=4 * 1024**3, metadata=_meta(
        "Upper bound of host buffer bytes held by the buffer pool (idle buffers kept for reuse).",
        size=True, minimum=0))
    max_inflight_bytes: int = field(default=4 * 1024**3, metadata=_meta(
        "Upper bound of host bytes of chunks in flight (gathered and not yet handed to the tiers, "
        "or fetched for a load and not yet written to the engine); past it stores are dropped and "
        "loads cut short, both counted.", size=True, minimum=0))
    metrics_port: int = field(default=0, metadata=_meta(
        "Serve Prometheus metrics on this port; 0 disables.", minimum=0))
    log_level: str = field(default="WARNING", metadata=_meta(
        "Logging level of the lmcache_core logger.",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")))

    # -- construction ----------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
    ) -> "Config":
        """Resolve defaults < YAML file < ``LMCACHE_*`` env < ``overrides``."""
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        path = path or env.get(ENV_PREFIX + "CONFIG_FILE")
        if path:
            raw.update(_read_yaml(Path(path)))
        raw.update(_from_env(env))
        if overrides:
            raw.update(dict(overrides))
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Config":
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.replace("-", "_").lower()
            if name not in known:
                raise ConfigError(
                    f"unknown config key {key!r}; allowed keys: {', '.join(sorted(known))}"
                )
            values[name] = _coerce(known[name], value)
        if values.get("key_scheme") == "sglang":
            # SGLang names whole pages only: a partial last chunk has no SGLang key.
            if values.get("save_partial", False):
                raise ConfigError("save_partial: must be false with key_scheme sglang (SGLang keys whole "
                                  "pages only); leave it unset or set it to false")
            values["save_partial"] = False
        cfg = cls(**values)
        cfg._check()
        return cfg

    def replace(self, **changes: Any) -> "Config":
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tiers"] = list(self.tiers)
        return out

    def _check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
            if choices and value not in choices:
                raise ConfigError(
                    f"{f.name}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}"
                )
            if minimum is not None and value < minimum:
                raise ConfigError(f"{f.name}: must be >= {minimum}, got {value!r}")
        if not self.tiers:
            raise ConfigError("tiers: at least one storage tier is needed, e.g. ['memory://?capacity=2GiB']")
        for url in self.tiers:
            if "://" not in url:
                raise ConfigError(
                    f"tiers: {url!r} is not a URL; write it as scheme://..., e.g. disk:///var/cache/lmcache"
                )

    def check_block_size(self, block_size: int) -> None:
        """Chunks start on block boundaries so a chunk maps to whole engine blocks."""
        if self.chunk_size % block_size:
            lower = max(block_size, self.chunk_size // block_size * block_size)
            raise ConfigError(
                f"chunk_size must be a multiple of the engine block size {block_size}, "
                f"got {self.chunk_size}; use e.g. {lower}"
            )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    names = {f.name for f in fields(Config)}
    out: dict[str, Any] = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX):].lower()
            if name in names:
                out[name] = value
    return out


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    key, typ = f.name, f.type
    try:
        if f.metadata.get("size"):
            return parse_size(value, key=key)
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str):
                value = value.strip()
            return int(value)
        if typ == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ == "str":
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value).upper() if key == "log_level" else str(value)
        if typ == "tuple[str, ...]":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return tuple(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        pass
    else:
        return value
    expected = {"int": "an integer", "bool": "true or false", "str": "a string",
                "tuple[str, ...]": "a list of URLs (or a comma-separated string)"}.get(str(typ), str(typ))
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")
