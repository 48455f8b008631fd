"""Contract tests every device plugin runs: chunk round trips, pipelining, zero-copy.

Use them the zarr/fsspec way: subclass and supply a ``device`` fixture::

    from lmcache_conformance import DeviceChunkTests

    class TestMyDevice(DeviceChunkTests):
        @pytest.fixture
        def device(self):
            return MyDevice()

Under ``lmcache conformance`` the fixtures come from the plugin registry
instead (``lmcache_device``, ``lmcache_chunk_store``), one parameter per
registered plugin. Values are compared with :mod:`groundtruth`, never with
the device's own output.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from lmcache_core.keys import Namespace, chunk_keys

from . import harness as h
from .capabilities import layout_skip_reason
from .groundtruth import DTYPES, LAYOUTS, KVShape, build, expected_chunk, raw
from .targets import Target

if TYPE_CHECKING:
    import torch

    from lmcache_core.device import Device


def load_device(target: Target) -> "Device":
    """An instance of the target's device class; skips with the detection reason if absent."""
    from lmcache_core.plugins import get_plugin_manager

    target.require()
    cls = get_plugin_manager().get("device", target.name).load()
    return cls()


def store_url(target: Target, tmp_path: Any) -> str:
    target.require(f"store {target.name}: ")
    assert target.url is not None
    return h.fill_url(target.url, tmp_path)


class ContractTests:
    """Base of every contract class: ``kind`` and ``contract`` label the report's table."""

    kind: ClassVar[str] = ""
    contract: ClassVar[str] = ""


class DeviceContract(ContractTests):
    kind = "device"

    @pytest.fixture
    def device(self, lmcache_device: Target) -> "Device":
        return load_device(lmcache_device)

    @pytest.fixture
    def chunk_store(self, lmcache_chunk_store: Target, tmp_path: Any) -> str:
        """URL of the store a round trip goes through (parametrised over every selected store)."""
        return store_url(lmcache_chunk_store, tmp_path)

    @staticmethod
    def kv_for(device: "Device", layout: str, dtype: str, seed: int = 0, shape: KVShape = KVShape()) -> h.EngineKV:
        reason = layout_skip_reason(device, layout, dtype)
        if reason:
            pytest.skip(reason)
        return build(layout, dtype, device.torch_device, shape, seed)

    @staticmethod
    def host_chunk(device: "Device", kv: h.EngineKV, tokens: int) -> "torch.Tensor":
        """A chunk tensor in the device's host memory, filled with the sentinel pattern."""
        from lmcache_core.layout import torch_dtype

        g = kv.kv.geometry
        t = device.alloc_host(g.nbytes(tokens))
        t.fill_(h.SENTINEL)
        return t.view(torch_dtype(g.dtype)).view(g.shape(tokens))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
