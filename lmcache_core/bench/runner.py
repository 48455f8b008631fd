"""Drive a target with a workload: closed loop (``concurrency`` sessions at a time) or open loop
(Poisson arrivals at ``rate`` requests per second); a live progress line while it runs.

A request that fails is a result with ``error`` set (the run goes on; the CLI exits non-zero
when any failed). Sessions run their requests in order: a chat turn waits for the one before.

A target with ``batched = True`` (vLLM's ``LLM`` API, which batches what it is given) is fed
waves instead of threads: closed loop, a wave is the next turn of each of ``concurrency``
sessions (a finished session's place goes to the next one); open loop, a wave is every
request that has arrived, and whose turn before it is done, when the engine is free.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from .targets import Target
from .workloads import Request, Workload

logger = logging.getLogger(__name__)
MAX_THREADS = 64


@dataclass
class Result:
    id: str
    session: str
    start_s: float  # since the run began
    prompt_tokens: int
    ttft_s: float = 0.0
    total_s: float = 0.0
    output_tokens: int = 0
    cached_tokens: int | None = None
    by_tier: dict[str, int] = field(default_factory=dict)
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Arrival:
    """``concurrency`` sessions at a time, or (``rate`` > 0) Poisson arrivals of requests."""

    concurrency: int = 1
    rate: float = 0.0
    seed: int = 0

    def describe(self) -> str:
        return f"poisson {self.rate:g}/s" if self.rate > 0 else f"concurrency {self.concurrency}"


def _one(target: Target, req: Request, t0: float) -> Result:
    res = Result(req.id, req.session, time.perf_counter() - t0, len(req.tokens))
    try:
        out = target.generate(req)
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, the run goes on
        logger.warning("request %s on %s failed: %s: %s", req.id, target.name, type(exc).__name__, exc)
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.ttft_s, res.total_s, res.output_tokens = out.ttft_s, out.total_s, out.output_tokens
    res.cached_tokens, res.by_tier = out.cached_tokens, out.by_tier
    return res


def _arrivals(sessions: list[tuple[Request, ...]], arrival: Arrival) -> dict[tuple[int, int], float]:
    """Request arrival times: a Poisson process over the workload's request order, each
    session's turns in order (a turn starts at its arrival or when the one before ends)."""
    rng = np.random.default_rng([arrival.seed, 7])
    order = [(si, ri) for ri in range(max(map(len, sessions), default=0))
             for si, s in enumerate(sessions) if ri < len(s)]
    gaps = rng.exponential(1.0 / arrival.rate, size=len(order))
    return {k: float(t) for k, t in zip(order, np.cumsum(gaps))}


def _waves(target: Any, sessions: list[tuple[Request, ...]], arrival: Arrival, t0: float,
           record: Callable[[Result], None]) -> None:
    """Feed a batched target one wave at a time (module docstring)."""
    nxt = [0] * len(sessions)
    at = _arrivals(sessions, arrival) if arrival.rate > 0 else {}
    waiting = list(range(len(sessions)))  # closed loop: sessions not yet started, in order
    active: list[int] = []
    while True:
        if arrival.rate > 0:
            now = time.perf_counter() - t0
            pending = [(at[(si, nxt[si])], si) for si in range(len(sessions)) if nxt[si] < len(sessions[si])]
            if not pending:
                return
            first = min(pending)[0]
            if first > now:
                time.sleep(first - now)
                now = time.perf_counter() - t0
            wave = [si for t, si in sorted(pending) if t <= now]
        else:
            active = [si for si in active if nxt[si] < len(sessions[si])]
            while waiting and len(active) < max(1, arrival.concurrency):
                active.append(waiting.pop(0))
            if not active:
                return
            wave = list(active)
        reqs = [sessions[si][nxt[si]] for si in wave]
        start = time.perf_counter() - t0
        try:
            outs: list[Any] = target.generate_batch(reqs)
        except Exception as exc:  # noqa: BLE001 - a failed wave is failed results, the run goes on
            logger.warning("a wave of %d requests on %s failed: %s: %s", len(reqs), target.name,
                           type(exc).__name__, exc)
            outs = [exc] * len(reqs)
        for si, req, out in zip(wave, reqs, outs):
            res = Result(req.id, req.session, start, len(req.tokens))
            if isinstance(out, Exception):
                res.error = f"{type(out).__name__}: {out}"
            else:
                res.ttft_s, res.total_s, res.output_tokens = out.ttft_s, out.total_s, out.output_tokens
                res.cached_tokens, res.by_tier = out.cached_tokens, out.by_tier
            record(res)
            nxt[si] += 1


def run(target: Target, workload: Workload, arrival: Arrival,
        on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Every request of ``workload`` against ``target``; results in completion order."""
    results: list[Result] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def record(r: Result) -> None:
        with lock:
            results.append(r)
        if on_result is not None:
            on_result(r)

    sessions = list(workload.sessions)
    if getattr(target, "batched", False):
        _waves(target, sessions, arrival, t0, record)
        return results
    if arrival.rate > 0:
        at = _arrivals(sessions, arrival)

        def session_loop(si: int) -> None:
            for ri, req in enumerate(sessions[si]):
                delay = at[(si, ri)] - (time.perf_counter() - t0)
                if delay > 0:
                    time.sleep(delay)
                record(_one(target, req, t0))

        work: queue.Queue[int] = queue.Queue()
        for si in sorted(range(len(sessions)), key=lambda i: at.get((i, 0), 0.0)):
            work.put(si)
        width = len(sessions) if target.concurrent else 1
    else:
        def session_loop(si: int) -> None:
            for req in sessions[si]:
                record(_one(target, req, t0))

        work = queue.Queue()
        for si in range(len(sessions)):
            work.put(si)
        width = arrival.concurrency if target.concurrent else 1

    def worker() -> None:
        while True:
            try:
                si = work.get_nowait()
            except queue.Empty:
                return
            session_loop(si)

    threads = [threading.Thread(target=worker, name=f"bench-{i}", daemon=True)
               for i in range(max(1, min(width, MAX_THREADS, len(sessions))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
