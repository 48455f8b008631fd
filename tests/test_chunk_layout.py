"""Chunk format and layouts: gather -> seal -> bytes -> decode -> scatter is bit-exact."""
from __future__ import annotations

import pytest
import torch

from lmcache_core.builtin.cpu import CPUDevice
from lmcache_core.chunk import HEADER_SIZE, decode_image, new_chunk, seal
from lmcache_core.errors import ChunkError, LayoutError
from lmcache_core.keys import Namespace, chunk_keys
from lmcache_core.layout import ChunkGeometry, PagedKV, slot_mapping
from lmcache_core.memory import BufferPool, round_up

from .conftest import random_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]
L, H, D, BS, NB = 3, 2, 8, 4, 24


def make_layout(kind: str, dtype: torch.dtype, seed: int = 0) -> PagedKV:
    if kind == "vllm_flash":
        return PagedKV.from_vllm_flash([random_kv((2, NB, BS, H, D), dtype, seed + i) for i in range(L)])
    if kind == "flashinfer":
        return PagedKV.from_flashinfer([random_kv((NB, 2, BS, H, D), dtype, seed + i) for i in range(L)])
    if kind == "vllm_blocks_heads":  # 0.3x: per-layer views over one shared buffer (non-contiguous)
        shared = random_kv((NB, L, H, BS, 2 * D), dtype, seed)
        return PagedKV.from_vllm_blocks_heads([shared[:, i] for i in range(L)], head_dim=D)
    if kind == "mla":
        return PagedKV.from_mla([random_kv((NB, BS, D), dtype, seed + i) for i in range(L)])
    if kind == "hf":
        return PagedKV.from_hf([(random_kv((1, H, NB * BS, D), dtype, seed + i),
                                 random_kv((1, H, NB * BS, D), dtype, seed + 50 + i)) for i in range(L)])
    if kind == "sglang_page_first":
        return PagedKV.from_sglang_host(random_kv((2, NB * BS, L, H, D), dtype, seed), "page_first")
    if kind == "sglang_layer_first":
        return PagedKV.from_sglang_host(random_kv((2, L, NB * BS, H, D), dtype, seed), "layer_first")
    if kind == "sglang_page_first_direct":
        return PagedKV.from_sglang_host(random_kv((2, NB, L, BS, H, D), dtype, seed), "page_first_direct")
    raise AssertionError(kind)


LAYOUTS = ["vllm_flash", "flashinfer", "vllm_blocks_heads", "mla", "hf", "sglang_page_first",
           "sglang_layer_first", "sglang_page_first_direct"]


