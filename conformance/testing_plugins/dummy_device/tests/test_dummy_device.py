"""The dummy device itself: its stream, its defect switch, and the contract classes over it."""

from __future__ import annotations

import threading
import time

import pytest

from lmcache_conformance import PipeliningTests
from lmcache_dummy_device.device import DEFECT_ENV, DummyDevice, ThreadStream


class TestDummyPipelining(PipeliningTests):
    """The vendor pattern: the contract class plus a ``device`` fixture."""

    @pytest.fixture
    def device(self, monkeypatch: pytest.MonkeyPatch) -> DummyDevice:
        monkeypatch.delenv(DEFECT_ENV, raising=False)
        return DummyDevice()


def _run(stream: ThreadStream, n: int) -> list[int]:
    order: list[int] = []
    lock = threading.Lock()
    for i in range(n):
        def job(i: int = i) -> None:
            with lock:
                order.append(i)
        stream.submit(job)
    deadline = time.monotonic() + 10
    while len(order) < n and time.monotonic() < deadline:  # events may lie under a defect: poll the work
        time.sleep(0.001)
    return order


def test_stream_runs_jobs_in_submission_order() -> None:
    s = ThreadStream("")
    try:
        assert _run(s, 20) == list(range(20))
    finally:
        s.close()


def test_reorder_defect_runs_newest_first() -> None:
    s = ThreadStream("reorder")
    try:
        order = _run(s, 5)
        assert sorted(order) == list(range(5)) and order != list(range(5))
    finally:
        s.close()


def test_no_overlap_defect_runs_work_only_when_waited() -> None:
    s = ThreadStream("no-overlap")
    done: list[int] = []
    s.submit(lambda: done.append(1))
    ev = s.record()
    assert not ev.query() and done == []
    ev.synchronize()
    assert done == [1] and ev.query()


def test_unknown_defect_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEFECT_ENV, "bogus")
    with pytest.raises(ValueError, match="gather-shift"):
        DummyDevice()


def test_detect_says_present() -> None:
    det = DummyDevice.detect()
    assert det.available and det.reason
