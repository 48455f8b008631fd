"""The vLLM connector's halves without vLLM: layout binding, the worker's layer-wise loads and
stores over vLLM-shaped caches, and the scheduler's plans (duck-typed requests). Fast; the
end-to-end behaviour with real engines is in test_vllm_connector.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import torch

from lmcache_core import CacheEngine, Config
from lmcache_core.errors import ConfigError, LayoutError
from lmcache_core.integrations.vllm.common import ConnectorOptions, LoadSpec, SaveSpec, StepPlan, load_config
from lmcache_core.integrations.vllm.layout import bind_vllm_caches, layer_order
from lmcache_core.integrations.vllm.scheduler import VLLMScheduler
from lmcache_core.integrations.vllm.worker import VLLMWorker

L, B, H, N, D = 3, 12, 2, 16, 8


def cpu_attn_caches(seed: int = 0) -> dict[str, torch.Tensor]:
    """vLLM 0.32 CPU_ATTN: one LBHNC buffer, per-layer [B, H, N, 2D] views."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(L, B, H, N, 2 * D, generator=g)
    return {f"model.layers.{i}.self_attn.attn": buf[i] for i in reversed(range(L))}


def flash_caches(seed: int = 0) -> dict[str, torch.Tensor]:
    """vLLM 0.32 FlashAttention: one LBNHC buffer viewed per layer as [B, H, N, 2D] (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(L, B, N, H, 2 * D, generator=g)
    return {f"model.layers.{i}.self_attn.attn": buf[i].permute(0, 2, 1, 3) for i in range(L)}


def test_layer_order_follows_layer_numbers() -> None:
    assert layer_order(["m.layers.10.attn", "m.layers.2.attn", "m.layers.1.attn"]) == [
        "m.layers.1.attn", "m.layers.2.attn", "m.layers.10.attn"]


def test_cpu_attn_layout_splits_k_and_v_inside_each_slab() -> None:
    caches = cpu_attn_caches()
    kv, names = bind_vllm_caches(caches, head_dim=D, backend="CPU_ATTN", block_size=N)
    assert kv.kind == "vllm_split_blocks" and names[0].startswith("model.layers.0")
    t = caches["model.layers.1.self_attn.attn"]
    slab = t.reshape(B, H, 2 * N * D)  # per (block, head): K^T [D, N], then V [N, D] (vec/vec16 kernels)
    k_ref = slab[..., : N * D].reshape(B, H, D, N).permute(0, 3, 1, 2)
    v_ref = slab[..., N * D :].reshape(B, H, N, D).permute(0, 2, 1, 3)
    assert torch.equal(kv.layers[1].k, k_ref)
    assert torch.equal(kv.layers[1].v, v_ref)
    assert kv.layers[1].k.data_ptr() == t.data_ptr()  # views, not copies


def test_flash_layout_reads_k_concat_v_per_token() -> None:
    caches = flash_caches()
    kv, _ = bind_vllm_caches(caches, head_dim=D, backend="FLASH_ATTN", block_size=N)
    t = caches["model.layers.2.self_attn.attn"]
    assert torch.equal(kv.layers[2].k, t.transpose(1, 2)[..., :D])
    assert torch.equal(kv.layers[2].v, t.transpose(1, 2)[..., D:])


def test_older_and_mla_layouts() -> None:
    old = {f"l.{i}": torch.zeros(2, B, N, H, D) for i in range(L)}
    assert bind_vllm_caches(old, head_dim=D)[0].kind == "vllm_flash"
    mla = {f"l.{i}": torch.zeros(B, 1, N, 24) for i in range(L)}
    kv, _ = bind_vllm_caches(mla, head_dim=24, use_mla=True)
    assert kv.geometry.kv_planes == 1 and kv.geometry.head_dim == 24


def test_unsupported_layouts_are_startup_errors() -> None:
    with pytest.raises(LayoutError, match="not 2 \\* head_dim"):
        bind_vllm_caches({"l.0": torch.zeros(B, H, N, 3 * D)}, head_dim=D, backend="FLASH_ATTN")
    with pytest.raises(LayoutError, match="--block-size 16"):
        bind_vllm_caches(cpu_attn_caches(), head_dim=D, backend="CPU_ATTN", block_size=32)
    with pytest.raises(LayoutError, match="slab contiguous"):
        bind_vllm_caches(flash_caches(), head_dim=D, backend="CPU_ATTN")
    with pytest.raises(LayoutError, match="'amx' kernel"):
        bind_vllm_caches(cpu_attn_caches(), head_dim=D, backend="CPU_ATTN", isa="amx")


def test_options_and_config_come_from_one_dict() -> None:
    options, config = load_config({"async_load": "false", "chunk_size": 32, "tiers": ["memory://"]})
    assert options == ConnectorOptions(async_load="false") and config.chunk_size == 32
    with pytest.raises(ConfigError, match="connector options: async_load"):
        load_config({"no_such_key": 1})
    with pytest.raises(ConfigError, match="async_load"):
        load_config({"async_load": "sometimes"})
    with pytest.raises(ConfigError, match="multiple of the engine block size 16, got 40"):
        Config.from_dict({"chunk_size": 40}).check_block_size(16)


# -- worker and scheduler over a shared disk tier --------------------------------------------------
@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[CacheEngine, CacheEngine]]:
    """Two engines as two processes would have: own memory tier, one shared disk tier."""
    from lmcache_core.integrations.vllm.layout import geometry_from_spec

    geom = geometry_from_spec(L, H, D, torch.float32, False)
    made = [CacheEngine(geom, Config.from_dict({
        "tiers": ["memory://?capacity=64MiB", f"disk://{tmp_path / 'disk'}?capacity=256MiB"],
        "chunk_size": 32, "device": "cpu"}), model="m") for _ in range(2)]
    yield made[0], made[1]
    for e in made:
        e.close()


def _worker(engine: CacheEngine, caches: dict[str, torch.Tensor], async_save: bool = True) -> VLLMWorker:
    kv, names = bind_vllm_caches(caches, head_dim=D, backend="CPU_ATTN", block_size=N)
    return VLLMWorker(engine, kv, names, async_save=async_save)


def _step(w: VLLMWorker, plan: StepPlan) -> None:
    """What vLLM does in one step: bind, start loads, per layer wait/save, wait_for_save."""
    w.bind(plan)
    w.start_load()
    for name in w.layer_names:
        w.wait_layer(name)
        w.save_layer(name)
    w.wait_for_save()


def _tokens_kv(w: VLLMWorker, blocks: list[int], start: int, end: int) -> torch.Tensor:
    idx = torch.arange(start, end)
    b = torch.tensor(blocks)[idx // N]
    return torch.stack([torch.stack([lp.k[b, idx % N], lp.v[b, idx % N]]) for lp in w.kv.layers])


def test_store_then_load_across_engines_is_bit_exact(engines: tuple[CacheEngine, CacheEngine]) -> None:
    src_engine, dst_engine = engines
    src, dst = _worker(src_engine, cpu_attn_caches(1)), _worker(dst_engine, cpu_attn_caches(2))
    tokens = tuple(range(100, 170))  # 70 tokens: two chunks of 32 and a partial of 6
    _step(src, StepPlan(saves=(SaveSpec("r1", tokens, (3, 7, 1, 9, 4)),)))
    assert src.get_finished({"r1"}) in (({"r1"}, set()), (set(), set()))
    src.wait_requests(["r1"], timeout=10)
    src_engine.flush()
    sending, _ = src.get_finished(set())
    assert src.take_stats()["stored_tokens"] == 70
    # Load tokens [16, 69) into other blocks; [0, 16) is "vLLM's own" and must not be written.
    before = _tokens_kv(dst, [5, 0, 2, 11, 6], 0, 16).clone()
    _step(dst, StepPlan(loads=(LoadSpec("r2", tokens, (5, 0, 2, 11, 6), 16, 69),), null_block=8))
    assert torch.equal(_tokens_kv(dst, [5, 0, 2, 11, 6], 16, 69), _tokens_kv(src, [3, 7, 1, 9, 4], 16, 69))
    assert torch.equal(_tokens_kv(dst, [5, 0, 2, 11, 6], 0, 16), before)
    assert dst.load_errors() == set()
    stats = dst.take_stats()
    assert stats["loaded_tokens"] == 53 and stats["load_failed_tokens"] == 0


def test_async_load_and_load_failure_report_blocks(engines: tuple[CacheEngine, CacheEngine]) -> None:
    src_engine, dst_engine = engines
    src, dst = _worker(src_engine, cpu_attn_caches(1), async_save=False), _worker(dst_engine, cpu_attn_caches(3))
    tokens = tuple(range(1, 97))  # three full chunks
    _step(src, StepPlan(saves=(SaveSpec("s", tokens, (0, 1, 2, 3, 4, 5)),)))
    src_engine.flush()
    src_engine.tiers.delete([src_engine.keys(tokens)[1]])  # chunk 1 vanishes after the lookup
    _step(dst, StepPlan(loads=(LoadSpec("a", tokens, (6, 7, 8, 9, 10, 11), 0, 95, is_async=True),)))
    deadline = 50
    recving: set[str] = set()
    while "a" not in recving and deadline:
        import time

        time.sleep(0.1)
        deadline -= 1
        recving |= dst.get_finished(set())[1]
    assert recving == {"a"}
    # Tokens 32..95 could not be loaded: blocks 8..11 (16 tokens each) must be recomputed.
    assert dst.load_errors() == {8, 9, 10, 11}
    assert torch.equal(_tokens_kv(dst, [6, 7], 0, 32), _tokens_kv(src, [0, 1], 0, 32))


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    num_tokens: int = 0

    def __post_init__(self) -> None:
        self.num_tokens = self.num_tokens or len(self.prompt_token_ids)


@dataclass
class NewReq:
    req_id: str
    prompt_token_ids: list[int]
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class Cached:
    req_ids: list[str] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class Output:
    scheduled_new_reqs: list[NewReq]
    scheduled_cached_reqs: Cached
    num_scheduled_tokens: dict[str, int]
    preempted_req_ids: set[str] | None = None


def test_scheduler_plans_chunked_prefill_stores_and_capped_hits(engines: tuple[CacheEngine, CacheEngine]) -> None:
    engine = engines[0]
    sched = VLLMScheduler(engine, N, ConnectorOptions())
    prompt = list(range(500, 580))  # 80 tokens: chunks of 32, 32 and a partial 16
    sched.update_state_after_alloc(FakeRequest("r", prompt), [1, 2, 3], 0)  # vLLM calls it for every request
    # Step 1 computes 40 tokens: only chunk 0 is complete.
    plan = sched.build_plan(Output([NewReq("r", prompt, ([1, 2, 3],), 0)], Cached(), {"r": 40}))
    assert [s.end for s in plan.saves] == [32]
    # Step 2 computes the rest (one more block): chunks 1 and the partial chunk.
    plan = sched.build_plan(Output([], Cached(["r"], set(), [([4, 5],)], [40]), {"r": 40}))
    assert [s.end for s in plan.saves] == [80] and plan.saves[0].block_ids == (1, 2, 3, 4, 5)
    assert sched.build_plan(Output([], Cached(["r"], set(), [None], [80]), {"r": 1})).saves == ()
    assert sched.request_finished("r") is True  # a store ran: vLLM keeps the blocks until get_finished
    assert sched.request_finished("other") is False
    # Nothing stored yet (the plans never ran on a worker): no hit.
    assert sched.get_num_new_matched_tokens(FakeRequest("q", prompt), 0) == (0, False)


def test_scheduler_hit_is_capped_and_async_outside_the_fast_tier(engines: tuple[CacheEngine, CacheEngine]) -> None:
    writer, reader = engines
    w = _worker(writer, cpu_attn_caches(4), async_save=False)
    prompt = list(range(1, 81))
    _step(w, StepPlan(saves=(SaveSpec("s", tuple(prompt), (0, 1, 2, 3, 4)),)))
    writer.flush()
    sched = VLLMScheduler(reader, N, ConnectorOptions())
    req = FakeRequest("q", prompt)
    ext, is_async = sched.get_num_new_matched_tokens(req, 16)
    assert (ext, is_async) == (79 - 16, True)  # whole prompt cached; one token left to compute; disk -> async
    assert sched.get_num_new_matched_tokens(req, 16) == (ext, is_async)  # repeatable
    sched.update_state_after_alloc(req, [9, 8, 7, 6, 5], ext)
    plan = sched.build_plan(Output([], Cached(), {}), null_block=0)
    assert plan.loads == (LoadSpec("q", tuple(prompt), (9, 8, 7, 6, 5), 16, 79, True),)
    assert sched.hit_sources("q") == {"disk": 80}
    sync = VLLMScheduler(reader, N, ConnectorOptions(async_load="false"))
    assert sync.get_num_new_matched_tokens(req, 0) == (79, False)
    assert VLLMScheduler(reader, N, ConnectorOptions(), can_load=False).get_num_new_matched_tokens(req, 0) == (0, False)


# -- per-request key extras, as vLLM's Request objects carry them ------------------------------------
@dataclass
class Lora:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class Placeholder:
    offset: int
    length: int


@dataclass
class MMFeature:
    identifier: str
    mm_position: Placeholder


@dataclass
class RichRequest(FakeRequest):
    lora_request: Lora | None = None
    cache_salt: str | None = None
    mm_features: list[MMFeature] = field(default_factory=list)


def test_request_extras_follow_vllms_extra_keys() -> None:
    from lmcache_core.integrations.vllm.scheduler import request_extras

    prompt = list(range(64))
    plain = request_extras(RichRequest("p", prompt), 32)
    assert plain is None
    lora = request_extras(RichRequest("l", prompt, lora_request=Lora("sql", 1, "/a/sql")), 32)
    assert lora is not None and lora.adapter == ("sql", "/a/sql", "1")
    salted = request_extras(RichRequest("s", prompt, cache_salt="abc"), 32)
    assert salted is not None and salted.cache_salt == "abc"
    mm = request_extras(RichRequest("m", prompt, mm_features=[MMFeature("img", Placeholder(40, 10))]), 32)
    assert mm is not None and mm.mm[0].offset == 40
    with pytest.raises(ValueError, match="multimodal"):
        request_extras(RichRequest("x", prompt, mm_features=[MMFeature(None, Placeholder(0, 1))]), 32)  # type: ignore[arg-type]


def test_adapters_and_salts_never_share_chunks_through_the_connector(engines: tuple[CacheEngine, CacheEngine]
                                                                      ) -> None:
    writer, reader = engines
    w = _worker(writer, cpu_attn_caches(6), async_save=False)
    prompt = list(range(1, 81))
    sw = VLLMScheduler(writer, N, ConnectorOptions())
    a = RichRequest("a", prompt, lora_request=Lora("a", 1, "/a"))
    sw.update_state_after_alloc(a, [1, 2, 3, 4, 5], 0)
    plan = sw.build_plan(Output([NewReq("a", prompt, ([1, 2, 3, 4, 5],), 0)], Cached(), {"a": 80}))
    assert plan.saves and plan.saves[0].extras is not None
    _step(w, plan)
    writer.flush()
    sr = VLLMScheduler(reader, N, ConnectorOptions())
    assert sr.get_num_new_matched_tokens(RichRequest("q1", prompt, lora_request=Lora("a", 1, "/a")), 0)[0] == 79
    assert sr.get_num_new_matched_tokens(RichRequest("q2", prompt, lora_request=Lora("b", 2, "/b")), 0) == (0, False)
    assert sr.get_num_new_matched_tokens(RichRequest("q3", prompt), 0) == (0, False)
    assert sr.get_num_new_matched_tokens(RichRequest("q4", prompt, cache_salt="x"), 0) == (0, False)


def test_remote_lookups_answer_none_until_known(engines: tuple[CacheEngine, CacheEngine]) -> None:
    import time

    sched = VLLMScheduler(engines[0], N, ConnectorOptions(async_lookup="true"))
    release = __import__("threading").Event()
    real = engines[0].lookup

    def slow(*a, **k):  # a remote tier that answers late
        release.wait(5)
        return real(*a, **k)

    engines[0].lookup = slow  # type: ignore[method-assign]
    try:
        req = FakeRequest("r", list(range(64)))
        assert sched.get_num_new_matched_tokens(req, 0) == (None, False)
        assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # still under way; never blocks
        release.set()
        deadline = time.time() + 5
        while (got := sched.get_num_new_matched_tokens(req, 0))[0] is None and time.time() < deadline:
            time.sleep(0.01)
        assert got == (0, False)
    finally:
        engines[0].lookup = real  # type: ignore[method-assign]
        sched.close()


def test_freed_null_blocks_are_never_stored(engines: tuple[CacheEngine, CacheEngine]) -> None:
    """A sliding-window layer's out-of-window block is vLLM's null block: no chunk reads it."""
    sched = VLLMScheduler(engines[0], N, ConnectorOptions())
    prompt = list(range(96))
    sched.update_state_after_alloc(FakeRequest("r", prompt), [], 0)
    plan = sched.build_plan(Output([NewReq("r", prompt, ([1, 2, 3, 4],), 0)], Cached(), {"r": 64}), null_block=0)
    assert [s.end for s in plan.saves] == [64]
    # Next step: only the new chunk is gathered (the first one's blocks may be gone by now).
    plan = sched.build_plan(Output([], Cached(["r"], set(), [([5, 6],)], [64]), {"r": 32}), null_block=0)
    assert plan.saves and plan.saves[0].start == 64
    sched.update_state_after_alloc(FakeRequest("z", prompt), [], 0)
    plan = sched.build_plan(Output([NewReq("z", prompt, ([0, 2, 3, 4, 5, 6],), 0)], Cached(), {"z": 96}),
                            null_block=0)
    assert plan.saves == ()


@pytest.mark.parametrize("where", ["wait_layer", "save_layer"])
def test_worker_faults_become_load_errors_and_dropped_stores(engines: tuple[CacheEngine, CacheEngine],
                                                             where: str) -> None:
    src_engine, dst_engine = engines
    src = _worker(src_engine, cpu_attn_caches(1), async_save=False)
    tokens = tuple(range(1, 65))
    _step(src, StepPlan(saves=(SaveSpec("s", tokens, (0, 1, 2, 3)),)))
    src_engine.flush()
    dst = _worker(dst_engine, cpu_attn_caches(2), async_save=False)
    calls = {"n": 0}
    if where == "wait_layer":
        real = dst_engine.device.scatter_many

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected scatter fault")
            return real(*a, **k)

        dst_engine.device.scatter_many = flaky  # type: ignore[method-assign]
        plan = StepPlan(loads=(LoadSpec("l", tokens, (4, 5, 6, 7), 0, 63),))
    else:
        real = dst_engine.device.gather_many

        def flaky(*a, **k):
            raise RuntimeError("injected gather fault")

        dst_engine.device.gather_many = flaky  # type: ignore[method-assign]
        plan = StepPlan(saves=(SaveSpec("t", tuple(range(500, 564)), (8, 9, 10, 11)),))
    try:
        _step(dst, plan)  # never raises into the forward pass
    finally:
        del dst_engine.device.__dict__["scatter_many" if where == "wait_layer" else "gather_many"]
    dst_engine.flush()
    stats = dst.take_stats()
    if where == "wait_layer":
        assert dst.load_errors() == {4, 5, 6, 7} and stats["load_failed_tokens"] == 63
    else:
        assert stats["store_errors"] == 1 and dst_engine.lookup(tuple(range(500, 564))).hit_tokens == 0
    assert dst_engine.inflight_bytes() == 0
    held = len(dst_engine.tiers.tiers[0].store._chunks)
    assert dst_engine.pool.live_count() == held


def test_failure_policy_option() -> None:
    options, _ = load_config({"load_failure_policy": "fail", "tiers": ["memory://"]})
    assert options.load_failure_policy == "fail"
    assert load_config({"tiers": ["memory://"]})[0].load_failure_policy == "recompute"
    with pytest.raises(ConfigError, match="load_failure_policy"):
        load_config({"load_failure_policy": "retry"})


def test_scheduler_follows_the_workers_memory_tier_through_worker_metadata() -> None:
    """Memory-only tiers, scheduler and worker in two processes (two engines here): the worker's
    journal tells the scheduler what its memory holds, so the scheduler offers those hits."""
    from lmcache_core.integrations.vllm.layout import geometry_from_spec

    geom = geometry_from_spec(L, H, D, torch.float32, False)
    cfg = Config.from_dict({"tiers": ["memory://?capacity=64MiB"], "chunk_size": 32, "device": "cpu"})
    worker_engine, sched_engine = CacheEngine(geom, cfg, model="m"), CacheEngine(geom, cfg, model="m")
    w = _worker(worker_engine, cpu_attn_caches(7), async_save=False)
    sched = VLLMScheduler(sched_engine, N, ConnectorOptions())
    prompt = list(range(3, 83))
    assert sched.get_num_new_matched_tokens(FakeRequest("a", prompt), 0) == (0, False)
    _step(w, StepPlan(saves=(SaveSpec("s", tuple(prompt), (0, 1, 2, 3, 4)),)))
    worker_engine.flush()
    added, removed, reset = w.presence_update()
    assert len(added) == 3 and not removed and not reset
    sched.mirror.apply(added, removed, reset)
    assert sched.get_num_new_matched_tokens(FakeRequest("b", prompt), 0) == (79, False)  # memory: sync load
    assert w.presence_update() is None  # nothing new
    worker_engine.tiers.delete(worker_engine.keys(prompt)[1:2])  # evicted on the worker
    sched.mirror.apply(*w.presence_update())
    assert sched.get_num_new_matched_tokens(FakeRequest("c", prompt), 0) == (32, False)
    for e in (worker_engine, sched_engine):
        e.close()


# -- disaggregated prefill: kv_transfer_params between a producer and a consumer ----------------------
@dataclass
class PDRequest(FakeRequest):
    kv_transfer_params: dict | None = None


def test_producer_reports_stored_tokens_and_consumer_waits_for_them(engines: tuple[CacheEngine, CacheEngine]
                                                                    ) -> None:
    import time

    writer, reader = engines
    prompt = list(range(2000, 2080))  # 80 tokens: two chunks and a partial
    producer = VLLMScheduler(writer, N, ConnectorOptions(), can_load=False)
    req = PDRequest("p", prompt, kv_transfer_params={"do_remote_decode": True})
    producer.update_state_after_alloc(req, [1, 2, 3, 4, 5], 0)
    plan = producer.build_plan(Output([NewReq("p", prompt, ([1, 2, 3, 4, 5],), 0)], Cached(), {"p": 80}))
    params = producer.transfer_params(req)
    assert params == {"do_remote_prefill": True, "do_remote_decode": False, "lmcache": {"v": 1, "tokens": 80}}
    assert producer.transfer_params(PDRequest("x", prompt)) is None  # not asked: nothing to hand on
    assert producer.request_finished("p") is True
    # A prompt whose blocks vLLM freed (null block) is not stored: nothing is promised.
    freed = PDRequest("f", list(range(3000, 3080)), kv_transfer_params={"do_remote_decode": True})
    producer.update_state_after_alloc(freed, [0, 1, 2, 3, 4], 0)
    producer.build_plan(Output([NewReq("f", freed.prompt_token_ids, ([0, 1, 2, 3, 4],), 0)], Cached(), {"f": 80}))
    assert producer.transfer_params(freed) is None

    consumer = VLLMScheduler(reader, N, ConnectorOptions(remote_prefill_wait_ms=5000), can_save=False)
    dec = PDRequest("d", prompt, kv_transfer_params=params)
    assert consumer.get_num_new_matched_tokens(dec, 0) == (None, False)  # the producer's store is not done
    _step(_worker(writer, cpu_attn_caches(5), async_save=False), plan)  # now it is
    writer.flush()
    deadline = time.monotonic() + 5
    got: tuple = (None, False)
    while got[0] is None and time.monotonic() < deadline:
        time.sleep(0.005)
        got = consumer.get_num_new_matched_tokens(dec, 0)
    assert got == (79, True)  # found through a fresh lookup, from disk: an async load
    assert consumer.take_stats()["remote_prefill_requests"] == 1

    # A producer whose chunks never arrive: after the wait, the request computes what is missing.
    impatient = VLLMScheduler(reader, N, ConnectorOptions(remote_prefill_wait_ms=50), can_save=False)
    lost = PDRequest("l", list(range(9000, 9080)), kv_transfer_params=params)
    t0 = time.monotonic()
    while (answer := impatient.get_num_new_matched_tokens(lost, 0))[0] is None:
        time.sleep(0.005)
        assert time.monotonic() - t0 < 5, "the wait for a remote prefill did not end"
    assert answer == (0, False) and time.monotonic() - t0 >= 0.05
    assert impatient.take_stats()["remote_prefill_short"] == 1
    # Params of another connector, or malformed ones, are an ordinary lookup.
    for other in ({"do_remote_prefill": True, "remote_block_ids": [1]},
                  {"do_remote_prefill": True, "lmcache": {"v": 1, "tokens": "80"}},
                  {"do_remote_prefill": True, "lmcache": {"v": 99, "tokens": 80}}):
        assert impatient.get_num_new_matched_tokens(PDRequest("o" + str(id(other)), list(range(7000, 7080)),
                                                              kv_transfer_params=other), 0) == (0, False)


def test_remote_prefill_wait_option_is_validated() -> None:
    assert ConnectorOptions.split({"remote_prefill_wait_ms": "250"})[0].remote_prefill_wait_ms == 250
    for bad in (-1, "soon"):
        with pytest.raises(ConfigError, match="remote_prefill_wait_ms"):
            ConnectorOptions.split({"remote_prefill_wait_ms": bad})
