"""Shared moves of the contract tests: engines over given tiers, store/retrieve round trips,
backdoor corruption, and instrumentation of stores for the zero-copy contract.

These helpers drive the real engine, tier stack and stores; nothing is mocked.
Instrumentation wraps a real store's methods on the instance to record what
they were handed (addresses, content hashes) and calls through unchanged.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import xxhash

from lmcache_core.chunk import HEADER_SIZE, ChunkBuffer
from lmcache_core.config import Config
from lmcache_core.engine import CacheEngine
from lmcache_core.keys import ChunkKey
from lmcache_core.plugins import PluginManager, get_plugin_manager
from lmcache_core.storage import ByteStore, Store

from .groundtruth import EngineKV, block_table, expected_chunk, raw, slots_for

if TYPE_CHECKING:
    import torch

    from lmcache_core.device import Device

CHUNK_SIZE = 32  # two engine blocks of 16: full chunks map to whole blocks
NUM_TOKENS = 2 * CHUNK_SIZE + 13  # two full chunks and a partial one
SENTINEL = 0x5A  # byte pattern of untouched cache memory


def fill_url(template: str, tmp: Path) -> str:
    """A store URL with ``{tmp}`` replaced by a directory unique to this test."""
    return template.replace("{tmp}", str(tmp))


def make_engine(device: "Device", kv: EngineKV, urls: Sequence[str], *, salt: str | None = None,
                plugins: PluginManager | None = None, chunk_size: int = CHUNK_SIZE) -> CacheEngine:
    """A CacheEngine over ``urls`` for ``kv``'s geometry; ``salt`` isolates runs on shared servers."""
    cfg = Config.from_dict({
        "tiers": list(urls), "chunk_size": chunk_size, "save_partial": True, "model": "lmcache-conformance",
        "salt": salt if salt is not None else uuid.uuid4().hex, "writer_threads": 2, "reader_threads": 2,
        "host_pool_size": 256 << 20,
    })
    return CacheEngine(kv.kv.geometry, cfg, device=device, plugins=plugins or get_plugin_manager())


def tokens_for(n: int = NUM_TOKENS, seed: int = 0) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (n,), generator=g).tolist()


@dataclass(frozen=True)
class Placement:
    """A request's tokens placed in a cache: its block table and the slot of every token."""

    block_ids: tuple[int, ...]
    slots: tuple[int, ...]


def place(kv: EngineKV, n: int, seed: int) -> Placement:
    needed = (n - 1) // kv.block_size + 1
    bt = block_table(kv.num_blocks, needed, seed)
    return Placement(tuple(bt), tuple(slots_for(bt, kv.block_size, 0, n)))


def check_loaded(dst: EngineKV, before: "torch.Tensor", src_logical: "torch.Tensor", src: Placement,
                 dst_place: Placement, n: int) -> str | None:
    """None when ``dst`` holds the source's first ``n`` tokens at ``dst_place`` and is unchanged
    everywhere else; otherwise a sentence saying what differs."""
    import torch

    now = dst.logical()
    expected = before.clone()
    idx_dst = torch.as_tensor(dst_place.slots[:n], dtype=torch.int64)
    idx_src = torch.as_tensor(src.slots[:n], dtype=torch.int64)
    expected[:, :, idx_dst] = src_logical[:, :, idx_src]
    if torch.equal(now, expected):
        return None
    diff = (now != expected).reshape(now.shape[0], now.shape[1], now.shape[2], -1).any(-1)
    layers, planes, slots = (t.tolist() for t in diff.nonzero(as_tuple=True))
    target = set(dst_place.slots[:n])
    inside = sorted({s for s in slots if s in target})
    outside = sorted({s for s in slots if s not in target})
    parts = []
    if inside:
        parts.append(f"{len(inside)} loaded slots hold wrong values (e.g. slot {inside[0]}, layer {layers[0]})")
    if outside:
        parts.append(f"{len(outside)} slots outside the request changed (e.g. slot {outside[0]})")
    return "; ".join(parts)


