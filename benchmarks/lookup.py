"""Chunk-key hashing and tier lookup beside the bytes-hashing floor, in the same run.

For each prompt length (4K, 32K, 128K tokens by default) and input type, the median of
``--reps`` interleaved rounds of:

- ``hash``: :func:`lmcache_core.keys.chunk_keys` (256-token chunks, xxh3_128 chain);
- ``hit``: ``hash`` plus ``TierStack.lookup`` and ``pin`` of the hit chunks, as
  ``CacheEngine.lookup(pin=True)`` does, against a memory tier holding every chunk;
- ``miss``: ``hash`` plus ``TierStack.lookup`` against an empty memory tier;
- ``release``: the ``unpin`` a finished load does (not part of the goal, shown apart);
- ``hit cold``: ``hit`` after writing ``--evict-mib`` MiB (tokens, keys and the tier's index
  come from memory, as on a scheduler step after a forward pass); median of ``--cold-reps``.

Every other timed call follows an untimed one of the same kind (warm caches).

Input types: ``ndarray`` (int64), ``tensor`` (CPU torch int64, when torch imports), ``list``
(Python ints, converted each call: what vLLM hands) and the asked-again rows of
:class:`lmcache_core.keys.PrefixKeys`: ``list+again`` / ``ndarray+again``, a request whose
tokens grew by one chunk since its last lookup (the same list object, appended to).

References from the same run: ``floor``, one ``xxh3_128`` over the whole int64 token
buffer (what hashing the bytes costs at all), and ``convert``, ``np.fromiter`` of the list
into int64 (what a list costs before any hashing). ``--profile`` adds the top functions of
a cProfile of the 128K ``hit`` rows, to say what bounds them. The garbage collector is off
during each timed call (as in ``timeit``) and runs between rounds.

    python benchmarks/lookup.py                                   # table; JSON under benchmarks/results/
    python benchmarks/lookup.py --tokens 131072 --reps 101 --json out.json --profile
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xxhash

from lmcache_core.builtin.memory_store import MemoryStore
from lmcache_core.chunk import new_chunk
from lmcache_core.keys import Namespace, chunk_keys
from lmcache_core.layout import ChunkGeometry
from lmcache_core.memory import BufferPool
from lmcache_core.metrics import Metrics
from lmcache_core.storage import StoreContext
from lmcache_core.tiers import TierStack

try:
    from lmcache_core.keys import PrefixKeys
except ImportError:  # an older checkout (a before/after run): no asked-again rows
    PrefixKeys = None  # type: ignore[assignment,misc]

GOAL_MS = 1.0  # issue 12: lookup plus hashing under 1 ms for 128K tokens
GEOMETRY = ChunkGeometry(1, 1, 8, "float16")  # tiny chunks: the lookup does not read KV
NS = Namespace("bench/lookup@-#0", GEOMETRY.signature)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


class Case:
    """One prompt length: its tokens, a stack holding all its chunks and an empty one."""

    def __init__(self, tokens: int, chunk_size: int, seed: int) -> None:
        self.tokens = tokens
        self.chunk_size = chunk_size
        self.arr = np.random.default_rng(seed).integers(0, 152_000, tokens, dtype=np.int64)
        self.list = self.arr.tolist()
        self.pool = BufferPool()
        self.full = TierStack([MemoryStore(StoreContext(self.pool), None, "memory")], Metrics())
        self.empty = TierStack([MemoryStore(StoreContext(self.pool), None, "memory")], Metrics())
        self.keys = chunk_keys(self.arr, NS, chunk_size)
        for key in self.keys:
            chunk = new_chunk(self.pool, key, GEOMETRY, key.num_tokens)
            self.full.put(key, chunk)
            chunk.release()

    def close(self) -> None:
        self.full.close()
        self.empty.close()

    def inputs(self) -> dict[str, Callable[[], Callable[[], list]]]:
        """Input type -> a setup (untimed) returning the timed key computation."""
        out: dict[str, Callable[[], Callable[[], list]]] = {
            "ndarray": lambda: lambda: chunk_keys(self.arr, NS, self.chunk_size),
            "list": lambda: lambda: chunk_keys(self.list, NS, self.chunk_size),
        }
        try:
            import torch

            tensor = torch.from_numpy(self.arr.copy())
            out["tensor"] = lambda: lambda: chunk_keys(tensor, NS, self.chunk_size)
        except ImportError:
            pass
        if PrefixKeys is not None and self.tokens > self.chunk_size:
            grown = self.tokens - self.chunk_size

            def again_list() -> Callable[[], list]:
                cache = PrefixKeys(NS, self.chunk_size)
                tokens = self.list[:grown]
                cache.keys(tokens)
                tokens.extend(self.list[grown:])  # the request's one list, one chunk longer
                return lambda: cache.keys(tokens)

            def again_array() -> Callable[[], list]:
                cache = PrefixKeys(NS, self.chunk_size)
                cache.keys(self.arr[:grown])
                return lambda: cache.keys(self.arr)

            out["list+again"] = again_list
            out["ndarray+again"] = again_array
        return out


def measure(case: Case, reps: int, cold_reps: int = 0, evict_mib: int = 0) -> list[dict[str, Any]]:
    """Rows of one case; every round runs every input and operation once (interleaved).
    With ``cold_reps``, also ``hit_cold``: a hit timed after writing ``evict_mib`` MiB, so
    the tokens, keys and the tier's index come from memory, as on a scheduler step that
    follows a forward pass."""
    inputs = case.inputs()
    evict = np.ones(evict_mib << 17, dtype=np.float64) if cold_reps else None
    samples: dict[tuple[str, str], list[float]] = {}
    floor: list[float] = []
    convert: list[float] = []
    hits_seen: dict[str, int] = {}

    def timed(name: str, op: str, fn: Callable[[], Any]) -> Any:
        gc.disable()  # as timeit does: a collection lands on whichever call allocates at the time
        try:
            t0 = time.perf_counter()
            out = fn()
            samples.setdefault((name, op), []).append(time.perf_counter() - t0)
        finally:
            gc.enable()
        return out

    def hit(fn: Callable[[], list]) -> tuple:
        keys = fn()
        presence = case.full.lookup(keys)
        hit_keys = tuple(keys[:presence.hits])
        if hit_keys:
            case.full.pin(hit_keys)
        return hit_keys

    def miss(fn: Callable[[], list]) -> Any:
        return case.empty.lookup(fn())

    for _ in range(reps):
        gc.collect()
        for ref, fn in ((floor, lambda: xxhash.xxh3_128_digest(case.arr)),
                        (convert, lambda: np.fromiter(case.list, dtype=np.int64, count=len(case.list)))):
            fn()  # warm, like every timed call below
            t0 = time.perf_counter()
            fn()
            ref.append(time.perf_counter() - t0)
        for name, setup in inputs.items():
            # each timed call follows an untimed one of the same kind (warm caches for every row)
            for op in ("hash", "hit", "miss"):
                for warm in (True, False):
                    fn = setup()
                    call = fn if op == "hash" else partial(hit if op == "hit" else miss, fn)
                    if warm:
                        got = call()
                    else:
                        got = timed(name, op, call)
                    if op == "hit":
                        hits_seen[name] = len(got)
                        if warm:
                            case.full.unpin(got)
                        else:
                            timed(name, "release", partial(case.full.unpin, got))
    for _ in range(cold_reps):
        for name, setup in inputs.items():
            fn = setup()
            assert evict is not None
            evict += 1.0  # through every cache level
            case.full.unpin(timed(name, "hit_cold", partial(hit, fn)))
    floor_ms, convert_ms = _median_ms(floor), _median_ms(convert)
    rows = []
    for name in inputs:
        assert hits_seen[name] == len(case.keys), f"{name}: {hits_seen[name]} of {len(case.keys)} chunks hit"
        row: dict[str, Any] = {"tokens": case.tokens, "chunks": len(case.keys), "input": name,
                               "floor_ms": floor_ms, "convert_ms": convert_ms}
        for op in ("hash", "hit", "miss", "release"):
            row[f"{op}_ms"] = _median_ms(samples[(name, op)])
            row[f"{op}_min_ms"] = min(samples[(name, op)]) * 1e3
        if cold_reps:
            row["hit_cold_ms"] = _median_ms(samples[(name, "hit_cold")])
            row["evict_mib"] = evict_mib
        row["hit_over_floor"] = row["hit_ms"] / floor_ms if floor_ms else 0.0
        row["us_per_chunk_hit"] = row["hit_ms"] * 1e3 / len(case.keys)
        row["goal_met"] = row["hit_ms"] < GOAL_MS and row["miss_ms"] < GOAL_MS
        rows.append(row)
    return rows


def profile(case: Case, rounds: int, top: int) -> dict[str, str]:
    """cProfile text (top functions by own time) of ``rounds`` hit lookups per input type."""
    out = {}
    for name, setup in case.inputs().items():
        fns = [setup() for _ in range(rounds)]
        prof = cProfile.Profile()
        prof.enable()
        for fn in fns:
            keys = fn()
            hits = case.full.lookup(keys).hits
            case.full.pin(keys[:hits])
        prof.disable()
        for _ in fns:
            case.full.unpin(case.keys)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
        out[name] = text.getvalue()
    return out


def table(rows: list[dict[str, Any]]) -> str:
    cold = any("hit_cold_ms" in r for r in rows)
    head = (f"{'tokens':>7} {'input':<14} {'hash ms':>8} {'hit ms':>8} {'miss ms':>8} {'release':>8} "
            + (f"{'hit cold':>8} " if cold else "")
            + f"{'floor ms':>8} {'hit/floor':>9} {'convert':>8}  goal (<{GOAL_MS:g} ms)")
    lines = [head, "-" * len(head)]
    for r in rows:
        goal = "met" if r["goal_met"] else f"missed by {max(r['hit_ms'], r['miss_ms']) - GOAL_MS:.2f} ms"
        lines.append(f"{r['tokens']:>7} {r['input']:<14} {r['hash_ms']:>8.3f} {r['hit_ms']:>8.3f} "
                     f"{r['miss_ms']:>8.3f} {r['release_ms']:>8.3f} "
                     + (f"{r.get('hit_cold_ms', 0.0):>8.3f} " if cold else "")
                     + f"{r['floor_ms']:>8.3f} {r['hit_over_floor']:>8.1f}x {r['convert_ms']:>8.3f}  {goal}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="4096,32768,131072", help="prompt lengths, comma-separated")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=51, help="interleaved rounds; figures are medians")
    p.add_argument("--machine", default=os.environ.get("LMCACHE_MACHINE", "cpu"),
                   help="machine name in the default JSON path")
    p.add_argument("--json", default="", help="default benchmarks/results/lookup-<machine>-<date>.json")
    p.add_argument("--profile", action="store_true", help="add a cProfile of the longest prompt's hit lookups")
    p.add_argument("--cold-reps", type=int, default=15, help="rounds of hits after a cache flush (0: none)")
    p.add_argument("--evict-mib", type=int, default=256, help="MiB written before each cold hit")
    p.add_argument("--note", default="", help="free text kept in the JSON (e.g. the commit measured)")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.tokens.split(",") if x]
    rows: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}
    for i, n in enumerate(lengths):
        case = Case(n, args.chunk_size, seed=i)
        try:
            rows += measure(case, args.reps, args.cold_reps, args.evict_mib)
            if args.profile and n == max(lengths):
                profiles = profile(case, 50, 14)
        finally:
            case.close()
    print(table(rows))
    for name, text in profiles.items():
        print(f"\n-- profile, {max(lengths)} tokens, {name}, hit --\n{text}")
    report = {"benchmark": "lookup", "machine": args.machine, "host": platform.node(),
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
              "numpy": np.__version__, "xxhash": xxhash.VERSION, "chunk_size": args.chunk_size,
              "reps": args.reps, "cold_reps": args.cold_reps, "goal_ms": GOAL_MS, "note": args.note, "rows": rows, "profiles": profiles}
    path = Path(args.json or Path(__file__).parent / "results" / f"lookup-{args.machine}-{report['date']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
