"""kv_codec: the engine's own copies code the KV (fp8), every tier holds that form, reads hand
it to the device still coded. Checked against the host codec bit for bit, on the CPU device
(the torch reference every device inherits); the fused kernels are checked in
kernels/tests/test_fp8.py."""
from __future__ import annotations

import pytest
import torch

from lmcache_core import chunk as chunkmod
from lmcache_core.codecs import fp8
from lmcache_core.config import Config
from lmcache_core.engine import CacheEngine
from lmcache_core.errors import ChunkError, ConfigError
from lmcache_core.keys import ChunkKey
from lmcache_core.layout import PagedKV, slot_mapping
from lmcache_core.memory import BufferPool

from .conftest import random_kv

L, H, D, BS, NB = 4, 2, 16, 16, 48
TOKENS = list(range(1000, 1100))  # 3 chunks of 32 and a partial of 4


def paged(seed: int, dtype=torch.bfloat16) -> tuple[list[torch.Tensor], PagedKV]:
    caches = [random_kv((2, NB, BS, H, D), dtype, seed * 100 + i) for i in range(L)]
    return caches, PagedKV.from_vllm_flash(caches)


def tokens_of(caches, blocks, n):
    s = slot_mapping(blocks, BS, 0, n)
    return [c[:, s // BS, s % BS] for c in caches]  # [planes, n, heads, dim] per layer


def fp8_of(x: torch.Tensor) -> torch.Tensor:
    """What the fp8 codec makes of ``x`` ``[planes, n, heads, dim]`` (scales per token and head)."""
    q, s = fp8.quantize(x.reshape(*x.shape[:2], H * D), D)
    return fp8.dequantize(q, s, D, x.dtype).reshape(x.shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def assert_fp8_loaded(src_c, dst_c, blocks) -> None:
    """Every one of the 100 tokens at ``blocks`` of ``dst_c`` holds the fp8 codec's values of ``src_c``'s."""
    for a, b in zip(tokens_of(src_c, blocks, 100), tokens_of(dst_c, blocks, 100)):
        assert same(b, fp8_of(a))


def assert_host_chain_meets_kv_codec(make_engine, fp8_engine, shared, writer_codec: str, reader_codec: str,
                                     options: str = "") -> None:
    """An exact engine whose disk tier codes ``writer_codec`` (a host chain starting with fp8) stores
    the 100 tokens; a kv_codec fp8 engine with the tier codec ``reader_codec`` (the chain's rest,
    "" for none) loads them all, the fp8 codec's values bit for bit: the two write the same chunks."""
    src_c, src = paged(1)
    blocks = torch.arange(7)
    writer = make_engine(src.geometry, tiers=[f"disk://{shared}?capacity=256MiB&codec={writer_codec}{options}"])
    writer.store(TOKENS, src, blocks, wait=True)
    reader_query = f"&codec={reader_codec}" if reader_codec else ""
    reader = fp8_engine(tiers=[f"disk://{shared}?capacity=256MiB{reader_query}{options}"])
    dst_c, dst = paged(4)
    assert reader.retrieve(TOKENS, dst, blocks).hit_tokens == 100
    assert_fp8_loaded(src_c, dst_c, blocks)


@pytest.fixture
def fp8_engine(tmp_path):
    engines: list[CacheEngine] = []

    def make(tiers=None, **overrides):
        cfg = Config.from_dict({"tiers": tiers or ["memory://?capacity=256MiB",
                                                   f"disk://{tmp_path / 'disk'}?capacity=256MiB"],
                                "chunk_size": 32, "device": "cpu", "kv_codec": "fp8", **overrides})
        eng = CacheEngine(paged(0)[1].geometry, cfg, model="test-model")
        engines.append(eng)
        return eng

    yield make
    for e in engines:
        e.close()


@pytest.mark.parametrize("layerwise", [True, False])
def test_fp8_round_trip_is_the_host_codec_bit_for_bit(fp8_engine, layerwise):
    src_c, src = paged(1)
    dst_c, dst = paged(2)
    eng = fp8_engine()
    sb, db = torch.randperm(NB)[:7], torch.randperm(NB)[:7]
    if layerwise:
        task = eng.start_store(TOKENS, src, sb)
        for layer in range(L):
            task.save_layer(layer)
        assert task.finish(wait=True) == 100
        r = eng.start_retrieve(TOKENS, dst, db)
        assert list(r) == list(range(L))
        r.finish()
        assert r.hit_tokens == 100
    else:
        assert eng.store(TOKENS, src, sb, wait=True) == 100
        assert eng.retrieve(TOKENS, dst, db).hit_tokens == 100
    for a, b in zip(tokens_of(src_c, sb, 100), tokens_of(dst_c, db, 100)):
        assert same(b, fp8_of(a))
        assert not same(b, a)  # lossy: not the exact KV
    assert eng.inflight_bytes() == 0
    # buffers hold the coded form (a byte per value, 2 per head and token), and the in-flight bound
    # counts that
    assert eng._chunk_bytes(32) == fp8.encoded_len(src.geometry, 32) == src.geometry.nbytes(32) * (D + 2) // (2 * D)


def test_disk_holds_the_coded_form_and_a_fresh_engine_loads_part_of_it(fp8_engine, tmp_path):
    src_c, src = paged(1)
    eng = fp8_engine()
    sb, db = torch.arange(7), torch.randperm(NB)[:7]
    eng.store(TOKENS, src, sb, wait=True)
    eng.close()
    files = [p for p in (tmp_path / "disk").rglob("*") if p.is_file() and p.stat().st_size > chunkmod.HEADER_SIZE]
    assert len(files) == 4
    for f in files:
        h = chunkmod.decode_header(f.read_bytes()[:chunkmod.HEADER_SIZE])
        assert h.codec == "fp8-e4m3-th/1" and h.stored_len == fp8.encoded_len(src.geometry, h.num_tokens)
    disk_only = fp8_engine(tiers=[f"disk://{tmp_path / 'disk'}?capacity=256MiB"])
    dst_c, dst = paged(3)
    before = tokens_of(paged(3)[0], db, 100)
    res = disk_only.retrieve(TOKENS, dst, db, skip_tokens=40, max_tokens=90)  # mid-chunk at both ends
    assert res.hit_tokens == 90 and res.by_tier == {"disk": 50}
    for a, b, old in zip(tokens_of(src_c, sb, 100), tokens_of(dst_c, db, 100), before):
        assert same(b[:, 40:90], fp8_of(a)[:, 40:90])
        assert same(b[:, :40], old[:, :40]) and same(b[:, 90:], old[:, 90:])  # the engine's own tokens


def test_fp8_and_exact_chunks_never_meet_but_a_tier_codec_fp8_is_the_same_form(make_engine, fp8_engine, tmp_path):
    _, src = paged(1)
    blocks = torch.arange(7)
    exact = make_engine(src.geometry)
    exact.store(TOKENS, src, blocks, wait=True)
    coded = fp8_engine()  # the same memory and disk URLs: other processes would share the disk
    assert coded.lookup(TOKENS).hit_tokens == 0
    coded.store(TOKENS[:64], src, blocks, wait=True)
    assert exact.lookup(TOKENS[:64]).hit_tokens == 64  # its own exact chunks, not the fp8 ones
    exact.clear()
    assert exact.lookup(TOKENS).hit_tokens == 0
    # an exact engine whose disk tier codes fp8 writes the same chunks under the same keys
    assert_host_chain_meets_kv_codec(make_engine, fp8_engine, tmp_path / "shared", "fp8", "")


def test_a_bad_fp8_stream_is_a_miss_even_with_a_valid_tag():
    geometry = paged(0)[1].geometry
    pool = BufferPool(lambda n: torch.empty(n, dtype=torch.uint8), 1 << 26)
    chunkmod.keep_coded(pool, "fp8-e4m3-th/1")
    key = ChunkKey(bytes(range(16)), bytes(16), 32)
    for poison in ("nan", "scale"):
        c = chunkmod.new_chunk(pool, key, geometry, 32, "fp8-e4m3-th/1")
        q, s = fp8.image_views(geometry, c.coded(), 32)
        q.fill_(0x38)  # 1.0
        s.fill_(1.0)
        if poison == "nan":
            q[1, 0, 3, 5] = 0x7F
        else:
            s[2, 1, 0, 1] = float("inf")
        sealed = chunkmod.seal(c, "none", pool)  # tagged as it is: only the stream check can refuse it
        buf = pool.acquire(sealed.header.image_len)
        buf.memoryview(0, sealed.header.image_len)[:] = sealed.image()
        with pytest.raises(ChunkError, match="NaN|scale"):
            chunkmod.decode_image(buf, sealed.header.image_len, key, pool, geometry)
        sealed.release()
    # a well-formed stream stays coded for the device (not decoded on the host)
    c = chunkmod.new_chunk(pool, key, geometry, 32, "fp8-e4m3-th/1")
    c.coded().zero_()
    fp8.image_views(geometry, c.coded(), 32)[1].fill_(1.0)
    sealed = chunkmod.seal(c, "none", pool)
    buf = pool.acquire(sealed.header.image_len)
    buf.memoryview(0, sealed.header.image_len)[:] = sealed.image()
    got = chunkmod.decode_image(buf, sealed.header.image_len, key, pool, geometry)
    assert got.header.codec == "fp8-e4m3-th/1" and torch.equal(got.coded(), sealed.coded())
    got.release()
    sealed.release()


def test_kv_codec_refuses_what_it_cannot_combine_with(tmp_path):
    base = {"tiers": ["memory://?capacity=64MiB"], "device": "cpu", "kv_codec": "fp8"}
    Config.from_dict({**base, "daemon": f"daemon://{tmp_path}/s.sock"})  # the daemon keeps fp8 chunks coded
    with pytest.raises(ConfigError, match="codec: none"):
        Config.from_dict({**base, "codec": "zlib"})
    for lossy in ("cachegen", "fp8", "lossless%2Bfp8"):
        with pytest.raises(ConfigError, match="only lossless codecs"):
            Config.from_dict({**base, "tiers": [f"disk://{tmp_path}/d?codec={lossy}"]})
    Config.from_dict({**base, "tiers": [f"disk://{tmp_path}/d?codec=aesgcm&codec_key_file={tmp_path}/k"]})
    Config.from_dict({**base, "tiers": [f"disk://{tmp_path}/d?codec=lossless"]})
    with pytest.raises(ConfigError, match="not allowed"):
        Config.from_dict({**base, "kv_codec": "fp4"})
    fp8_kv = PagedKV.from_vllm_flash([torch.zeros((2, 4, BS, H, D), dtype=torch.float8_e4m3fn)])
    with pytest.raises(ConfigError, match="unset kv_codec"):
        CacheEngine(fp8_kv.geometry, Config.from_dict(base), model="m")


def test_kv_codec_wire_id_is_the_fp8_codecs():
    assert fp8.FP8Codec.wire_id in chunkmod._KEPT_CHECKS


def test_encryption_at_rest_over_fp8_images(fp8_engine, make_engine, tmp_path):
    """kv_codec fp8 with a disk tier codec=aesgcm: the files hold fp8 images encrypted (none of an
    image's bytes in the clear), a fresh engine with the secret loads them bit for bit, one with
    another secret misses, and an exact engine's codec=fp8+aesgcm tier writes the same form."""
    secret, other = tmp_path / "k1", tmp_path / "k2"
    secret.write_text("a" * 32)
    other.write_text("b" * 32)
    disk = tmp_path / "enc"
    url = f"disk://{disk}?capacity=256MiB&codec=aesgcm&codec_key_file={secret}"
    src_c, src = paged(1)
    blocks = torch.arange(7)
    eng = fp8_engine(tiers=["memory://?capacity=64MiB", url])
    eng.store(TOKENS, src, blocks, wait=True)
    image = eng.tiers.by_name("memory").get(eng.keys(TOKENS)[0])  # the memory tier keeps it plain fp8
    assert image is not None and image.header.codec == "fp8-e4m3-th/1"
    sample = bytes(image.coded()[1000:1064].numpy())
    image.release()
    files = [p for p in disk.rglob("*") if p.is_file() and p.stat().st_size > chunkmod.HEADER_SIZE]
    assert len(files) == 4
    for f in files:
        data = f.read_bytes()
        assert chunkmod.decode_header(data[:chunkmod.HEADER_SIZE]).codec == "fp8-e4m3-th/1+aesgcm/1"
        assert sample not in data
    fresh = fp8_engine(tiers=[url])
    dst_c, dst = paged(2)
    assert fresh.retrieve(TOKENS, dst, blocks).by_tier == {"disk": 100}
    assert_fp8_loaded(src_c, dst_c, blocks)
    stranger = fp8_engine(tiers=[f"disk://{disk}?capacity=256MiB&codec=aesgcm&codec_key_file={other}"])
    assert stranger.retrieve(TOKENS, paged(3)[1], blocks).hit_tokens == 0  # fails authentication: a miss
    # an exact engine's host chain fp8+aesgcm: the same chunks, read by kv_codec fp8 with the tier aesgcm
    assert_host_chain_meets_kv_codec(make_engine, fp8_engine, tmp_path / "shared", "fp8%2Baesgcm", "aesgcm",
                                     f"&codec_key_file={secret}")


def test_lossless_over_fp8_images(fp8_engine, make_engine, tmp_path):
    """kv_codec fp8 with a disk tier codec=lossless: the files hold the fp8 images zstd-coded
    (smaller, header fp8-e4m3-th/1+lossless-zstd/2), a fresh engine loads them bit for bit the
    host codec's values, a corrupted compressed payload is a miss, and an exact engine's host
    chain fp8+lossless writes the same form; lossless+aesgcm composes."""
    disk = tmp_path / "z"
    url = f"disk://{disk}?capacity=256MiB&codec=lossless"
    src_c, src = paged(1)
    blocks = torch.arange(7)
    eng = fp8_engine(tiers=["memory://?capacity=64MiB", url])
    eng.store(TOKENS, src, blocks, wait=True)
    files = sorted(p for p in disk.rglob("*") if p.is_file() and p.stat().st_size > chunkmod.HEADER_SIZE)
    assert len(files) == 4
    for f in files:
        h = chunkmod.decode_header(f.read_bytes()[:chunkmod.HEADER_SIZE])
        assert h.codec == "fp8-e4m3-th/1+lossless-zstd/2"
        assert h.stored_len < fp8.encoded_len(src.geometry, h.num_tokens)  # random KV: the scales' and signs' slack
    fresh = fp8_engine(tiers=[url])
    dst_c, dst = paged(2)
    assert fresh.retrieve(TOKENS, dst, blocks).by_tier == {"disk": 100}
    assert_fp8_loaded(src_c, dst_c, blocks)
    data = bytearray(files[0].read_bytes())
    data[chunkmod.HEADER_SIZE + 40] ^= 0x5A
    files[0].write_bytes(bytes(data))
    third = fp8_engine(tiers=[url])
    assert third.lookup(TOKENS).hit_tokens == 100
    assert third.retrieve(TOKENS, paged(3)[1], blocks).hit_tokens < 100  # the corrupted chunk is a miss
    # an exact engine's host chain fp8+lossless: the same chunks; and lossless+aesgcm over fp8
    secret = tmp_path / "k"
    secret.write_text("c" * 32)
    for writer_codec, reader_codec in (("fp8%2Blossless", "lossless"),
                                       ("fp8%2Blossless%2Baesgcm", "lossless%2Baesgcm")):
        assert_host_chain_meets_kv_codec(make_engine, fp8_engine, tmp_path / f"shared-{reader_codec}", writer_codec,
                                         reader_codec, f"&codec_key_file={secret}")
