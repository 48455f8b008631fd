"""``aesgcm``: encryption at rest (disk, remote and peer tiers).

AES-256-GCM with a key per namespace (a namespace includes the tenant), derived with
HKDF-SHA256 from the deployment's secret (the tier URL's ``codec_key_file``), and the chunk's key (its
namespace, prefix hash and token count) plus layout as associated data: a chunk copied under
another key, or read with another secret, fails authentication, which is a miss (counted as a
corrupt chunk), never an exception into the engine. Always the last codec of a chain
(``lossless+aesgcm``: compress, then encrypt).

Stored form: a 12-byte random nonce, then ciphertext and the 16-byte GCM tag.

The secret is bound to an engine's buffer pool (:func:`bind_secret`), as the integrity key is:
the tier stack binds it when a tier names this codec, and readers find it by the pool they
decode into.
"""

from __future__ import annotations

import os
import struct
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ChunkError, ConfigError
from .base import Codec, CodecContext

if TYPE_CHECKING:
    from ..memory import BufferPool

NONCE = 12
TAG = 16
MIN_SECRET = 16
_SALT = b"lmcache-aesgcm-v1"
_KEYS_CACHED = 256


class _Secrets:
    """Secrets by buffer pool (weakly), with the per-namespace ciphers derived from each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_pool: "weakref.WeakKeyDictionary[BufferPool, bytes]" = weakref.WeakKeyDictionary()
        self._ciphers: OrderedDict[tuple[bytes, bytes], AESGCM] = OrderedDict()

    def bind(self, pool: "BufferPool", secret: bytes) -> None:
        if len(secret) < MIN_SECRET:
            raise ConfigError(f"codec_key_file: the secret has {len(secret)} bytes; it needs at least "
                              f"{MIN_SECRET} (e.g. python -c 'import secrets; print(secrets.token_hex(32))')")
        with self._lock:
            old = self._by_pool.get(pool)
            if old is not None and old != secret:
                raise ConfigError("two tiers of one engine name different codec_key_file secrets; an engine "
                                  "encrypts with one secret, give every aesgcm tier the same file")
            self._by_pool[pool] = bytes(secret)

    def cipher(self, pool: "BufferPool | None", namespace: bytes) -> AESGCM:
        with self._lock:
            secret = self._by_pool.get(pool) if pool is not None else None
        if secret is None:
            raise ChunkError("chunk is encrypted (aesgcm) and this engine has no codec_key_file")
        ident = (secret, namespace)
        with self._lock:
            c = self._ciphers.get(ident)
            if c is not None:
                self._ciphers.move_to_end(ident)
                return c
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=b"ns:" + namespace).derive(secret)
        c = AESGCM(key)
        with self._lock:
            self._ciphers[ident] = c
            while len(self._ciphers) > _KEYS_CACHED:
                self._ciphers.popitem(last=False)
        return c

    def __repr__(self) -> str:
        return "<aesgcm secrets>"


_SECRETS = _Secrets()


def bind_secret(pool: "BufferPool", secret: bytes) -> None:
    """Encrypt and decrypt the chunks of the engine that owns ``pool`` with ``secret``."""
    _SECRETS.bind(pool, secret)


def read_secret(path: str) -> bytes:
    p = Path(path).expanduser()
    try:
        data = p.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ConfigError(f"codec_key_file: {str(p)!r} cannot be read: {exc.strerror}") from exc
    if len(data) < MIN_SECRET:
        raise ConfigError(f"codec_key_file: {str(p)!r} holds {len(data)} bytes; it needs at least {MIN_SECRET}")
    return data


def _aad(ctx: CodecContext) -> bytes:
    return b"lmcache-chunk:" + ctx.key.to_bytes() + struct.pack("<Q", ctx.num_tokens) + \
        ctx.geometry.signature.encode()


class AESGCMCodec(Codec):
    name = "aesgcm"
    wire_id = "aesgcm/1"
    lossless = True
    encrypts = True

    def __init__(self, options: "dict[str, Any] | None" = None) -> None:
        super().__init__(options)

    def encode(self, data: memoryview, ctx: CodecContext) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + _SECRETS.cipher(ctx.pool, ctx.key.namespace).encrypt(nonce, data, _aad(ctx))

    def decode(self, data: memoryview, limit: int, ctx: CodecContext) -> bytes:
        if len(data) < NONCE + TAG:
            raise ChunkError(f"chunk {ctx.key}: aesgcm stream of {len(data)} bytes is truncated")
        try:
            plain = _SECRETS.cipher(ctx.pool, ctx.key.namespace).decrypt(data[:NONCE], data[NONCE:], _aad(ctx))
        except InvalidTag:
            raise ChunkError(f"chunk {ctx.key} fails aesgcm authentication (another secret, key or a changed "
                             f"byte)") from None
        return plain

    def max_encoded_len(self, n: int, ctx: CodecContext) -> int:
        return n + NONCE + TAG


__all__ = ["AESGCMCodec", "bind_secret", "read_secret"]
