"""Issue 10, "wrong bytes" in the decoder: every length against every other, the tag over header
and payload, any decode failure a ChunkError (the tier deletes the object), bounded inflation,
and the keyed integrity mode. Each test holds the reproduction from the issue."""
from __future__ import annotations

import hmac
import struct
import time
import tracemalloc
import zlib
from typing import Any

import msgpack
import pytest
import torch
import xxhash

from lmcache_core import chunk as chunkmod
from lmcache_core.builtin.disk_store import DiskStore
from lmcache_core.chunk import HEADER_SIZE, decode_header, decode_image, new_chunk, seal
from lmcache_core.config import Config
from lmcache_core.errors import ChunkError
from lmcache_core.keys import Namespace, chunk_keys
from lmcache_core.layout import ChunkGeometry
from lmcache_core.memory import BufferPool
from lmcache_core.storage import StoreContext
from lmcache_core.tiers import TierStack

from .conftest import random_kv

G = ChunkGeometry(2, 2, 8, "bfloat16")
TOKENS = 16
SECRET = b"0123456789abcdef-deployment-secret"


@pytest.fixture(autouse=True)
def _no_process_key():
    chunkmod.set_integrity_key(None)
    yield
    chunkmod.set_integrity_key(None)


def make_image(pool: BufferPool, codec: str = "none", seed: int = 0, tokens: int = TOKENS,
               ) -> tuple[Any, bytes, torch.Tensor]:
    key = chunk_keys(list(range(seed, seed + tokens)), Namespace("m", G.signature), tokens)[0]
    c = new_chunk(pool, key, G, tokens)
    c.kv().copy_(random_kv(c.kv().shape, torch.bfloat16, seed))
    expected = c.kv().clone()
    sealed = seal(c, codec, pool)
    data = bytes(sealed.image())
    sealed.release()
    return key, data, expected


def parse(data: bytes) -> tuple[int, int, dict[str, Any], bytes]:
    """(version, flags, metadata, stored payload) of an image, without verifying it."""
    _, version, flags, meta_len = struct.unpack_from("<4sHHI", data)
    meta = msgpack.unpackb(data[12:12 + meta_len])
    return version, flags, meta, data[HEADER_SIZE:]


def forge(meta: Any, stored: bytes, *, flags: int = 0, version: int = 2, key: bytes | None = None,
          raw_meta: bytes | None = None) -> bytes:
    """An image with any metadata and payload and *valid* checksums: what someone who knows the
    format (but not the deployment secret, unless ``key``) can write to a shared store."""
    packed = raw_meta if raw_meta is not None else msgpack.packb(meta)
    head = struct.pack("<4sHHI", b"LMCK", version, flags, len(packed)) + packed
    head += xxhash.xxh3_64_digest(head)
    if key is None:
        h: Any = xxhash.xxh3_128()
    else:
        h = hmac.new(chunkmod.derive_key(key), b"lmcache-chunk-v2", "sha256")
    h.update(head)
    h.update(stored)
    head += h.digest()
    return head + bytes(max(0, HEADER_SIZE - len(head))) + stored


def decode(pool: BufferPool, key: Any, data: bytes, nbytes: int | None = None):
    buf = pool.acquire(max(len(data), 1))
    buf.memoryview(0, len(data))[:] = data
    return decode_image(buf, len(data) if nbytes is None else nbytes, key, pool)


def rejected(pool: BufferPool, key: Any, data: bytes, match: str | None = None, nbytes: int | None = None) -> None:
    with pytest.raises(ChunkError, match=match):
        decode(pool, key, data, nbytes)
    assert pool.live_count() == 0


def test_forged_images_with_valid_checksums_decode_when_consistent():
    pool = BufferPool()
    key, data, expected = make_image(pool)
    _, _, meta, stored = parse(data)
    c = decode(pool, key, forge(meta, stored))  # the forge helper is faithful
    assert torch.equal(c.kv(), expected)
    c.release()
    assert pool.live_count() == 0


