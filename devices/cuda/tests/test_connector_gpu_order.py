"""The vLLM connector's worker half on a real GPU: stores wait on the compute stream (no host
sync), fp8 KV (vLLM's uint8 tensors) round-trips bit-exact and is keyed apart from bf16, and the
engine runs on the KV tensors' own device. Skipped without a GPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lmcache_device_cuda.device import CUDADevice  # noqa: E402

DET = CUDADevice.detect()
pytestmark = pytest.mark.skipif(not DET.available or not torch.cuda.is_available(),
                                reason=f"no usable NVIDIA GPU: {DET.reason}")

from lmcache_core import CacheEngine, Config  # noqa: E402
from lmcache_core.errors import LayoutError  # noqa: E402
from lmcache_core.integrations.vllm.common import LoadSpec, SaveSpec, StepPlan  # noqa: E402
from lmcache_core.integrations.vllm.layout import bind_vllm_caches  # noqa: E402
from lmcache_core.integrations.vllm.worker import VLLMWorker  # noqa: E402
from lmcache_core.keys import model_fingerprint  # noqa: E402

L, B, H, N, D = 4, 160, 8, 16, 128


def _caches(dtype: torch.dtype, fill: float | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """vLLM 0.32 FlashAttention: one LBNHC buffer viewed per layer as [B, H, N, 2D]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if dtype == torch.uint8:
        buf = torch.randint(0, 255, (L, B, N, H, 2 * D), generator=g, device="cuda", dtype=torch.uint8)
    else:
        buf = torch.randn(L, B, N, H, 2 * D, generator=g, device="cuda").to(dtype)
    if fill is not None:
        buf.fill_(fill)
    return {f"model.layers.{i}.self_attn.attn": buf[i].permute(0, 2, 1, 3) for i in range(L)}


def _step(w: VLLMWorker, plan: StepPlan, before_save=None) -> None:
    w.bind(plan)
    w.start_load()
    for name in w.layer_names:
        w.wait_layer(name)
        if before_save is not None:
            before_save(name)
        w.save_layer(name)
    w.wait_for_save()


def test_store_waits_for_kv_written_on_the_compute_stream(tmp_path) -> None:
    """Each layer's KV is written on the compute stream after a long device-side delay, with no host
    sync before save_kv_layer: the stored bytes must be the written ones, not the stale ones."""
    caches = _caches(torch.bfloat16, fill=0.0)
    kv, names = bind_vllm_caches(caches, head_dim=D, backend="FLASH_ATTN", block_size=N)
    cfg = Config.load(overrides={"tiers": ["memory://?capacity=2GiB"], "chunk_size": 256, "device": "cuda"},
                      env={})
    eng = CacheEngine(kv.geometry, cfg, model="stream-order")
    w = VLLMWorker(eng, kv, names, async_save=False)
    tokens = tuple(range(1, 1 + 2048))
    blocks = tuple(range(0, 2048 // N))
    a = torch.randn(4096, 4096, device="cuda")

    def write_late(name: str) -> None:
        for _ in range(20):  # ~ milliseconds of device work queued ahead of the write
            torch.mm(a, a, out=a)
            a.div_(a.abs().max())
        i = names.index(name)
        caches[name].fill_(float(i + 1))  # the layer's KV, written on the compute stream

    _step(w, StepPlan(saves=(SaveSpec("r", tokens, blocks),)), before_save=write_late)
    eng.flush()
    dst_caches = _caches(torch.bfloat16, fill=-1.0)
    dst, _ = bind_vllm_caches(dst_caches, head_dim=D, backend="FLASH_ATTN", block_size=N)
    got = eng.retrieve(tokens, dst, list(range(B - len(blocks), B)))
    torch.cuda.synchronize()
    assert got.hit_tokens == 2048
    for i, name in enumerate(names):
        t = dst_caches[name][B - len(blocks):]
        assert bool((t == float(i + 1)).all()), f"layer {i}: stale KV stored (store did not wait on compute)"
    w.close()
    eng.close()


def test_fp8_kv_round_trips_through_the_connector_and_is_keyed_apart(tmp_path) -> None:
    src_caches = _caches(torch.uint8, seed=3)  # vLLM hands fp8 KV caches as uint8
    kv, names = bind_vllm_caches(src_caches, head_dim=D, backend="FLASH_ATTN", block_size=N)
    assert kv.geometry.dtype == "uint8"
    fp8 = model_fingerprint("m", dtype="bfloat16", kv_cache_dtype="fp8_e4m3")
    bf16 = model_fingerprint("m", dtype="bfloat16", kv_cache_dtype="auto")
    cfg = Config.load(overrides={"tiers": ["memory://?capacity=2GiB"], "chunk_size": 256, "device": "cuda"},
                      env={})
    eng = CacheEngine(kv.geometry, cfg, model=fp8)
    w = VLLMWorker(eng, kv, names, async_save=False)
    tokens = tuple(range(7, 7 + 1000))
    blocks = tuple(range(3, 3 + 63))
    _step(w, StepPlan(saves=(SaveSpec("s", tokens, blocks),)))
    eng.flush()
    dst_caches = _caches(torch.uint8, seed=4)
    dst, _ = bind_vllm_caches(dst_caches, head_dim=D, backend="FLASH_ATTN", block_size=N)
    w2 = VLLMWorker(eng, dst, names, async_save=False)
    dst_blocks = tuple(range(0, 63))
    _step(w2, StepPlan(loads=(LoadSpec("l", tokens, dst_blocks, 0, 999),)))
    torch.cuda.synchronize()
    for name in names:
        s = src_caches[name].permute(0, 2, 1, 3).reshape(B * N, H, 2 * D)
        d = dst_caches[name].permute(0, 2, 1, 3).reshape(B * N, H, 2 * D)
        src_slots = torch.tensor([blocks[t // N] * N + t % N for t in range(999)], device="cuda")
        dst_slots = torch.tensor([dst_blocks[t // N] * N + t % N for t in range(999)], device="cuda")
        assert torch.equal(s[src_slots], d[dst_slots])
    other = CacheEngine(kv.geometry, cfg, model=bf16)
    assert other.lookup(tokens).hit_tokens == 0 and eng.lookup(tokens).hit_tokens == 1000
    for x in (w, w2):
        x.close()
    other.close()
    eng.close()


def test_engine_refuses_kv_on_another_device() -> None:
    """A worker's KV on cuda:1 with an engine on cuda:0 is a startup error naming the fix; on a
    one-GPU host the check is exercised with a fake device index."""
    caches = _caches(torch.bfloat16)
    kv, _ = bind_vllm_caches(caches, head_dim=D, backend="FLASH_ATTN", block_size=N)
    cfg = Config.load(overrides={"tiers": ["memory://"], "chunk_size": 256, "device": "cuda"}, env={})
    eng = CacheEngine(kv.geometry, cfg, model="dev-index", device=CUDADevice(1))  # no CUDA call until used
    with pytest.raises(LayoutError, match="device_index=0"):
        eng.store(list(range(256)), kv, list(range(16)))
    eng.close()
    eng0 = CacheEngine(kv.geometry, cfg, model="dev-index", device_index=0)
    assert eng0.device.index == 0
    eng0.close()
