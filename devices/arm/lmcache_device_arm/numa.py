"""NUMA topology from sysfs, and host buffers placed on the caller's node.

Grace (and two-socket Graviton/Ampere hosts) have several memory nodes; a KV
buffer on the far node costs cross-socket bandwidth on every copy. Placement
here binds the buffer's pages to the node of the CPUs the calling thread runs
on: with libnuma through ``numa_tonode_memory`` (the mbind policy), else by
first touch from a thread pinned to that node's CPUs. Both leave the memory an
ordinary torch CPU tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

NODE_ROOT = "/sys/devices/system/node"


def parse_cpulist(text: str) -> frozenset[int]:
    """``0-3,8,10-11`` -> {0, 1, 2, 3, 8, 10, 11}; empty text gives an empty set."""
    out: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        out.update(range(int(lo), int(hi) + 1) if sep else (int(lo),))
    return frozenset(out)


@dataclass(frozen=True)
class Node:
    node: int
    cpus: frozenset[int]
    memory_kb: int = 0


def nodes(root: str = NODE_ROOT) -> list[Node]:
    """Memory nodes with their CPUs (CPU-less nodes, e.g. Grace's GPU memory, have none)."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, "node[0-9]*")), key=lambda p: int(p.rsplit("node", 1)[1])):
        n = int(path.rsplit("node", 1)[1])
        try:
            with open(os.path.join(path, "cpulist")) as f:
                cpus = parse_cpulist(f.read())
        except OSError:
            cpus = frozenset()
        mem = 0
        try:
            with open(os.path.join(path, "meminfo")) as f:
                for line in f:
                    if "MemTotal" in line:
                        mem = int(line.split()[-2])
        except (OSError, ValueError, IndexError):
            pass
        out.append(Node(n, cpus, mem))
    return out


def node_of_cpus(cpus: frozenset[int] | set[int], topology: list[Node]) -> int | None:
    """The node holding most of ``cpus`` (the caller's affinity), or None."""
    best, count = None, 0
    for nd in topology:
        c = len(nd.cpus & set(cpus))
        if c > count:
            best, count = nd.node, c
    return best


class _LibNuma:
    def __init__(self) -> None:
        self.lib: Any = None
        name = ctypes.util.find_library("numa")
        if name:
            try:
                lib = ctypes.CDLL(name)
                if lib.numa_available() >= 0:
                    lib.numa_tonode_memory.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                    self.lib = lib
            except OSError as exc:
                logger.debug("libnuma unusable: %s", exc)


_NUMA: _LibNuma | None = None


def _libnuma() -> Any:
    global _NUMA
    if _NUMA is None:
        _NUMA = _LibNuma()
    return _NUMA.lib


def place(t: "torch.Tensor", node: int, topology: list[Node]) -> str:
    """Bind the pages of the fresh host tensor ``t`` to ``node``; returns how it was done."""
    lib = _libnuma()
    nbytes = t.numel() * t.element_size()
    if lib is not None:
        lib.numa_tonode_memory(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(nbytes), node)
        t.view(-1)[::4096 // t.element_size() or 1].zero_()  # fault the pages in under the policy
        return "libnuma"
    cpus = next((nd.cpus for nd in topology if nd.node == node), frozenset())
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return "none"

    def touch() -> None:
        os.sched_setaffinity(0, cpus)
        t.view(-1)[::4096 // t.element_size() or 1].zero_()

    th = threading.Thread(target=touch, name="lmcache-numa-touch")
    th.start()
    th.join()
    return "first-touch"