def chunk_payload_matches(chunk: ChunkBuffer, src_logical: "torch.Tensor", slots: Sequence[int]) -> bool:
    """Whether a stored chunk's payload is the ground truth of ``slots``."""
    import torch

    return torch.equal(raw(chunk.kv()), expected_chunk(src_logical, slots))


def corrupt_stored(store: Store, key: ChunkKey, offset: int = 7) -> bool:
    """Flip one payload byte of ``key``'s image at rest through the ByteStore backdoor.

    Reads the image with ``_read``, flips a byte after the header, deletes the key
    and writes the damaged image back with ``_write``. False where the store is not
    a ByteStore (it holds buffers, so nothing rests as bytes to damage).
    """
    if not isinstance(store, ByteStore):
        return False
    got = store._read(key, store.context.pool.acquire)
    if got is None:
        raise AssertionError(f"store {store.name}: key {key} vanished before it could be corrupted")
    buf, nbytes = got
    try:
        from lmcache_core.chunk import decode_header

        header = decode_header(buf.memoryview(0, HEADER_SIZE))
        mv = buf.memoryview(0, nbytes)
        mv[HEADER_SIZE + offset] ^= 0xFF
        damaged = ChunkBuffer(buf, header)
        store.delete([key])
        store._write(key, damaged.image(), damaged)
    finally:
        buf.release()
    return True


def digest(mv: memoryview) -> bytes:
    return xxhash.xxh3_128_digest(mv)


def address_of(mv: memoryview) -> int:
    """Start address of a memoryview's bytes (for pointer-identity checks)."""
    import numpy as np

    return int(np.frombuffer(mv, dtype=np.uint8).__array_interface__["data"][0]) if len(mv) else 0


@dataclass
class PutRecord:
    tier: str
    key: ChunkKey
    buffer_id: int
    address: int
    refs_before: int
    digest_before: bytes
    digest_after: bytes
    image_addresses: list[int] = field(default_factory=list)


class PutRecorder:
    """Wraps ``put`` (and ``_write`` of byte stores) of real stores to record what they got.

    Records per put: which pooled buffer (identity and address), the image's
    content hash before and after the call (a store must not mutate it), and for
    byte stores the address of the memoryview handed to ``_write`` (it must be
    the gathered buffer itself, not a copy).
    """

    def __init__(self) -> None:
        self.records: list[PutRecord] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    def instrument(self, store: Store) -> None:
        inner_put = store.put

        def put(key: ChunkKey, chunk: ChunkBuffer) -> bool:
            image = chunk.image()
            rec = PutRecord(store.name, key, id(chunk.buf), chunk.buf.address, chunk.buf.refs, digest(image), b"")
            self._local.current = rec
            try:
                return inner_put(key, chunk)
            finally:
                self._local.current = None
                rec.digest_after = digest(image)
                with self._lock:
                    self.records.append(rec)

        store.put = put  # type: ignore[method-assign]
        if isinstance(store, ByteStore):
            inner_write = store._write

            def _write(key: ChunkKey, image: memoryview, chunk: ChunkBuffer) -> Any:
                rec = getattr(self._local, "current", None)
                if rec is not None:
                    rec.image_addresses.append(address_of(image))
                return inner_write(key, image, chunk)

            store._write = _write  # type: ignore[method-assign]


def scribble_idle(engine: CacheEngine, nbytes: int, count: int = 8) -> None:
    """Take idle pool buffers of the chunk size and overwrite them: a store that kept a view of
    a released buffer now sees garbage, exactly as after reuse by a later request."""
    bufs = [engine.pool.acquire(nbytes) for _ in range(count)]
    for b in bufs:
        b.view().fill_(0xA5)
    for b in bufs:
        b.release()


__all__ = ["CHUNK_SIZE", "NUM_TOKENS", "SENTINEL", "Placement", "PutRecord", "PutRecorder", "address_of",
           "check_loaded", "chunk_payload_matches", "corrupt_stored", "digest", "fill_url", "make_engine",
           "place", "scribble_idle", "tokens_for"]
