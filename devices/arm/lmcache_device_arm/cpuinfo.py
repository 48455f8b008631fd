"""Recognise Arm server CPUs from ``/proc/cpuinfo``: implementer, part, features.

On aarch64 Linux, ``/proc/cpuinfo`` has no model name; each processor block
carries ``CPU implementer`` and ``CPU part`` (MIDR fields) and a ``Features``
line. The tables below name the server cores we meet (Grace is Neoverse V2,
Graviton2 N1, Graviton3 V1, Graviton4 V2, Ampere Altra N1); features tell us
whether SVE, SVE2 and BF16 are there.
"""

from __future__ import annotations

from dataclasses import dataclass

IMPLEMENTERS = {0x41: "Arm", 0xC0: "Ampere", 0x48: "HiSilicon", 0x4E: "NVIDIA", 0x51: "Qualcomm",
                0x61: "Apple"}
ARM_PARTS = {
    0xD0C: "Neoverse N1", 0xD40: "Neoverse V1", 0xD49: "Neoverse N2", 0xD4F: "Neoverse V2",
    0xD8E: "Neoverse N3", 0xD84: "Neoverse V3", 0xD0D: "Cortex-A77", 0xD41: "Cortex-A78",
    0xD08: "Cortex-A72", 0xD03: "Cortex-A53",
}
SYSTEMS = {  # (implementer, part) -> the platforms that use that core
    (0x41, 0xD4F): "NVIDIA Grace / AWS Graviton4 class",
    (0x41, 0xD40): "AWS Graviton3 class",
    (0x41, 0xD0C): "AWS Graviton2 / Ampere Altra class",
    (0x41, 0xD49): "Neoverse N2 class (Azure Cobalt 100, Alibaba Yitian 710)",
}
AARCH64 = ("aarch64", "arm64")


@dataclass(frozen=True)
class ArmCpu:
    """What the kernel reports about the host's cores."""

    processors: int
    implementer: int | None
    part: int | None
    features: frozenset[str]

    @property
    def vendor(self) -> str:
        return IMPLEMENTERS.get(self.implementer or -1, f"implementer {self.implementer:#x}"
                                if self.implementer is not None else "unknown")

    @property
    def core(self) -> str:
        if self.implementer == 0x41 and self.part in ARM_PARTS:
            return ARM_PARTS[self.part]
        if self.implementer == 0xC0:
            return "AmpereOne" if (self.part or 0) >= 0xAC3 else f"Ampere part {self.part:#x}"
        return f"part {self.part:#x}" if self.part is not None else "unknown core"

    @property
    def system(self) -> str:
        return SYSTEMS.get((self.implementer or -1, self.part or -1), "")

    @property
    def sve(self) -> bool:
        return "sve" in self.features

    @property
    def sve2(self) -> bool:
        return "sve2" in self.features

    @property
    def bf16(self) -> bool:
        return "bf16" in self.features or "svebf16" in self.features

    def describe(self) -> dict[str, object]:
        return {"processors": self.processors, "vendor": self.vendor, "core": self.core, "system": self.system,
                "sve": self.sve, "sve2": self.sve2, "bf16": self.bf16}


def parse_cpuinfo(text: str) -> ArmCpu | None:
    """The host's cores from ``/proc/cpuinfo`` text, or None when it is not an Arm cpuinfo."""
    processors = 0
    implementer: int | None = None
    part: int | None = None
    features: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            processors += 1
        elif key == "CPU implementer" and implementer is None:
            implementer = _hex(value)
        elif key == "CPU part" and part is None:
            part = _hex(value)
        elif key == "Features" and not features:
            features = set(value.split())
    if implementer is None and part is None:
        return None
    return ArmCpu(processors, implementer, part, frozenset(features))


def _hex(value: str) -> int | None:
    try:
        return int(value, 16) if value.lower().startswith("0x") else int(value)
    except ValueError:
        return None


def read_cpuinfo(path: str = "/proc/cpuinfo") -> ArmCpu | None:
    try:
        with open(path) as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return None