def test_stored_len_zero_with_the_checksum_of_empty_bytes_is_rejected():
    # issue: a header with stored_len=0 and the checksum of b"" passed with the payload unchecked
    pool = BufferPool()
    key, data, _ = make_image(pool)
    _, _, meta, stored = parse(data)
    flipped = bytearray(stored)
    flipped[7] ^= 0x40
    rejected(pool, key, forge({**meta, "stored_len": 0}, b"") + bytes(flipped), "stored_len|outside|stores")
    rejected(pool, key, forge({**meta, "stored_len": 0}, b""), "outside|stores", nbytes=HEADER_SIZE)


def test_a_flipped_payload_byte_behind_a_forged_header_is_not_served_by_the_disk_tier(tmp_path):
    pool = BufferPool()
    key, data, _ = make_image(pool)
    _, _, meta, stored = parse(data)
    store = DiskStore.from_url(f"disk://{tmp_path / 'd'}", StoreContext(pool))
    path = store._path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    flipped = bytearray(stored)
    flipped[100] ^= 0x01
    path.write_bytes(forge({**meta, "stored_len": 0}, b"")[:HEADER_SIZE] + bytes(flipped))
    with pytest.raises(ChunkError):
        store.get(key)
    store.close()
    assert pool.live_count() == 0


def test_codec_none_over_a_zlib_payload_is_rejected():
    # issue: a header saying `none` over a zlib payload served compressed bytes as KV
    pool = BufferPool()
    key, zdata, _ = make_image(pool, "zlib")
    _, _, meta, zstored = parse(zdata)
    assert meta["codec"] == "zlib"
    rejected(pool, key, forge({**meta, "codec": "none"}, zstored), "codec none needs exactly")
    # padded out to the plain length, the lengths agree but the bytes are not what was sealed:
    # a forger can do that only without a key (see the keyed tests); a flip of the stored
    # bytes under the old header is caught by the tag
    padded = zstored + bytes(meta["payload_len"] - len(zstored))
    bad = bytearray(forge({**meta, "codec": "none", "stored_len": meta["payload_len"]}, padded))
    bad[HEADER_SIZE + 3] ^= 1
    rejected(pool, key, bytes(bad), "integrity")


def test_header_only_images_are_a_chunk_error_and_the_tier_deletes_them():
    # issue: a header-only image made every retrieve raise from memory.py and was never deleted
    pool = BufferPool()
    key, data, _ = make_image(pool)
    rejected(pool, key, data[:HEADER_SIZE], "image is 4096 bytes")
    _, _, meta, _ = parse(data)
    for forged in ({**meta, "tokens": 0, "payload_len": 0, "stored_len": 0, "shape": [2, 2, 0, 16]},
                   {**meta, "stored_len": 0}):
        rejected(pool, key, forge(forged, b""), "outside|stores")
    rejected(pool, key, data[:100], "shorter than its 4096-byte header")


def _dict_store(pool: BufferPool):
    """A minimal ByteStore over a dict: what Redis or S3 look like to the decoder."""
    from lmcache_core.storage import ByteStore

    class DictStore(ByteStore):
        schemes = ("dict",)

        def __init__(self, context):
            super().__init__("dict", context)
            self.data: dict = {}

        @classmethod
        def from_url(cls, url, context):
            return cls(context)

        def _write(self, key, image, chunk):
            self.data[key] = bytes(image)

        def _read(self, key, alloc):
            v = self.data.get(key)
            if v is None:
                return None
            buf = alloc(len(v))
            buf.memoryview(0, len(v))[:] = v
            return buf, len(v)

        def exists(self, keys):
            return [k in self.data for k in keys]

        def delete(self, keys):
            return sum(self.data.pop(k, None) is not None for k in keys)

    return DictStore(StoreContext(pool))


