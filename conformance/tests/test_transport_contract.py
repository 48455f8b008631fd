"""The transport contract catches defective transports (and passes the built-in one).

Each defect is a small real Transport written into a vendor-style test file that
subclasses :class:`TransportTests`, run by pytest in a subprocess: the file is
what a transport author would write, and its outcome is what they would see.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TEMPLATE = '''
import pytest
from lmcache_core.builtin.local_transport import LocalTransport
from lmcache_conformance import TransportTests


class Defective(LocalTransport):
    DEFECT = {defect!r}

    def _copy(self, dst, src):
        if self.DEFECT == "drops-last-byte":
            d, s = self._lookup(dst), self._lookup(src)
            if len(d) < len(s):
                raise ValueError("too small")
            d[: max(len(s) - 1, 0)] = s[: max(len(s) - 1, 0)]
            return True
        if self.DEFECT == "swallows-errors":
            try:
                return super()._copy(dst, src)
            except Exception:
                return True  # reports success for a transfer that never happened
        return super()._copy(dst, src)


class TestDefective(TransportTests):
    @pytest.fixture
    def transport_pair(self):
        yield Defective(), Defective()
'''


def run_file(tmp_path: Path, defect: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "test_vendor_transport.py"
    f.write_text(textwrap.dedent(TEMPLATE.format(defect=defect)))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "/dev/null",
                           "--rootdir", str(tmp_path), str(f)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


@pytest.mark.parametrize("defect,failing", [
    ("drops-last-byte", ["test_write_arrives_intact", "test_read_arrives_intact", "test_many_transfers_in_flight"]),
    ("swallows-errors", ["test_write_to_deregistered_peer_fails", "test_oversized_write_fails"]),
])
def test_transport_contract_catches_defect(tmp_path: Path, defect: str, failing: list[str]) -> None:
    proc = run_file(tmp_path, defect)
    assert proc.returncode == 1, proc.stdout[-3000:]
    for name in failing:
        assert f"FAILED test_vendor_transport.py::TestDefective::{name}" in proc.stdout, proc.stdout[-3000:]


def test_correct_transport_passes(tmp_path: Path) -> None:
    proc = run_file(tmp_path, "none")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "9 passed" in proc.stdout, proc.stdout[-500:]