class DeviceChunkTests(DeviceContract):
    """Chunk contract: bit-exact gather, scatter and store -> retrieve for every layout and dtype."""

    contract = "chunk"

    def test_gather(self, device: "Device", layout: str, dtype: str) -> None:
        """Full and partial chunks from a shuffled block table equal the ground truth, and a
        partial chunk writes nothing past its tokens."""
        import torch

        kv = self.kv_for(device, layout, dtype, seed=11)
        truth = kv.logical()
        p = h.place(kv, h.NUM_TOKENS, seed=3)
        for start, end in ((0, h.CHUNK_SIZE), (2 * h.CHUNK_SIZE, h.NUM_TOKENS)):
            out = self.host_chunk(device, kv, h.CHUNK_SIZE)
            slots = torch.as_tensor(p.slots[start:end], dtype=torch.int64)
            device.gather(kv.kv, slots, out)
            device.record_event(None).synchronize()
            device.synchronize()
            n = end - start
            got = raw(out)
            assert torch.equal(got[:, :, :n].cpu(), expected_chunk(truth, p.slots[start:end])), (
                f"{device.name}: gather of tokens {start}..{end} ({layout}, {dtype}) differs from the ground truth")
            tail = out.view(torch.uint8)[:, :, n:] if n < h.CHUNK_SIZE else None
            if tail is not None:
                assert bool((tail == h.SENTINEL).all()), (
                    f"{device.name}: gather of {n} tokens wrote past token {n} of the chunk buffer")

    def test_gather_single_layer(self, device: "Device", layout: str, dtype: str) -> None:
        """``layers=(i,)`` copies layer i only (what layer-by-layer saving relies on)."""
        import torch

        kv = self.kv_for(device, layout, dtype, seed=12)
        truth = kv.logical()
        p = h.place(kv, h.CHUNK_SIZE, seed=4)
        out = self.host_chunk(device, kv, h.CHUNK_SIZE)
        layer = kv.kv.geometry.num_layers - 2
        device.gather(kv.kv, torch.as_tensor(p.slots, dtype=torch.int64), out, layers=(layer,))
        device.record_event(None).synchronize()
        device.synchronize()
        exp = expected_chunk(truth, p.slots)
        assert torch.equal(raw(out)[layer].cpu(), exp[layer]), f"{device.name}: layer {layer} differs"
        others = [l for l in range(kv.kv.geometry.num_layers) if l != layer]
        assert bool((out.view(torch.uint8)[others] == h.SENTINEL).all()), (
            f"{device.name}: gather(layers=({layer},)) also wrote other layers")

    def test_scatter(self, device: "Device", layout: str, dtype: str) -> None:
        """A chunk scattered into a shuffled block table lands bit-exact at those slots and
        nowhere else; a partial chunk touches only its tokens."""
        import torch

        src = self.kv_for(device, layout, dtype, seed=13)
        src_truth = src.logical()
        sp = h.place(src, h.NUM_TOKENS, seed=5)
        dst = self.kv_for(device, layout, dtype, seed=14)
        dst.fill_raw(h.SENTINEL)
        before = dst.logical()
        dp = h.place(dst, h.NUM_TOKENS, seed=6)
        for start, end in ((0, h.CHUNK_SIZE), (2 * h.CHUNK_SIZE, h.NUM_TOKENS)):
            chunk = self.host_chunk(device, src, h.CHUNK_SIZE)
            raw(chunk)[:, :, : end - start].copy_(expected_chunk(src_truth, sp.slots[start:end]))
            device.scatter(dst.kv, torch.as_tensor(dp.slots[start:end], dtype=torch.int64),
                           chunk[:, :, : end - start])
        device.record_event(None).synchronize()
        device.synchronize()
        moved = h.Placement(sp.block_ids, sp.slots[: h.CHUNK_SIZE] + sp.slots[2 * h.CHUNK_SIZE:])
        landed = h.Placement(dp.block_ids, dp.slots[: h.CHUNK_SIZE] + dp.slots[2 * h.CHUNK_SIZE:])
        problem = h.check_loaded(dst, before, src_truth, moved, landed, len(moved.slots))
        assert problem is None, f"{device.name}: scatter ({layout}, {dtype}): {problem}"

    def test_batched_gather_and_scatter(self, device: "Device", layout: str, dtype: str) -> None:
        """``gather_many``/``scatter_many`` (what the engine calls: all chunks of a request in one
        batch, kernels launch once) move full and partial chunks as the single calls do."""
        import torch

        if not hasattr(device, "gather_many"):
            pytest.skip("this lmcache-core has no batched gather_many/scatter_many")
        src = self.kv_for(device, layout, dtype, seed=15)
        truth = src.logical()
        sp = h.place(src, h.NUM_TOKENS, seed=16)
        bounds = [(0, h.CHUNK_SIZE), (h.CHUNK_SIZE, 2 * h.CHUNK_SIZE), (2 * h.CHUNK_SIZE, h.NUM_TOKENS)]
        outs = [self.host_chunk(device, src, end - start) for start, end in bounds]
        batch = [(torch.as_tensor(sp.slots[a:b], dtype=torch.int64), out) for (a, b), out in zip(bounds, outs)]
        device.gather_many(src.kv, batch)
        device.record_event(None).synchronize()
        device.synchronize()
        for (a, b), out in zip(bounds, outs):
            assert torch.equal(raw(out).cpu(), expected_chunk(truth, sp.slots[a:b])), (
                f"{device.name}: gather_many of tokens {a}..{b} ({layout}, {dtype}) differs from the ground truth")
        dst = self.kv_for(device, layout, dtype, seed=17)
        dst.fill_raw(h.SENTINEL)
        before = dst.logical()
        dp = h.place(dst, h.NUM_TOKENS, seed=18)
        device.scatter_many(dst.kv, [(torch.as_tensor(dp.slots[a:b], dtype=torch.int64), out)
                                     for (a, b), out in zip(bounds, outs)])
        device.record_event(None).synchronize()
        device.synchronize()
        problem = h.check_loaded(dst, before, truth, sp, dp, h.NUM_TOKENS)
        assert problem is None, f"{device.name}: scatter_many ({layout}, {dtype}): {problem}"

    def test_coded_gather_and_scatter(self, device: "Device", layout: str, dtype: str) -> None:
        """``gather_coded``/``scatter_coded`` with ``fp8`` (what the engine calls under
        ``kv_codec: fp8``): each image is byte for byte the host codec's encoding of the ground
        truth, per layer as in one call, and a scatter of a token range of each image writes
        those tokens' decoded values and nothing else."""
        import torch

        from lmcache_core.codecs import fp8
        from lmcache_core.device import CodedPart
        from lmcache_core.layout import torch_dtype

        if not hasattr(device, "gather_coded"):
            pytest.skip("this lmcache-core has no device codecs (gather_coded/scatter_coded)")
        if dtype not in ("float32", "float16", "bfloat16"):
            pytest.skip(f"fp8 codes float32, float16 and bfloat16 KV, not {dtype}")
        src = self.kv_for(device, layout, dtype, seed=41)
        g = src.kv.geometry
        truth = src.logical()
        sp = h.place(src, h.NUM_TOKENS, seed=42)
        bounds = [(0, h.CHUNK_SIZE), (h.CHUNK_SIZE, 2 * h.CHUNK_SIZE), (2 * h.CHUNK_SIZE, h.NUM_TOKENS)]
        want = []
        for a, b in bounds:
            plain = expected_chunk(truth, sp.slots[a:b]).view(torch_dtype(dtype))
            img = torch.empty(fp8.encoded_len(g, b - a), dtype=torch.uint8)
            q, sc = fp8.image_views(g, img, b - a)
            fp8.encode_into(plain, q, sc, g.head_dim)
            want.append(img)
        imgs = []
        for (a, b), w in zip(bounds, want):
            t = device.alloc_host(w.numel())
            t.fill_(h.SENTINEL)
            imgs.append(t)
        parts = [CodedPart(torch.as_tensor(sp.slots[a:b], dtype=torch.int64), img, b - a)
                 for (a, b), img in zip(bounds, imgs)]
        stream = device.new_stream()
        for layer in range(g.num_layers):
            with device.use_stream(stream):
                device.gather_coded(src.kv, parts, "fp8", layers=(layer,))
        device.record_event(stream).synchronize()
        device.synchronize()
        for (a, b), img, w in zip(bounds, imgs, want):
            diff = int((img.cpu() != w).sum())
            assert diff == 0, (f"{device.name}: gather_coded fp8 of tokens {a}..{b} ({layout}, {dtype}): {diff} of "
                               f"{w.numel()} bytes differ from the host codec's encoding of the ground truth")
        dst = self.kv_for(device, layout, dtype, seed=43)
        dst.fill_raw(h.SENTINEL)
        before = dst.logical()
        dp = h.place(dst, h.NUM_TOKENS, seed=44)
        cuts = [(a + 3, b) if b - a > 3 else (a, b) for a, b in bounds]  # a token range of each image
        cuts[-1] = (cuts[-1][0], cuts[-1][1] - 1) if cuts[-1][1] - cuts[-1][0] > 1 else cuts[-1]
        device.scatter_coded(dst.kv, [CodedPart(torch.as_tensor(dp.slots[x:y], dtype=torch.int64), img, b - a, x - a)
                                      for (a, b), (x, y), img in zip(bounds, cuts, imgs)], "fp8")
        device.record_event(None).synchronize()
        device.synchronize()
        now = dst.logical()
        written: list[int] = []
        for (a, b), (x, y), w in zip(bounds, cuts, want):
            q, sc = fp8.image_views(g, w, b - a)
            dec = fp8.decode_from(q[:, :, x - a:y - a], sc[:, :, x - a:y - a], g.head_dim, torch_dtype(dtype))
            got = expected_chunk(now, dp.slots[x:y])
            assert torch.equal(got, raw(dec)), (
                f"{device.name}: scatter_coded fp8 of tokens {x}..{y} ({layout}, {dtype}) did not write the "
                "image's decoded values")
            written += dp.slots[x:y]
        rest = sorted(set(range(now.shape[2])) - set(written))
        assert torch.equal(expected_chunk(now, rest), expected_chunk(before, rest)), (
            f"{device.name}: scatter_coded fp8 ({layout}, {dtype}) wrote outside its tokens' slots")

    def test_roundtrip_through_store(self, device: "Device", layout: str, dtype: str, chunk_store: str) -> None:
        """gather -> seal -> store -> (new engine) -> verify -> scatter is bit-exact for full and
        partial chunks, into a different, non-contiguous block table."""
        src = self.kv_for(device, layout, dtype, seed=21)
        truth = src.logical()
        sp = h.place(src, h.NUM_TOKENS, seed=7)
        tokens = h.tokens_for(seed=1)
        salt = f"rt-{time.time_ns()}"
        dst = self.kv_for(device, layout, dtype, seed=22)
        dst.fill_raw(h.SENTINEL)
        before = dst.logical()
        dp = h.place(dst, h.NUM_TOKENS, seed=8)
        with h.make_engine(device, src, [chunk_store], salt=salt) as eng:
            stored = eng.store(tokens, src.kv, list(sp.block_ids), wait=True)
            assert stored == h.NUM_TOKENS, f"engine queued {stored} of {h.NUM_TOKENS} tokens for storing"
            assert eng.flush(timeout=60)
            caps = eng.tiers.tiers[0].store.capabilities
            if not (caps.shared or caps.persistent):
                got = eng.retrieve(tokens, dst.kv, list(dp.block_ids))
        if caps.shared or caps.persistent:
            # A second engine decodes from what rests in the store, not from the first one's buffers.
            with h.make_engine(device, src, [chunk_store], salt=salt) as eng2:
                got = eng2.retrieve(tokens, dst.kv, list(dp.block_ids))
        assert got.hit_tokens == h.NUM_TOKENS, f"retrieved {got.hit_tokens} of {h.NUM_TOKENS} tokens"
        problem = h.check_loaded(dst, before, truth, sp, dp, h.NUM_TOKENS)
        assert problem is None, f"{device.name} via {chunk_store}: {problem}"


