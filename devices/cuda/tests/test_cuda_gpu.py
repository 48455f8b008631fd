"""The CUDA device on a real GPU: bit-exact gather/scatter for every layout and path, the engine
round trip, layer-by-layer events, IPC across processes, GDS, telemetry. Skipped without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lmcache_device_cuda.device import CUDADevice  # noqa: E402

DET = CUDADevice.detect()
pytestmark = pytest.mark.skipif(not DET.available or not torch.cuda.is_available(),
                                reason=f"no usable NVIDIA GPU: {DET.reason}")

from lmcache_kernels import reference  # noqa: E402
from lmcache_kernels.testing import LAYOUTS, bits, chunk_like, make_kv, random_slots  # noqa: E402
from lmcache_kernels.transfer import TransferOptions  # noqa: E402


def _gen(seed: int) -> "torch.Generator":
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode", ["direct", "staged", "torch"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_engine_style_calls_are_bit_exact(kind: str, mode: str) -> None:
    """Per-chunk, per-layer calls inside use_stream (what CacheEngine does), batched by the device."""
    dev = CUDADevice(0, TransferOptions(store_mode=mode, load_mode=mode, staging_bytes=1 << 16))
    kv, _ = make_kv(kind, device="cuda", num_blocks=32, generator=_gen(1))
    host_kv, _ = make_kv(kind, num_blocks=32, generator=_gen(1))
    slots = random_slots(100, kv, _gen(2))
    parts = [(slots[0:48], 48), (slots[48:96], 48), (slots[96:100], 48)]  # last one partial
    chunks = []
    for _, n in parts:
        buf = dev.alloc_host(kv.geometry.nbytes(n))
        chunks.append(buf.view(kv.layers[0].k.dtype).view(kv.geometry.shape(n)))
        chunks[-1].view(torch.uint8).fill_(0x5A)
    stream = dev.new_stream()
    for layer in range(kv.geometry.num_layers):
        with dev.use_stream(stream):
            for (s, _), c in zip(parts, chunks):
                dev.gather(kv, s, c, layers=(layer,))
    dev.record_event(stream).synchronize()
    for (s, n), c in zip(parts, chunks):
        want = chunk_like(host_kv, n)
        reference.gather_batch(host_kv, [(s, want)])
        assert torch.equal(bits(c), bits(want)), f"{kind} {mode}"
    # load into a different cache, layer by layer, then compare the touched slots
    kv2, keep2 = make_kv(kind, device="cuda", num_blocks=32, generator=_gen(3))
    events = []
    for layer in range(kv.geometry.num_layers):
        with dev.use_stream(stream):
            for (s, n), c in zip(parts, chunks):
                dev.scatter(kv2, s, c[:, :, : s.numel()], layers=(layer,))
            events.append(dev.record_event(stream))
    for ev in events:
        ev.wait_on_compute()
    torch.cuda.synchronize()
    back = chunk_like(kv2, 100)
    reference.gather_batch(kv2, [(slots.cuda(), back)])
    full = chunk_like(host_kv, 100)
    reference.gather_batch(host_kv, [(slots, full)])
    assert torch.equal(bits(back), bits(full))
    stats = dev.transfer.stats
    if mode != "torch":
        assert stats.torch == 0, stats.fallbacks
        assert stats.launches <= 2 * kv.geometry.num_layers * (2 if mode == "staged" else 1) + 2


def test_cached_tables_wait_for_their_upload_on_another_stream() -> None:
    """A batch's kernel table is uploaded on the stream of its first call without the host waiting;
    a later call on another stream reuses it and must wait for that upload (else its kernel may read
    a table not there yet: wrong slots). Stream A sleeps before the first call, so its upload is
    queued behind the sleep; B's kernel must still be waiting when the host looks."""
    import time

    dev = CUDADevice(0, TransferOptions(store_mode="direct", load_mode="direct"))
    kv, _ = make_kv("vllm_flash", device="cuda", num_blocks=32, generator=_gen(1))
    host_kv, _ = make_kv("vllm_flash", num_blocks=32, generator=_gen(1))
    slots = random_slots(96, kv, _gen(2)).cuda()

    def chunk() -> "torch.Tensor":
        buf = dev.alloc_host(kv.geometry.nbytes(96))
        return buf.view(kv.layers[0].k.dtype).view(kv.geometry.shape(96))
    warm, c = chunk(), chunk()
    a, b, w = dev.new_stream(), dev.new_stream(), dev.new_stream()
    with dev.use_stream(w):  # caches the slot check, the slots and the layer ids, landed
        dev.gather(kv, slots, warm)
    torch.cuda.synchronize()
    with dev.use_stream(a):
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time
        t0 = time.monotonic()
        dev.gather(kv, slots, c)  # a new chunk address: a new plan, its table queued behind the sleep
    with dev.use_stream(b):
        dev.gather(kv, slots, c)  # the same batch: the cached table
    issued = time.monotonic() - t0
    time.sleep(0.05)
    waiting = not b.query()
    a_busy = not a.query()
    torch.cuda.synchronize()
    assert a_busy and issued < 0.5, f"the calls took {issued:.2f} s on the host: they waited for stream A"
    assert waiting, "the call on stream B did not wait for the table stream A uploaded"
    want = chunk_like(host_kv, 96)
    reference.gather_batch(host_kv, [(slots.cpu(), want)])
    assert torch.equal(bits(c), bits(want)) and torch.equal(bits(warm), bits(want))


