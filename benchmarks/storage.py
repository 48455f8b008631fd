"""Storage tier throughput beside the raw client ceiling measured in the same run.

For each backend (redis, valkey, s3 on SeaweedFS, disk) and chunk size (4 MiB, 32 MiB):
``put`` and ``get`` through the lmcache store (sealed chunk images, verified on read, landing
in pooled buffers) against the same sizes through the raw client: a redis-py / valkey-py
SET/GET loop of ``bytes``, boto3 put_object/get_object().read(), and ``dd`` with O_DIRECT
for the disk. Servers are started on loopback by :mod:`lmcache_core.testing.servers`.

    python benchmarks/storage.py                    # all backends, table on stdout
    python benchmarks/storage.py --backends redis disk --sizes 4 --ops 8 --json out.json

The figures are single-client, sequential operations (one request in flight), the way a
tier writer thread or a reader thread uses a store; each is the median of ``--reps`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from lmcache_core.chunk import ChunkBuffer
from lmcache_core.memory import BufferPool
from lmcache_core.storage import Store, StoreContext
from lmcache_core.testing.servers import RedisServer, SeaweedS3
from lmcache_core.testing.storage_tests import LARGE_GEOMETRY, make_chunk, make_key

MiB = 1 << 20


@dataclass(frozen=True)
class Row:
    backend: str
    size_mib: int
    op: str
    store_gibs: float
    raw_gibs: float
    raw_what: str
    c_client_gibs: float = 0.0  # redis-benchmark, where it applies

    @property
    def ratio(self) -> float:
        return self.store_gibs / self.raw_gibs if self.raw_gibs else 0.0


def _rate(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / (1 << 30)


def _timed(fn: Callable[[], None], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_store(store: Store, pool: BufferPool, size: int, ops: int, reps: int) -> tuple[float, float]:
    """(put GiB/s, get GiB/s) of ``ops`` distinct chunks of ``size`` payload bytes through ``store``."""
    ns = uuid.uuid4().hex
    tokens = size // LARGE_GEOMETRY.bytes_per_token
    keys = [make_key(i, ns, num_tokens=tokens) for i in range(ops)]
    chunks: list[ChunkBuffer] = [make_chunk(pool, k, LARGE_GEOMETRY) for k in keys]
    nbytes = sum(c.header.image_len for c in chunks)

    def put() -> None:
        for k, c in zip(keys, chunks):
            store.put(k, c)

    def get() -> None:
        for k in keys:
            got = store.get(k)
            assert got is not None, f"{k} missing after put"
            got.release()

    try:
        put_t = []
        for _ in range(reps):  # content-addressed stores skip keys they hold: start each run empty
            store.delete(keys)
            put_t += _timed(put, 1)
        get_t = _timed(get, reps)
    finally:
        for c in chunks:
            c.release()
        store.delete(keys)
    return _rate(nbytes, put_t), _rate(nbytes, get_t)


def bench_raw_kv(client: Any, size: int, ops: int, reps: int) -> tuple[float, float]:
    """A plain SET/GET loop of ``bytes`` values with the library's default client (hiredis)."""
    value = os.urandom(size + 4096)
    names = [f"raw/{uuid.uuid4().hex}" for _ in range(ops)]

    def put() -> None:
        for n in names:
            client.set(n, value)

    def get() -> None:
        for n in names:
            assert len(client.get(n)) == len(value)

    put_t, get_t = _timed(put, reps), _timed(get, reps)
    client.delete(*names)
    return _rate(len(value) * ops, put_t), _rate(len(value) * ops, get_t)