class DeviceKeyTests(DeviceContract):
    """Keys are bytes of the tokens and namespace only: equal in every process."""

    contract = "chunk"

    def test_keys_identical_across_processes(self, device: "Device") -> None:
        """Asked per device so every device row of the report shows it; the keys never depend on it."""
        tokens = h.tokens_for(600, seed=9)
        ns = Namespace("m", "L2-P2-H2-D8-float16", "t", "s")
        here = [k.path for k in chunk_keys(tokens, ns, 256)]
        code = ("import sys, json; from lmcache_core.keys import Namespace, chunk_keys; "
                "t = json.loads(sys.stdin.read()); "
                "print('\\n'.join(k.path for k in chunk_keys(t, Namespace('m','L2-P2-H2-D8-float16','t','s'), 256)))")
        import json
        import os

        for seed in ("1", "12345"):
            env = {**os.environ, "PYTHONHASHSEED": seed}
            out = subprocess.run([sys.executable, "-c", code], input=json.dumps(tokens), capture_output=True,
                                 text=True, env=env, timeout=120, check=True).stdout.split()
            assert out == here, f"keys differ in a process with PYTHONHASHSEED={seed}"
        assert len(set(here)) == len(here) == 3


@pytest.mark.parametrize("layout", ["vllm_flash", "mla"])
class DeviceCorruptionTests(DeviceContract):
    """A corrupted payload at rest is a miss: nothing is scattered, the bad object is deleted."""

    contract = "chunk"

    def test_corrupted_payload_is_miss(self, device: "Device", layout: str, chunk_store: str) -> None:
        src = self.kv_for(device, layout, "bfloat16", seed=31)
        truth = src.logical()
        sp = h.place(src, h.NUM_TOKENS, seed=9)
        tokens = h.tokens_for(seed=2)
        with h.make_engine(device, src, [chunk_store]) as eng:
            store = eng.tiers.tiers[0].store
            if store.capabilities.holds_buffers:
                pytest.skip(f"{store.name} holds buffers in process memory (capabilities.holds_buffers); "
                            "no bytes rest there to corrupt")
            eng.store(tokens, src.kv, list(sp.block_ids), wait=True)
            assert eng.flush(timeout=60)
            keys = eng.keys(tokens)
            assert h.corrupt_stored(store, keys[1])
            dst = self.kv_for(device, layout, "bfloat16", seed=32)
            dst.fill_raw(h.SENTINEL)
            before = dst.logical()
            dp = h.place(dst, h.NUM_TOKENS, seed=10)
            got = eng.retrieve(tokens, dst.kv, list(dp.block_ids))
            assert got.hit_tokens == h.CHUNK_SIZE, (
                f"with chunk 1 corrupted, {got.hit_tokens} tokens were loaded; expected the {h.CHUNK_SIZE} before it")
            problem = h.check_loaded(dst, before, truth, sp, dp, h.CHUNK_SIZE)
            assert problem is None, f"after a corrupt chunk: {problem}"
            assert eng.metrics.value("lmcache_corrupt_chunks", tier=store.name) >= 1, "corruption was not counted"
            assert store.exists([keys[1]]) == [False], "the corrupt object was not deleted"


