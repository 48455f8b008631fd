"""Codecs on real SmolLM2 KV (benchmarks/data): bounds, bit-exact lossless, every bad stream a
miss, per-tier codecs through a real engine and disk tier, lossy namespaces, encryption at rest."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcache_core import hookimpl
from lmcache_core.chunk import HEADER_SIZE, ChunkBuffer, decode_image, encode_chunk, new_chunk, seal
from lmcache_core.codecs import REGISTRY, CodecContext, resolve
from lmcache_core.codecs.registry import split_codec
from lmcache_core.errors import ChunkError, ConfigError
from lmcache_core.keys import Namespace, chunk_keys
from lmcache_core.layout import ChunkGeometry, PagedKV
from lmcache_core.memory import BufferPool
from lmcache_core.plugins import PluginManager, get_plugin_manager

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
META = json.loads((DATA / "smollm2_kv.json").read_text())
G = ChunkGeometry(META["num_layers"], META["num_heads"], META["head_dim"], "bfloat16")
T = META["tokens"]


@pytest.fixture(scope="module")
def real_kv() -> torch.Tensor:
    """``[layers, 2, tokens, hidden]`` bf16 KV SmolLM2-135M computed for the demo document."""
    raw = np.load(DATA / "smollm2_kv.npy")
    return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(G.shape(T))


def _chunk(pool: BufferPool, kv: torch.Tensor, seed: int = 0) -> ChunkBuffer:
    key = chunk_keys(list(range(seed, seed + kv.shape[2])), Namespace("m", G.signature), kv.shape[2])[0]
    c = new_chunk(pool, key, G, kv.shape[2])
    c.kv().copy_(kv)
    return seal(c)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| as a fraction of max |a| per layer and plane (the declared bound's measure)."""
    amax = a.float().abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-30)
    return float(((a.float() - b.float()).abs() / amax).max())


# -- the codecs themselves -------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["lossless", "fp8", "cachegen", "lossless+aesgcm", "fp8+lossless"])
def test_round_trip_on_real_kv_within_the_declared_bound(spec, real_kv, tmp_path):
    pool = BufferPool()
    if "aesgcm" in spec:
        from lmcache_core.codecs.aesgcm import bind_secret

        bind_secret(pool, b"s" * 32)
    chain = resolve(spec)
    plain = _chunk(pool, real_kv)
    coded = encode_chunk(plain, chain, pool)
    assert coded.header.codec == chain.wire_id
    if spec != "lossless+aesgcm":
        assert coded.header.stored_len < plain.header.payload_len  # real KV compresses
    img = pool.acquire(coded.header.image_len)
    img.memoryview(0, coded.header.image_len)[:] = coded.image()
    back = decode_image(img, coded.header.image_len, plain.key, pool, G)
    assert back.header.codec == "none"
    if chain.lossless:
        assert torch.equal(back.kv().view(torch.int16), real_kv.view(torch.int16)), "lossless is not bit-exact"
    else:
        err = _rel_err(real_kv, back.kv())
        assert 0 < err <= chain.error_bound, f"{spec}: error {err} outside its declared bound {chain.error_bound}"
    for c in (plain, coded, back):
        c.release()


def _forge(pool: BufferPool, coded: ChunkBuffer, mutate) -> tuple:
    """The image of ``coded`` with its coded bytes changed by ``mutate`` and a *valid* tag
    (what a writer without a keyed integrity tag could do): only the codec can catch it."""
    from lmcache_core.chunk import _write_header

    stored = bytearray(coded.buf.memoryview(HEADER_SIZE, coded.header.stored_len))
    mutate(stored)
    buf = pool.acquire(HEADER_SIZE + len(stored))
    buf.memoryview(HEADER_SIZE, len(stored))[:] = stored
    forged = _write_header(ChunkBuffer(buf, coded.header), coded.header.codec, buf.memoryview(HEADER_SIZE, len(stored)),
                           pool)
    return forged.buf, forged.header.image_len


