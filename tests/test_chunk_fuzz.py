"""Seeded mutation fuzzing of the chunk decoder (issue 10).

Inputs are sealed images (plain and zlib, full and partial chunks, unkeyed and keyed) put
through raw mutations (bit flips, byte writes, truncations, extensions, splices, zeroed or
random regions, a wrong ``nbytes``) and through header rewrites *with recomputed checksums*
(any field set to a hostile value, dropped or added, codec swapped, prefix fields changed,
garbage msgpack), which is what a writer who knows the format can plant. In keyed mode the
forger also rewrites the payload, with an unkeyed tag or one under another secret.

Two properties are counted over every input: a decode either raises ChunkError or returns
exactly the sealed payload bytes in the sealed byte shape (a *wrong-data acceptance*
otherwise), and it never raises anything else (a *non-chunk exception*). The pool must hold
no buffer afterwards.

CI runs a fixed budget (``FUZZ_INPUTS`` below, a few seconds). The long run:
``LMCACHE_FUZZ_INPUTS=1000000 pytest -q tests/test_chunk_fuzz.py`` or
``python -m tests.test_chunk_fuzz 1000000 [seed]`` (prints a JSON summary).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import msgpack
import torch

from lmcache_core import chunk as chunkmod
from lmcache_core.chunk import HEADER_SIZE, decode_image, new_chunk, seal
from lmcache_core.errors import ChunkError
from lmcache_core.keys import ChunkKey, Namespace, chunk_keys
from lmcache_core.layout import ChunkGeometry, itemsize
from lmcache_core.memory import BufferPool

try:
    from .test_chunk_integrity import SECRET, forge, parse
except ImportError:  # python -m tests.test_chunk_fuzz
    from tests.test_chunk_integrity import SECRET, forge, parse  # type: ignore[no-redef]

FUZZ_INPUTS = int(os.environ.get("LMCACHE_FUZZ_INPUTS", "40000"))
OTHER_SECRET = b"not-the-deployment-secret-0123456789"
GEOMETRIES = [ChunkGeometry(2, 2, 8, "bfloat16"), ChunkGeometry(1, 1, 16, "float8_e4m3fn")]
HOSTILE = [0, 1, -1, 2, 15, 16, 17, 255, 256, 4095, 4096, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -2**63,
           2**64 - 1, True, False, None, 0.0, 1.5, float("nan"), "", "x", "16", "none", "zlib", b"", b"\0" * 32,
           [], [1, 2], {}, {"a": 1}]


@dataclass
class Base:
    key: ChunkKey
    image: bytes
    payload: bytes  # the sealed, decoded payload
    row_shape: tuple[int, int, int, int]  # layers, planes, tokens, bytes per row
    keyed: bool


@dataclass
class FuzzResult:
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    wrong_data: int = 0
    non_chunk_exceptions: int = 0
    leaked_buffers: int = 0
    seconds: float = 0.0
    seed: int = 0
    by_mutation: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


def row_shape(g: ChunkGeometry, tokens: int) -> tuple[int, int, int, int]:
    return (g.num_layers, g.kv_planes, tokens, g.hidden * itemsize(g.dtype))


def make_bases(pool: BufferPool, keyed: bool) -> list[Base]:
    chunkmod.set_integrity_key(SECRET if keyed else None)
    out = []
    for gi, g in enumerate(GEOMETRIES):
        for tokens in (16, 5):
            for codec in ("none", "zlib"):
                key = chunk_keys(list(range(gi * 100, gi * 100 + tokens)), Namespace("m", g.signature), 16,
                                 save_partial=True)[0]
                c = new_chunk(pool, key, g, tokens)
                raw = c.kv().view(torch.uint8).view(-1)
                gen = torch.Generator().manual_seed(gi * 10 + tokens)
                raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
                raw[: raw.numel() // 3] = 0  # compressible, so zlib images are short
                payload = bytes(raw.numpy())
                s = seal(c, codec, pool)
                out.append(Base(key, bytes(s.image()), payload, row_shape(g, tokens), keyed))
                s.release()
    return out


# -- mutations: (image, nbytes) -> (image, nbytes) -----------------------------------------------
def _flip(r: random.Random, b: Base, img: bytearray) -> tuple[bytes, int]:
    for _ in range(r.randint(1, 8)):
        i = r.randrange(len(img)) if r.random() < 0.5 else r.randrange(min(len(img), 256))
        img[i] ^= 1 << r.randrange(8)
    return bytes(img), len(img)


def _set_bytes(r: random.Random, b: Base, img: bytearray) -> tuple[bytes, int]:
    i = r.randrange(len(img))
    n = r.randint(1, 16)
    img[i:i + n] = bytes(r.randrange(256) for _ in range(n))[: max(0, len(img) - i)]
    return bytes(img), len(img)


def _truncate(r: random.Random, b: Base, img: bytearray) -> tuple[bytes, int]:
    cut = r.choice([r.randrange(len(img)), HEADER_SIZE, len(img) - 1, r.randrange(64)])
    return bytes(img[:cut]), cut


def _extend(r: random.Random, b: Base, img: bytearray) -> tuple[bytes, int]:
    extra = bytes(r.randrange(256) for _ in range(r.choice([1, 7, 100]))) if r.random() < 0.5 else \
        bytes(r.choice([1, 4096, 5000]))
    return bytes(img) + extra, len(img) + len(extra)


def _splice(r: random.Random, b: Base, img: bytearray, others: list[Base]) -> tuple[bytes, int]:
    o = r.choice([x for x in others if x is not b] or others).image
    i = r.randrange(min(len(img), len(o)))
    n = r.randint(1, 512)
    out = bytearray(img)
    out[i:i + n] = o[i:i + n]
    if r.random() < 0.3:  # one image's header over another's payload
        out = bytearray(o[:HEADER_SIZE]) + img[HEADER_SIZE:]
    return bytes(out), len(out)


def _region(r: random.Random, b: Base, img: bytearray) -> tuple[bytes, int]:
    i = r.randrange(len(img))
    n = r.randint(1, 4096)
    fill = bytes(min(n, len(img) - i)) if r.random() < 0.5 else \
        bytes(r.randrange(256) for _ in range(min(n, len(img) - i, 64)))
    img[i:i + len(fill)] = fill
    return bytes(img), len(img)


def _random_image(r: random.Random, b: Base, img: bytearray) -> tuple[bytes, int]:
    n = r.choice([0, 1, 12, 100, HEADER_SIZE, len(img)])
    data = bytearray(r.randrange(256) for _ in range(min(n, 200))) + bytes(max(0, n - 200))
    if r.random() < 0.5 and n >= 4:
        data[:4] = b"LMCK"
    return bytes(data), n


def _nbytes(r: random.Random, b: Base, img: bytearray) -> tuple[bytes, int]:
    return bytes(img), max(0, len(img) + r.choice([-1, -4096, 1, 100, -len(img), -HEADER_SIZE - 1]))


def _rewrite(r: random.Random, b: Base, img: bytearray) -> tuple[bytes, int]:
    """A header field rewritten, then every checksum recomputed (unkeyed, or keyed with the
    deployment secret when the payload is left alone: a replay of sealed bytes)."""
    version, flags, meta, stored = parse(bytes(img))
    meta = dict(meta)
    what = r.randrange(10)
    if what < 5:
        name = r.choice(list(meta))
        meta[name] = r.choice(HOSTILE + [meta[r.choice(list(meta))]]) if r.random() < 0.7 else \
            (meta[name] + r.choice([-1, 1]) if type(meta[name]) is int else meta[name])
    elif what == 5:
        meta.pop(r.choice(list(meta)))
    elif what == 6:
        meta[r.choice(["extra", "checksum", "codec2"])] = r.choice(HOSTILE)
    elif what == 7:
        meta["codec"] = "zlib" if meta["codec"] == "none" else "none"
        if r.random() < 0.5:
            meta["stored_len"] = len(stored)
    elif what == 8:
        g = ChunkGeometry.from_signature(meta["layout"])
        other = r.choice(GEOMETRIES + [ChunkGeometry(g.num_layers, g.num_heads, g.head_dim, "float16", g.kv_planes),
                                       ChunkGeometry(g.num_layers, 1, g.hidden, g.dtype, g.kv_planes)])
        meta["layout"], meta["dtype"] = other.signature, other.dtype
        if r.random() < 0.7:
            meta["shape"] = list(other.shape(meta["tokens"]))
            meta["payload_len"] = other.nbytes(meta["tokens"])
    else:
        tokens = r.choice([1, b.row_shape[2] - 1, b.row_shape[2] + 1, 16])
        meta["tokens"] = tokens
        g = ChunkGeometry.from_signature(meta["layout"])
        meta["shape"] = list(g.shape(tokens))
        meta["payload_len"] = g.nbytes(tokens)
        if meta["codec"] == "none":
            meta["stored_len"] = meta["payload_len"]
    if r.random() < 0.1:
        version, flags = r.choice([(1, flags), (3, flags), (version, flags ^ 2), (version, flags ^ 1)])
    try:
        packed = msgpack.packb(meta)
    except (TypeError, ValueError, OverflowError):
        packed = msgpack.packb({k: v for k, v in meta.items() if type(v) is not float})
    if r.random() < 0.05:  # garbage msgpack under a valid header checksum
        packed = bytes(x ^ (r.randrange(256) if r.random() < 0.1 else 0) for x in packed)
    key = SECRET if (flags & 1 and b.keyed and r.random() < 0.5) else (OTHER_SECRET if flags & 1 else None)
    out = forge(None, stored, flags=flags, version=version, key=key, raw_meta=packed)
    return out, len(out)


def _forge_payload(r: random.Random, b: Base, img: bytearray) -> tuple[bytes, int]:
    """The payload changed under the original header, tagged unkeyed or under another secret:
    accepted only by a process whose integrity key the forger does not have if broken."""
    version, flags, meta, stored = parse(bytes(img))
    s = bytearray(stored)
    s[r.randrange(len(s))] ^= 1 << r.randrange(8)
    fl, key = r.choice([(flags, OTHER_SECRET if flags & 1 else None), (flags & ~1, None), (flags | 1, OTHER_SECRET)])
    out = forge(meta, bytes(s), flags=fl, version=version, key=key)
    return out, len(out)


MUTATIONS: dict[str, Callable[..., tuple[bytes, int]]] = {
    "flip": _flip, "set_bytes": _set_bytes, "truncate": _truncate, "extend": _extend, "region": _region,
    "random_image": _random_image, "nbytes": _nbytes, "rewrite": _rewrite, "rewrite2": _rewrite,
    "forge_payload": _forge_payload,
}


def check_one(pool: BufferPool, b: Base, data: bytes, nbytes: int, res: FuzzResult, how: str) -> None:
    buf = pool.acquire(max(len(data), 1))
    buf.memoryview(0, len(data))[:] = data
    try:
        c = decode_image(buf, nbytes, b.key, pool)
    except ChunkError:
        res.rejected += 1
        return
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer counts
        res.non_chunk_exceptions += 1
        if len(res.examples) < 10:
            res.examples.append(f"{how}: {type(exc).__name__}: {exc}")
        return
    try:
        h = c.header
        got = bytes(c.buf.memoryview(HEADER_SIZE, h.payload_len))
        if h.codec != "none" or row_shape(h.geometry, h.num_tokens) != b.row_shape or got != b.payload:
            res.wrong_data += 1
            if len(res.examples) < 10:
                res.examples.append(f"{how}: accepted {h.geometry.signature} x {h.num_tokens}, "
                                    f"bytes equal: {got == b.payload}")
        else:
            res.accepted += 1
    finally:
        c.release()


def fuzz(inputs: int, seed: int = 0) -> FuzzResult:
    r = random.Random(seed)
    pool = BufferPool(max_idle_bytes=64 << 20)
    res = FuzzResult(seed=seed)
    t0 = time.perf_counter()
    try:
        for keyed in (False, True):
            bases = make_bases(pool, keyed)  # sets the process key for this half
            names = list(MUTATIONS)
            for i in range(inputs // 2 if not keyed else inputs - inputs // 2):
                b = r.choice(bases)
                how = r.choice(names)
                fn = MUTATIONS[how]
                if how == "forge_payload" and not keyed:
                    # unkeyed, a payload re-tagged by a forger is a valid chunk by design: that is
                    # what keyed mode is for, so this half flips payload bits without re-tagging
                    how, fn = "flip", _flip
                data, nbytes = fn(r, b, bytearray(b.image))
                res.by_mutation[how] = res.by_mutation.get(how, 0) + 1
                check_one(pool, b, data, nbytes, res, how)
                if i % 7 == 0:  # splices between images of one mode
                    data, nbytes = _splice(r, b, bytearray(b.image), bases)
                    res.by_mutation["splice"] = res.by_mutation.get("splice", 0) + 1
                    check_one(pool, b, data, nbytes, res, "splice")
                    res.inputs += 1
                res.inputs += 1
                if i % 997 == 0:  # the clean image still decodes
                    check_one(pool, b, b.image, len(b.image), res, "clean")
                    res.inputs += 1
    finally:
        chunkmod.set_integrity_key(None)
    res.seconds = round(time.perf_counter() - t0, 2)
    res.leaked_buffers = pool.live_count()
    return res


def test_decoder_fuzz_fixed_budget():
    res = fuzz(FUZZ_INPUTS, seed=int(os.environ.get("LMCACHE_FUZZ_SEED", "0")))
    print(json.dumps(asdict(res)))
    assert res.wrong_data == 0, res.examples
    assert res.non_chunk_exceptions == 0, res.examples
    assert res.leaked_buffers == 0
    assert res.accepted > 0 and res.rejected > res.inputs // 2  # the mutations bite, clean images pass


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    result = fuzz(n, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(json.dumps(asdict(result), indent=2))
    sys.exit(1 if result.wrong_data or result.non_chunk_exceptions or result.leaked_buffers else 0)