def bench_redis_benchmark(port: int, size: int, ops: int) -> tuple[float, float]:
    """``redis-benchmark`` (a C client, one connection, no pipelining) SET and GET of ``size`` bytes."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return 0.0, 0.0
    n = max(ops * 4, 16)
    out = subprocess.run([exe, "-p", str(port), "-c", "1", "-n", str(n), "-d", str(size + 4096), "-t", "set,get",
                          "--csv"], capture_output=True, text=True, timeout=600).stdout
    rates: dict[str, float] = {}
    for line in out.splitlines():
        parts = [p.strip('"') for p in line.split(",")]
        if len(parts) > 1 and parts[0] in ("SET", "GET"):
            rates[parts[0]] = float(parts[1]) * (size + 4096) / (1 << 30)
    return rates.get("SET", 0.0), rates.get("GET", 0.0)


def bench_raw_s3(client: Any, bucket: str, size: int, ops: int, reps: int) -> tuple[float, float]:
    """boto3 put_object of ``bytes`` and get_object().read() (default client settings)."""
    value = os.urandom(size + 4096)
    names = [f"raw/{uuid.uuid4().hex}" for _ in range(ops)]

    def put() -> None:
        for n in names:
            client.put_object(Bucket=bucket, Key=n, Body=value)

    def get() -> None:
        for n in names:
            assert len(client.get_object(Bucket=bucket, Key=n)["Body"].read()) == len(value)

    put_t, get_t = _timed(put, reps), _timed(get, reps)
    for n in names:
        client.delete_object(Bucket=bucket, Key=n)
    return _rate(len(value) * ops, put_t), _rate(len(value) * ops, get_t)


def bench_raw_dd(root: Path, size: int, ops: int, reps: int) -> tuple[float, float]:
    """``dd`` with O_DIRECT: ``ops`` blocks of the chunk size written, then read back."""
    path = root / "dd.bin"
    bs = size + 4096
    w = ["dd", "if=/dev/zero", f"of={path}", f"bs={bs}", f"count={ops}", "oflag=direct", "status=none"]
    r = ["dd", f"if={path}", "of=/dev/null", f"bs={bs}", "iflag=direct", "status=none"]

    def put() -> None:
        subprocess.run(w, check=True)

    def get() -> None:
        subprocess.run(r, check=True)

    put_t, get_t = _timed(put, reps), _timed(get, reps)
    path.unlink(missing_ok=True)
    return _rate(bs * ops, put_t), _rate(bs * ops, get_t)


def _no_ceiling(size: int) -> tuple[float, float]:
    return 0.0, 0.0


def run(backends: list[str], sizes: list[int], ops: int, reps: int, disk_root: Path) -> list[Row]:
    rows: list[Row] = []
    pool = BufferPool(max_idle_bytes=2 << 30)
    ctx = StoreContext(pool)
    for backend in backends:
        cleanup: list[Callable[[], None]] = []
        c_client: Callable[[int], tuple[float, float]] = _no_ceiling
        try:
            if backend in ("redis", "valkey"):
                server = (RedisServer.redis() if backend == "redis" else RedisServer.valkey()).start()
                cleanup.append(server.close)
                if backend == "redis":
                    import redis

                    from lmcache_storage_redis.store import RedisStore as StoreCls
                    raw_client: Any = redis.Redis(port=server.port)
                else:
                    import valkey

                    from lmcache_storage_valkey.store import ValkeyStore as StoreCls  # type: ignore[assignment]
                    raw_client = valkey.Valkey(port=server.port)
                store: Store = StoreCls.from_url(server.url, ctx)
                raw: Callable[[int], tuple[float, float]] = partial(bench_raw_kv, raw_client, ops=ops, reps=reps)
                raw_what = f"{backend}-py SET/GET loop"
                c_client = partial(bench_redis_benchmark, server.port, ops=ops)
            elif backend == "s3":
                from lmcache_storage_s3.store import S3Store

                s3 = SeaweedS3().start()
                cleanup.append(s3.close)
                bucket = s3.create_bucket("bench")
                store = S3Store.from_url(s3.url(bucket, "lm"), ctx)
                s3_client = s3.client()
                raw = partial(bench_raw_s3, s3_client, bucket, ops=ops, reps=reps)
                raw_what = "boto3 put_object/get_object"
            elif backend == "disk":
                from lmcache_core.builtin.disk_store import DiskStore

                root = Path(tempfile.mkdtemp(prefix="lmcache-bench-", dir=disk_root))
                cleanup.append(partial(shutil.rmtree, root, ignore_errors=True))
                store = DiskStore.from_url(f"disk://{root}/store", ctx)
                raw = partial(bench_raw_dd, root, ops=ops, reps=reps)
                raw_what = "dd O_DIRECT"
            else:
                raise SystemExit(f"unknown backend {backend!r}; choose from redis, valkey, s3, disk")
            cleanup.append(store.close)
            for size_mib in sizes:
                size = size_mib * MiB
                bench_store(store, pool, size, 2, 1)  # warm-up: connections, pool buffers
                raw_put, raw_get = raw(size)
                put, get = bench_store(store, pool, size, ops, reps)
                c_put, c_get = c_client(size)
                rows.append(Row(backend, size_mib, "put", put, raw_put, raw_what, c_put))
                rows.append(Row(backend, size_mib, "get", get, raw_get, raw_what, c_get))
                print(f"{backend:7s} {size_mib:3d} MiB  put {put:6.2f} GiB/s (raw {raw_put:6.2f})  "
                      f"get {get:6.2f} GiB/s (raw {raw_get:6.2f})", file=sys.stderr)
        finally:
            for fn in reversed(cleanup):
                fn()
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| tier | chunk | op | lmcache store GiB/s | raw client GiB/s | store / raw | raw client "
             "| redis-benchmark GiB/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = f"{r.c_client_gibs:.2f}" if r.c_client_gibs else "-"
        lines.append(f"| {r.backend} | {r.size_mib} MiB | {r.op} | {r.store_gibs:.2f} | {r.raw_gibs:.2f} | "
                     f"{r.ratio:.0%} | {r.raw_what} | {c} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["redis", "valkey", "s3", "disk"])
    p.add_argument("--sizes", nargs="+", type=int, default=[4, 32], help="chunk payload sizes in MiB")
    p.add_argument("--ops", type=int, default=8, help="chunks per timed run")
    p.add_argument("--reps", type=int, default=5, help="timed runs per figure (the median is reported)")
    p.add_argument("--disk-root", type=Path, default=Path.cwd(), help="where the disk tier and dd write")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows = run(args.backends, args.sizes, args.ops, args.reps, args.disk_root)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "ratio": r.ratio} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