BAD_META = {
    "KeyError (a field missing)": lambda m: {k: v for k, v in m.items() if k != "dtype"},
    "TypeError (tokens a string)": lambda m: {**m, "tokens": "16"},
    "OverflowError (a huge shape)": lambda m: {**m, "shape": [2**63, 2, 16, 16]},
    "OverflowError (a huge payload_len)": lambda m: {**m, "payload_len": 2**64 - 1},
    "AttributeError (metadata a list)": lambda m: list(m.values()),
    "bool for an int": lambda m: {**m, "tokens": True},
    "float for an int": lambda m: {**m, "stored_len": float(m["stored_len"])},
    "None key": lambda m: {**m, "key": None},
    "short key": lambda m: {**m, "key": m["key"][:5]},
    "layout not canonical": lambda m: {**m, "layout": m["layout"].replace("L2", "L02")},
    "layout garbage": lambda m: {**m, "layout": "L2-P9-H2-D8-bfloat16"},
    "unknown dtype": lambda m: {**m, "layout": m["layout"].replace("bfloat16", "int128"), "dtype": "int128"},
    "extra field": lambda m: {**m, "extra": 1},
    "fewer tokens than the key": lambda m: {**m, "tokens": 15, "shape": [2, 2, 15, 16], "payload_len": 960,
                                            "stored_len": 960},
    "unknown codec": lambda m: {**m, "codec": "zstd"},
    "zlib over a plain payload": lambda m: {**m, "codec": "zlib"},
}


@pytest.mark.parametrize("how", list(BAD_META))
def test_bad_metadata_with_valid_checksums_is_a_chunk_error_deleted_and_rewritten(how):
    pool = BufferPool()
    key, data, expected = make_image(pool)
    _, _, meta, stored = parse(data)
    forged = forge(BAD_META[how](meta), stored)
    rejected(pool, key, forged)
    store = _dict_store(pool)
    stack = TierStack([store])
    try:
        store.data[key] = forged
        assert stack.lookup([key]).hits == 1  # present until a read proves it bad
        assert stack.get(key) is None
        assert key not in store.data  # deleted, so a lookup no longer promises it
        assert stack.metrics.value("lmcache_corrupt_chunks", tier="dict") == 1
        assert stack.lookup([key]).hits == 0
        good = decode(pool, key, data)
        stack.put(key, good)
        assert stack.flush(10)
        good.release()
    finally:
        stack.close()
    assert store.data.get(key) == data  # a later store rewrote it
    assert pool.live_count() == 0


@pytest.mark.parametrize("prefix", ["version 1", "unknown flag", "meta_len past the header", "meta garbage"])
def test_bad_prefixes_are_chunk_errors(prefix):
    pool = BufferPool()
    key, data, _ = make_image(pool)
    _, _, meta, stored = parse(data)
    forged = {"version 1": lambda: forge(meta, stored, version=1),
              "unknown flag": lambda: forge(meta, stored, flags=0x4),
              "meta garbage": lambda: forge(None, stored, raw_meta=b"\xc1\xff\x00"),
              "meta_len past the header": lambda: forge(None, stored, raw_meta=bytes(HEADER_SIZE - 20))}[prefix]()
    rejected(pool, key, forged)


def test_nbytes_must_match_the_image():
    pool = BufferPool()
    key, data, _ = make_image(pool)
    rejected(pool, key, data + bytes(5000), "describes")  # beyond the 4096-byte padding
    decode(pool, key, data + bytes(100)).release()  # O_DIRECT padding is fine
    rejected(pool, key, data, nbytes=-1)
    rejected(pool, key, data, nbytes=10**12)
    assert pool.live_count() == 0


def test_a_zlib_bomb_is_rejected_quickly_and_without_the_memory():
    # issue: a 1.5 MB zlib image inflating to 1.5 GiB took 3 GiB and 18 s before it was rejected
    pool = BufferPool()
    key, data, _ = make_image(pool)
    _, _, meta, _ = parse(data)
    # 1.5 GiB of zeros as 1536 identical 1 MiB deflate blocks (full flushes reset the window);
    # the adler32 trailer is wrong, which a decoder sees only after inflating everything
    comp = zlib.compressobj(9)
    first = comp.compress(bytes(1 << 20)) + comp.flush(zlib.Z_FULL_FLUSH)
    mid = comp.compress(bytes(1 << 20)) + comp.flush(zlib.Z_FULL_FLUSH)
    end = comp.flush()
    bomb = first + mid * 1535 + end
    assert 1 << 20 < len(bomb) < 2 << 20
    forged = forge({**meta, "codec": "zlib", "stored_len": len(bomb)}, bomb)
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        # the declared size bounds the stored zlib length too: this bomb does not even fit
        rejected(pool, key, forged, "exceed the bound")
        # one that fits the bound (4 MiB of zeros in ~4 KiB under a bigger layout) stops at the
        # declared size
        big = {**meta, "layout": "L8-P2-H2-D8-bfloat16", "shape": [8, 2, TOKENS, 16],
               "payload_len": 8 * 2 * TOKENS * 16 * 2}
        small = first + mid * 3 + end  # 4 MiB
        assert len(small) <= big["payload_len"]
        rejected(pool, key, forge({**big, "codec": "zlib", "stored_len": len(small)}, small), "inflates beyond")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 8 << 20, f"peak {peak} bytes"