class PipeliningTests(DeviceContract):
    """Pipelining contract: layers land in order, each complete before compute gets it; overlap."""

    contract = "pipelining"
    # A device that declares async_copy promises that loads overlap compute. Accelerators: at
    # least 80% of the shorter of load and compute hidden, what the engine is built to reach (a
    # plain side-stream H2D copy hid 96-97% on the H100 and H200 of docs/benchmarks.md, the cuda
    # device's layer-by-layer load 97-98% on the H200). Host devices, whose copies and compute
    # share the cores: 10% of the load, well above timer noise on a busy host. Neither is ever
    # lowered to let a device pass: the figure is reported beside it (figures
    # ``overlap_hidden_fraction`` and ``overlap_required_fraction``), and a device under it fails.
    OVERLAP_MIN: ClassVar[float] = 0.80
    OVERLAP_MIN_HOST: ClassVar[float] = 0.10

    def _stored(self, device: "Device", shape: KVShape, chunk_size: int, seed: int) -> Any:
        src = self.kv_for(device, "vllm_flash", "float16", seed=seed, shape=shape)
        n = shape.slots
        sp = h.place(src, n, seed=seed)
        tokens = h.tokens_for(n, seed=seed)
        eng = h.make_engine(device, src, ["memory://?capacity=2GiB"], chunk_size=chunk_size)
        eng.store(tokens, src.kv, list(sp.block_ids), wait=True)
        assert eng.flush(timeout=60)
        # the engine's pinned reserve refills after a store (about 1 GB/s, each allocation holding
        # the driver's lock): what is timed here is a warm engine's loads, not that warm-up
        eng.pool.wait_reserve(30)
        return src, sp, tokens, eng

    def test_layers_in_order_and_complete_before_release(self, device: "Device") -> None:
        import torch

        shape = KVShape(num_layers=6, num_heads=2, head_dim=8, block_size=16, num_blocks=8)
        src, sp, tokens, eng = self._stored(device, shape, 32, seed=41)
        try:
            truth = src.logical()
            dst = self.kv_for(device, "vllm_flash", "float16", seed=42, shape=shape)
            dst.fill_raw(h.SENTINEL)
            dp = h.place(dst, shape.slots, seed=43)
            idx_d = torch.as_tensor(dp.slots, dtype=torch.int64)
            idx_s = torch.as_tensor(sp.slots, dtype=torch.int64)
            task = eng.start_retrieve(tokens, dst.kv, list(dp.block_ids))
            assert task.hit_tokens == shape.slots
            seen = []
            for layer in task:
                seen.append(layer)
                assert task.order == seen, f"layers completed in order {task.order}, expected {seen}"
                # What compute sees now: read layer `layer` on the compute side (no extra sync).
                got = raw(dst.tensors[layer]).cpu().reshape(2, -1, shape.num_heads, shape.head_dim)
                assert torch.equal(got[:, idx_d], truth[layer][:, idx_s]), (
                    f"{device.name}: layer {layer} was released to compute before its load completed")
                for earlier in range(layer + 1):
                    ev = task.events[earlier]
                    assert ev is None or ev.query(), f"layer {earlier} not complete when layer {layer} was"
            task.finish()
            assert seen == list(range(shape.num_layers))
        finally:
            eng.close()
        assert eng.pool.live_count() == 0, f"{eng.pool.live_count()} buffers not returned after close"

    def test_loads_complete_in_layer_order(self, device: "Device") -> None:
        """Queued layer loads complete in order: completion is always a prefix of the layers.

        The engine keeps a few layers queued ahead of the one being waited for; a layer
        with no event yet is not complete, and waiting for it queues it (and the next ones).
        """
        import time as _time

        if not device.capabilities.async_copy:
            pytest.skip(f"device {device.name!r} does not declare async_copy; each layer loads when waited "
                        "for, in order by construction")
        shape = KVShape(num_layers=8, num_heads=4, head_dim=32, block_size=16, num_blocks=16)
        src, sp, tokens, eng = self._stored(device, shape, 64, seed=44)
        try:
            dst = self.kv_for(device, "vllm_flash", "float16", seed=45, shape=shape)
            dp = h.place(dst, shape.slots, seed=46)
            # Everything queued at once: the widest window for a device to reorder copies.
            task = eng.start_retrieve(tokens, dst.kv, list(dp.block_ids), lookahead=shape.num_layers)
            deadline = _time.monotonic() + 15
            seen: list[list[bool]] = []
            while True:
                # Newest layer first: if layer j reads done, every i < j read after it must be too.
                states = [False] * shape.num_layers
                for i in reversed(range(shape.num_layers)):
                    ev = task.events[i]
                    states[i] = ev is not None and ev.query()
                if not seen or seen[-1] != states:
                    seen.append(states)
                bad = [(i, j) for j in range(shape.num_layers) for i in range(j) if states[j] and not states[i]]
                assert not bad, (f"{device.name}: layer {bad[0][1]} completed before layer {bad[0][0]} "
                                 f"(completion states seen: {[''.join('x' if s else '.' for s in st) for st in seen]})")
                if all(states):
                    break
                first = states.index(False)
                if task.events[first] is None:
                    task.wait_layer(first)  # not queued yet: queue it and the lookahead window
                assert _time.monotonic() < deadline, "layer loads did not complete within 15 s of being queued (does query() make progress?)"
            task.finish()
        finally:
            eng.close()

    def test_overlap(self, device: "Device", record_property: Any) -> None:
        """Fraction of load time hidden behind a stand-in compute (a report figure)."""
        if not device.capabilities.async_copy:
            pytest.skip(f"device {device.name!r} does not declare async_copy; loads run in the compute "
                        "thread, so there is no overlap to measure")
        accel = device.capabilities.accelerator
        # Accelerators: 512 MiB of KV in chunks of 1024 tokens (few, large copies, so the load is
        # bound by the device and its link, not by Python queueing many small ones).
        shape = (KVShape(num_layers=16, num_heads=8, head_dim=128, block_size=16, num_blocks=512) if accel
                 else KVShape(num_layers=8, num_heads=8, head_dim=64, block_size=16, num_blocks=64))
        src, sp, tokens, eng = self._stored(device, shape, 1024 if accel else 256, seed=51)
        try:
            dst = self.kv_for(device, "vllm_flash", "float16", seed=52, shape=shape)
            dp = h.place(dst, shape.slots, seed=53)
            # Up to three attempts, keeping the best: a busy machine can steal one measurement, but a
            # device that truly serialises copies and compute never reaches the threshold.
            figures: dict[str, float] = {}
            threshold = self.OVERLAP_MIN if device.torch_device.type != "cpu" else self.OVERLAP_MIN_HOST
            figures["overlap_required_fraction"] = threshold
            for attempt in range(1, 4):
                got = measure_overlap(device, eng, tokens, dst, list(dp.block_ids), shape.num_layers,
                                      rounds=5 if accel else 3)
                if "overlap_hidden_fraction" not in figures or \
                        got["overlap_hidden_fraction"] > figures["overlap_hidden_fraction"]:
                    figures = {**got, "overlap_required_fraction": threshold, "attempts": attempt}
                if figures["overlap_hidden_fraction"] >= threshold:
                    break
        finally:
            eng.close()
        for k, v in figures.items():
            record_property(f"figure:{k}", v)
        problem = judge_overlap(device.name, figures)
        assert problem is None, problem


