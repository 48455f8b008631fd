"""Backdoors around a store: read and write its backend without going through the store.

The shared storage tests check what a store wrote against ground truth, and plant
damaged values, through ``raw_get``/``raw_set``. A store can offer them itself by
implementing :class:`SupportsRawAccess`; for the stores of this repository the
suite also knows their public, documented naming:

- ``disk://``: ``ROOT/<namespace-hex>/<hh>/<digest-hex>.kv`` (the disk tier's docstring);
- RESP stores (redis, valkey): a plain GET/SET of ``store.key_name(key)`` on ``store.client``;
- S3 stores: ``get_object``/``put_object`` of ``store.object_key(key)`` in ``store.options.bucket``.

Without one, those tests are skips that say how to add it.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from lmcache_core.keys import ChunkKey
from lmcache_core.storage import Store


@runtime_checkable
class SupportsRawAccess(Protocol):
    """A store offering the suite a way around itself (bytes exactly as the backend holds them)."""

    def raw_get(self, key: ChunkKey) -> bytes | None: ...

    def raw_set(self, key: ChunkKey, data: bytes) -> None: ...


@dataclass(frozen=True)
class Backdoor:
    how: str  # a few words for messages
    get: Callable[[ChunkKey], "bytes | None"]
    set: Callable[[ChunkKey, bytes], None]


def _disk(store: Any) -> Backdoor:
    root = Path(store.root)

    def path(key: ChunkKey) -> Path:
        d = key.digest.hex()
        return root / key.namespace.hex() / d[:2] / f"{d}.kv"

    def get(key: ChunkKey) -> bytes | None:
        try:
            return path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(key: ChunkKey, data: bytes) -> None:
        p = path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f"conformance-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, p)

    return Backdoor("the file under the disk root", get, put)


def _resp(store: Any) -> Backdoor:
    return Backdoor("a plain GET/SET on the store's client",
                    lambda key: store.client.get(store.key_name(key)),
                    lambda key, data: store.client.set(store.key_name(key), data))


def _s3(store: Any) -> Backdoor:
    def get(key: ChunkKey) -> bytes | None:
        try:
            return store.client.get_object(Bucket=store.options.bucket, Key=store.object_key(key))["Body"].read()  # type: ignore[no-any-return]
        except store.client.exceptions.NoSuchKey:
            return None

    return Backdoor("get_object/put_object on the store's client", get,
                    lambda key, data: store.client.put_object(Bucket=store.options.bucket, Key=store.object_key(key),
                                                              Body=data))


def backdoor_for(store: Store) -> Backdoor | None:
    """The way around ``store``, or None when the suite knows none."""
    if isinstance(store, SupportsRawAccess):
        return Backdoor("the store's raw_get/raw_set", store.raw_get, store.raw_set)
    from lmcache_core.builtin.disk_store import DiskStore

    if isinstance(store, DiskStore):
        return _disk(store)
    if hasattr(store, "client") and callable(getattr(store, "key_name", None)):
        return _resp(store)
    if hasattr(store, "client") and callable(getattr(store, "object_key", None)) and hasattr(store, "options"):
        return _s3(store)
    return None


__all__ = ["Backdoor", "SupportsRawAccess", "backdoor_for"]