@pytest.mark.parametrize("spec", ["lossless", "fp8", "cachegen", "lossless+aesgcm"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupt_coded_payload_is_a_chunk_error(spec, damage, real_kv):
    pool = BufferPool()
    if "aesgcm" in spec:
        from lmcache_core.codecs.aesgcm import bind_secret

        bind_secret(pool, b"s" * 32)
    plain = _chunk(pool, real_kv[:, :, :32])
    coded = encode_chunk(plain, resolve(spec), pool)
    n = coded.header.stored_len

    def mutate(b: bytearray) -> None:
        if damage == "flip":
            b[n // 3] ^= 0x40
            b[5] ^= 0xFF
        elif damage == "truncate":
            del b[n // 2:]
        else:
            b[:] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()

    # a flipped byte under the unforged tag: the tag catches it
    img = pool.acquire(coded.header.image_len)
    img.memoryview(0, coded.header.image_len)[:] = coded.image()
    img.memoryview(HEADER_SIZE + n // 2, 1)[0] ^= 1
    with pytest.raises(ChunkError):
        decode_image(img, coded.header.image_len, plain.key, pool, G)
    buf, nbytes = _forge(pool, coded, mutate)
    if spec == "fp8" and damage == "flip":  # e4m3 has no invalid byte: a flip is a bounded value change
        back = decode_image(buf, nbytes, plain.key, pool, G)
        back.release()
    else:
        with pytest.raises(ChunkError):
            decode_image(buf, nbytes, plain.key, pool, G)
    plain.release()
    coded.release()


def test_a_header_naming_another_codec_or_an_unknown_one_is_a_miss(real_kv):
    pool = BufferPool()
    plain = _chunk(pool, real_kv[:, :, :32])
    coded = encode_chunk(plain, resolve("lossless"), pool)
    from lmcache_core.chunk import _write_header

    for wire in ("cachegen/1", "fp8-e4m3-th/1", "lossless-zstd/1", "nope/1"):
        img = pool.acquire(coded.header.image_len)
        img.memoryview(0, coded.header.image_len)[:] = coded.image()
        stored = img.memoryview(HEADER_SIZE, coded.header.stored_len)
        try:
            _write_header(ChunkBuffer(img, coded.header), wire, stored, pool)
        except ChunkError:
            img.release()
            continue
        with pytest.raises(ChunkError):
            decode_image(img, coded.header.image_len, plain.key, pool, G)
    plain.release()
    coded.release()


def test_chains_and_specs_are_checked():
    with pytest.raises(ConfigError, match="two lossy"):
        resolve("fp8+cachegen")
    with pytest.raises(ConfigError, match="must come last"):
        resolve("aesgcm+lossless")
    with pytest.raises(ConfigError, match="unknown; known: none, aesgcm, .*cachegen, fp8, lossless"):
        split_codec("disk:///x?codec=zstd")
    assert split_codec("disk:///x?capacity=1GiB&codec=lossless+aesgcm&codec_key_file=/k") == \
        ("disk:///x?capacity=1GiB", "lossless+aesgcm", "/k")
    assert split_codec("redis://h:6379") == ("redis://h:6379", "", "")
    ctx = CodecContext(chunk_keys([1], Namespace("m", "x"), 1)[0], ChunkGeometry(1, 1, 8, "float8_e4m3fn"), 1)
    assert "codes float32, float16, bfloat16 KV" in resolve("fp8").supports(ctx)


# -- the plugin hook ---------------------------------------------------------------------------
def _xor_plugin():
    from lmcache_core.codecs import Codec

    class Xor(Codec):
        name, wire_id, lossless = "xor", "xor-test/1", True

        def encode(self, data, ctx):
            return (np.frombuffer(data, np.uint8) ^ 0x5A).tobytes()

        def decode(self, data, limit, ctx):
            return (np.frombuffer(data, np.uint8) ^ 0x5A).tobytes()

    globals()["XorCodecImpl"] = Xor

    class Plugin:
        @hookimpl
        def lmcache_register_codecs(self, register):
            register("xor", f"{__name__}:XorCodecImpl", wire_id="xor-test/1", description="test")

    return Plugin()


def test_builtin_and_plugin_codecs_register_through_lmcache_register_codecs(make_engine, real_kv, tmp_path):
    regs = get_plugin_manager().registrations("codec")
    assert {(n, r.wire_id) for n, r in regs.items()} >= {("lossless", "lossless-zstd/2"), ("fp8", "fp8-e4m3-th/1"),
                                                         ("cachegen", "cachegen/1"), ("aesgcm", "aesgcm/1")}
    pm = PluginManager(load_entry_points=False)
    pm.register_plugin(_xor_plugin(), "xor-plugin", "lmcache-test-xor")
    assert pm.registrations("codec")["xor"].wire_id == "xor-test/1"
    from lmcache_core.codecs.registry import register_from_plugins

    register_from_plugins(pm)
    assert REGISTRY.known_wire("xor-test/1")
    pool = BufferPool()
    plain = _chunk(pool, real_kv[:, :, :16])
    coded = encode_chunk(plain, resolve("xor"), pool)
    back = decode_image(coded.retain().buf, coded.header.image_len, plain.key, pool, G)
    assert torch.equal(back.kv().view(torch.int16), real_kv[:, :, :16].view(torch.int16))
    for c in (plain, coded, back):
        c.release()


# -- tiers and engines ------------------------------------------------------------------------
def _hf_layers(kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    t = kv.shape[2]
    return [(kv[i, 0].view(t, G.num_heads, G.head_dim).transpose(0, 1).unsqueeze(0).contiguous(),
             kv[i, 1].view(t, G.num_heads, G.head_dim).transpose(0, 1).unsqueeze(0).contiguous())
            for i in range(G.num_layers)]


def _store(engine, kv: torch.Tensor, tokens: list[int]) -> None:
    paged = PagedKV.from_hf(_hf_layers(kv))
    engine.store(tokens, paged, slots=torch.arange(len(tokens)))
    assert engine.flush(30)


def _load(engine, tokens: list[int]) -> tuple[int, torch.Tensor]:
    out = torch.zeros(G.shape(len(tokens)), dtype=torch.bfloat16)
    layers = _hf_layers(out)
    res = engine.retrieve(tokens, PagedKV.from_hf(layers), slots=torch.arange(len(tokens)))
    got = torch.stack([torch.stack([k[0].transpose(0, 1).reshape(len(tokens), -1),
                                    v[0].transpose(0, 1).reshape(len(tokens), -1)]) for k, v in layers])
    return res.hit_tokens, got


TOKENS = list(range(1000, 1000 + T))


def test_lossless_disk_tier_is_smaller_and_bit_exact_in_a_new_engine(make_engine, real_kv, tmp_path):
    d = tmp_path / "lossless"
    a = make_engine(G, ["memory://?capacity=64MiB", f"disk://{d}?codec=lossless"], chunk_size=64)
    _store(a, real_kv, TOKENS)
    files = [p for p in d.rglob("*") if p.is_file() and p.stat().st_size > HEADER_SIZE]
    assert files and sum(p.stat().st_size for p in files) < 0.8 * G.nbytes(T)
    b = make_engine(G, [f"disk://{d}?codec=lossless"], chunk_size=64)
    hit, got = _load(b, TOKENS)
    assert hit == T and torch.equal(got.view(torch.int16), real_kv.view(torch.int16))


def test_lossy_tier_has_its_own_namespace_and_never_feeds_exact_tiers(make_engine, real_kv, tmp_path):
    d = tmp_path / "fp8"
    a = make_engine(G, [f"disk://{d}?codec=fp8"], chunk_size=64)
    _store(a, real_kv, TOKENS)
    exact = make_engine(G, [f"disk://{d}"], chunk_size=64)  # same files, no codec: an exact reader
    assert exact.lookup(TOKENS).hit_tokens == 0
    b = make_engine(G, ["memory://?capacity=64MiB", f"disk://{d}?codec=fp8"], chunk_size=64)
    hit, got = _load(b, TOKENS)
    assert hit == T and 0 < _rel_err(real_kv, got) <= resolve("fp8").error_bound
    assert b.lookup(TOKENS).tiers == ("disk",) * 2  # not promoted into the exact memory tier
    _store(b, got, TOKENS)  # what the engine now holds came from fp8: not stored as exact
    assert b.tiers.lookup(b.keys(TOKENS), fast_only=True).hits == 0


def _secret(tmp_path: Path, name: str, value: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(value)
    return p


def test_aesgcm_disk_tier_holds_no_plaintext_and_other_secrets_or_flips_miss(make_engine, real_kv, tmp_path):
    d = tmp_path / "enc"
    k1, k2 = _secret(tmp_path, "k1", b"1" * 32), _secret(tmp_path, "k2", b"2" * 32)
    url = f"disk://{d}?codec=lossless+aesgcm&codec_key_file="
    a = make_engine(G, [url + str(k1)], chunk_size=64)
    _store(a, real_kv, TOKENS)
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.stat().st_size > HEADER_SIZE)
    assert len(files) == 2
    plain = real_kv.contiguous().view(torch.uint8).numpy().tobytes()
    for f in files:
        body = f.read_bytes()[HEADER_SIZE:]
        for off in range(0, len(plain) - 64, len(plain) // 50):  # no 64-byte run of the KV anywhere
            assert plain[off: off + 64] not in body
    other = make_engine(G, [url + str(k2)], chunk_size=64)  # another tenant's secret
    hit, _ = _load(other, TOKENS)
    assert hit == 0
    assert other.metrics.corrupt.labels("disk")._value.get() >= 1
    a2 = make_engine(G, [url + str(k1)], chunk_size=64)
    _store(a2, real_kv, TOKENS)
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.stat().st_size > HEADER_SIZE)
    with open(files[0], "r+b") as f:  # one flipped ciphertext byte
        f.seek(HEADER_SIZE + 100)
        b = f.read(1)
        f.seek(HEADER_SIZE + 100)
        f.write(bytes([b[0] ^ 1]))
    b = make_engine(G, [url + str(k1)], chunk_size=64)
    hit, got = _load(b, TOKENS)
    assert hit in (0, 64)  # the flipped chunk and everything after it are misses
    if hit:
        assert torch.equal(got[:, :, :64].view(torch.int16), real_kv[:, :, :64].view(torch.int16))


def test_codec_configuration_errors_name_the_fix(make_engine, tmp_path):
    with pytest.raises(ConfigError, match="memory tier holds exact chunks"):
        make_engine(G, ["memory://?capacity=1MiB&codec=lossless"], chunk_size=64)
    with pytest.raises(ConfigError, match="codec_key_file"):
        make_engine(G, [f"disk://{tmp_path / 'x'}?codec=aesgcm"], chunk_size=64)
    short = _secret(tmp_path, "short", b"abc")
    with pytest.raises(ConfigError, match="at least 16"):
        make_engine(G, [f"disk://{tmp_path / 'x'}?codec=aesgcm&codec_key_file={short}"], chunk_size=64)


def test_a_chunk_the_codec_cannot_code_is_a_counted_dropped_store(tmp_path):
    from lmcache_core.metrics import Metrics
    from lmcache_core.plugins import build_stores, get_plugin_manager
    from lmcache_core.storage import StoreContext
    from lmcache_core.tiers import TierStack

    g8 = ChunkGeometry(2, 2, 8, "float8_e4m3fn")
    pool = BufferPool()
    m = Metrics()
    stack = TierStack(build_stores([f"disk://{tmp_path / 'd'}?codec=fp8"], get_plugin_manager(),
                                   StoreContext(pool, geometry=g8)), m)
    key = chunk_keys(list(range(16)), Namespace("m", g8.signature), 16)[0]
    c = new_chunk(pool, key, g8, 16)
    c.kv().view(torch.uint8).fill_(0x38)
    sealed = seal(c)
    stack.put(key, sealed)
    assert stack.flush(10)
    sealed.release()
    assert m.dropped.labels("disk")._value.get() == 1
    assert m.errors.labels("disk", "encode")._value.get() == 1
    assert stack.get(key) is None
    stack.close()