def token_values(kv: PagedKV, slots: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for lp in kv.layers:
        for plane in (lp.k, lp.v):
            if plane is not None:
                out.append(plane.view(torch.uint8 if plane.element_size() == 1 else
                                      {2: torch.int16, 4: torch.int32}[plane.element_size()])
                           [slots // kv.block_size, slots % kv.block_size].clone())
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("num_tokens", [32, 19])  # full chunk and a partial one
def test_round_trip_bit_exact(kind, dtype, num_tokens):
    src = make_layout(kind, dtype, seed=1)
    dst = make_layout(kind, dtype, seed=99)  # poisoned with other random values
    dev, pool = CPUDevice(), BufferPool()
    bs = src.block_size
    nblocks = (num_tokens + bs - 1) // bs
    src_blocks = torch.randperm(src.num_blocks)[:nblocks]  # non-contiguous, shuffled
    dst_blocks = torch.randperm(dst.num_blocks)[:nblocks]
    s_slots = slot_mapping(src_blocks, bs, 0, num_tokens)
    d_slots = slot_mapping(dst_blocks, bs, 0, num_tokens)

    key = chunk_keys(list(range(num_tokens)), Namespace("m", src.geometry.signature), 32)[0]
    c = new_chunk(pool, key, src.geometry, num_tokens)
    c.kv().view(torch.uint8).fill_(0xAB)  # poison the buffer first
    dev.gather(src, s_slots, c.kv())
    sealed = seal(c)
    data = bytes(sealed.image())
    sealed.release()

    buf = pool.acquire(len(data))
    buf.memoryview(0, len(data))[:] = data
    back = decode_image(buf, len(data), key, pool)
    assert back.header.geometry == src.geometry and back.num_tokens == num_tokens
    dev.scatter(dst, d_slots, back.kv())
    back.release()
    for a, b in zip(token_values(src, s_slots), token_values(dst, d_slots)):
        assert torch.equal(a, b)
    assert pool.live_count() == 0


@pytest.fixture
def image():
    pool = BufferPool()
    g = ChunkGeometry(2, 2, 8, "bfloat16")
    key = chunk_keys(list(range(16)), Namespace("m", g.signature), 16)[0]
    c = new_chunk(pool, key, g, 16)
    c.kv().copy_(random_kv(c.kv().shape, torch.bfloat16))
    sealed = seal(c)
    data = bytes(sealed.image())
    expected = sealed.kv().clone()
    sealed.release()
    return pool, key, data, expected


def _decode(pool, key, data):
    buf = pool.acquire(max(len(data), 1))
    buf.memoryview(0, len(data))[:] = data
    return decode_image(buf, len(data), key, pool)


def test_clean_image_decodes(image):
    pool, key, data, expected = image
    c = _decode(pool, key, data)
    assert torch.equal(c.kv(), expected)
    c.release()
    assert pool.live_count() == 0


@pytest.mark.parametrize("offset", [0, 5, 40, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 100, -1])
def test_any_flipped_byte_is_rejected(image, offset):
    pool, key, data, _ = image
    bad = bytearray(data)
    idx = offset if offset >= 0 else len(bad) - 1
    bad[idx] ^= 0x01  # the header padding too: it must be zero
    with pytest.raises(ChunkError):
        _decode(pool, key, bytes(bad))
    assert pool.live_count() == 0


@pytest.mark.parametrize("cut", [0, 10, HEADER_SIZE, HEADER_SIZE + 7])
def test_truncated_image_is_rejected(image, cut):
    pool, key, data, _ = image
    with pytest.raises(ChunkError):
        _decode(pool, key, data[: len(data) - cut - 1] if cut else data[:-1])
    assert pool.live_count() == 0


def test_foreign_key_and_zlib_codec(image):
    pool, key, data, expected = image
    other = chunk_keys(list(range(1, 17)), Namespace("m", "x"), 16)[0]
    with pytest.raises(ChunkError, match="stored under"):
        _decode(pool, other, data)
    c = _decode(pool, key, data)
    z = seal(c, "zlib", pool)  # releases c
    zdata = bytes(z.image())
    z.release()
    back = _decode(pool, key, zdata)
    assert torch.equal(back.kv(), expected)
    back.release()
    assert pool.live_count() == 0


def test_layout_errors_are_clear():
    with pytest.raises(LayoutError, match=r"expected \[2, blocks, block_size, heads, dim\]"):
        PagedKV.from_vllm_flash([torch.zeros(3, 4, 16, 2, 8)])
    with pytest.raises(LayoutError, match="all layers must match"):
        PagedKV.from_vllm_flash([torch.zeros(2, 4, 16, 2, 8), torch.zeros(2, 4, 16, 2, 4)])
    with pytest.raises(LayoutError, match="not supported"):
        PagedKV.from_mla([torch.zeros(4, 16, 8, dtype=torch.int32)])
    with pytest.raises(LayoutError, match="matches no known vLLM layout"):
        PagedKV.from_vllm([torch.zeros(4, 4)])
    assert PagedKV.from_vllm([torch.zeros(2, 8, 16, 2, 4)]).kind == "vllm_flash"
    assert PagedKV.from_vllm([torch.zeros(8, 2, 16, 2, 4)]).kind == "flashinfer"
    assert PagedKV.from_vllm([torch.zeros(8, 2, 16, 8)], head_dim=4).kind == "vllm_blocks_heads"
    with pytest.raises(LayoutError, match="block table has 1 blocks"):
        slot_mapping(torch.tensor([3]), 16, 0, 17)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("planes", [2, 1])
def test_kv_token_ranges_are_the_sliced_view_of_a_carved_buffer(dtype: torch.dtype, planes: int) -> None:
    # kv(first, end) is one as_strided over the buffer's typed view: the same elements as the view
    # chain and slice it replaced, for chunks carved side by side from one slab, where a wrong
    # offset or stride would read the neighbour's tokens
    geom = ChunkGeometry(L, H, D, str(dtype).replace("torch.", ""), kv_planes=planes)
    pool = BufferPool(slab_bytes=1 << 20, reserve_bytes=0)
    pool._slab, pool._slab_off = torch.empty(1 << 20, dtype=torch.uint8), 0  # carved as the reserve does
    pool._reserve_size = round_up(HEADER_SIZE + geom.nbytes(13))  # whole chunks of 13 tokens
    keys = chunk_keys(list(range(1, 2 * 13 + 1)), Namespace("m", "sig"), 13)
    chunks = [new_chunk(pool, k, geom, 13) for k in keys]
    assert pool.host_allocations == 0  # both cut from the one slab
    for i, c in enumerate(chunks):
        old = c.buf.view(HEADER_SIZE, c.header.payload_len).view(dtype).view(geom.shape(13))
        old.copy_(torch.randn(old.shape, generator=torch.Generator().manual_seed(i)).to(dtype))
    for c in chunks:
        old = c.buf.view(HEADER_SIZE, c.header.payload_len).view(dtype).view(geom.shape(13))
        for first, end in ((0, 13), (0, 5), (4, 13), (7, 7), (12, 13)):
            got = c.kv(first, end)
            assert got.shape == old[:, :, first:end].shape and got.stride() == old[:, :, first:end].stride()
            assert got.data_ptr() == old[:, :, first:end].data_ptr()
            assert torch.equal(got, old[:, :, first:end])
        assert torch.equal(c.kv(), old)
        with pytest.raises(ChunkError, match="tokens"):
            c.kv(3, 14)
    with torch.inference_mode():  # a view taken inside inference mode is still writable outside it
        chunks[0].kv(0, 4)
    chunks[0].kv(0, 4).zero_()
    assert not chunks[0].kv(0, 4).any() and chunks[0].kv(4, 13).any()
