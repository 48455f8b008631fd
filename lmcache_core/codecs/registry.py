"""Codec names and wire ids: resolving a tier's ``codec=`` spec, and decoding what a header says.

A spec names one codec or a chain joined by ``+`` (``cachegen+aesgcm``): encoding runs left to
right, decoding right to left. At most one lossy codec, and an encrypting codec only last
(compress, then encrypt: ciphertext does not compress). The chain's wire id is its codecs'
wire ids joined by ``+``; that string is what the chunk header records.

Built-in codecs are known here by import path (imported only when used, so a missing
``zstandard`` or ``cryptography`` names its extra instead of failing an import); plugins add
theirs through the ``lmcache_register_codecs`` hook (:mod:`lmcache_core.plugins`). A header
whose wire id this process cannot decode is a miss, never a guess.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ChunkError, ConfigError, MissingDependencyError
from .base import Codec, CodecContext

if TYPE_CHECKING:
    from ..plugins import PluginManager

#: wire ids the chunk module codes itself (no codec object)
NATIVE = ("none", "zlib")
MAX_CHAIN = 4


@dataclass(frozen=True)
class CodecSpec:
    """One registered codec: import path of its class and what it needs."""

    name: str
    factory: str  # "package.module:Class"
    wire_id: str
    requires: tuple[str, ...] = ()
    extra: str | None = None
    description: str = ""
    distribution: str = "lmcache-core"

    def load(self) -> type[Codec]:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            hint = f'pip install "lmcache-core[{self.extra}]"' if self.extra else f"pip install {self.distribution}"
            raise MissingDependencyError(f"codec {self.name!r} needs {', '.join(missing)}; install it with: {hint}")
        module, _, attr = self.factory.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if cls.wire_id != self.wire_id or cls.name != self.name:
            raise ConfigError(f"codec {self.name!r}: {self.factory} declares name {cls.name!r} and wire id "
                              f"{cls.wire_id!r}, its registration {self.name!r} / {self.wire_id!r}")
        return cls  # type: ignore[no-any-return]


BUILTIN: tuple[CodecSpec, ...] = (
    CodecSpec("lossless", "lmcache_core.codecs.lossless:LosslessCodec", "lossless-zstd/2", ("zstandard",),
              "codecs", "Exact: byte planes of each value, zstd level 1 per plane"),
    CodecSpec("fp8", "lmcache_core.codecs.fp8:FP8Codec", "fp8-e4m3-th/1", ("torch",), "torch",
              "Lossy: e4m3 with a bf16 scale per token and head; fused into the GPU gather/scatter"),
    CodecSpec("cachegen", "lmcache_core.codecs.cachegen:CacheGenCodec", "cachegen/1", ("constriction",),
              "codecs", "Lossy: layer-dependent quantisation, deltas to an anchor token, ANS coding"),
    CodecSpec("aesgcm", "lmcache_core.codecs.aesgcm:AESGCMCodec", "aesgcm/1", ("cryptography",), "codecs",
              "Encryption at rest: AES-256-GCM, a key per namespace (HKDF), the chunk key as AAD"),
)


class CodecRegistry:
    """Names to specs and wire ids to loaded codecs (process-wide, thread-safe)."""

    def __init__(self, specs: Sequence[CodecSpec] = BUILTIN) -> None:
        self._lock = threading.Lock()
        self._specs: dict[str, CodecSpec] = {s.name: s for s in specs}
        self._by_wire: dict[str, CodecSpec] = {s.wire_id: s for s in specs}
        self._loaded: dict[str, Codec] = {}  # wire id -> instance with default options

    def register(self, spec: CodecSpec) -> None:
        with self._lock:
            for table, k in ((self._specs, spec.name), (self._by_wire, spec.wire_id)):
                old = table.get(k)
                if old is not None and (old.name, old.factory, old.wire_id) != (spec.name, spec.factory, spec.wire_id):
                    raise ConfigError(f"codec {k!r} is registered by both {old.distribution} ({old.factory}) and "
                                      f"{spec.distribution} ({spec.factory}); uninstall or block one of them")
            if spec.name in NATIVE or "+" in spec.name or "+" in spec.wire_id:
                raise ConfigError(f"codec name {spec.name!r} / wire id {spec.wire_id!r} is reserved or contains '+'")
            self._specs[spec.name] = spec
            self._by_wire[spec.wire_id] = spec

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._specs)

    def spec(self, name: str) -> CodecSpec:
        with self._lock:
            spec = self._specs.get(name)
        if spec is None:
            raise ConfigError(f"codec {name!r} is unknown; known: {', '.join(['none', *self.names()])}")
        return spec

    def resolve(self, spec: str, options: "dict[str, Any] | None" = None) -> "Chain | None":
        """The chain a ``codec=`` spec names (None for ``none``). Errors name the spec and the fix."""
        parts = [p.strip() for p in spec.split("+")]
        if spec.strip() in ("", "none"):
            return None
        if any(not p for p in parts) or len(parts) > MAX_CHAIN:
            raise ConfigError(f"codec {spec!r}: write one codec or up to {MAX_CHAIN} joined by '+', "
                              f"e.g. lossless+aesgcm")
        return Chain(tuple(self.spec(p).load()(options) for p in parts))

    def chain_for_wire(self, wire: str, options: "dict[str, Any] | None" = None) -> "Chain":
        """The chain a header's codec field names; ChunkError when this process cannot decode it."""
        parts = wire.split("+")
        if len(parts) > MAX_CHAIN:
            raise ChunkError(f"chunk codec {wire!r} chains more than {MAX_CHAIN} codecs")
        codecs = []
        for w in parts:
            with self._lock:
                codec = self._loaded.get(w)
                spec = self._by_wire.get(w)
            if codec is None:
                if spec is None:
                    raise ChunkError(f"chunk codec {w!r} is unknown to this process")
                try:
                    codec = spec.load()(options)
                except Exception as exc:  # noqa: BLE001 - a codec we cannot load is a miss
                    raise ChunkError(f"chunk codec {w!r} cannot be loaded: {exc}") from exc
                with self._lock:
                    self._loaded.setdefault(w, codec)
            codecs.append(codec)
        try:
            return Chain(tuple(codecs))
        except ConfigError as exc:
            raise ChunkError(f"chunk codec {wire!r}: {exc}") from exc

    def known_wire(self, wire: str) -> bool:
        with self._lock:
            return all(w in self._by_wire for w in wire.split("+"))


