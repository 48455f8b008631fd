"""StreamDevice batching on a CPU (HostStreamDevice, kernels in the Triton interpreter): the
engine's per-chunk, per-layer calls become one launch per layer, bit for bit."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lmcache_kernels import reference, triton_copy  # noqa: E402
from lmcache_kernels.accel import HostStreamDevice  # noqa: E402
from lmcache_kernels.testing import bits, chunk_like, make_kv, random_slots  # noqa: E402
from lmcache_kernels.transfer import TransferOptions  # noqa: E402

OK, WHY = triton_copy.kernel_available(torch.device("cpu"))
pytestmark = pytest.mark.skipif(not OK, reason=f"Triton kernel cannot run here: {WHY}")


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kv, _ = make_kv("flashinfer", num_layers=3, num_blocks=24, generator=g)
    slots = random_slots(40, kv, g)
    parts = [(slots[i:i + 16], chunk_like(kv, 16)) for i in range(0, 40, 16)]  # the last one partial
    return kv, parts


def _expected(kv, parts):
    out = []
    for s, c in parts:
        want = chunk_like(kv, c.shape[2])
        reference.gather_batch(kv, [(s, want)])
        out.append(want)
    return out


def test_per_layer_calls_in_a_stream_block_become_one_launch_per_layer() -> None:
    dev = HostStreamDevice(0, TransferOptions(store_mode="direct", load_mode="direct"))
    kv, parts = _setup()
    stream = dev.new_stream()
    for layer in range(3):
        with dev.use_stream(stream):
            for s, c in parts:
                dev.gather(kv, s, c, layers=(layer,))
    dev.record_event(stream).synchronize()
    assert dev.transfer.stats.launches == 3 and dev.transfer.stats.direct == 9
    for (_, c), want in zip(parts, _expected(kv, parts)):
        assert torch.equal(bits(c), bits(want))


def test_record_event_flushes_and_calls_outside_a_block_run_at_once() -> None:
    dev = HostStreamDevice(0, TransferOptions(store_mode="direct"))
    kv, parts = _setup(1)
    want = _expected(kv, parts)
    s, c = parts[0]
    dev.gather(kv, s, c)  # no block: runs now
    assert torch.equal(bits(c), bits(want[0]))
    stream = dev.new_stream()
    with dev.use_stream(stream):
        dev.gather(kv, parts[1][0], parts[1][1])
        assert not torch.equal(bits(parts[1][1]), bits(want[1]))  # batched, not run yet
        dev.record_event(stream)
        assert torch.equal(bits(parts[1][1]), bits(want[1]))  # the event covers it


def test_an_exception_in_the_block_drops_the_batch() -> None:
    dev = HostStreamDevice(0)
    kv, parts = _setup(2)
    before = bits(parts[0][1]).clone()
    with pytest.raises(RuntimeError, match="engine unwinding"):
        with dev.use_stream(dev.new_stream()):
            dev.gather(kv, parts[0][0], parts[0][1])
            raise RuntimeError("engine unwinding")
    dev.synchronize()
    assert torch.equal(bits(parts[0][1]), before)


@pytest.mark.parametrize("mode", ["direct", "staged"])
def test_gather_many_and_scatter_many_round_trip(mode: str) -> None:
    dev = HostStreamDevice(0, TransferOptions(store_mode=mode, load_mode=mode, staging_bytes=1 << 14))
    kv, parts = _setup(3)
    dev.gather_many(kv, parts)
    for (_, c), want in zip(parts, _expected(kv, parts)):
        assert torch.equal(bits(c), bits(want))
    kv2, _ = make_kv("flashinfer", num_layers=3, num_blocks=24, generator=torch.Generator().manual_seed(9))
    dev.scatter_many(kv2, [(s, c[:, :, : s.numel()]) for s, c in parts])
    for (_, c), want in zip(parts, _expected(kv2, parts)):
        assert torch.equal(bits(c), bits(want))


def test_cache_engine_round_trip_through_the_stream_device() -> None:
    from lmcache_core.config import Config
    from lmcache_core.engine import CacheEngine
    from lmcache_core.layout import slot_mapping

    g = torch.Generator().manual_seed(4)
    kv, _ = make_kv("vllm_flash", num_layers=2, num_blocks=30, block_size=8, heads=2, head_dim=16, generator=g)
    kv2, _ = make_kv("vllm_flash", num_layers=2, num_blocks=30, block_size=8, heads=2, head_dim=16, generator=g)
    cfg = Config.load(overrides={"tiers": ["memory://?capacity=16MiB"], "chunk_size": 32}, env={})
    tokens = list(range(5, 105))
    b1, b2 = torch.randperm(30, generator=g)[:13], torch.randperm(30, generator=g)[:13]
    dev = HostStreamDevice(0)
    with CacheEngine(kv.geometry, cfg, model="stream-test", device=dev) as eng:
        assert eng.store(tokens, kv, b1, wait=True) == 100
        assert eng.retrieve(tokens, kv2, b2).hit_tokens == 100
    a, b = chunk_like(kv, 100), chunk_like(kv2, 100)
    reference.gather_batch(kv, [(slot_mapping(b1, 8, 0, 100), a)])
    reference.gather_batch(kv2, [(slot_mapping(b2, 8, 0, 100), b)])
    assert torch.equal(bits(a), bits(b))
    # whole-request calls go through the kernels (staged or direct), never the torch fallback
    assert dev.transfer.stats.torch == 0 and dev.transfer.stats.direct + dev.transfer.stats.staged > 0


def test_a_layerwise_load_queues_layer_0_at_its_start_and_ramps_the_window_in_its_waits() -> None:
    # The device is idle while start_retrieve runs on the host: it queues only layer 0, and each
    # wait queues at most RAMP more until LOOKAHEAD layers are ahead; lookahead >= the layer count
    # still queues everything at the start. Every layer lands bit for bit either way.
    from lmcache_core.config import Config
    from lmcache_core.device import DeviceCapabilities
    from lmcache_core.engine import CacheEngine, LayerwiseRetrieve
    from lmcache_core.layout import slot_mapping

    layers = 10
    g = torch.Generator().manual_seed(5)
    kv, _ = make_kv("vllm_flash", num_layers=layers, num_blocks=12, block_size=8, heads=2, head_dim=16, generator=g)
    cfg = Config.load(overrides={"tiers": ["memory://?capacity=16MiB"], "chunk_size": 32}, env={})
    tokens = list(range(7, 71))
    blocks = list(range(8))

    class Queued(HostStreamDevice):  # copies still run at each record_event; the engine queues them as on a GPU
        capabilities = DeviceCapabilities(async_copy=True)

    with CacheEngine(kv.geometry, cfg, model="window", device=Queued(0)) as eng:
        assert eng.store(tokens, kv, blocks, wait=True) == 64
        for lookahead, queued_at_start in ((None, 1), (layers, layers)):
            dst, _ = make_kv("vllm_flash", num_layers=layers, num_blocks=12, block_size=8, heads=2, head_dim=16,
                             generator=g)
            task = eng.start_retrieve(tokens, dst, [11, 10, 9, 8, 4, 5, 6, 7], lookahead=lookahead)
            window = task.lookahead
            queued = [sum(e is not None for e in task.events)]
            for _ in task:
                queued.append(sum(e is not None for e in task.events))
            task.finish()
            assert queued[0] == queued_at_start
            if lookahead is None:
                ramp, full = LayerwiseRetrieve.RAMP, LayerwiseRetrieve.LOOKAHEAD
                assert window == full
                # after wait i: through min(i + window, what was queued + RAMP - 1), capped at the layers
                want, q = [], 1
                for i in range(layers):
                    q = min(layers, max(i + 1, min(i + window + 1, q + ramp)))
                    want.append(q)
                assert queued[1:] == want and want[:3] == [3, 5, 7]
            a, b = chunk_like(kv, 64), chunk_like(dst, 64)
            reference.gather_batch(kv, [(slot_mapping(torch.tensor(blocks), 8, 0, 64), a)])
            reference.gather_batch(dst, [(slot_mapping(torch.tensor([11, 10, 9, 8, 4, 5, 6, 7]), 8, 0, 64), b)])
            assert torch.equal(bits(a), bits(b))  # every layer, every token
