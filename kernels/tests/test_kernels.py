"""The Triton kernel against the torch reference, bit for bit, on every layout and dtype.

On a CPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1);
on a GPU machine the same tests run the compiled kernel on the device.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lmcache_kernels import reference, triton_copy  # noqa: E402
from lmcache_kernels.testing import DTYPES, LAYOUTS, bits, chunk_like, make_kv, poison, random_slots  # noqa: E402

ok, why = triton_copy.kernel_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
pytestmark = pytest.mark.skipif(not ok, reason=f"Triton kernel cannot run here: {why}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed: int) -> "torch.Generator":
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_gather_matches_reference_bit_for_bit(kind: str, dtype: str) -> None:
    g = _gen(hash((kind, dtype)) % 1000)
    kv, _keep = make_kv(kind, dtype=dtype, device=DEVICE, generator=g)
    # two chunks: one partial (fewer slots than chunk tokens), over shuffled blocks
    s1 = random_slots(7, kv, g)
    s2 = random_slots(13, kv, g)
    got = [chunk_like(kv, 9, DEVICE), chunk_like(kv, 16, DEVICE)]
    want = [chunk_like(kv, 9, DEVICE), chunk_like(kv, 16, DEVICE)]
    triton_copy.gather_batch(kv, [(s1, got[0]), (s2, got[1])])
    reference.gather_batch(kv, [(s1, want[0]), (s2, want[1])])
    for a, b in zip(got, want):
        assert torch.equal(bits(a), bits(b))
    # the tail past the slots keeps its poison, and the written part is not poison
    poisoned = bits(poison(chunk_like(kv, 9)))
    assert torch.equal(bits(got[0])[:, :, 7:], poisoned[:, :, 7:])
    assert not torch.equal(bits(got[0])[:, :, :7], poisoned[:, :, :7])


@pytest.mark.parametrize("kind", LAYOUTS)
def test_scatter_matches_reference_bit_for_bit(kind: str) -> None:
    g = _gen(7)
    kv_k, keep_k = make_kv(kind, device=DEVICE, generator=_gen(1))
    kv_r, keep_r = make_kv(kind, device=DEVICE, generator=_gen(1))
    for a, b in zip(keep_k, keep_r):
        assert torch.equal(bits(a), bits(b))
    slots = random_slots(11, kv_k, g)
    src = chunk_like(kv_k, 16, DEVICE)
    src.copy_(torch.randn(src.shape).to(src.dtype))
    triton_copy.scatter_batch(kv_k, [(slots, src)])
    reference.scatter_batch(kv_r, [(slots, src)])
    for a, b in zip(keep_k, keep_r):
        assert torch.equal(bits(a), bits(b))
    back = chunk_like(kv_k, 16, DEVICE)
    triton_copy.gather_batch(kv_k, [(slots, back)])
    assert torch.equal(bits(back)[:, :, :11], bits(src)[:, :, :11])


@pytest.mark.parametrize("layers", [(0,), (2,), (0, 2), (1, 2)])
def test_layer_selection_touches_only_those_layers(layers: tuple[int, ...]) -> None:
    kv, _ = make_kv("vllm_flash", device=DEVICE, generator=_gen(3))
    slots = random_slots(10, kv, _gen(4))
    got, want = chunk_like(kv, 10, DEVICE), chunk_like(kv, 10, DEVICE)
    triton_copy.gather_batch(kv, [(slots, got)], layers)
    reference.gather_batch(kv, [(slots, want)], layers)
    assert torch.equal(bits(got), bits(want))
    untouched = [l for l in range(3) if l not in layers]
    fresh = bits(chunk_like(kv, 10))
    for l in untouched:
        assert torch.equal(bits(got)[l], fresh[l])


def test_reference_agrees_with_token_loop_ground_truth() -> None:
    for kind in ("vllm_blocks_heads", "sglang_page_first_direct", "mla"):
        kv, _ = make_kv(kind, generator=_gen(5))
        slots = random_slots(9, kv, _gen(6))
        a, b = chunk_like(kv, 9), chunk_like(kv, 9)
        reference.gather_batch(kv, [(slots, a)])
        reference.gather_loop(kv, slots.tolist(), b)
        assert torch.equal(bits(a), bits(b))


def test_kernel_agrees_with_core_cpu_device() -> None:
    from lmcache_core.builtin.cpu import torch_gather

    kv, _ = make_kv("flashinfer", dtype="float16", generator=_gen(8))
    slots = random_slots(12, kv, _gen(9))
    a, b = chunk_like(kv, 12), chunk_like(kv, 12)
    if DEVICE == "cpu":
        triton_copy.gather_batch(kv, [(slots, a)])
    else:
        kvd, _ = make_kv("flashinfer", dtype="float16", device=DEVICE, generator=_gen(8))
        ad = chunk_like(kvd, 12, DEVICE)
        triton_copy.gather_batch(kvd, [(slots, ad)])
        a = ad.cpu()
    torch_gather(kv, slots, b, None)
    assert torch.equal(bits(a), bits(b))


def test_misuse_names_the_problem() -> None:
    kv, _ = make_kv("vllm_flash", device=DEVICE, generator=_gen(10))
    slots = random_slots(5, kv, _gen(11))
    with pytest.raises(ValueError, match="shape"):
        triton_copy.gather_batch(kv, [(slots, torch.zeros(3, 2, 5, 7, dtype=torch.bfloat16, device=DEVICE))])
    with pytest.raises(ValueError, match="do not fit"):
        triton_copy.gather_batch(kv, [(slots, chunk_like(kv, 4, DEVICE))])
    with pytest.raises(IndexError, match="layer 3"):
        triton_copy.gather_batch(kv, [(slots, chunk_like(kv, 5, DEVICE))], layers=(3,))
    with pytest.raises(ValueError, match="dtype"):
        triton_copy.gather_batch(kv, [(slots, chunk_like(kv, 5, DEVICE).float())])


def test_unequal_plane_strides_are_refused_with_a_reason() -> None:
    from lmcache_core.layout import PagedKV

    a = torch.randn(2, 8, 4, 2, 16).to(torch.bfloat16)
    b = torch.randn(2, 4, 8, 2, 16).to(torch.bfloat16).transpose(1, 2)  # same shape, other strides
    kv = PagedKV.from_vllm_flash([a, b])
    table, why = triton_copy.plane_table(kv)
    assert table is None and "strides" in why
