"""Contract tests every transport plugin runs: buffers arrive intact, failures are reported.

Two endpoints (``transport_pair``) stand for two agents; by default both are
``cls()`` of the registered class, each connected to the other
(``connect(endpoint())``, the metadata exchange). A vendor whose transport needs
more setup overrides ``transport_pair``. :class:`TransportProcessTests` runs a
peer in another process (transports whose capabilities say ``cross_process``).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from lmcache_core.transport import Descriptor, Transport

from .device_tests import ContractTests
from .targets import Target

SIZES = (1, 4097, 4 << 20)


def wait(t: Transport, handle: Any, timeout: float = 30.0) -> None:
    """Poll ``handle`` until done; raises what poll raises, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while not t.poll(handle):
        if time.monotonic() > deadline:
            raise TimeoutError(f"transfer not complete after {timeout} s")
        time.sleep(0.0005)


def pattern(n: int, seed: int) -> bytearray:
    import numpy as np

    return bytearray(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())


class TransportTests(ContractTests):
    kind = "transport"
    contract = "transport"

    @pytest.fixture
    def transport_pair(self, lmcache_transport: Target) -> Iterator[tuple[Transport, Transport]]:
        from lmcache_core.plugins import get_plugin_manager

        lmcache_transport.require()
        cls = get_plugin_manager().get("transport", lmcache_transport.name).load()
        a, b = cls(), cls()
        a.connect(b.endpoint())
        b.connect(a.endpoint())
        yield a, b
        a.close()
        b.close()

    @pytest.mark.parametrize("nbytes", SIZES)
    def test_write_arrives_intact(self, transport_pair: tuple[Transport, Transport], nbytes: int) -> None:
        a, b = transport_pair
        src, dst = pattern(nbytes, 1), bytearray(nbytes)
        ls, rd = a.register(memoryview(src)), b.register(memoryview(dst))
        try:
            assert isinstance(ls, Descriptor) and ls.nbytes == nbytes and rd.nbytes == nbytes
            wait(a, a.write(ls, rd))
            assert dst == src, "written bytes differ at the peer"
            assert src == pattern(nbytes, 1), "write changed the source buffer"
        finally:
            a.deregister(ls)
            b.deregister(rd)

    @pytest.mark.parametrize("nbytes", SIZES)
    def test_read_arrives_intact(self, transport_pair: tuple[Transport, Transport], nbytes: int) -> None:
        a, b = transport_pair
        remote, local = pattern(nbytes, 2), bytearray(nbytes)
        rd, ld = b.register(memoryview(remote)), a.register(memoryview(local))
        try:
            wait(a, a.read(ld, rd))
            assert local == remote, "read bytes differ from the peer's buffer"
        finally:
            a.deregister(ld)
            b.deregister(rd)

    def test_many_transfers_in_flight(self, transport_pair: tuple[Transport, Transport]) -> None:
        a, b = transport_pair
        srcs = [pattern(65536, 10 + i) for i in range(16)]
        dsts = [bytearray(65536) for _ in srcs]
        lds = [a.register(memoryview(s)) for s in srcs]
        rds = [b.register(memoryview(d)) for d in dsts]
        try:
            handles = [a.write(l, r) for l, r in zip(lds, rds)]
            for hd in handles:
                wait(a, hd)
            assert all(d == s for d, s in zip(dsts, srcs)), "a transfer among several in flight arrived wrong"
        finally:
            for d in lds:
                a.deregister(d)
            for d in rds:
                b.deregister(d)

    def test_write_to_deregistered_peer_fails(self, transport_pair: tuple[Transport, Transport]) -> None:
        a, b = transport_pair
        src, dst = pattern(4096, 3), bytearray(4096)
        ls, rd = a.register(memoryview(src)), b.register(memoryview(dst))
        b.deregister(rd)
        try:
            with pytest.raises(Exception):  # noqa: B017 - any error, as long as it is reported
                wait(a, a.write(ls, rd), timeout=10)
            assert dst == bytearray(4096), "a buffer deregistered by its owner was written"
        finally:
            a.deregister(ls)

    def test_oversized_write_fails(self, transport_pair: tuple[Transport, Transport]) -> None:
        a, b = transport_pair
        src, dst = pattern(8192, 4), bytearray(4096)
        ls, rd = a.register(memoryview(src)), b.register(memoryview(dst))
        try:
            with pytest.raises(Exception):  # noqa: B017
                wait(a, a.write(ls, rd), timeout=10)
        finally:
            a.deregister(ls)
            b.deregister(rd)


