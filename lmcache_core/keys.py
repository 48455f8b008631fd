"""Token chunking and the 128-bit prefix hash chain that names chunks.

``h_i = H(h_{i-1} || namespace_id || int64-LE token bytes of chunk i)``. The hash
only depends on bytes, never on Python's ``hash()``, so two processes, two
machines and two engines agree on every key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import xxhash

from .errors import ConfigError

HASH_BYTES = 16
_ALGORITHMS = ("xxh3_128", "blake2b")


def _hasher(algorithm: str):  # type: ignore[no-untyped-def]
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "blake2b":
        return hashlib.blake2b(digest_size=HASH_BYTES)
    raise ConfigError(f"hash_algorithm: {algorithm!r} is not allowed; choose one of {', '.join(_ALGORITHMS)}")


@dataclass(frozen=True)
class Namespace:
    """Everything besides the tokens that makes KV differ: model, chunk layout, tenant, salt."""

    model: str
    layout: str
    tenant: str = "default"
    salt: str = ""

    @property
    def id(self) -> bytes:
        """16 stable bytes identifying the namespace (blake2b of its fields)."""
        h = hashlib.blake2b(digest_size=HASH_BYTES, person=b"lmcache-ns-v1")
        for part in (self.model, self.layout, self.tenant, self.salt):
            data = part.encode()
            h.update(len(data).to_bytes(4, "little"))
            h.update(data)
        return h.digest()


@dataclass(frozen=True)
class ChunkKey:
    """Address of one chunk: namespace id plus the prefix hash up to and including the chunk."""

    namespace: bytes
    digest: bytes
    num_tokens: int  # tokens in this chunk (== chunk_size except for a partial last chunk)

    def __post_init__(self) -> None:
        if len(self.namespace) != HASH_BYTES or len(self.digest) != HASH_BYTES:
            raise ValueError("ChunkKey namespace and digest must be 16 bytes each")

    def to_bytes(self) -> bytes:
        return self.namespace + self.digest

    @classmethod
    def from_bytes(cls, data: bytes, num_tokens: int = 0) -> "ChunkKey":
        if len(data) != 2 * HASH_BYTES:
            raise ValueError(f"a ChunkKey is {2 * HASH_BYTES} bytes, got {len(data)}")
        return cls(bytes(data[:HASH_BYTES]), bytes(data[HASH_BYTES:]), num_tokens)

    @property
    def path(self) -> str:
        """``<namespace-hex>/<digest-hex>``: the name stores use for files and object keys."""
        return f"{self.namespace.hex()}/{self.digest.hex()}"

    def __str__(self) -> str:
        return self.path

    # Equality and hashing ignore num_tokens: the digest already covers the tokens.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChunkKey) and self.namespace == other.namespace and self.digest == other.digest

    def __hash__(self) -> int:
        return hash((self.namespace, self.digest))


def token_bytes(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Tokens as a contiguous little-endian int64 array (one conversion, no per-token loop)."""
    if hasattr(tokens, "detach"):  # torch.Tensor without importing torch
        tokens = tokens.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.ascontiguousarray(np.asarray(tokens).reshape(-1), dtype="<i8")
    return arr


def chunk_bounds(num_tokens: int, chunk_size: int, *, save_partial: bool = True) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the chunks covering ``num_tokens``."""
    if chunk_size <= 0:
        raise ConfigError(f"chunk_size must be positive, got {chunk_size}")
    end_full = num_tokens - num_tokens % chunk_size
    bounds = [(s, s + chunk_size) for s in range(0, end_full, chunk_size)]
    if save_partial and end_full < num_tokens:
        bounds.append((end_full, num_tokens))
    return bounds


def chunk_keys(
    tokens: Sequence[int] | np.ndarray,
    namespace: Namespace,
    chunk_size: int = 256,
    *,
    save_partial: bool = True,
    algorithm: str = "xxh3_128",
) -> list[ChunkKey]:
    """Keys of every chunk of ``tokens``; key ``i`` depends on all tokens before chunk ``i + 1``."""
    arr = token_bytes(tokens)
    ns = namespace.id
    prev = b"\x00" * HASH_BYTES
    keys: list[ChunkKey] = []
    view = memoryview(arr).cast("B")
    for start, end in chunk_bounds(arr.size, chunk_size, save_partial=save_partial):
        h = _hasher(algorithm)
        h.update(prev)
        h.update(ns)
        h.update(view[start * 8 : end * 8])
        prev = h.digest()
        keys.append(ChunkKey(ns, prev, end - start))
    return keys
