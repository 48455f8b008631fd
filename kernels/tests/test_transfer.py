"""KVTransfer's paths (direct, staged ring, torch) agree bit for bit, and the plugin entry point."""

from __future__ import annotations

import importlib.metadata as md

import pytest

torch = pytest.importorskip("torch")

from lmcache_kernels import triton_copy  # noqa: E402
from lmcache_kernels.testing import bits, chunk_like, make_kv, random_slots  # noqa: E402
from lmcache_kernels.transfer import KVTransfer, TransferOptions  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKEND = torch.cuda if DEVICE.type == "cuda" else None
KERNEL_OK, KERNEL_WHY = triton_copy.kernel_available(DEVICE)


def _batch(kv, sizes, seed, pin=False):
    g = torch.Generator().manual_seed(seed)
    total = random_slots(sum(sizes), kv, g)
    out, start = [], 0
    for n in sizes:
        out.append((total[start:start + n], chunk_like(kv, max(sizes), "cpu", pin=pin)))
        start += n
    return out


def _cpu_staged(num_blocks: int, seed: int):
    """A host paged cache and a transfer that stages every call (the ring path CI can run)."""
    cpu = torch.device("cpu")
    kv, _ = make_kv("vllm_flash", device=cpu, num_blocks=num_blocks, generator=torch.Generator().manual_seed(seed))
    return kv, KVTransfer(cpu, TransferOptions(store_mode="staged", load_mode="staged"), None)


def _gathered_as_reference(xfer, kind: str, seed: int, batch_seed: int, layers):
    """A 16-block cache of ``kind`` on DEVICE and a batch of three chunks (8, 5 and 8 tokens)
    ``xfer`` gathered from it, each asserted bit for bit what torch gathers from a host twin."""
    from lmcache_kernels import reference

    kv, _ = make_kv(kind, device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(seed))
    ref_kv, _ = make_kv(kind, num_blocks=16, generator=torch.Generator().manual_seed(seed))
    batch = _batch(kv, [8, 5, 8], batch_seed, pin=DEVICE.type == "cuda")
    xfer.gather(kv, batch, layers)
    if BACKEND is not None:
        BACKEND.synchronize()
    for slots, chunk in batch:
        want = chunk_like(ref_kv, chunk.shape[2])
        reference.gather_batch(ref_kv, [(slots, want)], layers)
        assert torch.equal(bits(chunk), bits(want)), kind
    return kv, batch


def _assert_chunks_hold_kv(kv, batch) -> None:
    """Each chunk's first tokens are ``kv`` at its slots, bit for bit (gathered again by torch)."""
    backend = torch.cuda if kv.device.type == "cuda" else None
    want = [(s, chunk_like(kv, c.shape[2])) for s, c in batch]
    KVTransfer(kv.device, TransferOptions(store_mode="torch"), backend).gather(kv, want)
    if backend is not None:
        backend.synchronize()
    for (s, c), (_, w) in zip(batch, want):
        n = int(s.numel())
        assert torch.equal(bits(c[:, :, :n]), bits(w[:, :, :n]))


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
@pytest.mark.parametrize("mode", ["direct", "staged", "torch"])
@pytest.mark.parametrize("layers", [None, (1,), (0, 2)])
def test_every_path_round_trips_bit_for_bit(mode: str, layers) -> None:
    # a staging slot smaller than the batch forces several groups through the ring
    opts = TransferOptions(store_mode=mode, load_mode=mode, staging_bytes=6000, staging_slots=2)
    xfer = KVTransfer(DEVICE, opts, BACKEND)
    _, batch = _gathered_as_reference(xfer, "vllm_blocks_heads", 1, 2, layers)
    stats = xfer.stats
    assert {"direct": stats.direct, "staged": stats.staged, "torch": stats.torch}[mode] == 3
    # load the chunks into a second, different cache and read them back
    kv2, _ = make_kv("vllm_blocks_heads", device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(9))
    xfer.scatter(kv2, batch, layers)
    back = [(s, chunk_like(kv2, c.shape[2])) for s, c in batch]
    KVTransfer(DEVICE, TransferOptions(store_mode="torch"), BACKEND).gather(kv2, back, layers)
    if BACKEND is not None:
        BACKEND.synchronize()
    for (s, c), (_, b) in zip(batch, back):
        assert torch.equal(bits(c), bits(b))


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
def test_staged_partial_chunk_scatter_uses_row_copies() -> None:
    opts = TransferOptions(store_mode="staged", load_mode="staged", staging_bytes=1 << 16)
    xfer = KVTransfer(DEVICE, opts, BACKEND)
    kv, keep = make_kv("flashinfer", device=DEVICE, generator=torch.Generator().manual_seed(3))
    slots = random_slots(5, kv, torch.Generator().manual_seed(4))
    src = chunk_like(kv, 8)
    src.copy_(torch.randn(src.shape).to(src.dtype))
    xfer.scatter(kv, [(slots, src[:, :, :5])])  # a non-contiguous view, as the engine passes for partial loads
    back = chunk_like(kv, 5)
    KVTransfer(DEVICE, TransferOptions(store_mode="torch"), BACKEND).gather(kv, [(slots, back)])
    if BACKEND is not None:
        BACKEND.synchronize()
    assert torch.equal(bits(back), bits(src[:, :, :5]))
    assert xfer.stats.dmas == 3 * 2  # one per (layer, plane) row block


def test_kernel_failure_falls_back_to_torch_and_says_why() -> None:
    from lmcache_core.layout import PagedKV

    a = torch.randn(2, 8, 4, 2, 16).to(torch.bfloat16)
    b = torch.randn(2, 4, 8, 2, 16).to(torch.bfloat16).transpose(1, 2)
    kv = PagedKV.from_vllm_flash([a, b])
    xfer = KVTransfer(torch.device("cpu"), TransferOptions(store_mode="direct"), None)
    slots = torch.tensor([1, 2, 9, 30])
    out = chunk_like(kv, 4)
    xfer.gather(kv, [(slots, out)])
    assert xfer.stats.torch == 1 and xfer.stats.direct == 0
    assert xfer.stats.fallbacks and ("strides" in xfer.stats.fallbacks[0] or "kernel" in xfer.stats.fallbacks[0])
    want = chunk_like(kv, 4)
    from lmcache_kernels import reference

    reference.gather_batch(kv, [(slots, want)])
    assert torch.equal(bits(out), bits(want))