def judge_overlap(device_name: str, figures: dict[str, float]) -> str | None:
    """None when ``overlap_hidden_fraction`` meets ``overlap_required_fraction``, else the
    failure message, with both figures and the times they come from."""
    hidden = float(figures["overlap_hidden_fraction"])
    required = float(figures["overlap_required_fraction"])
    if hidden >= required:
        return None
    return (f"{device_name} declares async_copy but hid {hidden:.1%} of load time behind compute, "
            f"under the required {required:.0%} (load {figures['load_ms']:.2f} ms, compute "
            f"{figures['compute_ms']:.2f} ms, both {figures['both_ms']:.2f} ms, load time exposed to compute "
            f"{figures['exposed_load_ms']:.2f} ms)" + _timeline_text(figures))


def _timeline_text(figures: dict[str, float]) -> str:
    """Where an accelerator's exposed load time went, from :func:`measure_overlap`'s timeline run."""
    if "timeline_first_ready_ms" not in figures:
        return ""
    return (f"; timeline run: start_retrieve {figures['timeline_start_host_ms']:.2f} ms of host, layer 0 ready "
            f"at {figures['timeline_first_ready_ms']:.2f} ms, later layers stalled compute "
            f"{figures['timeline_stall_ms']:.2f} ms (at most {figures['timeline_max_stall_ms']:.2f} ms once), "
            f"compute {figures['timeline_compute_ms']:.2f} of {figures['timeline_total_ms']:.2f} ms")