class Chain:
    """Codecs applied in order (encode) and in reverse (decode)."""

    def __init__(self, codecs: tuple[Codec, ...]) -> None:
        if not codecs:
            raise ConfigError("a codec chain needs at least one codec")
        lossy = [c for c in codecs if not c.lossless]
        if len(lossy) > 1:
            raise ConfigError(f"codec chain {'+'.join(c.name for c in codecs)} has two lossy codecs "
                              f"({', '.join(c.name for c in lossy)}); use one")
        for c in codecs[:-1]:
            if getattr(c, "encrypts", False):
                raise ConfigError(f"codec {c.name} encrypts and must come last (compress, then encrypt): "
                                  f"e.g. lossless+{c.name}")
        for c in codecs[1:]:
            if c.where != "host":
                raise ConfigError(f"codec {c.name} runs on the device and must come first")
        self.codecs = codecs
        self.wire_id = "+".join(c.wire_id for c in codecs)
        self.name = "+".join(c.name for c in codecs)
        self.lossless = not lossy
        self.error_bound = lossy[0].error_bound if lossy else 0.0

    def supports(self, ctx: CodecContext) -> str:
        for c in self.codecs:
            why = c.supports(ctx)
            if why:
                return why
        return ""

    def max_encoded_len(self, n: int, ctx: CodecContext) -> int:
        for c in self.codecs:
            n = c.max_encoded_len(n, ctx)
        return n

    def encode(self, data: memoryview, ctx: CodecContext) -> "bytes | bytearray | memoryview":
        out: Any = data
        for c in self.codecs:
            out = c.encode(memoryview(out).cast("B"), ctx)
        return out  # type: ignore[no-any-return]

    def decode(self, data: memoryview, out_len: int, ctx: CodecContext) -> "bytes | bytearray | memoryview":
        """Every intermediate length is bounded: each stage's input is at most what the stage
        before it could have produced from ``out_len`` bytes."""
        bounds = [out_len]
        for c in self.codecs[:-1]:
            bounds.append(c.max_encoded_len(bounds[-1], ctx))
        cur: Any = data
        for c, limit in zip(reversed(self.codecs), reversed(bounds)):
            if len(cur) > c.max_encoded_len(limit, ctx):
                raise ChunkError(f"chunk {ctx.key}: {len(cur)} bytes exceed what codec {c.name} makes of {limit}")
            cur = c.decode(memoryview(cur).cast("B"), limit, ctx)
            if len(cur) > limit:
                raise ChunkError(f"chunk {ctx.key}: codec {c.name} decoded {len(cur)} bytes, at most {limit} allowed")
        if len(cur) != out_len:
            raise ChunkError(f"chunk {ctx.key}: codec {self.name} decoded {len(cur)} bytes, expected {out_len}")
        return cur  # type: ignore[no-any-return]


REGISTRY = CodecRegistry()


def resolve(spec: str, options: "dict[str, Any] | None" = None) -> Chain | None:
    return REGISTRY.resolve(spec, options)


def register_from_plugins(plugins: "PluginManager") -> None:
    """Add the codecs plugins registered (``lmcache_register_codecs``) to the process registry."""
    for reg in plugins.registrations("codec").values():
        if reg.conflict:
            continue  # refused where used: the name stays unknown here
        REGISTRY.register(CodecSpec(reg.name, reg.factory, reg.wire_id, reg.requires, reg.extra, reg.description,
                                    reg.distribution))


def split_codec(url: str) -> tuple[str, str, str]:
    """``(url without its codec options, the codec spec or "", the key file or "")``: options
    ``codec`` and ``codec_key_file`` (the secret of an encrypting codec) belong to the tier stack,
    not the store. The spec's names are checked here (a typo is a ConfigError at start, naming
    the known codecs); loading waits for use."""
    base, _, query = url.partition("?")
    fields = query.split("&") if query else []
    # read raw: in a query '+' would mean a space, here it joins a chain (codec=lossless+aesgcm)
    found: dict[str, list[str]] = {"codec": [], "codec_key_file": []}
    rest = []
    for f in fields:
        name, _, value = f.partition("=")
        if name in found:
            found[name].append(urllib.parse.unquote(value))
        else:
            rest.append(f)
    for name, values in found.items():
        if len(values) > 1:
            raise ConfigError(f"{url}: option {name} is given {len(values)} times; give it once")
    spec = found["codec"][0].strip() if found["codec"] else ""
    key_file = found["codec_key_file"][0] if found["codec_key_file"] else ""
    for name in spec.split("+") if spec else ():
        if name.strip() != "none":
            REGISTRY.spec(name.strip())
    if key_file and not spec:
        raise ConfigError(f"{url}: option codec_key_file without codec; e.g. codec=lossless+aesgcm")
    return (f"{base}?{'&'.join(rest)}" if rest else base), "" if spec == "none" else spec, key_file


__all__ = ["BUILTIN", "Chain", "CodecRegistry", "CodecSpec", "NATIVE", "REGISTRY", "register_from_plugins",
           "resolve", "split_codec"]
