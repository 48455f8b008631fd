"""One typed, validated configuration from defaults, a YAML file, ``LMCACHE_*`` env and a dict.

Precedence, lowest first: defaults, the YAML file (``path`` or
``LMCACHE_CONFIG_FILE``), environment variables ``LMCACHE_<KEY>``, then the
dict an engine passes (e.g. vLLM's ``kv_connector_extra_config``). Every error
names the key, the value and what is allowed, at load: types are never guessed
(a YAML number in a namespace field, a float for an integer and a duplicate
YAML key are errors; each tier URL gets the checks every store shares,
``storage.parse_url``), and an ``LMCACHE_`` variable that is nearly a key is a
warning naming the key. The integrity secret is never printed.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError
from .upstream_config import hint, upstream_keys_message

logger = logging.getLogger(__name__)

ENV_PREFIX = "LMCACHE_"
NAMESPACE_KEYS = ("model", "tenant", "salt")  # strings only: 1.10 and 1.1 must never be one namespace
REDACTED = "<redacted>"
# LMCACHE_* variables that belong to other parts of lmcache-core, not to this config
_OTHER_ENV = {"CONFIG_FILE", "PLUGINS", "BLOCK_PLUGINS", "REQUIRE_SERVERS", "TORCH_SPEC"}
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


def parse_bool(value: Any, *, key: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case) -> bool; anything else is an error naming the key."""
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lmcache-core``; a relative ``XDG_CACHE_HOME`` is ignored, as the XDG
    base directory spec says, so the default disk tier never depends on the working directory."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmcache-core"


def _default_tiers() -> list[str]:
    # quoted: a '#', '?' or '%' in the home directory stays part of the path
    chunks = urllib.parse.quote(str(default_cache_dir() / "chunks"))
    return ["memory://?capacity=2GiB", f"disk://{chunks}?capacity=20GiB"]