def measure_overlap(device: "Device", eng: Any, tokens: list[int], dst: h.EngineKV, block_ids: list[int],
                    layers: int, rounds: int = 5) -> dict[str, float]:
    """Times of load alone, compute alone and both pipelined (best of ``rounds`` each).

    ``overlap_hidden_fraction``: on an accelerator, ``(load + compute - both) /
    min(load, compute)``; compute runs asynchronously there, so only the totals are
    observable. On a host device compute is synchronous, so the suite times what the
    compute thread spends waiting for loads inside the pipelined run ("exposed"), and
    the fraction is ``1 - exposed / load``: immune to the compute's timing noise on a
    busy machine. Both are clipped to [0, 1]; the classic formula is reported as well.

    The stand-in compute is one matrix product per layer, sized so that all layers
    take about as long as the load: on an accelerator one launch per layer keeps the
    host free (what is measured is the device's copies against its compute, not
    Python launching both); on a host device a few small products per layer.
    """
    import torch

    dev = device.torch_device
    accel = dev.type != "cpu"

    def sync() -> None:
        device.synchronize()
        if accel:
            getattr(torch, dev.type).synchronize()

    def make(size: int) -> "torch.Tensor":
        return torch.randn(size, size, device=dev, dtype=torch.float16 if accel else torch.float32)

    work: dict[str, Any] = {"a": make(256 if accel else 96), "reps": 1}

    def compute() -> None:
        a = work["a"]
        x = a
        for _ in range(work["reps"]):
            x = x @ a if accel else torch.tanh(x @ a)

    def pipelined(with_compute: bool) -> tuple[float, float]:
        """(total, exposed): wall time of a layer-by-layer load, and the part spent outside compute."""
        sync()
        t0 = time.perf_counter()
        task = eng.start_retrieve(tokens, dst.kv, block_ids)
        exposed = time.perf_counter() - t0
        it = iter(task)
        while True:
            tw = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                break
            exposed += time.perf_counter() - tw
            if with_compute:
                compute()
        tf = time.perf_counter()
        task.finish()
        sync()
        end = time.perf_counter()
        return end - t0, exposed + (end - tf)

    def timeline() -> dict[str, float]:
        """One more pipelined run (not in the timed figures) with timing events on the compute
        stream: when each layer's load was ready for compute (after its wait) and when its
        compute ended, so a failing figure says where the exposed time went: the host's
        ``start_retrieve`` (lookup and fetch, the device idle), layer 0's load, or later layers'
        loads arriving after the previous layer's compute ended (stalls)."""
        event = getattr(getattr(torch, dev.type, None), "Event", None)
        if not accel or event is None:
            return {}
        try:
            sync()
            ev0 = event(enable_timing=True)
            ev0.record()
            h0 = time.perf_counter()
            task = eng.start_retrieve(tokens, dst.kv, block_ids)
            start_host = time.perf_counter() - h0
            ready, done = [], []
            for _ in task:
                ready.append(event(enable_timing=True))
                ready[-1].record()
                compute()
                done.append(event(enable_timing=True))
                done[-1].record()
            task.finish()
            sync()
            r = [ev0.elapsed_time(e) for e in ready]
            d = [ev0.elapsed_time(e) for e in done]
        except Exception as exc:  # noqa: BLE001 - a figure, not the contract: say why it is missing
            return {"timeline_error": f"{type(exc).__name__}: {exc}"}  # type: ignore[dict-item]
        stalls = [max(0.0, r[i] - d[i - 1]) for i in range(1, len(r))]
        return {"timeline_start_host_ms": round(start_host * 1e3, 3), "timeline_first_ready_ms": round(r[0], 3),
                "timeline_stall_ms": round(sum(stalls), 3), "timeline_max_stall_ms": round(max(stalls, default=0.0), 3),
                "timeline_compute_ms": round(sum(b - a for a, b in zip(r, d)), 3),
                "timeline_total_ms": round(d[-1], 3)}

    def time_compute() -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(layers):
            compute()
        sync()
        return time.perf_counter() - t0

    # On a host device copies and compute share the cores: give compute one thread, as an
    # engine pinned to its cores would, so the figure measures the device and not the scheduler.
    threads = torch.get_num_threads()
    if not accel:
        torch.set_num_threads(1)
    try:
        pipelined(False)  # warm up allocations, caches, kernels
        load = min(pipelined(False)[0] for _ in range(rounds))
        time_compute()
        while time_compute() < load:  # size the compute like the load: a fair fraction
            if accel and work["a"].shape[0] < 16384:
                work["a"] = make(work["a"].shape[0] * 2)
            elif work["reps"] < 4096:
                work["reps"] *= 2
            else:
                break
        comp = min(time_compute() for _ in range(rounds))
        runs = [pipelined(True) for _ in range(rounds)]
        line = timeline()
    finally:
        torch.set_num_threads(threads)
    both = min(r[0] for r in runs)
    exposed = min(r[1] for r in runs)
    classic = max(0.0, min(1.0, (load + comp - both) / max(min(load, comp), 1e-9)))
    by_wait = max(0.0, min(1.0, 1.0 - exposed / max(load, 1e-9)))
    return {"overlap_hidden_fraction": round(classic if accel else by_wait, 3),
            "overlap_classic_fraction": round(classic, 3), "load_ms": round(load * 1e3, 3),
            "compute_ms": round(comp * 1e3, 3), "both_ms": round(both * 1e3, 3),
            "exposed_load_ms": round(exposed * 1e3, 3),
            "load_bytes": int(dst.kv.geometry.nbytes(len(block_ids) * dst.block_size)),
            "compute_matrix": int(work["a"].shape[0]), "compute_reps_per_layer": int(work["reps"]), **line}


