"""The dummy device: CPU copies queued on a worker thread, with switchable defects.

``LMCACHE_DUMMY_DEVICE_DEFECT`` (read when a device is created) picks at most
one defect, each aimed at one contract:

- ``gather-shift``: the last token of every gather is read from the wrong slot (chunk);
- ``scatter-spill``: every scatter also writes one slot past the request (chunk);
- ``early-release``: events report completion before the copies ran (pipelining);
- ``reorder``: the stream runs queued copies last-in first-out (pipelining);
- ``no-overlap``: claims async copies but runs them only when waited for (pipelining);
- ``gather-copy``: gathers into a private buffer and copies it over (zero-copy of the
  engine's buffer is kept, so this one must *pass*: it checks the suite is not too strict).

Unset or empty: a correct device.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from lmcache_core.builtin.cpu import torch_gather, torch_scatter
from lmcache_core.device import Detection, Device, DeviceCapabilities, DoneEvent, Event

if TYPE_CHECKING:
    import torch

    from lmcache_core.layout import PagedKV

logger = logging.getLogger(__name__)

DEFECT_ENV = "LMCACHE_DUMMY_DEVICE_DEFECT"
# Each queued copy first waits this long, like a DMA engine's setup latency. The wait
# releases the GIL, so on a CPU the overlap of copies with compute is real and steady.
DMA_LATENCY_S = 0.002
DEFECTS = ("gather-shift", "scatter-spill", "early-release", "reorder", "no-overlap", "gather-copy")


def current_defect() -> str:
    value = os.environ.get(DEFECT_ENV, "").strip()
    if value and value not in DEFECTS:
        raise ValueError(f"{DEFECT_ENV}={value!r} is not a known defect; use one of {', '.join(DEFECTS)}")
    return value


class ThreadEvent(Event):
    """Set by the stream's worker when every job queued before it has run."""

    def __init__(self, stream: "ThreadStream", early: bool = False) -> None:
        self._done = threading.Event()
        self._stream = stream
        self._early = early

    def synchronize(self) -> None:
        if self._early:
            return  # defect: says "done" without waiting
        self._stream.run_pending_inline()
        if not self._done.wait(60):
            raise TimeoutError("dummy stream: event not reached in 60 s")

    def query(self) -> bool:
        return self._early or self._done.is_set()


_LIVE: "weakref.WeakSet[ThreadStream]" = weakref.WeakSet()


@atexit.register
def _stop_streams() -> None:
    """Let every worker finish and exit before the interpreter tears torch down under it
    (a daemon thread inside a torch op at shutdown aborts the process)."""
    for stream in list(_LIVE):
        stream.close()
        if stream._thread is not None:
            stream._thread.join(timeout=10)


class ThreadStream:
    """A FIFO of copy jobs run by one worker thread (the CPU stand-in for a transfer stream)."""

    def __init__(self, defect: str) -> None:
        self.defect = defect
        self._jobs: deque[Callable[[], None]] = deque()
        self._cv = threading.Condition()
        self._last_submit = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None
        if defect != "no-overlap":
            self._thread = threading.Thread(target=self._run, name="dummy-stream", daemon=True)
            self._thread.start()
        _LIVE.add(self)

    def submit(self, job: Callable[[], None], copy: bool = True) -> None:
        if copy:
            inner = job

            def job() -> None:
                time.sleep(DMA_LATENCY_S)
                inner()

        with self._cv:
            self._jobs.append(job)
            self._last_submit = time.monotonic()
            self._cv.notify()

    def record(self) -> ThreadEvent:
        ev = ThreadEvent(self, early=self.defect == "early-release")
        self.submit(ev._done.set, copy=False)
        return ev

    def run_pending_inline(self) -> None:
        """The ``no-overlap`` defect: queued work runs only in the thread that waits."""
        if self._thread is not None:
            return
        while True:
            with self._cv:
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            job()

    def drain(self) -> None:
        self.record().synchronize() if self.defect != "early-release" else self._wait_empty()

    def _wait_empty(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: not self._jobs and not self._busy, 60)

    _busy = False

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._jobs or self._closed)
                if self._closed and not self._jobs:
                    return
                if self.defect == "reorder":
                    # wait for the burst to end, then run it newest first
                    while time.monotonic() - self._last_submit < 0.005:
                        self._cv.wait(0.005)
                    job = self._jobs.pop()
                else:
                    job = self._jobs.popleft()
                self._busy = True
            try:
                if self.defect == "early-release":
                    time.sleep(0.005)  # make the premature release observable
                job()
            except Exception:  # noqa: BLE001 - a failed copy must not kill the stream
                logger.exception("dummy stream job failed")
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class DummyDevice(Device):
    """Host memory, torch reference copies, and a worker-thread stream per ``new_stream()``."""

    name = "dummy"
    capabilities = DeviceCapabilities(async_copy=True, pinned_memory=False, accelerator=False)
    auto_select = False  # a test device: used only when named, never by `device: auto`

    @classmethod
    def detect(cls) -> Detection:
        return Detection(True, "always present (test plugin)", 1, {"defect": os.environ.get(DEFECT_ENV, "")})

    def __init__(self, index: int = 0) -> None:
        super().__init__(index)
        self.defect = current_defect()
        self._local = threading.local()
        self._streams: "weakref.WeakSet[ThreadStream]" = weakref.WeakSet()

    @property
    def torch_device(self) -> "torch.device":
        import torch

        return torch.device("cpu")

    # -- streams ------------------------------------------------------------------------
    def new_stream(self) -> ThreadStream:
        s = ThreadStream(self.defect)
        self._streams.add(s)
        weakref.finalize(s, s.close)
        return s

    @contextlib.contextmanager
    def use_stream(self, stream: Any) -> Iterator[None]:
        prev = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = prev

    def record_event(self, stream: Any = None) -> Event:
        if stream is None:
            return DoneEvent()
        return stream.record()  # type: ignore[no-any-return]

    def synchronize(self) -> None:
        for s in list(self._streams):
            s.drain()

    def _enqueue(self, job: Callable[[], None]) -> None:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            job()
        else:
            stream.submit(job)

    # -- copies -------------------------------------------------------------------------
    def gather(self, kv: "PagedKV", slots: "torch.Tensor", out: "torch.Tensor",
               layers: Sequence[int] | None = None) -> None:
        import torch

        slots = slots.to("cpu", dtype=torch.int64).clone()
        if self.defect == "gather-shift" and slots.numel() > 1:
            slots[-1] = slots[0]
        if self.defect == "gather-copy":
            def job() -> None:
                tmp = out.clone()
                torch_gather(kv, slots, tmp, layers)
                out.copy_(tmp)
        else:
            def job() -> None:
                torch_gather(kv, slots, out, layers)
        self._enqueue(job)

    def scatter(self, kv: "PagedKV", slots: "torch.Tensor", src: "torch.Tensor",
                layers: Sequence[int] | None = None) -> None:
        import torch

        slots = slots.to("cpu", dtype=torch.int64).clone()

        def job() -> None:
            torch_scatter(kv, slots, src, layers)
            if self.defect == "scatter-spill":
                total = kv.num_blocks * kv.block_size
                extra = (int(slots.max()) + 1) % total
                if extra not in set(slots.tolist()):
                    torch_scatter(kv, torch.tensor([extra]), src[:, :, :1], layers)

        self._enqueue(job)

    def telemetry(self) -> dict[str, Any]:
        return {"defect": self.defect or None, "streams": len(self._streams)}