def test_mapped_pinned_memory_probe() -> None:
    dev = CUDADevice(0)
    ok, why = dev.transfer.mapped_host()
    assert ok, why


def test_gather_many_all_layers_one_launch() -> None:
    dev = CUDADevice(0, TransferOptions(store_mode="direct"))
    kv, _ = make_kv("vllm_flash", device="cuda", num_layers=4, num_blocks=64, heads=8, head_dim=128,
                    block_size=16, generator=_gen(4))
    slots = random_slots(512, kv, _gen(5))
    chunks = [chunk_like(kv, 256, pin=True), chunk_like(kv, 256, pin=True)]
    dev.gather_many(kv, [(slots[:256], chunks[0]), (slots[256:], chunks[1])])
    dev.synchronize()
    assert dev.transfer.stats.launches == 1
    host = make_kv("vllm_flash", num_layers=4, num_blocks=64, heads=8, head_dim=128, block_size=16,
                   generator=_gen(4))[0]
    for s, c in ((slots[:256], chunks[0]), (slots[256:], chunks[1])):
        want = chunk_like(host, 256)
        reference.gather_batch(host, [(s, want)])
        assert torch.equal(bits(c), bits(want))


def test_cache_engine_round_trip_on_gpu(tmp_path) -> None:
    from lmcache_core.config import Config
    from lmcache_core.engine import CacheEngine

    dev = CUDADevice(0)
    kv, _ = make_kv("vllm_flash", device="cuda", num_layers=4, num_blocks=64, heads=8, head_dim=128,
                    block_size=16, generator=_gen(6))
    cfg = Config.load(overrides={"tiers": ["memory://?capacity=1GiB"], "chunk_size": 256, "device": "cuda"},
                      env={})
    tokens = list(range(1000, 1000 + 700))
    blocks = torch.randperm(64, generator=_gen(7))[:44]
    with CacheEngine(kv.geometry, cfg, model="t", device=dev) as eng:
        assert eng.store(tokens, kv, blocks, wait=True) == 700
        kv2, _ = make_kv("vllm_flash", device="cuda", num_layers=4, num_blocks=64, heads=8, head_dim=128,
                         block_size=16, generator=_gen(8))
        blocks2 = torch.randperm(64, generator=_gen(9))[:44]
        task = eng.start_retrieve(tokens, kv2, blocks2)
        for layer in task:
            pass
        task.finish()
        assert task.hit_tokens == 700 and task.order == list(range(4))
        a, b = chunk_like(kv, 700, "cuda"), chunk_like(kv2, 700, "cuda")
        from lmcache_core.layout import slot_mapping

        reference.gather_batch(kv, [(slot_mapping(blocks.cuda(), 16, 0, 700), a)])
        reference.gather_batch(kv2, [(slot_mapping(blocks2.cuda(), 16, 0, 700), b)])
        assert torch.equal(bits(a), bits(b))


def test_ipc_round_trip_in_another_process() -> None:
    dev = CUDADevice(0)
    t = torch.randint(-(2 ** 15), 2 ** 15, (3, 1000), dtype=torch.int16, device="cuda")[:, 10:900]
    handle = dev.ipc_export(t)
    expected = int(t.to(torch.int64).sum())
    code = textwrap.dedent(f"""
        import sys
        from lmcache_device_cuda.device import CUDADevice
        t = CUDADevice(0).ipc_import(bytes.fromhex({handle.hex()!r}))
        import torch
        assert tuple(t.shape) == (3, 890), t.shape
        print(int(t.to(torch.int64).sum()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) == expected


def test_gds_round_trip_or_reason(tmp_path) -> None:
    dev = CUDADevice(0)
    st = dev.gds_status()
    assert st.reason
    assert dev.capabilities.direct_storage == st.direct
    if not st.usable:
        pytest.skip(f"GPUDirect Storage unavailable: {st.reason}")
    src = torch.randint(-(2 ** 31), 2 ** 31 - 1, (1 << 18,), dtype=torch.int32, device="cuda")
    path = Path(st.directory or tmp_path) / f"lmcache-gds-test-{os.getpid()}.bin"
    with dev.open_direct(path, write=True) as f:
        assert f.write_from(src) == src.numel() * 4
    try:
        dst = torch.full_like(src, 7)
        with dev.open_direct(path) as f:
            assert f.read_into(dst) == src.numel() * 4
        torch.cuda.synchronize()
        assert torch.equal(src, dst)
    finally:
        path.unlink(missing_ok=True)


def test_telemetry_reads_the_gpu() -> None:
    tel = CUDADevice(0).telemetry()
    assert tel.get("memory_total", 0) > 0, tel
    assert "name" in tel and "pcie_gen" in tel
