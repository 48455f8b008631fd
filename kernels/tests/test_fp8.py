"""fp8 fused into gather/scatter: the kernel (Triton, the interpreter on a CPU) against the torch
reference, on real SmolLM2 KV in a paged cache with shuffled blocks; the image is the host
``fp8`` codec's stored form, both ways."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcache_core.codecs import CodecContext, resolve
from lmcache_core.codecs import fp8 as fp8_codec
from lmcache_core.codecs.fp8 import encoded_len
from lmcache_core.keys import Namespace, chunk_keys
from lmcache_core.layout import ChunkGeometry, PagedKV
from lmcache_kernels import fp8
from lmcache_kernels.triton_copy import kernel_available

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
META = json.loads((DATA / "smollm2_kv.json").read_text())
G = ChunkGeometry(META["num_layers"], META["num_heads"], META["head_dim"], "bfloat16")
LAYERS = 4  # the interpreter pays per program: a few real layers are enough
BLOCK = 16
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # compiled on a GPU, interpreted on a CPU


@pytest.fixture(scope="module")
def paged():
    raw = np.load(DATA / "smollm2_kv.npy")
    kv = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(G.shape(META["tokens"]))[:LAYERS, :, :64]
    g = ChunkGeometry(LAYERS, G.num_heads, G.head_dim, "bfloat16")
    blocks = 8
    perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(1))[:4]  # 4 blocks of 16 tokens
    slots = (perm[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1).to(DEV)
    kv = kv.to(DEV)
    layers = []
    for l in range(LAYERS):
        k = torch.zeros(blocks, BLOCK, g.num_heads, g.head_dim, dtype=torch.bfloat16, device=DEV)
        v = torch.zeros_like(k)
        k.view(-1, g.hidden)[slots] = kv[l, 0]
        v.view(-1, g.hidden)[slots] = kv[l, 1]
        layers.append((k, v))
    return g, None, slots, kv, layers


def _kv(g, layers):
    from lmcache_core.layout import LayerPlanes

    return PagedKV("test", tuple(LayerPlanes(k, v) for k, v in layers), BLOCK, g)


def _paged_from(x: torch.Tensor) -> tuple[ChunkGeometry, torch.Tensor, list]:
    """``x`` ``[layers, 2, tokens, hidden]`` in a paged cache of reversed blocks on DEV."""
    L, _, t, hidden = x.shape
    g = ChunkGeometry(L, G.num_heads, hidden // G.num_heads, str(x.dtype).removeprefix("torch."))
    blocks = t // BLOCK
    slots = (torch.arange(blocks).flip(0)[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1).to(DEV)
    layers = []
    for l in range(L):
        k = torch.zeros(blocks, BLOCK, g.num_heads, g.head_dim, dtype=x.dtype, device=DEV)
        v = torch.zeros_like(k)
        k.view(-1, g.hidden)[slots] = x[l, 0].to(DEV)
        v.view(-1, g.hidden)[slots] = x[l, 1].to(DEV)
        layers.append((k, v))
    return g, slots, layers


def _gather_both(g, slots, layers) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(slots.numel())
    ref = torch.zeros(encoded_len(g, n), dtype=torch.uint8, device=DEV)
    out = torch.full_like(ref, 0x55)  # not zeros: a byte the kernel skips shows
    fp8.gather_ref(_kv(g, layers), [(slots, ref)])
    fp8.gather(_kv(g, layers), [(slots, out)])
    return out, ref


def _scatter_differences(g, slots, layers, img: torch.Tensor, ref_img: torch.Tensor) -> int:
    """Values that differ between the kernel's scatter of ``img`` and the reference's of
    ``ref_img``, each into a zeroed copy of ``layers``."""
    back_k = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in layers]
    back_r = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in layers]
    fp8.scatter(_kv(g, back_k), [(slots, img)])
    fp8.scatter_ref(_kv(g, back_r), [(slots, ref_img)])
    return sum(int((got.view(torch.int16) != want.view(torch.int16)).sum())
               for (a, b), (c, d) in zip(back_k, back_r) for got, want in ((a, c), (b, d)))


def _first_diff(out: torch.Tensor, ref: torch.Tensor) -> str:
    d = (out != ref).nonzero().reshape(-1)
    if not d.numel():
        return ""
    i = int(d[0])
    return f"{d.numel()} of {out.numel()} bytes differ; first at byte {i}: kernel {int(out[i]):#04x}, reference {int(ref[i]):#04x}"


def _skip_without_kernel() -> None:
    ok, why = kernel_available(DEV)
    if not ok:
        pytest.skip(why)


def test_kernel_matches_the_reference_and_the_host_codec(paged):
    g, _, slots, kv, layers = paged
    ok, why = kernel_available(DEV)
    if not ok:
        pytest.skip(why)
    pkv = _kv(g, layers)
    n = int(slots.numel())
    ref = torch.zeros(encoded_len(g, n), dtype=torch.uint8, device=DEV)
    out = torch.zeros_like(ref)
    fp8.gather_ref(pkv, [(slots, ref)])
    fp8.gather(pkv, [(slots, out)])
    assert torch.equal(out, ref), f"{int((out != ref).sum())} of {out.numel()} bytes differ from the reference"
    # the host codec writes and reads the same image
    key = chunk_keys(list(range(n)), Namespace("m", g.signature), n)[0]
    ctx = CodecContext(key, g, n)
    host = bytes(resolve("fp8").encode(memoryview(kv.cpu().contiguous().view(torch.uint8).numpy()).cast("B"), ctx))
    assert host == ref.cpu().numpy().tobytes()
    # scatter: kernel and reference write the same values, within the codec's bound of the original
    back_k = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in layers]
    back_r = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in layers]
    fp8.scatter(_kv(g, back_k), [(slots, out)])
    fp8.scatter_ref(_kv(g, back_r), [(slots, ref)])
    for (a, b), (c, d), (k, v) in zip(back_k, back_r, layers):
        assert torch.equal(a.view(torch.int16), c.view(torch.int16)) and torch.equal(b.view(torch.int16), d.view(torch.int16))
        for x, y in ((k, a), (v, b)):
            xs, ys = x.view(-1, g.hidden)[slots].float(), y.view(-1, g.hidden)[slots].float()
            assert float((xs - ys).abs().max()) <= resolve("fp8").error_bound * float(xs.abs().max())


def test_bad_images_and_slots_are_refused_before_any_copy(paged):
    g, _, slots, kv, layers = paged
    pkv = _kv(g, layers)
    n = int(slots.numel())
    with pytest.raises(ValueError, match="bytes"):
        fp8.gather(pkv, [(slots, torch.zeros(encoded_len(g, n) - 2, dtype=torch.uint8, device=DEV))])
    with pytest.raises(Exception, match="slot"):
        fp8.scatter(pkv, [(slots + 10_000, torch.zeros(encoded_len(g, n), dtype=torch.uint8, device=DEV))])


def test_checked_batches_skip_only_the_slot_range_check(paged, monkeypatch):
    # a pipeline that issues one checked batch in several calls passes checked=True: no range
    # check (it waits for the device) per call, while a malformed image is still refused
    from lmcache_core import layout

    g, _, slots, kv, layers = paged
    _skip_without_kernel()
    pkv = _kv(g, layers)
    n = int(slots.numel())
    calls = []
    real = layout.check_slots
    monkeypatch.setattr(layout, "check_slots", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    img = torch.zeros(encoded_len(g, n), dtype=torch.uint8, device=DEV)
    fp8.gather(pkv, [(slots, img)])
    assert calls == [1]
    ref = torch.zeros_like(img)
    fp8.gather(pkv, [(slots, ref)], checked=True)
    back = _kv(g, [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in layers])  # the fixture stays as it is
    fp8.scatter(back, [(slots, ref)], checked=True)
    assert calls == [1] and torch.equal(img, ref)
    assert any(bool(p.k.view(-1, g.hidden)[slots].abs().sum() > 0) for p in back.layers)
    with pytest.raises(ValueError, match="bytes"):
        fp8.scatter(back, [(slots, img[:-2])], checked=True)


def test_values_that_round_to_zero_keep_their_sign():
    """A negative value far below its head's amax quantises to e4m3 -0 (0x80), as torch's
    conversion gives; so does -0.0 itself. The benchmark's real KV (30 layers) holds such
    values, the first 4 layers of the sample do not."""
    _skip_without_kernel()
    x = torch.linspace(-1.0, 1.0, 2 * 2 * 32 * G.hidden).reshape(2, 2, 32, G.hidden)
    head = x[..., : G.head_dim]  # the first head of every token and plane
    head[..., 0] = 1.0  # amax 1: the scale is 1/448, e4m3 steps 2**-9 below 2**-6
    head[..., 1] = -1e-7  # rounds to -0
    head[..., 2] = -0.0
    head[..., 3] = -2.0**-10 / 448  # a tie between -0 and -2**-9: nearest-even is -0
    head[..., 4] = -3 * 2.0**-10 / 448  # a tie between -2**-9 and -2**-8: -2**-8
    head[..., 5] = 1e-7  # +0
    g, slots, layers = _paged_from(x.to(torch.bfloat16))
    out, ref = _gather_both(g, slots, layers)
    q = ref.view(g.num_layers, -1)[:, : g.kv_planes * 32 * g.hidden]
    assert int((q == 0x80).sum()) > 0, "the case under test: the reference writes e4m3 -0"
    assert torch.equal(out, ref), _first_diff(out, ref)


def test_kernel_matches_the_reference_on_every_layer_of_the_sample():
    """All 30 layers and 128 tokens of the captured KV (what the GPU benchmark tiles)."""
    _skip_without_kernel()
    raw = np.load(DATA / "smollm2_kv.npy")
    kv = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(G.shape(META["tokens"]))
    g, slots, layers = _paged_from(kv)
    out, ref = _gather_both(g, slots, layers)
    assert torch.equal(out, ref), _first_diff(out, ref)
    bad = _scatter_differences(g, slots, layers, out, ref)
    assert bad == 0, f"{bad} values scattered by the kernel differ from the reference"


def test_float16_scatter_rounds_subnormals_once():
    """float16 KV whose dequantised values fall below 2**-14 (float16 subnormals, multiples of
    2**-24): the scatter rounds each product once, to nearest-even, as the reference does."""
    _skip_without_kernel()
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 2, 32, G.hidden, generator=gen) * 3e-5).to(torch.float16)
    g, slots, layers = _paged_from(x)
    out, ref = _gather_both(g, slots, layers)
    assert torch.equal(out, ref), _first_diff(out, ref)
    bad = _scatter_differences(g, slots, layers, ref, ref)
    assert bad == 0, f"{bad} float16 values differ from the reference"


# -- the device API the engine calls (kv_codec): gather_coded / scatter_coded ---------------------
def _stream_device():
    """A StreamDevice over DEV: the CPU stand-in with the interpreter, or CUDA itself."""
    from lmcache_core.device import Detection
    from lmcache_kernels.accel import HostStreamDevice, StreamDevice

    if DEV.type == "cpu":
        return HostStreamDevice(0)

    class _CUDA(StreamDevice):
        name = "test-cuda"
        auto_select = False

        @classmethod
        def detect(cls):
            return Detection(True, "test", 1)

    return _CUDA(0)


@pytest.mark.parametrize("kind", ["vllm_flash", "flashinfer", "vllm_blocks_heads"])
@pytest.mark.parametrize("stage", ["auto", "always", "never"])
def test_device_coded_copies_are_the_reference_per_layer_and_for_a_token_range(kind, stage, monkeypatch) -> None:
    _skip_without_kernel()
    from lmcache_core.device import CodedPart
    from lmcache_kernels.testing import make_kv, random_slots

    monkeypatch.setattr(fp8, "STAGE", stage)
    from lmcache_kernels import dma

    batches = []
    host_copy = dma.HostCopier.copy
    monkeypatch.setattr(dma.HostCopier, "copy", lambda self, *a: (batches.append(len(a[2])), host_copy(self, *a)))
    launches = []
    launch = fp8._launch
    monkeypatch.setattr(fp8, "_launch", lambda *a: (launches.append(a[2]), launch(*a)))
    gen = torch.Generator().manual_seed(7)
    kv, caches = make_kv(kind, num_layers=3, num_blocks=12, block_size=4, device=DEV, generator=gen)
    for c in caches:
        c.copy_(torch.randn(c.shape, generator=gen).to(c.dtype))
    g = kv.geometry
    slots = random_slots(40, kv, gen).to(DEV)
    chunks = [(slots[i:i + 16], min(16, 40 - i)) for i in range(0, 40, 16)]  # the last one partial
    pin = DEV.type == "cuda"
    imgs = [torch.full((encoded_len(g, n),), 0x55, dtype=torch.uint8, pin_memory=pin) for _, n in chunks]
    refs = [torch.zeros(encoded_len(g, n), dtype=torch.uint8, device=DEV) for _, n in chunks]
    fp8.gather_ref(kv, [(s, r) for (s, _), r in zip(chunks, refs)])
    dev = _stream_device()
    parts = [CodedPart(s, img, n) for (s, n), img in zip(chunks, imgs)]
    stream = dev.new_stream()
    for layer in range(g.num_layers):  # the engine's layer-wise store
        with dev.use_stream(stream):
            dev.gather_coded(kv, parts, "fp8", layers=(layer,))
    dev.record_event(stream).synchronize()
    assert not dev._fp8_off and launches == [[0], [1], [2]]  # the kernel, once per layer for all chunks
    for img, ref in zip(imgs, refs):
        assert _first_diff(img.to(DEV), ref) == ""
    # scatter a token range of each image (first > 0, ending early) into a cleared cache
    want_kv, want_caches = make_kv(kind, num_layers=3, num_blocks=12, block_size=4, device=DEV, generator=gen)
    got_kv, got_caches = make_kv(kind, num_layers=3, num_blocks=12, block_size=4, device=DEV, generator=gen)
    for w, c in zip(want_caches, got_caches):
        w.zero_()
        c.zero_()
    ranges = [(3, 13), (0, 16), (1, 7)]
    fp8.scatter_ref(want_kv, [(s[a:b], _range_image(g, r, n, a, b))
                              for (s, n), r, (a, b) in zip(chunks, refs, ranges)])
    sub = [CodedPart(s[a:b], img, n, a) for (s, n), img, (a, b) in zip(chunks, imgs, ranges)]
    with dev.use_stream(stream):
        dev.scatter_coded(got_kv, sub, "fp8", layers=None)
        dev.scatter_coded(got_kv, sub, "fp8", layers=(1,))  # again, one layer: the same values
    dev.record_event(stream).synchronize()
    assert launches[3:] == [[0, 1, 2], [1]]
    if stage == "always" and DEV.type == "cpu":  # staged: each run's copies went as one batch
        assert batches == [3] * 5
    for w, c in zip(want_caches, got_caches):
        assert torch.equal(w.view(torch.int16), c.view(torch.int16))
    with pytest.raises(ValueError, match="whole chunks"):
        dev.gather_coded(kv, sub[:1], "fp8")
    with pytest.raises(ValueError, match="do not fit"):
        dev.scatter_coded(kv, [CodedPart(chunks[2][0], imgs[2], chunks[2][1], 1)], "fp8")


def _range_image(g, img: torch.Tensor, n: int, a: int, b: int) -> torch.Tensor:
    """The fp8 image of tokens ``a..b`` cut out of the image of ``n`` tokens (the reference's input)."""
    from lmcache_core.codecs.fp8 import image_views

    q, s = image_views(g, img, n)
    out = torch.empty(encoded_len(g, b - a), dtype=torch.uint8, device=img.device)
    oq, os_ = image_views(g, out, b - a)
    oq.copy_(q[:, :, a:b])
    os_.copy_(s[:, :, a:b])
    return out


def test_engine_with_kv_codec_fp8_through_the_kernels(tmp_path) -> None:
    """CacheEngine(kv_codec=fp8) on a StreamDevice: layer-wise store, a layer-wise load of part of
    the hit and a fresh engine's batched load from disk, each the host codec's values bit for bit."""
    _skip_without_kernel()
    from lmcache_core.config import Config
    from lmcache_core.engine import CacheEngine
    from lmcache_core.layout import slot_mapping
    from lmcache_kernels.testing import make_kv

    gen = torch.Generator().manual_seed(3)
    src, src_c = make_kv("vllm_flash", num_layers=3, num_blocks=24, block_size=16, device=DEV, generator=gen)
    dst, dst_c = make_kv("vllm_flash", num_layers=3, num_blocks=24, block_size=16, device=DEV, generator=gen)
    for c in src_c:
        c.copy_(torch.randn(c.shape, generator=gen).to(c.dtype))
    g = src.geometry
    tokens = list(range(500, 600))  # 3 chunks of 32 and a partial of 4
    blocks = torch.arange(7)
    cfg = {"tiers": ["memory://?capacity=64MiB", f"disk://{tmp_path}/d?capacity=64MiB"], "chunk_size": 32,
           "kv_codec": "fp8"}
    s = slot_mapping(blocks, 16, 0, 100).to(DEV)

    def want(caches, a, b):
        x = torch.stack([c[:, s // 16, s % 16] for c in caches])[:, :, a:b]  # [L, 2, n, H, D]
        q, sc = fp8_codec.quantize(x.reshape(*x.shape[:3], g.hidden), g.head_dim)
        return fp8_codec.dequantize(q, sc, g.head_dim, x.dtype).reshape(x.shape)

    def got(caches, a, b):
        return torch.stack([c[:, s // 16, s % 16] for c in caches])[:, :, a:b]

    with CacheEngine(g, Config.from_dict(cfg), model="m", device=_stream_device()) as eng:
        task = eng.start_store(tokens, src, blocks)
        for layer in range(g.num_layers):
            task.save_layer(layer)
        assert task.finish(wait=True) == 100
        r = eng.start_retrieve(tokens, dst, blocks, skip_tokens=8)
        assert r.hit_tokens == 100 and list(r) == [0, 1, 2]
        r.finish()
        assert eng.device._fp8_off == ""
        exp = want(src_c, 8, 100)
        assert torch.equal(got(dst_c, 8, 100).view(torch.int16), exp.view(torch.int16))
    for c in dst_c:
        c.zero_()
    with CacheEngine(g, Config.from_dict({**cfg, "tiers": [f"disk://{tmp_path}/d?capacity=64MiB"]}), model="m",
                     device=_stream_device()) as fresh:
        assert fresh.retrieve(tokens, dst, blocks).by_tier == {"disk": 100}
        assert torch.equal(got(dst_c, 0, 100).view(torch.int16), want(src_c, 0, 100).view(torch.int16))


def test_staging_copies_fall_back_to_one_by_one_when_the_batch_fails(monkeypatch) -> None:
    """A copy-engine batch that fails: the same copies go one torch copy each (bit for bit) and
    later calls on that device skip the binding."""
    _skip_without_kernel()
    from lmcache_core.device import CodedPart
    from lmcache_kernels import dma
    from lmcache_kernels.testing import make_kv, random_slots

    if DEV.type != "cpu":
        pytest.skip("the failing binding is the CPU's memmove stand-in")
    monkeypatch.setattr(fp8, "STAGE", "always")
    monkeypatch.setattr(fp8, "_COPIER_OFF", {})

    def broken(self, *a):
        raise RuntimeError("copy engines gone")

    monkeypatch.setattr(dma.HostCopier, "copy", broken)
    gen = torch.Generator().manual_seed(9)
    kv, caches = make_kv("vllm_flash", num_layers=2, num_blocks=8, block_size=4, generator=gen)
    for c in caches:
        c.copy_(torch.randn(c.shape, generator=gen).to(c.dtype))
    g = kv.geometry
    slots = random_slots(16, kv, gen)
    img = torch.zeros(encoded_len(g, 16), dtype=torch.uint8)
    ref = torch.zeros_like(img)
    fp8.gather_ref(kv, [(slots, ref)])
    fp8.gather_coded(kv, [CodedPart(slots, img, 16)])
    assert torch.equal(img, ref) and "copy engines gone" in fp8._COPIER_OFF["cpu"]
    monkeypatch.setattr(dma.HostCopier, "copy", lambda self, *a: pytest.fail("the binding was tried again"))
    img.zero_()
    fp8.gather_coded(kv, [CodedPart(slots, img, 16)])
    assert torch.equal(img, ref)


def test_a_kernel_fault_falls_back_for_good_and_out_of_memory_for_that_call(monkeypatch) -> None:
    """StreamDevice.gather_coded: a kernel fault logs once and the torch reference serves from then
    on; running out of device memory serves that call by the reference and keeps the kernel."""
    _skip_without_kernel()
    from lmcache_core.device import CodedPart
    from lmcache_kernels.testing import make_kv, random_slots

    gen = torch.Generator().manual_seed(11)
    kv, caches = make_kv("vllm_flash", num_layers=2, num_blocks=8, block_size=4, device=DEV, generator=gen)
    for c in caches:
        c.copy_(torch.randn(c.shape, generator=gen).to(c.dtype))
    slots = random_slots(16, kv, gen).to(DEV)
    ref = torch.zeros(encoded_len(kv.geometry, 16), dtype=torch.uint8, device=DEV)
    fp8.gather_ref(kv, [(slots, ref)])
    dev = _stream_device()
    real = fp8.gather_coded

    def out_of_memory(*a, **k):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(fp8, "gather_coded", out_of_memory)
    img = torch.zeros(encoded_len(kv.geometry, 16), dtype=torch.uint8, pin_memory=DEV.type == "cuda")
    dev.gather_coded(kv, [CodedPart(slots, img, 16)], "fp8")
    dev.synchronize()
    assert torch.equal(img.to(DEV), ref) and dev._fp8_off == ""  # the reference served it; kernel kept

    def broken(*a, **k):
        raise RuntimeError("kernel fault")

    monkeypatch.setattr(fp8, "gather_coded", broken)
    img.zero_()
    dev.gather_coded(kv, [CodedPart(slots, img, 16)], "fp8")
    dev.synchronize()
    assert torch.equal(img.to(DEV), ref) and "kernel fault" in dev._fp8_off
    monkeypatch.setattr(fp8, "gather_coded", real)
    calls = []
    monkeypatch.setattr(fp8, "_launch", lambda *a: calls.append(a))
    dev.gather_coded(kv, [CodedPart(slots, img, 16)], "fp8")
    assert calls == []  # off for good: the kernel is not tried again


def test_kernel_matches_the_host_codec_on_random_bit_kv():
    """KV of uniformly random bits (every finite bf16: subnormals, magnitudes to 3e38), which the
    GPU benchmark copies: the kernel's image and scatter are the CPU host codec's, bit for bit
    (a flush of subnormals to zero, or a division that is not IEEE, shows here)."""
    _skip_without_kernel()
    from lmcache_kernels.testing import random_bits

    x = random_bits((2, 2, 32, G.hidden), torch.bfloat16, generator=torch.Generator().manual_seed(5))
    torch.nan_to_num_(x, nan=0.0, posinf=1.0, neginf=-1.0)
    g, slots, layers = _paged_from(x)
    out = torch.full((encoded_len(g, 32),), 0x55, dtype=torch.uint8, device=DEV)
    fp8.gather(_kv(g, layers), [(slots, out)])
    ref = torch.zeros(encoded_len(g, 32), dtype=torch.uint8)
    fp8_codec.encode_into(x, *fp8_codec.image_views(g, ref, 32), g.head_dim)  # on the CPU
    assert _first_diff(out.cpu(), ref) == ""
    back = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in layers]
    fp8.scatter(_kv(g, back), [(slots, out)])
    want = fp8_codec.decode_from(*fp8_codec.image_views(g, ref, 32), g.head_dim, torch.bfloat16)
    for layer, (k, v) in enumerate(back):
        for plane, t in enumerate((k, v)):
            got = t.view(-1, g.hidden)[slots].cpu()
            bad = int((got.view(torch.int16) != want[layer, plane].view(torch.int16)).sum())
            assert bad == 0, f"layer {layer} plane {plane}: {bad} scattered values differ from the host decode"


def _coded_setup(seed: int, kind: str = "vllm_flash"):
    from lmcache_core.device import CodedPart
    from lmcache_kernels.testing import make_kv, random_slots

    gen = torch.Generator().manual_seed(seed)
    kv, caches = make_kv(kind, num_layers=3, num_blocks=16, block_size=4, device=DEV, generator=gen)
    for c in caches:
        c.copy_(torch.randn(c.shape, generator=gen).to(c.dtype))
    slots = random_slots(56, kv, gen).to(DEV)
    chunks = [(slots[i:i + 16], min(16, 56 - i)) for i in range(0, 56, 16)]  # 4 chunks, the last partial
    pin = DEV.type == "cuda"
    parts = [CodedPart(s, torch.full((encoded_len(kv.geometry, n),), 0x55, dtype=torch.uint8, pin_memory=pin), n)
             for s, n in chunks]
    refs = [torch.zeros(encoded_len(kv.geometry, n), dtype=torch.uint8, device=DEV) for _, n in chunks]
    fp8.gather_ref(kv, [(s, r) for (s, _), r in zip(chunks, refs)])
    return kv, caches, parts, refs


@pytest.mark.parametrize("order", ["chunks", "layers"])
def test_staged_calls_run_in_groups_of_layers_or_chunks(monkeypatch, order):
    """With groups of a few bytes (3 at most): a call over 3 layers of 4 chunks is 3 runs of
    chunks with every layer (GROUP_ORDER "chunks"; runs of layers with 8 groups, more than the
    chunks) or 3 groups of a layer of every chunk ("layers"), a call of one layer is runs of
    chunks; each group one kernel launch and one copy batch, bit for bit the reference (gather,
    and a scatter of token ranges)."""
    _skip_without_kernel()
    from lmcache_core.device import CodedPart
    from lmcache_kernels.testing import make_kv

    monkeypatch.setattr(fp8, "STAGE", "always")
    monkeypatch.setattr(fp8, "GROUP_BYTES", 1)
    monkeypatch.setattr(fp8, "GROUPS", 3)
    monkeypatch.setattr(fp8, "GROUP_ORDER", order)
    monkeypatch.setattr(fp8, "_COPIER_OFF", {})
    launches, batches = [], []
    launch = fp8._launch
    monkeypatch.setattr(fp8, "_launch", lambda *a: (launches.append((tuple(a[2]), a[7])), launch(*a)))
    stage_copies = fp8._stage_copies  # the memmove stand-in on a CPU, cuMemcpyBatchAsync on a GPU
    monkeypatch.setattr(fp8, "_stage_copies", lambda *a: (batches.append(len(a[4])), stage_copies(*a))[1])
    kv, _, parts, refs = _coded_setup(21)
    by_layer = [((0,), (0, 4)), ((1,), (0, 4)), ((2,), (0, 4))]
    fp8.gather_coded(kv, parts)
    if order == "layers":
        assert launches == by_layer and batches == [4, 4, 4]
    else:
        assert launches == [((0, 1, 2), (0, 2)), ((0, 1, 2), (2, 3)), ((0, 1, 2), (3, 4))] and batches == [2, 1, 1]
    for p, r in zip(parts, refs):
        assert _first_diff(p.image.to(DEV), r) == ""
        p.image.fill_(0x55)
    if order == "chunks":  # more groups than chunks: runs of layers again
        monkeypatch.setattr(fp8, "GROUPS", 8)
        del launches[:], batches[:]
        fp8.gather_coded(kv, parts)
        assert launches == by_layer and batches == [4, 4, 4]
        for p, r in zip(parts, refs):
            assert _first_diff(p.image.to(DEV), r) == ""
            p.image.fill_(0x55)
        monkeypatch.setattr(fp8, "GROUPS", 3)
    del launches[:], batches[:]
    fp8.gather_coded(kv, parts, layers=(1,))  # one layer: 3 runs of chunks
    fp8.gather_coded(kv, parts, layers=(0,))
    fp8.gather_coded(kv, parts, layers=(2,))
    assert [c for _, c in launches[:3]] == [(0, 2), (2, 3), (3, 4)] and batches[:3] == [2, 1, 1]
    for p, r in zip(parts, refs):
        assert _first_diff(p.image.to(DEV), r) == ""
    g = kv.geometry
    ranges = [(3, 13), (0, 16), (1, 7), (0, 8)]
    want_kv, want_c = make_kv("vllm_flash", num_layers=3, num_blocks=16, block_size=4, device=DEV)
    got_kv, got_c = make_kv("vllm_flash", num_layers=3, num_blocks=16, block_size=4, device=DEV)
    for w, c in zip(want_c, got_c):
        w.zero_()
        c.zero_()
    fp8.scatter_ref(want_kv, [(p.slots[a:b], _range_image(g, r, p.num_tokens, a, b))
                              for p, r, (a, b) in zip(parts, refs, ranges)])
    sub = [CodedPart(p.slots[a:b], p.image, p.num_tokens, a) for p, (a, b) in zip(parts, ranges)]
    del launches[:]
    fp8.scatter_coded(got_kv, sub, layers=(0, 1))
    fp8.scatter_coded(got_kv, sub, layers=(2,))
    if order == "layers":
        assert launches[:2] == [((0,), (0, 4)), ((1,), (0, 4))] and len(launches) == 5
    else:
        assert [c for _, c in launches] == [(0, 2), (2, 3), (3, 4)] * 2
        assert [sel for sel, _ in launches] == [(0, 1)] * 3 + [(2,)] * 3
    for w, c in zip(want_c, got_c):
        assert torch.equal(w.view(torch.int16), c.view(torch.int16))


def test_the_device_keeps_a_batchs_tables_until_its_slots_change(monkeypatch):
    """StreamDevice.gather_coded checks and builds a batch's tables once for all its per-layer
    calls; slots rewritten in place make new ones, and the images follow the new slots."""
    _skip_without_kernel()
    from lmcache_core.device import CodedPart

    built = []
    plan = fp8._plan
    monkeypatch.setattr(fp8, "_plan", lambda *a: (built.append(a[4] is None), plan(*a))[1])
    kv, _, parts, refs = _coded_setup(23)
    dev = _stream_device()
    stream = dev.new_stream()
    with dev.use_stream(stream):
        for layer in range(3):
            dev.gather_coded(kv, parts, "fp8", layers=(layer,))
    dev.record_event(stream).synchronize()
    hits = len(built)
    for p, r in zip(parts, refs):
        assert _first_diff(p.image.to(DEV), r) == ""
    assert built == [False] * 3  # every call handed the batch's cache
    cache = dev.transfer._sig([(p.slots, p.image) for p in parts]).extra
    assert len(cache) == 1 and hits == 3
    parts[1].slots.copy_(parts[1].slots.flip(0))  # in place: a new version of the slot tensor
    with dev.use_stream(stream):
        dev.gather_coded(kv, parts, "fp8")
    dev.record_event(stream).synchronize()
    flipped = torch.zeros_like(refs[1])
    fp8.gather_ref(kv, [(parts[1].slots, flipped)])
    assert _first_diff(parts[1].image.to(DEV), flipped) == "" and not torch.equal(flipped, refs[1])
    for i in (0, 2, 3):
        assert _first_diff(parts[i].image.to(DEV), refs[i]) == ""
    assert isinstance(parts[0], CodedPart)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_values_near_the_dtypes_largest_decode_finite(dtype):
    """A head whose largest value is the dtype's largest finite value: in bfloat16 its scale
    rounds up from amax / 448, and 448 * scale is past that value. Kernel and host codec both
    saturate (before, the decode was infinity, which the next store coded as a NaN)."""
    _skip_without_kernel()
    top = torch.finfo(dtype).max
    gen = torch.Generator().manual_seed(13)
    x = (torch.rand(2, 2, 32, G.hidden, generator=gen) * 2 - 1) * top
    x[..., ::G.head_dim] = top  # every head reaches the top: its scale rounds up
    x = x.to(dtype)
    g, slots, layers = _paged_from(x)
    out, ref = _gather_both(g, slots, layers)
    assert _first_diff(out, ref) == ""
    want = fp8_codec.decode_from(*fp8_codec.image_views(g, ref.cpu(), 32), g.head_dim, dtype)
    assert bool(torch.isfinite(want).all())
    if dtype == torch.bfloat16:  # bf16's top / 448 rounds up (float16's rounds down: no overflow)
        assert float(want.float().abs().max()) == float(top)
    assert _scatter_differences(g, slots, layers, out, ref) == 0
    back = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in layers]
    fp8.scatter(_kv(g, back), [(slots, out)])
    assert all(bool(torch.isfinite(t).all()) for kv_ in back for t in kv_)