def test_truncated_and_trailing_zlib_streams_are_rejected():
    pool = BufferPool()
    key, zdata, expected = make_image(pool, "zlib")
    _, _, meta, zstored = parse(zdata)
    for stored in (zstored[:-3], zstored + b"junk", zlib.compress(b"\0" * (meta["payload_len"] - 1))):
        rejected(pool, key, forge({**meta, "stored_len": len(stored)}, stored))
    c = decode(pool, key, zdata)
    assert torch.equal(c.kv(), expected)
    c.release()
    assert pool.live_count() == 0


# -- keyed integrity --------------------------------------------------------------------------
def test_keyed_mode_accepts_only_chunks_sealed_with_the_secret():
    pool = BufferPool()
    plain_key, plain, _ = make_image(pool)
    chunkmod.set_integrity_key(SECRET)
    key, data, expected = make_image(pool, seed=1)
    _, flags, meta, stored = parse(data)
    assert flags == chunkmod.FLAG_KEYED
    c = decode(pool, key, data)
    assert torch.equal(c.kv(), expected)
    c.release()
    zkey, zdata, zexpected = make_image(pool, "zlib", seed=2)
    c = decode(pool, zkey, zdata)
    assert torch.equal(c.kv(), zexpected) and c.header.flags == chunkmod.FLAG_KEYED
    c.release()
    # a planted chunk: valid unkeyed checksums, or a keyed tag under another secret
    rejected(pool, plain_key, plain, "carries no keyed tag")
    other = bytearray(stored)
    other[0] ^= 1
    rejected(pool, key, forge(meta, bytes(other), flags=chunkmod.FLAG_KEYED, key=b"another secret of 16+ bytes"),
             "keyed integrity")
    rejected(pool, key, forge(meta, bytes(other)), "carries no keyed tag")
    assert decode(pool, key, forge(meta, stored, flags=chunkmod.FLAG_KEYED, key=SECRET)).release() is None
    # a reader without the key refuses keyed chunks rather than trusting them
    chunkmod.set_integrity_key(None)
    rejected(pool, key, data, "has none")
    assert pool.live_count() == 0


def test_a_per_pool_key_wins_over_the_process_key():
    a, b = BufferPool(), BufferPool()
    chunkmod.bind_integrity_key(a, SECRET)
    key, data, _ = make_image(a)
    assert parse(data)[1] == chunkmod.FLAG_KEYED
    rejected(b, key, data, "has none")
    decode(a, key, data).release()
    chunkmod.bind_integrity_key(a, None)
    assert not chunkmod.integrity_keyed(a)


def test_config_sets_the_process_key_from_a_file_and_never_shows_it(tmp_path, caplog):
    f = tmp_path / "key"
    f.write_text(SECRET.decode() + "\n")
    with caplog.at_level("DEBUG"):
        cfg = Config.load(overrides={"integrity_key_file": str(f)}, env={})
    assert chunkmod.integrity_keyed()
    pool = BufferPool()
    key, data, _ = make_image(pool)
    chunkmod.set_integrity_key(SECRET)
    decode(pool, key, data).release()  # the file's trailing newline is not part of the key
    cfg2 = Config.from_dict({"integrity_key": SECRET.decode()})
    for text in (repr(cfg2), str(cfg2.to_dict()), caplog.text):
        assert SECRET.decode() not in text
    assert cfg.integrity_key_file == str(f)


def test_decode_header_rejects_before_any_payload_is_read():
    pool = BufferPool()
    key, data, _ = make_image(pool)
    assert decode_header(data[:HEADER_SIZE]).key == key
    with pytest.raises(ChunkError):
        decode_header(forge({"tokens": "x"}, b"")[:HEADER_SIZE])
