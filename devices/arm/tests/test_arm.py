"""The Arm device on any host: cpuinfo samples of real server cores, NUMA parsing and placement,
bit-exact copies through the engine."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lmcache_core.plugins import PluginManager  # noqa: E402
from lmcache_device_arm import cpuinfo, numa  # noqa: E402
from lmcache_device_arm.device import ArmDevice, detect_arm  # noqa: E402

# Recorded /proc/cpuinfo blocks (first processor of each host; the kernel repeats one block per core).
GRACE = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svebf16 i8mm bf16 dgh bti
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd4f
CPU revision\t: 0

processor\t: 1
CPU implementer\t: 0x41
CPU part\t: 0xd4f
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""
ALTRA = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
"""
AMPERE_ONE = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg dcpodp flagm2 frint i8mm bf16 rng bti ecv
CPU implementer\t: 0xc0
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xac3
CPU revision\t: 0
"""
X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu vme sse sse2 avx2\n"


@pytest.mark.parametrize(("text", "core", "sve", "sve2", "bf16"), [
    (GRACE, "Neoverse V2", True, True, True),
    (GRAVITON3, "Neoverse V1", True, False, True),
    (ALTRA, "Neoverse N1", False, False, False),
    (AMPERE_ONE, "AmpereOne", False, False, True),
])
def test_cpuinfo_samples(text: str, core: str, sve: bool, sve2: bool, bf16: bool) -> None:
    cpu = cpuinfo.parse_cpuinfo(text)
    assert cpu is not None and cpu.core == core
    assert (cpu.sve, cpu.sve2, cpu.bf16) == (sve, sve2, bf16)
    det = detect_arm("aarch64", text)
    assert det.available and core in det.reason and det.details["core"] == core


def test_grace_is_named_and_counted() -> None:
    cpu = cpuinfo.parse_cpuinfo(GRACE)
    assert cpu is not None and cpu.processors == 2 and cpu.vendor == "Arm" and "Grace" in cpu.system


def test_x86_hosts_are_refused_with_the_reason() -> None:
    assert cpuinfo.parse_cpuinfo(X86) is None
    det = detect_arm("x86_64", X86)
    assert not det.available and "not aarch64" in det.reason
    det = detect_arm("aarch64", X86)
    assert not det.available and "implementer" in det.reason


def test_registered_and_auto_selection_rules() -> None:
    pm = PluginManager(allow="arm", block="")
    reg = pm.get("device", "arm")
    assert reg.extra == "arm" and reg.load() is ArmDevice
    assert not ArmDevice.capabilities.accelerator and not ArmDevice.capabilities.pinned_memory


@pytest.mark.parametrize(("text", "expected"), [
    ("0-3,8,10-11\n", {0, 1, 2, 3, 8, 10, 11}), ("", set()), ("5", {5}), ("0-71", set(range(72))),
])
def test_cpulist(text: str, expected: set[int]) -> None:
    assert numa.parse_cpulist(text) == expected


def test_numa_topology_from_a_grace_hopper_like_sysfs(tmp_path: Path) -> None:
    # Grace Hopper: node 0 has the 72 Grace cores and LPDDR5X; node 1 is the GPU's HBM, no CPUs.
    for n, cpus, mem in ((0, "0-71", 480 * 1024 * 1024), (1, "", 96 * 1024 * 1024)):
        d = tmp_path / f"node{n}"
        d.mkdir()
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(f"Node {n} MemTotal:       {mem} kB\nNode {n} MemFree: 1 kB\n")
    topo = numa.nodes(str(tmp_path))
    assert [(nd.node, len(nd.cpus)) for nd in topo] == [(0, 72), (1, 0)]
    assert topo[0].memory_kb == 480 * 1024 * 1024
    assert numa.node_of_cpus({3, 4}, topo) == 0
    assert numa.node_of_cpus({500}, topo) is None


def test_alloc_host_places_buffers_on_the_requested_node() -> None:
    dev = ArmDevice(numa_node=0)
    t = dev.alloc_host(1 << 20)
    assert t.numel() == 1 << 20 and t.dtype == torch.uint8
    assert sum(dev.placements.values()) == 1
    assert set(dev.placements) <= {"libnuma", "first-touch", "none"}


def test_engine_round_trip_is_bit_exact(tmp_path: Path) -> None:
    from lmcache_core.config import Config
    from lmcache_core.engine import CacheEngine
    from lmcache_core.layout import slot_mapping
    from lmcache_kernels import reference
    from lmcache_kernels.testing import bits, chunk_like, make_kv

    g = torch.Generator().manual_seed(0)
    kv, _ = make_kv("vllm_flash", num_layers=2, num_blocks=40, block_size=16, heads=2, head_dim=32, generator=g)
    kv2, _ = make_kv("vllm_flash", num_layers=2, num_blocks=40, block_size=16, heads=2, head_dim=32, generator=g)
    cfg = Config.load(overrides={"tiers": ["memory://?capacity=64MiB"], "chunk_size": 64}, env={})
    tokens = list(range(300))
    b1, b2 = torch.randperm(40, generator=g)[:19], torch.randperm(40, generator=g)[:19]
    with CacheEngine(kv.geometry, cfg, model="arm-test", device=ArmDevice()) as eng:
        assert eng.store(tokens, kv, b1, wait=True) == 300
        assert eng.retrieve(tokens, kv2, b2).hit_tokens == 300
    a, b = chunk_like(kv, 300), chunk_like(kv2, 300)
    reference.gather_batch(kv, [(slot_mapping(b1, 16, 0, 300), a)])
    reference.gather_batch(kv2, [(slot_mapping(b2, 16, 0, 300), b)])
    assert torch.equal(bits(a), bits(b))