def test_options_from_env_and_validation() -> None:
    env = {"LMCACHE_KV_STORE_MODE": "Staged", "LMCACHE_KV_COPY_STREAMS": "2", "LMCACHE_KV_STAGING_BYTES": "4096"}
    opts = TransferOptions.from_env(env)
    assert (opts.store_mode, opts.copy_streams, opts.staging_bytes) == ("staged", 2, 4096)
    assert opts.mode(False) in ("direct", "staged", "torch")
    with pytest.raises(ValueError, match="store_mode"):
        TransferOptions(store_mode="fast")
    with pytest.raises(ValueError, match="LMCACHE_KV_COPY_STREAMS"):
        TransferOptions.from_env({"LMCACHE_KV_COPY_STREAMS": "two"})


def test_entry_point_is_listed_without_hooks() -> None:
    eps = [ep for ep in md.entry_points(group="lmcache") if ep.name == "kernels"]
    assert len(eps) == 1 and eps[0].value == "lmcache_kernels.plugin"
    from lmcache_core.plugins import PluginManager

    pm = PluginManager(allow="kernels", block="")
    info = pm.plugins["kernels"]
    assert info.status == "loaded" and info.distribution == "lmcache-kernels"
    assert info.hooks == [] and info.registrations == []


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
@pytest.mark.parametrize("mode", ["direct", "staged"])
@pytest.mark.parametrize("programs", [1, 3])
def test_capped_grid_moves_every_tile_of_a_layer(mode: str, programs: int) -> None:
    # a per-layer call with its kernel held to a few programs: each loops over many tiles
    # (three chunks, two planes, several token tiles) and every byte still lands
    opts = TransferOptions(store_mode=mode, load_mode=mode, layer_programs=programs, staging_bytes=6000)
    xfer = KVTransfer(DEVICE, opts, BACKEND)
    kv, _ = make_kv("vllm_blocks_heads", device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(5))
    batch = _batch(kv, [8, 5, 8], 6, pin=DEVICE.type == "cuda")
    for layer in range(len(kv.layers)):
        xfer.gather(kv, batch, (layer,))
    kv2, _ = make_kv("vllm_blocks_heads", device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(7))
    for layer in range(len(kv2.layers)):
        xfer.scatter(kv2, batch, (layer,))
    ref = KVTransfer(DEVICE, TransferOptions(store_mode="torch"), BACKEND)
    want = [(s, chunk_like(kv, c.shape[2])) for s, c in batch]
    ref.gather(kv, want)
    back = [(s, chunk_like(kv2, c.shape[2])) for s, c in batch]
    ref.gather(kv2, back)
    if BACKEND is not None:
        BACKEND.synchronize()
    for (s, c), (_, w), (_, b) in zip(batch, want, back):
        n = int(s.numel())
        assert torch.equal(bits(c[:, :, :n]), bits(w[:, :, :n]))
        assert torch.equal(bits(b[:, :, :n]), bits(w[:, :, :n]))
    assert getattr(xfer.stats, mode) == 2 * len(kv.layers) * 3


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
def test_capped_kernel_launches_at_most_that_many_programs(monkeypatch) -> None:
    kv, _ = make_kv("vllm_blocks_heads", device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(2))
    batch = _batch(kv, [8, 8], 3, pin=DEVICE.type == "cuda")
    grids = []
    real = triton_copy._kernel()

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(triton_copy, "_JITTED", Spy())
    xfer = KVTransfer(DEVICE, TransferOptions(store_mode="direct", layer_programs=2), BACKEND)
    xfer.mapped_host()  # on a GPU the probe launches the kernel once itself
    grids.clear()
    xfer.gather(kv, batch, (0,))  # one layer: capped
    xfer.gather(kv, batch)  # every layer: the whole device
    assert grids[0] == (2,)
    assert grids[1][0] > 2
    assert TransferOptions().layer_programs > 0 and TransferOptions().stream_priority == "high"


def test_layer_programs_and_priority_options() -> None:
    opts = TransferOptions.from_env({"LMCACHE_KV_LAYER_PROGRAMS": "16", "LMCACHE_KV_STREAM_PRIORITY": "High"})
    assert (opts.layer_programs, opts.stream_priority) == (16, "high")
    with pytest.raises(ValueError, match="layer_programs"):
        TransferOptions(layer_programs=-1)
    with pytest.raises(ValueError, match="stream_priority"):
        TransferOptions(stream_priority="urgent")


def test_high_priority_streams_are_asked_for_and_fall_back() -> None:
    from lmcache_kernels.accel import HostStreamDevice

    asked = []

    class WithPriority:
        class Stream:
            def __init__(self, device=None, priority=0):
                asked.append(priority)

    class NoPriority:
        class Stream:
            def __init__(self, device=None):
                asked.append(None)

    for backend, priority, want in ((WithPriority, "high", [-(1 << 10)]), (NoPriority, "high", [None]),
                                    (WithPriority, "normal", [0])):
        class Dev(HostStreamDevice):
            @property
            def backend(self):
                return backend

        asked.clear()
        Dev(0, TransferOptions(stream_priority=priority)).new_stream()
        assert asked == want


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
@pytest.mark.parametrize("kind", ["vllm_flash", "flashinfer", "mla"])
@pytest.mark.parametrize("layers", [None, (1,), (0, 2)])
def test_copy_engine_batches_round_trip_bit_for_bit(kind: str, layers) -> None:
    # runs of tokens (split at block edges and wherever the slots jump) become one copy each;
    # on a CPU the batch is replayed with memmove, so the address arithmetic is what is tested
    opts = TransferOptions(store_mode="dma", load_mode="dma")
    xfer = KVTransfer(DEVICE, opts, BACKEND)
    kv, _ = make_kv(kind, device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(21))
    batch = _batch(kv, [8, 5, 8], 22, pin=DEVICE.type == "cuda")
    xfer.gather(kv, batch, layers)
    ref = KVTransfer(DEVICE, TransferOptions(store_mode="torch"), BACKEND)
    want = [(s, chunk_like(kv, c.shape[2])) for s, c in batch]
    ref.gather(kv, want, layers)
    kv2, _ = make_kv(kind, device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(23))
    before = [(s, chunk_like(kv2, c.shape[2])) for s, c in batch]
    ref.gather(kv2, before)
    xfer.scatter(kv2, batch, layers)
    back = [(s, chunk_like(kv2, c.shape[2])) for s, c in batch]
    ref.gather(kv2, back)
    if BACKEND is not None:
        BACKEND.synchronize()
    sel = list(range(len(kv.layers))) if layers is None else list(layers)
    for (s, c), (_, w), (_, b), (_, old) in zip(batch, want, back, before):
        n = int(s.numel())
        assert torch.equal(bits(c[sel, :, :n]), bits(w[sel, :, :n]))
        assert torch.equal(bits(b[sel, :, :n]), bits(w[sel, :, :n]))
        others = [l for l in range(len(kv.layers)) if l not in sel]
        assert torch.equal(bits(b[others, :, :n]), bits(old[others, :, :n]))  # untouched layers stay
    assert xfer.stats.dma == 6 and xfer.stats.batches == 2 and xfer.stats.direct == 0
    assert xfer.stats.dmas > 2 * 3  # several runs per chunk: random slots break them up


