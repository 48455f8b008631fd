"""Issue 10: slots outside the KV cache are a LayoutError on every launch path, before anything
is written (the Triton kernel wrote outside the KV tensor with block ids 8, 11, -1, -8 on an
8-block cache, seen in the interpreter). On a CPU the kernel runs in the Triton interpreter."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lmcache_core.errors import LayoutError  # noqa: E402
from lmcache_kernels import reference, triton_copy  # noqa: E402
from lmcache_kernels.accel import HostStreamDevice  # noqa: E402
from lmcache_kernels.testing import bits, chunk_like, make_kv  # noqa: E402
from lmcache_kernels.transfer import KVTransfer, TransferOptions  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKEND = torch.cuda if DEVICE.type == "cuda" else None
KERNEL_OK, KERNEL_WHY = triton_copy.kernel_available(DEVICE)
BS, NB = 4, 8


def _kv():
    return make_kv("vllm_flash", device=DEVICE, num_blocks=NB, block_size=BS,
                   generator=torch.Generator().manual_seed(3))


def _slots(block: int) -> torch.Tensor:
    return torch.arange(BS, dtype=torch.int64) + block * BS


BAD = {"block 8": _slots(8), "block 11": _slots(11), "block -1": _slots(-1), "block -8": _slots(-8),
       "2**62": torch.tensor([2**62, 0]), "mixed": torch.cat([_slots(2), _slots(8)]),
       "float": _slots(1).double(), "int32 -1": torch.tensor([-1], dtype=torch.int32)}


def _snapshot(keep) -> list[torch.Tensor]:
    return [bits(t).clone() for t in keep]


def _paths():
    paths = [("torch", lambda kv, b, g: (KVTransfer(DEVICE, TransferOptions(store_mode="torch", load_mode="torch"),
                                                     BACKEND).gather if g else
                                          KVTransfer(DEVICE, TransferOptions(store_mode="torch", load_mode="torch"),
                                                     BACKEND).scatter)(kv, b)),
             ("reference", lambda kv, b, g: (reference.gather_batch if g else reference.scatter_batch)(kv, b))]
    if KERNEL_OK:
        for mode in ("direct", "staged"):
            opts = TransferOptions(store_mode=mode, load_mode=mode)
            paths.append((mode, lambda kv, b, g, o=opts: (KVTransfer(DEVICE, o, BACKEND).gather if g else
                                                          KVTransfer(DEVICE, o, BACKEND).scatter)(kv, b)))
        paths.append(("kernel", lambda kv, b, g: (triton_copy.gather_batch if g else triton_copy.scatter_batch)(
            kv, [(s.to(DEVICE), c.to(DEVICE)) for s, c in b])))
    return paths


@pytest.mark.parametrize("path, run", _paths(), ids=[p for p, _ in _paths()])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "scatter"])
def test_out_of_range_slots_are_refused_before_any_write(path, run, bad, gather):
    kv, keep = _kv()
    good = (_slots(1), chunk_like(kv, 2 * BS, "cpu"))
    chunk = chunk_like(kv, 2 * BS, "cpu")
    before_kv, before_chunk = _snapshot(keep), bits(chunk).clone()
    with pytest.raises(LayoutError, match="outside the KV cache|must be integers"):
        run(kv, [good, (BAD[bad], chunk)], gather)
    if BACKEND is not None:
        BACKEND.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(before_kv, _snapshot(keep)))  # the cache is untouched
    assert torch.equal(before_chunk, bits(chunk))


def test_the_error_names_the_slot_block_and_range():
    kv, _ = _kv()
    with pytest.raises(LayoutError, match=r"slot 35 \(block 8\) is outside the KV cache's 8 blocks of 4 tokens "
                                          r"\(valid slots: 0 to 31\)"):
        reference.gather_batch(kv, [(_slots(8), chunk_like(kv, BS))])


def test_the_check_runs_once_per_batch_and_again_when_slots_change():
    kv, _ = _kv()
    xfer = KVTransfer(DEVICE, TransferOptions(store_mode="torch", load_mode="torch"), BACKEND)
    slots, chunk = _slots(3), chunk_like(kv, BS)
    calls = []
    orig = reference.check_slots
    reference.check_slots = lambda *a: (calls.append(1), orig(*a))[1]
    try:
        for layer in range(kv.geometry.num_layers):  # the engine's layer-by-layer calls
            xfer.gather(kv, [(slots, chunk)], [layer])
        assert len(calls) == 1
        slots[0] = NB * BS  # changed in place: checked again, and refused
        with pytest.raises(LayoutError):
            xfer.gather(kv, [(slots, chunk)], [0])
        assert len(calls) == 2
    finally:
        reference.check_slots = orig


@pytest.mark.skipif(not KERNEL_OK or DEVICE.type != "cpu", reason=f"host stream device: {KERNEL_WHY}")
def test_a_stream_device_refuses_a_bad_slot_at_the_call_not_at_the_flush():
    dev = HostStreamDevice(0, TransferOptions(store_mode="direct", load_mode="direct"))
    kv, keep = _kv()
    before = _snapshot(keep)
    with dev.use_stream(dev.new_stream()):
        with pytest.raises(LayoutError):
            dev.scatter(kv, _slots(-1), chunk_like(kv, BS))
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(keep)))
