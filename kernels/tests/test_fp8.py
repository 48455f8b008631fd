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