def _meta(help: str, *, choices: tuple[Any, ...] | None = None, minimum: int | None = None,
          maximum: int | None = None, size: bool = False, secret: bool = False) -> dict[str, Any]:
    return {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "size": size,
            "secret": secret}


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
    kv_codec: str = field(default="none", metadata=_meta(
        "Codec fused into the device's own copies: fp8 (e4m3, a scale per token and head) gathers and "
        "scatters half the bytes of bf16 KV, and every tier holds that form (lossy: its chunks live in "
        "their own key namespace). none: exact KV.", choices=("none", "fp8")))
    store_queue_size: int = field(default=64, metadata=_meta(
        "Most queued writes per slow tier; beyond it stores are dropped and counted.", minimum=1))
    writer_threads: int = field(default=2, metadata=_meta(
        "Background writer threads per slow tier.", minimum=1))
    reader_threads: int = field(default=4, metadata=_meta(
        "Threads that fetch chunks from slow tiers in parallel.", minimum=1))
    promote: bool = field(default=True, metadata=_meta(
        "Copy hits from slower tiers into the fastest tier."))
    load_policy: str = field(default="always", metadata=_meta(
        "How much of a hit to load: always (every hit chunk), or adaptive (per request, only the leading "
        "chunks that load faster, by each tier's measured throughput, than this engine recomputes them).",
        choices=("always", "adaptive")))
    host_pool_size: int = field(default=4 * 1024**3, metadata=_meta(
        "Upper bound of host buffer bytes held by the buffer pool (idle buffers kept for reuse).",
        size=True, minimum=0))
    host_pool_reserve: int = field(default=4 * 1024**3, metadata=_meta(
        "Bytes of whole-chunk pinned buffers the pool allocates ahead in a background thread (embedded mode, "
        "on devices with pinned memory, capped by host_pool_size), so a store that fills the cache does not "
        "pin memory on the engine's step (about 1 GB/s of chunk buffers); 0 turns it off.",
        size=True, minimum=0))
    max_inflight_bytes: int = field(default=4 * 1024**3, metadata=_meta(
        "Upper bound of host bytes of chunks in flight (gathered and not yet handed to the tiers, "
        "or fetched for a load and not yet written to the engine); past it stores are dropped and "
        "loads cut short, both counted.", size=True, minimum=0))
    metrics_port: int = field(default=0, metadata=_meta(
        "Serve Prometheus metrics on this port; 0 disables.", minimum=0, maximum=65535))
    log_level: str = field(default="WARNING", metadata=_meta(
        "Logging level of the lmcache_core logger.",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")))
    integrity_key: str = field(default="", repr=False, metadata=_meta(
        "Deployment secret (at least 16 bytes) that keys every chunk's tag (HMAC-SHA256 over header and "
        "payload): only processes with it can write chunks the others accept. Never printed.",
        secret=True))
    integrity_key_file: str = field(default="", metadata=_meta(
        "File holding the integrity secret (trailing newline ignored); instead of integrity_key."))
    daemon: str = field(default="", metadata=_meta(
        "Use an `lmcache serve` daemon's tiers instead of in-process ones: daemon:///path/to/socket "
        "(a Unix socket) or daemon+tcp://host:port. Empty: embedded (the tiers above)."))
    daemon_token: str = field(default="", repr=False, metadata=_meta(
        "Tenant token presented to the daemon (it decides the tenant from the token). Never printed.",
        secret=True))
    daemon_token_file: str = field(default="", metadata=_meta(
        "File holding the daemon token (trailing newline ignored); instead of daemon_token."))
    daemon_autostart: bool = field(default=False, metadata=_meta(
        "Start `lmcache serve` on the daemon socket when no daemon answers there."))
    daemon_timeout_ms: int = field(default=5000, metadata=_meta(
        "Deadline of one daemon request; past it the request is a miss (or a dropped store).", minimum=1))

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
            data = _read_yaml(Path(path))
            data.pop("serve", None)  # the daemon's own section (lmcache_core.daemon.settings)
            raw.update(data)
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
                raise ConfigError(upstream_keys_message(raw, known) or
                                  f"unknown config key {key!r}; allowed keys: {', '.join(sorted(known))}")
            values[name] = _coerce(known[name], value)
        if values.get("key_scheme") == "sglang":
            # SGLang names whole pages only: a partial last chunk has no SGLang key.
            if values.get("save_partial", False):
                raise ConfigError("save_partial: must be false with key_scheme sglang (SGLang keys whole "
                                  "pages only); leave it unset or set it to false")
            values["save_partial"] = False
        cfg = cls(**values)
        cfg._check()
        secret = cfg.integrity_secret()
        if secret is not None:
            from . import chunk

            chunk.set_integrity_key(secret)
        return cfg

    def replace(self, **changes: Any) -> "Config":
        return type(self).from_dict({**self._values(), **changes})

    def _values(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tiers"] = list(self.tiers)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every value, the integrity secret shown as ``<redacted>`` (``config show``, logs)."""
        out = self._values()
        for key in ("integrity_key", "daemon_token"):
            if out[key]:
                out[key] = REDACTED
        return out

    def integrity_secret(self) -> bytes | None:
        """The integrity secret (from ``integrity_key`` or ``integrity_key_file``), or None."""
        if self.integrity_key:
            return self.integrity_key.encode("utf-8")
        if not self.integrity_key_file:
            return None
        path = Path(self.integrity_key_file).expanduser()
        try:
            data = path.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"integrity_key_file: {str(path)!r} cannot be read: {exc.strerror}") from exc
        if len(data) < _MIN_SECRET:
            raise ConfigError(f"integrity_key_file: {str(path)!r} holds {len(data)} bytes; an integrity key needs "
                              f"at least {_MIN_SECRET} (e.g. python -c 'import secrets; print(secrets.token_hex(32))')")
        return data

    def _check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
            maximum = f.metadata.get("maximum")
            if choices and value not in choices:
                raise ConfigError(
                    f"{f.name}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}"
                )
            if minimum is not None and value < minimum:
                raise ConfigError(f"{f.name}: must be >= {minimum}, got {value!r}")
            if maximum is not None and value > maximum:
                raise ConfigError(f"{f.name}: must be <= {maximum}, got {value!r}")
        if self.integrity_key == REDACTED:
            raise ConfigError("integrity_key: got the redacted placeholder from to_dict(); pass the secret itself "
                              "or use integrity_key_file")
        if self.integrity_key and self.integrity_key_file:
            raise ConfigError("integrity_key and integrity_key_file are both set; set one of them")
        if self.integrity_key and len(self.integrity_key.encode("utf-8")) < _MIN_SECRET:
            raise ConfigError(f"integrity_key: an integrity key needs at least {_MIN_SECRET} bytes, got "
                              f"{len(self.integrity_key.encode('utf-8'))} (e.g. python -c 'import secrets; "
                              "print(secrets.token_hex(32))')")
        self.integrity_secret()  # a missing or short key file is an error at load
        if self.daemon_token == REDACTED:
            raise ConfigError("daemon_token: got the redacted placeholder from to_dict(); pass the token itself "
                              "or use daemon_token_file")
        if self.daemon_token and self.daemon_token_file:
            raise ConfigError("daemon_token and daemon_token_file are both set; set one of them")
        if self.daemon:
            from .daemon.address import parse_address  # here: keeps the daemon package off the import path

            parse_address(self.daemon)
        if not self.tiers:
            raise ConfigError("tiers: at least one storage tier is needed, e.g. ['memory://?capacity=2GiB']")
        if self.kv_codec != "none":
            self._check_kv_codec()
        from .storage import parse_url  # here: storage imports this module

        for url in self.tiers:
            if "://" not in url:
                raise ConfigError(
                    f"tiers: {url!r} is not a URL; write it as scheme://..., e.g. disk:///var/cache/lmcache"
                )
            try:
                parse_url(url)  # what every store checks (ports, brackets, '#', repeated options, ...)
            except ConfigError as exc:
                raise ConfigError(f"tiers: {exc}") from None

    def _check_kv_codec(self) -> None:
        """What does not combine with a device codec yet, refused at load with the fix named."""
        if self.codec != "none":
            raise ConfigError(f"kv_codec {self.kv_codec} and codec {self.codec}: chunks are already coded on the "
                              "device; set codec: none")
        from .codecs import REGISTRY
        from .storage import parse_url

        for url in self.tiers:
            codec = parse_url(url).query.get("codec")
            if codec is not None and codec.strip() != "none" and \
                    not all(REGISTRY.spec(part.strip()).load().lossless for part in codec.split("+")):
                raise ConfigError(f"tiers: {url!r} sets codec={codec}, and kv_codec {self.kv_codec} already codes "
                                  "every chunk on the device; only lossless codecs (lossless, aesgcm, "
                                  "lossless+aesgcm) apply over it: drop the tier's codec option or unset kv_codec")

    def daemon_token_value(self) -> str:
        """The daemon token (from ``daemon_token`` or ``daemon_token_file``), or ""."""
        if self.daemon_token or not self.daemon_token_file:
            return self.daemon_token
        path = Path(self.daemon_token_file).expanduser()
        try:
            return path.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"daemon_token_file: {str(path)!r} cannot be read: {exc.strerror}") from exc

    def check_block_size(self, block_size: int) -> None:
        """Chunks start on block boundaries so a chunk maps to whole engine blocks."""
        if self.chunk_size % block_size:
            lower = max(block_size, self.chunk_size // block_size * block_size)
            raise ConfigError(
                f"chunk_size must be a multiple of the engine block size {block_size}, "
                f"got {self.chunk_size}; use e.g. {lower}"
            )


_MIN_SECRET = 16


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (YAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"config file: key {key!r} appears twice (lines {seen[key].start_mark.line + 1} "
                                  f"and {key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({str(path)!r})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """``LMCACHE_<KEY>`` values; a variable that is nearly a key (wrong case, a missing
    underscore, a typo) is ignored with a warning that names the key."""
    names = {f.name for f in fields(Config)}
    squashed = {n.replace("_", ""): n for n in names}
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key[: len(ENV_PREFIX)].upper() == ENV_PREFIX:
            continue
        rest = key[len(ENV_PREFIX):]
        if key.startswith(ENV_PREFIX) and rest.lower() in names and rest == rest.upper():
            out[rest.lower()] = value
            continue
        if rest.upper() in _OTHER_ENV or rest.upper().startswith("KV_"):
            continue
        low = rest.lower()
        if hint(low):  # upstream LMCache reads LMCACHE_* too
            logger.warning("environment variable %s is ignored: %s", key, hint(low))
            continue
        guess = low if low in names else squashed.get(low.replace("_", ""))
        if guess is None:
            close = difflib.get_close_matches(low, sorted(names), n=1, cutoff=0.8)
            guess = close[0] if close else None
        if guess is not None:
            logger.warning("environment variable %s is not an lmcache config key and is ignored; did you mean "
                           "%s%s?", key, ENV_PREFIX, guess.upper())
    return out


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    key, typ = f.name, f.type
    shown = "<redacted>" if f.metadata.get("secret") else repr(value)
    if key in NAMESPACE_KEYS and not isinstance(value, str):
        raise ConfigError(
            f"{key}: expected a string, got {type(value).__name__} {value!r}; a namespace field is never "
            f"converted (YAML reads 1.10 as 1.1, 010 as 8, yes as true), so quote it: {key}: \"...\""
        )
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(f"{key}: {shown} is not valid text "
                              f"({exc.reason} at position {exc.start}); use UTF-8 text") from None
    try:
        if f.metadata.get("size"):
            return parse_size(value, key=key)
        if typ == "int":
            if isinstance(value, (bool, float)):
                raise ValueError
            if isinstance(value, str):
                value = value.strip()
            return int(value)
        if typ == "bool":
            return parse_bool(value, key=key)
        if typ == "str":
            if isinstance(value, bool) or not isinstance(value, (str, int, float)) or (
                    f.metadata.get("secret") and not isinstance(value, str)):
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
    raise ConfigError(f"{key}: expected {expected}, got {shown}")