PEER_SCRIPT = r"""
import json, sys
from lmcache_core.plugins import get_plugin_manager
from lmcache_core.transport import TransportOptions
cls = get_plugin_manager().get("transport", sys.argv[1]).load()
t = cls(TransportOptions())
import numpy as np
src = bytearray(np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
dst = bytearray(1 << 20)
ds, dd = t.register(memoryview(src)), t.register(memoryview(dst))
enc = lambda d: [d.agent, d.handle, d.nbytes, d.meta.hex()]
print("PEER " + json.dumps({"endpoint": t.endpoint().hex(), "src": enc(ds), "dst": enc(dd)}), flush=True)
sys.stdin.readline()
print("PEER " + json.dumps({"dst_ok": dst == src}), flush=True)
sys.stdin.readline()
"""


class TransportProcessTests(ContractTests):
    """The transport between two processes: a peer process registers buffers, this one reads and
    writes them; a peer that dies makes transfers fail within the timeout, never hang."""

    kind = "transport"
    contract = "transport"

    @pytest.fixture
    def peer(self, lmcache_transport: Target) -> Iterator[tuple[Transport, Any, dict[str, Any]]]:
        import json
        import subprocess
        import sys

        from lmcache_core.plugins import get_plugin_manager

        lmcache_transport.require()
        cls = get_plugin_manager().get("transport", lmcache_transport.name).load()
        if not cls.capabilities.cross_process:
            pytest.skip(f"transport {lmcache_transport.name} does not declare cross_process")
        proc = subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, lmcache_transport.name], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        info = _peer_line(proc)
        t = cls()
        t.connect(bytes.fromhex(info["endpoint"]))
        yield t, proc, info
        t.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def test_read_and_write_another_process(self, peer: tuple[Transport, Any, dict[str, Any]]) -> None:
        t, proc, info = peer
        local = bytearray(1 << 20)
        ld = t.register(memoryview(local))
        try:
            wait(t, t.read(ld, _desc(info["src"])))
            assert local == pattern(1 << 20, 5), "bytes read from the peer process differ"
            wait(t, t.write(ld, _desc(info["dst"])))
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert _peer_line(proc)["dst_ok"], "bytes written into the peer process differ"
        finally:
            t.deregister(ld)

    def test_dead_peer_fails_within_the_timeout(self, peer: tuple[Transport, Any, dict[str, Any]]) -> None:
        t, proc, info = peer
        proc.kill()
        proc.wait()
        local = bytearray(1 << 20)
        ld = t.register(memoryview(local))
        t0 = time.monotonic()
        try:
            with pytest.raises(Exception):  # noqa: B017 - failing is the contract; hanging or succeeding is not
                wait(t, t.read(ld, _desc(info["src"])), timeout=20)
            assert time.monotonic() - t0 < 25
        finally:
            t.deregister(ld)


def _peer_line(proc: Any) -> dict[str, Any]:
    import json

    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the peer process ended (exit {proc.wait()})")
        if line.startswith("PEER "):
            return json.loads(line[5:])


def _desc(raw: list[Any]) -> Descriptor:
    return Descriptor(raw[0], raw[1], raw[2], bytes.fromhex(raw[3]))


__all__ = ["TransportProcessTests", "TransportTests", "pattern", "wait"]