class DeviceZeroCopyTests(DeviceContract):
    """Zero-copy contract, device side: pinned host memory where declared, and the fan-out check
    of :mod:`zerocopy` over the default tiers plus the selected store."""

    contract = "zero-copy"

    def test_alloc_host_pinned(self, device: "Device") -> None:
        if not device.capabilities.pinned_memory:
            pytest.skip(f"device {device.name!r} does not declare pinned_memory")
        t = device.alloc_host(1 << 20)
        assert t.is_pinned(), f"{device.name}: alloc_host returned pageable memory but declares pinned_memory"
        assert t.numel() == 1 << 20 and str(t.dtype) == "torch.uint8"

    def test_ipc_shares_memory(self, device: "Device") -> None:
        """A tensor exported with ``ipc_export`` is the same memory in another process (daemon mode
        moves KV by handle, not by copy): the child sees its bytes and its writes show here."""
        import json
        import os

        import torch

        if not device.capabilities.ipc:
            pytest.skip(f"device {device.name!r} does not declare ipc")
        n = 3 * 4096 + 5
        t = (torch.arange(n, dtype=torch.int64) % 251).to(torch.uint8).to(device.torch_device)
        handle = device.ipc_export(t)
        assert isinstance(handle, bytes) and handle, "ipc_export must return handle bytes"
        code = (
            "import importlib, json, sys, torch\n"
            "a = json.loads(sys.stdin.read())\n"
            "mod, _, name = a['cls'].partition(':')\n"
            "dev = getattr(importlib.import_module(mod), name)(a['index'])\n"
            "x = dev.ipc_import(bytes.fromhex(a['handle']))\n"
            "want = (torch.arange(a['n'], dtype=torch.int64) % 251).to(torch.uint8)\n"
            "same = x.numel() == a['n'] and torch.equal(x.reshape(-1).cpu(), want)\n"
            "x.reshape(-1)[:16].fill_(0xEE)\n"
            "dev.synchronize()\n"
            "torch.cuda.synchronize() if torch.cuda.is_available() else None\n"
            "del x\n"
            "print('SAME' if same else 'DIFFERENT')\n"
        )
        args = {"cls": f"{type(device).__module__}:{type(device).__qualname__}", "index": device.index,
                "handle": handle.hex(), "n": n}
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(args), capture_output=True,
                              text=True, timeout=300, env=dict(os.environ))
        assert proc.returncode == 0, f"ipc_import in another process failed: {proc.stderr[-2000:]}"
        assert proc.stdout.split()[-1] == "SAME", "the imported tensor holds other bytes than the exported one"
        device.synchronize()
        assert bool((t[:16].cpu() == 0xEE).all()), "writes through the imported tensor do not show here: a copy"
        assert torch.equal(t[16:].cpu(), (torch.arange(16, n, dtype=torch.int64) % 251).to(torch.uint8))

    def test_fanout(self, device: "Device", chunk_store: str, tmp_path: Any) -> None:
        from .zerocopy import check_fanout

        urls = ["memory://?capacity=512MiB", f"disk://{tmp_path}/zc-disk"]
        if chunk_store.split("://")[0] not in ("memory", "cpu", "disk", "file"):
            urls.append(chunk_store)
        kv = self.kv_for(device, "vllm_flash", "bfloat16", seed=61)
        check_fanout(device, kv, urls)


__all__ = ["ContractTests", "DeviceChunkTests", "DeviceContract", "DeviceCorruptionTests", "DeviceKeyTests",
           "DeviceZeroCopyTests", "PipeliningTests", "judge_overlap", "load_device", "measure_overlap", "store_url"]