def test_copy_engine_runs_split_at_block_edges_and_jumps() -> None:
    import numpy as np

    from lmcache_kernels import dma

    starts, blk, off, lens = dma.runs(np.array([4, 5, 6, 7, 8, 9, 30, 31, 2]), 4)
    assert starts.tolist() == [0, 4, 6, 8] and blk.tolist() == [1, 2, 7, 0]
    assert off.tolist() == [0, 0, 2, 2] and lens.tolist() == [4, 2, 2, 1]
    starts, blk, off, lens = dma.runs(np.array([4, 5, 6, 7, 8, 9, 30, 31, 2]), 4, across_blocks=True)
    assert starts.tolist() == [0, 6, 8] and blk.tolist() == [1, 7, 0] and lens.tolist() == [6, 2, 1]


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
@pytest.mark.parametrize("kind", ["vllm_flash", "flashinfer"])
def test_copy_engine_runs_cross_blocks_only_where_blocks_are_adjacent(kind: str) -> None:
    # consecutive blocks: one run per chunk and plane in vllm_flash (blocks adjacent per plane);
    # FlashInfer interleaves K and V per block, so its runs stop at every block edge
    kv, _ = make_kv(kind, device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(4))
    slots = torch.arange(8, 8 + 24)
    chunk = chunk_like(kv, 24, "cpu", pin=DEVICE.type == "cuda")
    xfer = KVTransfer(DEVICE, TransferOptions(store_mode="dma"), BACKEND)
    xfer.gather(kv, [(slots, chunk)], (0,))
    want = chunk_like(kv, 24)
    KVTransfer(DEVICE, TransferOptions(store_mode="torch"), BACKEND).gather(kv, [(slots, want)], (0,))
    if BACKEND is not None:
        BACKEND.synchronize()
    assert torch.equal(bits(chunk[0]), bits(want[0]))
    per_plane = 1 if kind == "vllm_flash" else -(-24 // kv.block_size) + (8 % kv.block_size > 0)
    assert xfer.stats.dmas == 2 * per_plane


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
def test_copy_engine_mode_falls_back_for_layouts_it_cannot_move() -> None:
    # vLLM 0.3x per-layer views keep heads outside tokens: a run of tokens is not one copy
    xfer = KVTransfer(DEVICE, TransferOptions(store_mode="dma"), BACKEND)
    kv, _ = make_kv("vllm_blocks_heads", device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(2))
    batch = _batch(kv, [8], 3, pin=DEVICE.type == "cuda")
    xfer.gather(kv, batch)
    want = [(s, chunk_like(kv, c.shape[2])) for s, c in batch]
    KVTransfer(DEVICE, TransferOptions(store_mode="torch"), BACKEND).gather(kv, want)
    if BACKEND is not None:
        BACKEND.synchronize()
    assert torch.equal(bits(batch[0][1]), bits(want[0][1]))
    assert xfer.stats.dma == 0 and xfer.stats.direct + xfer.stats.staged == 1
    assert any("not contiguous" in f for f in xfer.stats.fallbacks)


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
def test_auto_per_layer_calls_choose_staged_dma_or_the_kernel() -> None:
    # per-layer calls of at least staged_min_layer_bytes: staged (loads and stores), ring copies
    # batched; smaller loads with long runs: copy-engine batches straight into the cache; else,
    # and with per-chunk ring copies ("each"), the capped kernel
    from lmcache_kernels.accel import SyncBackend

    backend = BACKEND if BACKEND is not None else SyncBackend()  # a stream backend: "an accelerator"
    kv, _ = make_kv("vllm_flash", device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(8))
    contiguous = [(torch.arange(16, 32), chunk_like(kv, 16, "cpu", pin=DEVICE.type == "cuda"))]
    scattered = _batch(kv, [16], 9, pin=DEVICE.type == "cuda")  # random slots: short runs
    run_bytes = 16 * kv.geometry.hidden * kv.layers[0].k.element_size()
    layer_bytes = kv.geometry.bytes_per_token // len(kv.layers) * 16
    for batch, dma_min, staged_min, copies, want in (
            (contiguous, run_bytes, 0, "batch", ("dma", "direct")),
            (contiguous, run_bytes, layer_bytes, "batch", ("staged", "staged")),
            (contiguous, run_bytes + 1, 0, "batch", ("direct", "direct")),
            (scattered, run_bytes, layer_bytes, "batch", ("staged", "staged")),
            (scattered, run_bytes, layer_bytes + 1, "batch", ("direct", "direct")),
            (scattered, run_bytes, layer_bytes, "each", ("direct", "direct"))):
        opts = TransferOptions(dma_min_run_bytes=dma_min, staged_min_layer_bytes=staged_min, staged_copies=copies)
        xfer = KVTransfer(DEVICE, opts, backend)
        for s, c in batch:
            c.copy_(torch.randn(c.shape).to(c.dtype))
        for layer in range(len(kv.layers)):
            xfer.scatter(kv, batch, (layer,))  # per-layer loads, auto
        xfer.gather(kv, batch, (0,))  # and one per-layer store
        back = [(s, chunk_like(kv, c.shape[2])) for s, c in batch]
        KVTransfer(DEVICE, TransferOptions(store_mode="torch"), BACKEND).gather(kv, back)
        if BACKEND is not None:
            BACKEND.synchronize()
        assert torch.equal(bits(back[0][1]), bits(batch[0][1])), (dma_min, staged_min, want)
        counts = {"direct": 0, "staged": 0, "dma": 0}
        counts[want[0]] += len(kv.layers)
        counts[want[1]] += 1
        got = {k: getattr(xfer.stats, k) for k in counts}
        assert got == counts, (dma_min, staged_min, copies, want, xfer.stats)
    with pytest.raises(ValueError, match="staged_min_layer_bytes"):
        TransferOptions(staged_min_layer_bytes=-1)
    assert TransferOptions.from_env({"LMCACHE_KV_STAGED_MIN_LAYER_BYTES": "0"}).staged_min_layer_bytes == 0
    with pytest.raises(ValueError, match="dma_min_run_bytes"):
        TransferOptions(dma_min_run_bytes=-1)
    assert TransferOptions.from_env({"LMCACHE_KV_DMA_MIN_RUN_BYTES": "0"}).dma_min_run_bytes == 0


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
def test_a_copy_engine_fault_is_a_fallback_and_leaves_the_kernel_on(monkeypatch) -> None:
    xfer = KVTransfer(DEVICE, TransferOptions(store_mode="dma", load_mode="dma"), BACKEND)
    kv, _ = make_kv("vllm_flash", device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(31))
    batch = _batch(kv, [8, 5], 32, pin=DEVICE.type == "cuda")
    xfer.mapped_host()

    def broken(*args, **kwargs):
        raise RuntimeError("cuMemcpyBatchAsync of 4 copies failed with CUresult 1")

    xfer._dma_unusable(kv)  # loads the copier (on a GPU the process-wide driver binding: patched for this test only)
    monkeypatch.setattr(xfer._copier, "copy", broken)
    xfer.gather(kv, batch)  # falls back for this call, bit-exact
    xfer.gather(kv, batch, (0,))  # later calls: the kernel, not the copy engines
    _assert_chunks_hold_kv(kv, batch)
    assert xfer.kernel_ok and xfer.stats.torch == 2 and xfer.stats.direct + xfer.stats.staged == 2
    assert "failed earlier" in (xfer._dma_unusable(kv) or "")


def test_copy_engine_mode_refuses_chunks_on_another_device() -> None:
    kv, _ = make_kv("vllm_flash", num_blocks=16, generator=torch.Generator().manual_seed(33))
    xfer = KVTransfer(torch.device("cpu"), TransferOptions(store_mode="dma"), None)
    batch = [(torch.arange(4), torch.empty(chunk_like(kv, 4).shape, dtype=kv.layers[0].k.dtype, device="meta"))]
    with pytest.raises(ValueError, match="cannot be moved"):
        xfer._split(kv, batch, [0], "dma")


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
@pytest.mark.parametrize("kind", ["vllm_flash", "vllm_blocks_heads", "mla"])
def test_staged_ring_copies_go_as_one_batch_per_group(kind: str) -> None:
    # per-layer and whole-request staged calls with the ring's copies as copy-engine batches (on a
    # CPU replayed with memmove): bit for bit as "each", one batch per ring group, and a per-layer
    # batch builds its kernel table and copy list once for every layer
    kv, _ = make_kv(kind, device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(41))
    results = {}
    for copies in ("batch", "each"):
        opts = TransferOptions(store_mode="staged", load_mode="staged", staging_bytes=6000, staging_slots=2,
                               staged_copies=copies)
        xfer = KVTransfer(DEVICE, opts, BACKEND)
        batch = _batch(kv, [8, 5, 8], 42, pin=DEVICE.type == "cuda")
        for layer in range(len(kv.layers)):
            xfer.gather(kv, batch, (layer,))
        kv2, _ = make_kv(kind, device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(43))
        for layer in range(len(kv2.layers)):
            xfer.scatter(kv2, batch, (layer,))
        xfer.scatter(kv2, batch)  # whole request: every layer per group
        back = [(s, chunk_like(kv2, c.shape[2])) for s, c in batch]
        KVTransfer(DEVICE, TransferOptions(store_mode="torch"), BACKEND).gather(kv2, back)
        want = [(s, chunk_like(kv, c.shape[2])) for s, c in batch]
        KVTransfer(DEVICE, TransferOptions(store_mode="torch"), BACKEND).gather(kv, want)
        if BACKEND is not None:
            BACKEND.synchronize()
        for (s, c), (_, w), (_, b) in zip(batch, want, back):
            n = int(s.numel())
            assert torch.equal(bits(c[:, :, :n]), bits(w[:, :, :n])), copies
            assert torch.equal(bits(b[:, :, :n]), bits(w[:, :, :n])), copies
        results[copies] = xfer
    fast, slow = results["batch"], results["each"]
    assert fast.stats.staged == slow.stats.staged == 3 * (2 * len(kv.layers) + 1)
    assert slow.stats.batches == 0 and fast.stats.batches == fast.stats.launches == slow.stats.launches
    assert fast.stats.dmas == slow.stats.dmas  # the same copies, issued in batches
    lay = [v for *_, v in fast._layouts._items]
    per_layer = [x for x in lay if x.preps and all(k[1] == -1 for k in x.preps)]
    assert per_layer and all(len(x.preps) == len(x.groups) for x in per_layer)  # built once, for every layer
    assert all(len(p) == len(fast._ring) for x in per_layer for p in x.preps.values())


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
def test_a_staged_batch_fault_falls_back_to_one_copy_per_chunk(monkeypatch) -> None:
    kv, _ = make_kv("vllm_flash", device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(51))
    xfer = KVTransfer(DEVICE, TransferOptions(store_mode="staged", load_mode="staged"), BACKEND)
    batch = _batch(kv, [8, 5], 52, pin=DEVICE.type == "cuda")
    xfer.gather(kv, batch, (0,))
    assert xfer.stats.batches == 1

    def broken(*args, **kwargs):
        raise RuntimeError("cuMemcpyBatchAsync of 2 copies failed with CUresult 1")

    monkeypatch.setattr(xfer._copier, "copy", broken)
    for layer in range(len(kv.layers)):
        xfer.gather(kv, batch, (layer,))
    _assert_chunks_hold_kv(kv, batch)
    assert xfer.stats.batches == 1 and xfer.stats.torch == 0 and xfer.kernel_ok
    assert "failed earlier" in (xfer._dma_unusable(kv) or "")
    with pytest.raises(ValueError, match="staged_copies"):
        TransferOptions(staged_copies="some")
    assert TransferOptions.from_env({"LMCACHE_KV_STAGED_COPIES": "Each"}).staged_copies == "each"


class _RecordingBackend:
    """The torch.cuda stream API on the host, recording which stream waited on which: one current
    stream (named), copy streams named in creation order, events remembering their stream."""

    def __init__(self, log: list) -> None:
        self.log = log
        backend = self

        class Stream:
            count = 0

            def __init__(self, *args, **kwargs) -> None:
                self.name = f"copy{Stream.count}"
                Stream.count += 1

            def wait_event(self, event) -> None:
                if event is not None:
                    backend.log.append(("wait", self.name, event.stream.name))

        class Event:
            stream = None

            def record(self, stream=None) -> None:
                self.stream = stream

        self.Stream, self.Event = Stream, Event
        self._current = Stream()
        self._current.name = "current"
        Stream.count = 0

    def stream(self, stream):
        import contextlib

        return contextlib.nullcontext()

    def current_stream(self, device=None):
        return self._current

    def synchronize(self, device=None) -> None:
        self.log.append(("synchronize",))


CPU_KERNEL_OK, CPU_KERNEL_WHY = triton_copy.kernel_available(torch.device("cpu"))


@pytest.mark.skipif(not CPU_KERNEL_OK, reason=f"Triton interpreter unavailable: {CPU_KERNEL_WHY}")
def test_a_kernel_fault_mid_staged_store_joins_the_copy_streams_before_the_torch_path(monkeypatch) -> None:
    # a staged store queues each group's ring-to-chunk copies on a copy stream; when the kernel of
    # a later group fails, the torch path rewrites the chunks on the current stream, which must
    # first wait for every copy stream, or a late copy would land over the torch path's bytes
    from lmcache_kernels import transfer as transfer_mod

    log: list = []
    backend = _RecordingBackend(log)
    cpu = torch.device("cpu")
    kv, _ = make_kv("vllm_flash", device=cpu, num_blocks=16, generator=torch.Generator().manual_seed(61))
    opts = TransferOptions(store_mode="staged", load_mode="staged", staging_bytes=6000, staging_slots=2,
                           copy_streams=2)
    xfer = KVTransfer(cpu, opts, backend)
    batch = _batch(kv, [8, 5, 8], 62)
    real_run, calls = triton_copy.run, []

    def failing_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            log.append(("kernel fault",))
            raise RuntimeError("an illegal memory access was encountered")
        return real_run(*args, **kwargs)

    real_ref = transfer_mod.reference.gather_batch

    def logged_ref(*args, **kwargs):
        log.append(("torch path",))
        return real_ref(*args, **kwargs)

    monkeypatch.setattr(triton_copy, "run", failing_run)
    monkeypatch.setattr(transfer_mod.reference, "gather_batch", logged_ref)
    xfer.gather(kv, batch)
    assert not xfer.kernel_ok and "illegal memory access" in xfer.kernel_reason
    fault, torch_path = log.index(("kernel fault",)), log.index(("torch path",))
    joined = {entry[2] for entry in log[fault:torch_path] if entry[0] == "wait" and entry[1] == "current"}
    assert joined == {"copy0", "copy1"}, log
    assert ("synchronize",) not in log  # the first ring allocation has no old ring to wait for
    want = [(s, chunk_like(kv, c.shape[2])) for s, c in batch]
    real_ref(kv, want)
    for (s, c), (_, w) in zip(batch, want):
        n = int(s.numel())
        assert torch.equal(bits(c[:, :, :n]), bits(w[:, :, :n]))


@pytest.mark.skipif(not CPU_KERNEL_OK, reason=f"Triton interpreter unavailable: {CPU_KERNEL_WHY}")
def test_a_staging_ring_without_memory_is_a_fallback_not_a_kernel_fault(monkeypatch) -> None:
    # the ring's allocation failing (device memory) sends that call's staged chunks through the
    # kernel in place (it reaches them here; torch where it cannot), is not tried again at that
    # size, turns auto per-layer calls back to the kernel, and leaves the kernel on
    from lmcache_kernels.accel import SyncBackend

    cpu = torch.device("cpu")
    kv, _ = make_kv("vllm_flash", device=cpu, num_blocks=16, generator=torch.Generator().manual_seed(71))
    real_empty, tries = torch.empty, []

    def empty(*args, **kwargs):
        if kwargs.get("dtype") is torch.uint8 and args and isinstance(args[0], int) and args[0] >= 1 << 30:
            tries.append(args[0])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    for mode, backend in (("staged", None), ("auto", SyncBackend())):
        del tries[:]
        layer_bytes = kv.geometry.bytes_per_token // len(kv.layers) * 16
        opts = TransferOptions(store_mode=mode, load_mode=mode, staging_bytes=1 << 30,
                               staged_min_layer_bytes=layer_bytes, dma_min_run_bytes=0)
        xfer = KVTransfer(cpu, opts, backend)
        batch = _batch(kv, [16], 72)
        for s, c in batch:
            c.copy_(torch.randn(c.shape).to(c.dtype))
        for layer in range(len(kv.layers)):
            xfer.scatter(kv, batch, (layer,))
        back = [(s, chunk_like(kv, c.shape[2])) for s, c in batch]
        KVTransfer(cpu, TransferOptions(store_mode="torch"), None).gather(kv, back)
        assert torch.equal(bits(back[0][1]), bits(batch[0][1])), mode
        assert xfer.kernel_ok, xfer.kernel_reason
        assert len(tries) == 1, tries  # remembered: one try
        assert any("staging ring" in f for f in xfer.stats.fallbacks)
        if mode == "staged":  # the kernel reaches host KV's chunks in place: it moves them, no ring
            assert xfer.stats.direct == len(kv.layers) and xfer.stats.staged == 0 and xfer.stats.torch == 0
        else:  # the first call chose staged and went through the kernel in place, the rest direct
            assert xfer.stats.direct == len(kv.layers) and xfer.stats.torch == 0
            assert "staged from" not in xfer.describe()["load_mode"]


@pytest.mark.skipif(not CPU_KERNEL_OK, reason=f"Triton interpreter unavailable: {CPU_KERNEL_WHY}")
def test_inference_mode_slots_build_only_the_ring_slot_in_use(monkeypatch) -> None:
    # inference tensors keep no version counter, so no batch cache can hold them: each per-layer
    # staged call then builds the kernel table of the one ring slot it uses, not of all of them
    cpu = torch.device("cpu")
    kv, _ = make_kv("vllm_flash", device=cpu, num_blocks=16, generator=torch.Generator().manual_seed(81))
    xfer = KVTransfer(cpu, TransferOptions(store_mode="staged", load_mode="staged", staging_slots=4), None)
    built: list[int] = []
    real = xfer._stage_preps

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        built.append(sum(map(len, out)))  # tables built: one per (group, ring slot)
        return out

    monkeypatch.setattr(xfer, "_stage_preps", spy)
    with torch.inference_mode():
        batch = _batch(kv, [8, 5], 82)
        for layer in range(len(kv.layers)):
            xfer.scatter(kv, batch, (layer,))
    assert built == [1] * len(kv.layers)
    back = [(s, chunk_like(kv, c.shape[2])) for s, c in batch]
    KVTransfer(cpu, TransferOptions(store_mode="torch"), None).gather(kv, back)
    for (s, c), (_, b) in zip(batch, back):
        n = int(s.numel())
        assert torch.equal(bits(c[:, :, :n]), bits(b[:, :, :n]))
    del built[:]
    batch = _batch(kv, [8, 5], 83)  # ordinary tensors: every slot's table once, then cached
    for layer in range(len(kv.layers)):
        xfer.scatter(kv, batch, (layer,))
    assert built == [4]


@pytest.mark.skipif(not CPU_KERNEL_OK, reason=f"Triton interpreter unavailable: {CPU_KERNEL_WHY}")
@pytest.mark.parametrize("gather", [False, True])
def test_a_batch_filling_several_ring_groups_builds_all_their_tables_at_once(monkeypatch, gather) -> None:
    # a request larger than a ring slot is staged in several groups per layer: the first layer
    # builds the tables of every group and ring slot in one pass (one upload of rows and slots),
    # every later layer reuses them, and each group's slot column points at its own chunks
    from lmcache_kernels import reference

    cpu = torch.device("cpu")
    kv, _ = make_kv("vllm_flash", device=cpu, num_blocks=32, generator=torch.Generator().manual_seed(71))
    g = kv.geometry
    chunk_bytes = g.kv_planes * 8 * g.hidden * kv.layers[0].k.element_size()  # one layer of 8 tokens
    xfer = KVTransfer(cpu, TransferOptions(store_mode="staged", load_mode="staged", staging_slots=3,
                                           staging_bytes=2 * chunk_bytes), None)
    built: list[tuple[int, int]] = []
    real = xfer._stage_preps

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        built.append((len(out), len(out[0])))
        return out

    monkeypatch.setattr(xfer, "_stage_preps", spy)
    sizes = [8, 5, 8, 3, 8, 7, 8]  # seven chunks, two a ring slot: four groups
    batch = _batch(kv, sizes, 72)
    torch_x = KVTransfer(cpu, TransferOptions(store_mode="torch", load_mode="torch"), None)
    if not gather:
        want = [(s, c.clone()) for s, c in batch]
        for layer in range(len(kv.layers)):
            xfer.scatter(kv, batch, (layer,))
        got = [(s, chunk_like(kv, max(sizes))) for s, _ in batch]
        torch_x.gather(kv, got)
    else:
        for layer in range(len(kv.layers)):
            xfer.gather(kv, batch, (layer,))
        got = batch
        want = [(s, chunk_like(kv, max(sizes))) for s, _ in batch]
        reference.gather_batch(kv, want, range(len(kv.layers)))
    assert built == [(4, 3)], built  # once, every group, every ring slot
    assert xfer.stats.staged == len(sizes) * len(kv.layers)
    for (s, a), (_, b) in zip(want, got):
        n = int(s.numel())
        assert torch.equal(bits(a[:, :, :n]), bits(b[:, :, :n]))


@pytest.mark.skipif(not CPU_KERNEL_OK, reason=f"Triton interpreter unavailable: {CPU_KERNEL_WHY}")
@pytest.mark.parametrize("gather", [False, True])
def test_a_later_request_of_the_same_shape_reuses_the_tables_and_moves_its_own_slots(monkeypatch, gather) -> None:
    # a staged batch's kernel tables are a function of the ring's addresses and the chunks' sizes
    # alone: a later request of the same shape (other chunks, other slots) reuses them and uploads
    # only its slots, and every request's chunks still land bit for bit at their own slots
    from lmcache_kernels import reference

    kv, xfer = _cpu_staged(64, 97)
    torch_x = KVTransfer(torch.device("cpu"), TransferOptions(store_mode="torch", load_mode="torch"), None)
    rows: list[int] = []
    real = KVTransfer._stage_rows
    monkeypatch.setattr(KVTransfer, "_stage_rows", staticmethod(lambda *a: (rows.append(1), real(*a))[1]))
    layers = range(len(kv.layers))
    for seed, sizes in ((110, [8, 5, 8]), (111, [8, 5, 8]), (112, [8, 5, 8]), (113, [8, 6, 8])):
        batch = _batch(kv, sizes, seed)  # random slots of their own, drawn again per request
        if gather:
            for layer in layers:
                xfer.gather(kv, batch, (layer,))
            want = [(s, chunk_like(kv, max(sizes))) for s, _ in batch]
            reference.gather_batch(kv, want, layers)
            got = batch
        else:
            want = [(s, c.clone()) for s, c in batch]
            for layer in layers:
                xfer.scatter(kv, batch, (layer,))
            got = [(s, chunk_like(kv, max(sizes))) for s, _ in batch]
            torch_x.gather(kv, got)
        for (sl, a), (_, b) in zip(want, got):
            n = int(sl.numel())
            assert torch.equal(bits(a[:, :, :n]), bits(b[:, :, :n])), (seed, n)
    assert len(rows) == 2, rows  # the first shape once for its three requests, then the other shape


@pytest.mark.skipif(not CPU_KERNEL_OK, reason=f"Triton interpreter unavailable: {CPU_KERNEL_WHY}")
def test_many_requests_loaded_layer_by_layer_keep_their_tables(monkeypatch) -> None:
    # one engine step loading 12 requests layer by layer interleaves 12 batches on one transfer:
    # each batch's ring tables are built once, not again at every layer (the caches hold them all)
    kv, xfer = _cpu_staged(64, 91)
    built: list[int] = []
    real = xfer._stage_preps
    monkeypatch.setattr(xfer, "_stage_preps", lambda *a, **k: (built.append(1), real(*a, **k))[1])
    batches = [_batch(kv, [4], 100 + r) for r in range(12)]
    for layer in range(len(kv.layers)):
        for batch in batches:
            xfer.scatter(kv, batch, (layer,))
    assert len(built) == len(batches)


@pytest.mark.skipif(not CPU_KERNEL_OK, reason=f"Triton interpreter unavailable: {CPU_KERNEL_WHY}")
def test_out_of_memory_in_a_call_is_that_calls_fallback_and_other_faults_stay_faults(monkeypatch) -> None:
    # a small table upload that finds no device memory sends that call through torch and keeps the
    # kernel; an error of another kind in the ring's allocation is a kernel fault, not "no ring"
    cpu = torch.device("cpu")
    kv, _ = make_kv("vllm_flash", device=cpu, num_blocks=16, generator=torch.Generator().manual_seed(95))
    xfer = KVTransfer(cpu, TransferOptions(store_mode="direct", load_mode="direct"), None)
    batch = _batch(kv, [8, 5], 96)
    real_run, calls = triton_copy.run, []

    def oom_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(triton_copy, "run", oom_once)
    xfer.gather(kv, batch, (0,))
    xfer.gather(kv, batch, (1,))
    assert xfer.kernel_ok and xfer.stats.torch == 2 and xfer.stats.direct == 2
    monkeypatch.setattr(triton_copy, "run", real_run)
    staged = KVTransfer(cpu, TransferOptions(store_mode="staged", load_mode="staged"), None)
    real_empty = torch.empty

    def broken(*args, **kwargs):
        if kwargs.get("dtype") is torch.uint8 and args and isinstance(args[0], int) and args[0] >= 32 << 20:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", broken)
    staged.gather(kv, batch)
    assert not staged.kernel_ok and "illegal memory access" in staged.kernel_reason
    assert staged._ring_failed is None and staged.stats.torch == 2


@pytest.mark.skipif(not CPU_KERNEL_OK, reason=f"Triton interpreter unavailable: {CPU_KERNEL_WHY}")
def test_per_layer_calls_walk_the_batch_once(monkeypatch) -> None:
    # the engine hands one batch for every layer: the keys of the per-batch caches (plan, ring
    # size, layout) are built on the first call, not on every layer (the H200 profile of a 32K
    # staged load spent most of its per-layer host time of ours walking 128 chunks for them)
    import lmcache_kernels.transfer as tr

    kv, xfer = _cpu_staged(32, 95)
    walks: list[str] = []
    real_plan, real_bytes = tr._plan_content, KVTransfer._stage_bytes
    monkeypatch.setattr(tr, "_plan_content", lambda b: (walks.append("plan"), real_plan(b))[1])
    monkeypatch.setattr(KVTransfer, "_stage_bytes", staticmethod(lambda *a: (walks.append("ring"), real_bytes(*a))[1]))
    batch = _batch(kv, [8, 5, 16], 96)
    for layer in range(len(kv.layers)):
        xfer.scatter(kv, batch, (layer,))
    assert walks.count("plan") == 1 and walks.count("ring") <= 2, walks  # ring: sized, then laid out
    assert len(xfer._sigs) == 1
    _assert_chunks_hold_kv(kv, batch)


@pytest.mark.skipif(not CPU_KERNEL_OK, reason=f"Triton interpreter unavailable: {CPU_KERNEL_WHY}")
def test_no_batch_cache_keeps_a_chunk_alive_and_a_dead_chunk_drops_its_keys() -> None:
    # chunks are views of pooled host buffers: a cache holding them would keep buffers the pool
    # let go; a chunk that dies takes its batch's keys with it, before its identity is reused
    import gc
    import weakref

    kv, xfer = _cpu_staged(32, 97)
    batch = _batch(kv, [8, 5], 98)
    for layer in range(len(kv.layers)):
        xfer.gather(kv, batch, (layer,))
    assert len(xfer._sigs) == 1
    refs = [weakref.ref(c) for _, c in batch]
    del batch
    gc.collect()
    assert all(r() is None for r in refs)
    assert not xfer._sigs
    again = _batch(kv, [8, 5], 98)  # new chunks (new identities): served bit for bit
    xfer.gather(kv, again, None)
    _assert_chunks_hold_kv(kv, again)


@pytest.mark.skipif(not CPU_KERNEL_OK, reason=f"Triton interpreter unavailable: {CPU_KERNEL_WHY}")
@pytest.mark.parametrize("mode", ["staged", "direct", "dma"])
def test_no_cache_keeps_a_dropped_paged_cache_alive(mode: str) -> None:
    # an engine that drops its KV cache (a new one after a reconfiguration, a second engine in
    # the process) gets its device memory back: the transfer's caches name it weakly, and a
    # new cache (perhaps at the same id) is never served the old one's tables
    import gc
    import weakref

    cpu = torch.device("cpu")
    xfer = KVTransfer(cpu, TransferOptions(store_mode=mode, load_mode=mode), None)
    for seed in (101, 103):
        kv, raw = make_kv("vllm_flash", device=cpu, num_blocks=32, generator=torch.Generator().manual_seed(seed))
        batch = _batch(kv, [8, 5], seed + 1)
        for layer in range(len(kv.layers)):
            xfer.gather(kv, batch, (layer,))
        xfer.scatter(kv, batch, None)
        _assert_chunks_hold_kv(kv, batch)
        planes = [weakref.ref(lp.k) for lp in kv.layers]
        del kv, raw, batch
        gc.collect()
        assert all(r() is None for r in planes), mode


@pytest.mark.skipif(not CPU_KERNEL_OK, reason=f"Triton interpreter unavailable: {CPU_KERNEL_WHY}")
def test_inference_mode_chunks_with_ordinary_slots_are_still_cached(monkeypatch) -> None:
    # vLLM's forward runs under inference_mode: pool buffers allocated there are inference
    # tensors (no version counter) while the engine's slots are ordinary; the batch's keys are
    # still built once, and a chunk re-pointed in place is seen (its address is part of the key)
    import lmcache_kernels.transfer as tr

    kv, xfer = _cpu_staged(32, 105)
    walks: list[int] = []
    real_plan = tr._plan_content
    monkeypatch.setattr(tr, "_plan_content", lambda b: (walks.append(1), real_plan(b))[1])
    batch = _batch(kv, [8, 5], 106)
    with torch.inference_mode():
        batch = [(s, c.clone()) for s, c in batch]
    assert all(c.is_inference() and not s.is_inference() for s, c in batch)
    for layer in range(len(kv.layers)):
        xfer.gather(kv, batch, (layer,))
    assert len(walks) == 1 and len(xfer._sigs) == 1
    _assert_chunks_hold_kv(kv, batch)
    with torch.inference_mode():
        batch[1][1].set_(torch.zeros_like(batch[1][1]))  # same tensor object, new (zeroed) memory
    before = len(walks)  # (the check above planned its own batch)
    xfer.gather(kv, batch, None)
    assert len(walks) == before + 1 and len(xfer._sigs) == 2  # a new key: planned again
    _assert_chunks_hold_kv(kv, batch)


@pytest.mark.skipif(not KERNEL_OK, reason=f"Triton kernel cannot run here: {KERNEL_WHY}")
@pytest.mark.parametrize("kind", ["vllm_flash", "flashinfer", "mla", "vllm_blocks_heads"])
@pytest.mark.parametrize("layers", [None, (1,), (0, 2)])
def test_ring_copy_dma_moves_the_ring_with_copy_engines_bit_for_bit(kind: str, layers) -> None:
    # ring_copy="dma": the staged path's ring <-> cache half goes as copy-engine batches (device to
    # device), so no SM is needed; several groups (small slots), partial chunks, per-layer and
    # multi-layer calls. A layout whose token splits its heads (vllm_blocks_heads) keeps the kernel.
    opts = TransferOptions(store_mode="staged", load_mode="staged", staging_bytes=6000, staging_slots=2,
                           ring_copy="dma")
    xfer = KVTransfer(DEVICE, opts, BACKEND)
    _, batch = _gathered_as_reference(xfer, kind, 21, 22, layers)
    from lmcache_kernels import reference

    by_copy = kind != "vllm_blocks_heads"
    groups = xfer.stats.ring_batches
    several = layers is None and kind != "mla"  # else the chunks' rows are small enough to share a slot
    assert (groups >= (2 if several else 1)) if by_copy else (groups == 0 and xfer.stats.launches > 0), \
        (kind, xfer.stats)
    kv2, _ = make_kv(kind, device=DEVICE, num_blocks=16, generator=torch.Generator().manual_seed(23))
    ref2, _ = make_kv(kind, num_blocks=16, generator=torch.Generator().manual_seed(23))
    launches = xfer.stats.launches
    xfer.scatter(kv2, batch, layers)
    reference.scatter_batch(ref2, [(s, c.cpu()) for s, c in batch], layers)
    if BACKEND is not None:
        BACKEND.synchronize()
    for got, want in zip(kv2.layers, ref2.layers):  # every plane, so no byte outside the slots moved
        for a, b in ((got.k, want.k), (got.v, want.v)):
            if a is not None:
                assert torch.equal(bits(a.cpu()), bits(b)), kind
    assert (xfer.stats.ring_batches > groups and xfer.stats.launches == launches) if by_copy else \
        xfer.stats.ring_batches == 0, (kind, xfer.stats)


def test_ring_copy_option_is_checked_and_read_from_the_environment() -> None:
    assert TransferOptions().ring_copy == "kernel"
    assert TransferOptions.from_env({"LMCACHE_KV_RING_COPY": "DMA"}).ring_copy == "dma"
    with pytest.raises(ValueError, match="ring_copy must be one of kernel, dma"):
        TransferOptions(ring_copy="sm")


def test_copy_engine_check_asks_the_driver_once_per_allocation_not_per_chunk(monkeypatch) -> None:
    # each is_pinned is a driver query (about 5 us on a GPU host, 128 of them at 32K tokens);
    # chunks carved from one pool slab share their allocation, and one answer serves them all
    from types import SimpleNamespace

    hidden = 16
    kv = SimpleNamespace(device=torch.device("cuda"), geometry=SimpleNamespace(hidden=hidden))
    slab, alone = torch.empty(3 * 2 * 2 * 4 * hidden), torch.empty(2 * 2 * 4 * hidden)
    chunks = [slab[i * 256:(i + 1) * 256].view(2, 2, 4, hidden) for i in range(3)] + [alone.view(2, 2, 4, hidden)]
    asked: list[int] = []
    answer = {slab.data_ptr(): True, alone.data_ptr(): True}

    def is_pinned(t: torch.Tensor) -> bool:
        asked.append(t.data_ptr())
        return answer[t.untyped_storage().data_ptr()]

    monkeypatch.setattr(torch.Tensor, "is_pinned", is_pinned)
    xfer = KVTransfer(torch.device("cpu"), TransferOptions(), None)
    items = [(torch.arange(4), c) for c in chunks]
    assert xfer._chunks_dma_ok(kv, items, None) and len(asked) == 2
    answer[alone.data_ptr()] = False  # one pageable chunk: the batch is not for the copy engines
    assert not xfer._chunks_dma_ok(kv, items, None)
