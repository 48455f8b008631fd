"""Load or recompute: how much of a cache hit is worth loading (setting ``load_policy``).

``always`` loads every hit chunk. ``adaptive`` compares, per request, the estimated
time to load the hit chunks (per tier, a line ``latency + bytes / throughput``
fitted to the engine's own recent fetches) with the estimated time to recompute
them (a line fitted to this engine's recent prefills: ``overhead + tokens /
throughput``), and loads the leading chunks only as far as loading them is faster:
a slow tier (S3 at tens of MB/s) in front of a model that prefills quickly is
recomputed; a tier in this process's memory (``fast_tiers``: a hit there is a copy) is
always loaded and never timed. Prefills shorter than ``MIN_PREFILL_TOKENS`` are not
used (they time the engine's fixed cost per step); a sample far off its line (a prefill
stalled by another process) is clipped before it counts (:class:`DecayedLine`). Before anything is measured it loads
everything (and so measures); every ``PROBE_EVERY``-th request it would cut short
loads one chunk more, so a tier that got faster is noticed.

The engine calls :meth:`AdaptivePolicy.begin` at a lookup, :meth:`plan` and
:meth:`observe_fetch` in a retrieve and :meth:`end_prefill` at the store of the
same prompt: the time between the load (or the lookup of a miss) and the store on
the same thread is the prefill of the tokens not loaded (``CachedModel``'s order).
An integration that times its prefill itself calls :meth:`observe_prefill`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from .config import Config
    from .engine import LookupResult

logger = logging.getLogger(__name__)

POLICIES = ("always", "adaptive")


class DecayedLine:
    """``y = a + b x`` by least squares over exponentially decayed samples (recent ones count most).

    ``decay`` is the weight an older sample keeps per new one; with one distinct ``x`` the line
    goes through the origin (``b = mean y / mean x``). Once ``WARM`` samples are in, a new ``y``
    is clipped to within ``clip`` times the line's prediction: one prefill stalled by another
    process (a shared CPU stalls one by 5-20x) moves the line by a bounded step instead of
    dragging it for the next ten samples, while a lasting change still gets through, a step
    per sample (10x slower is followed in under 20 samples)."""

    WARM = 3

    def __init__(self, decay: float = 0.9, clip: float = 4.0) -> None:
        if not 0 < decay <= 1 or clip <= 1:
            raise ValueError(f"DecayedLine needs 0 < decay <= 1 and clip > 1, got decay={decay}, clip={clip}")
        self.decay = decay
        self.clip = clip
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.count = 0
        self.clipped = 0  # samples pulled in to the clip bound

    def add(self, x: float, y: float) -> None:
        if self.count >= self.WARM:
            p = self.predict(x)
            if p is not None and p > 0 and not p / self.clip <= y <= p * self.clip:
                y = min(max(y, p / self.clip), p * self.clip)
                self.clipped += 1
        d = self.decay
        self.n = self.n * d + 1.0
        self.sx = self.sx * d + x
        self.sy = self.sy * d + y
        self.sxx = self.sxx * d + x * x
        self.sxy = self.sxy * d + x * y
        self.count += 1

    def coefficients(self) -> tuple[float, float] | None:
        """``(a, b)`` with ``a >= 0`` and ``b > 0``, or None before the first sample."""
        if not self.count or self.sx <= 0:
            return None
        mx, my = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mx * mx
        if var > 1e-9 * mx * mx:
            b = (self.sxy / self.n - mx * my) / var
            a = my - b * mx
            if b > 0 and a >= 0:
                return a, b
        # too few distinct sizes, or a fit with a negative part: proportional through the origin
        return 0.0, max(my, 0.0) / mx

    def predict(self, x: float) -> float | None:
        c = self.coefficients()
        return None if c is None else c[0] + c[1] * x


@dataclass
class _Pending:
    tokens: int  # the prompt's length (what its store will carry)
    loaded: int  # tokens the engine did not compute (loaded, or held by the engine already)
    since: float  # when the prefill of the rest began


class LoadPolicy:
    """``always``: load every hit chunk (the hooks do nothing)."""

    name = "always"
    #: tiers in this process's memory (the engine sets them): a hit there costs a copy, always loaded
    fast_tiers: frozenset[str] = frozenset()

    def begin(self, num_tokens: int) -> None:
        """A lookup of a ``num_tokens`` prompt on this thread (its prefill may start now)."""

    def plan(self, lookup: "LookupResult", cap: int, skip_tokens: int,
             chunk_bytes: Callable[[int], int]) -> int:
        """How many leading tokens of the hit to load (at most ``cap``); the rest is recomputed."""
        return cap

    def observe_fetch(self, fetched: Sequence[tuple[str, int]], seconds: float, num_tokens: int,
                      loaded: int) -> None:
        """One fetch of ``(tier, bytes)`` chunks took ``seconds``; the prompt has ``num_tokens``,
        ``loaded`` of them the engine will not compute."""

    def end_prefill(self, num_tokens: int) -> None:
        """The store of a ``num_tokens`` prompt on this thread: its prefill is over."""

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """The engine computed ``tokens`` prompt tokens in ``seconds``."""

    def stats(self) -> dict[str, object]:
        return {"policy": self.name}


class AdaptivePolicy(LoadPolicy):
    """Loads the leading hit chunks only as far as loading them beats recomputing them."""

    name = "adaptive"
    PROBE_EVERY = 16
    MIN_PREFILL_TOKENS = 256  # shorter prefills time the engine's fixed cost per step, not its tokens
    MAX_PENDING_S = 600.0  # a lookup whose store never came is forgotten after this

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.load: dict[str, DecayedLine] = {}
        self.prefill = DecayedLine(decay)
        self._lock = threading.Lock()
        self._local = threading.local()
        self.planned = 0
        self.skipped_tokens = 0  # hit tokens left to recompute

    # -- measurements ---------------------------------------------------------------------
    def observe_fetch(self, fetched: Sequence[tuple[str, int]], seconds: float, num_tokens: int,
                      loaded: int) -> None:
        by_tier: dict[str, int] = {}
        for tier, nbytes in fetched:
            if tier not in self.fast_tiers:
                by_tier[tier] = by_tier.get(tier, 0) + nbytes
        if by_tier:
            with self._lock:
                # Chunks of several tiers come in one parallel fetch: the slowest tier (by its
                # estimate, an unmeasured one first) gets the time the others are not expected to
                # take; in-process tiers (fast_tiers) are a copy and take ~none.
                def speed(t: str) -> float:
                    line = self.load.get(t)
                    c = line.coefficients() if line else None
                    return -1.0 if c is None else 1.0 / max(c[1], 1e-15)

                slow = min(by_tier, key=speed)
                others = sum(self.load[t].predict(n) or 0.0 for t, n in by_tier.items()
                             if t != slow and t in self.load)
                self.load.setdefault(slow, DecayedLine(self.decay)).add(
                    float(by_tier[slow]), max(seconds - others, 0.1 * seconds))
        self._local.pending = _Pending(num_tokens, loaded, time.perf_counter())

    def begin(self, num_tokens: int) -> None:
        self._local.pending = _Pending(num_tokens, 0, time.perf_counter())

    def end_prefill(self, num_tokens: int) -> None:
        pending: _Pending | None = getattr(self._local, "pending", None)
        self._local.pending = None
        if pending is None or pending.tokens != num_tokens:
            return
        seconds = time.perf_counter() - pending.since
        if 0 < seconds < self.MAX_PENDING_S and num_tokens > pending.loaded:
            self.observe_prefill(num_tokens - pending.loaded, seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= self.MIN_PREFILL_TOKENS and seconds > 0:
            with self._lock:
                self.prefill.add(float(tokens), seconds)

    # -- decision ------------------------------------------------------------------------
    def plan(self, lookup: "LookupResult", cap: int, skip_tokens: int,
             chunk_bytes: Callable[[int], int]) -> int:
        with self._lock:
            pre = self.prefill.coefficients()
            lines = {t: line.coefficients() for t, line in self.load.items()}
        if pre is None or cap <= skip_tokens:
            return cap
        per_token = pre[1]
        # Option i: load the hit through its i-th chunk, recompute the rest up to cap. Loading
        # costs each tier's line over its bytes; an unmeasured tier costs nothing (load, measure).
        options = [(min(skip_tokens, cap), (cap - skip_tokens) * per_token)]
        option_tier: list[str] = [""]  # the tier of the chunk option i loads last
        running: dict[str, int] = {}
        pos = 0
        for key, tier in zip(lookup.keys, lookup.tiers):
            if pos >= cap:
                break
            end = min(pos + key.num_tokens, cap)
            if end > skip_tokens:
                running[tier] = running.get(tier, 0) + chunk_bytes(end - max(pos, skip_tokens))
                load = sum(c[0] + c[1] * n for t, n in running.items()
                           if t not in self.fast_tiers and (c := lines.get(t)) is not None)
                options.append((end, load + (cap - end) * per_token))
                option_tier.append(tier)
            pos = end
        best = 0
        for i, (_, cost) in enumerate(options):
            if cost <= options[best][1]:  # ties: load (it saves compute for other requests)
                best = i
        self.planned += 1
        if self.planned % self.PROBE_EVERY == 0 and len(options) > 1:
            # now and then one chunk of a timed tier the other way, so neither estimate goes stale:
            # load one more (the tier is timed again) or recompute one more (a longer prefill)
            probe = best + 1 if best + 1 < len(options) else best - 1
            if option_tier[max(probe, best)] not in self.fast_tiers:
                best = probe
        choice = options[best][0]
        if choice < cap:
            self.skipped_tokens += cap - choice
        return choice

    def stats(self) -> dict[str, object]:
        with self._lock:
            pre = self.prefill.coefficients()
            out: dict[str, object] = {"policy": self.name, "planned": self.planned,
                                      "recomputed_hit_tokens": self.skipped_tokens}
            if pre is not None:
                out["prefill_tokens_per_s"] = 1.0 / pre[1] if pre[1] > 0 else float("inf")
                out["prefill_overhead_s"] = pre[0]
                out["prefill_clipped"] = self.prefill.clipped
            for t, line in self.load.items():
                c = line.coefficients()
                if c is not None:
                    out[f"load_bytes_per_s.{t}"] = 1.0 / c[1] if c[1] > 0 else float("inf")
                    out[f"load_latency_s.{t}"] = c[0]
                    out[f"load_clipped.{t}"] = line.clipped
        return out


def make_policy(config: "Config") -> LoadPolicy:
    """The policy ``config.load_policy`` names (``always`` when the key is absent)."""
    name = getattr(config, "load_policy", "always")
    if name == "adaptive":
        return AdaptivePolicy()
    return LoadPolicy()
