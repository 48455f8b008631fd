"""The disk tier shared between processes and stores: one capacity per directory, per-namespace
clear, file modes, read-only roots, hostile files at chunk paths, skipped-write counters."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Iterator

import pytest

from lmcache_core.builtin.disk_store import LEDGER_NAME, DiskStore
from lmcache_core.errors import ChunkError
from lmcache_core.keys import ChunkKey
from lmcache_core.memory import BufferPool
from lmcache_core.storage import StoreContext
from lmcache_core.testing.storage_tests import LARGE_GEOMETRY, assert_chunk_is, make_chunk, make_key

MiB = 1 << 20
CHUNK_TOKENS = 64  # 1 MiB of KV in LARGE_GEOMETRY (plus the 4 KiB header)


@pytest.fixture
def pool() -> Iterator[BufferPool]:
    p = BufferPool(max_idle_bytes=64 << 20)
    yield p
    assert p.live_count() == 0, f"{p.live_count()} pool buffers leaked"


def _store(root: Path, pool: BufferPool, query: str = "capacity=10MiB") -> DiskStore:
    return DiskStore.from_url(f"disk://{root}?{query}", StoreContext(pool))


def _put(store: DiskStore, pool: BufferPool, key: ChunkKey, geometry=LARGE_GEOMETRY) -> bool:  # type: ignore[no-untyped-def]
    c = make_chunk(pool, key, geometry)
    try:
        return store.put(key, c)
    finally:
        c.release()


def _chunk_files(root: Path) -> list[Path]:
    return [p for p in root.glob("*/*/*.kv") if p.is_file()]


def _dir_usage(root: Path) -> int:
    return sum(p.stat().st_size for p in _chunk_files(root))


# -- one capacity per directory ---------------------------------------------------------------
_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from lmcache_core.builtin.disk_store import DiskStore
    from lmcache_core.memory import BufferPool
    from lmcache_core.storage import StoreContext
    from lmcache_core.testing.storage_tests import LARGE_GEOMETRY, make_chunk, make_key

    root, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pool = BufferPool()
    store = DiskStore.from_url(f"disk://{root}?capacity=10MiB", StoreContext(pool))
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # start together
    for i in range(n):
        key = make_key(i, name, num_tokens=64)
        c = make_chunk(pool, key, LARGE_GEOMETRY)
        try:
            assert store.put(key, c), f"put {i} declined"
        finally:
            c.release()
    print(store.writes, store.evictions)
    store.close()
""")


def test_two_processes_share_one_capacity(tmp_path: Path) -> None:
    """The issue's reproduction: two processes with capacity=10MiB on one directory once left 18 MiB."""
    root = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(root), f"proc-{i}", "14"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    writes = sum(int(o.split()[0]) for o in outs)
    assert writes == 28, outs
    used = _dir_usage(root)
    assert used <= 10 * MiB, f"the directory holds {used / MiB:.1f} MiB, over its 10 MiB capacity"
    assert used >= 8 * MiB, f"only {used / MiB:.1f} MiB kept: evictions went further than needed"
    pool = BufferPool()
    s = _store(root, pool)
    try:
        assert s.usage().used_bytes == used  # the ledger agrees with the files
    finally:
        s.close()


def test_two_stores_one_directory_share_capacity_and_evict_each_other(tmp_path: Path, pool: BufferPool) -> None:
    a = _store(tmp_path, pool)
    b = _store(tmp_path, pool)  # empty index: a's chunks are unknown to it
    try:
        for i in range(9):
            assert _put(a, pool, make_key(i, "a", num_tokens=CHUNK_TOKENS))
        for i in range(9):
            assert _put(b, pool, make_key(i, "b", num_tokens=CHUNK_TOKENS))
            assert _dir_usage(tmp_path) <= 10 * MiB
        assert b.rescans >= 1, "b had to learn a's chunks from the directory to evict them"
        assert b.usage().used_bytes == a.usage().used_bytes == _dir_usage(tmp_path)
        assert b.usage().items == len(_chunk_files(tmp_path))
        b_keys = [make_key(i, "b", num_tokens=CHUNK_TOKENS) for i in range(9)]
        assert all(b.exists(b_keys[-5:])), "the newest chunks survive"
    finally:
        a.close()
        b.close()


def test_pinned_chunks_are_not_evicted_and_full_is_declined(tmp_path: Path, pool: BufferPool) -> None:
    s = _store(tmp_path, pool, "capacity=3MiB")
    try:
        keys = [make_key(i, "p", num_tokens=CHUNK_TOKENS) for i in range(3)]
        for k in keys[:2]:
            assert _put(s, pool, k)
        s.pin(keys[:2])
        assert not _put(s, pool, keys[2]), "no room without evicting a pinned chunk"
        assert s.declined_writes == 1 and s.exists(keys) == [True, True, False]
        s.unpin(keys[:1])
        assert _put(s, pool, keys[2])
        assert s.exists(keys) == [False, True, True]
    finally:
        s.close()


def test_damaged_ledger_is_rebuilt_from_the_files(tmp_path: Path, pool: BufferPool) -> None:
    s = _store(tmp_path, pool)
    try:
        for i in range(3):
            assert _put(s, pool, make_key(i, "l", num_tokens=CHUNK_TOKENS))
        (tmp_path / LEDGER_NAME).write_bytes(b"garbage")
        assert _put(s, pool, make_key(3, "l", num_tokens=CHUNK_TOKENS))
        assert s.usage().used_bytes == _dir_usage(tmp_path)
        assert s.usage().items == 4
    finally:
        s.close()


# -- writes that are skipped are not writes ---------------------------------------------------
def test_skipped_writes_are_counted_apart(tmp_path: Path, pool: BufferPool) -> None:
    a, b = _store(tmp_path, pool), _store(tmp_path, pool)
    key = make_key(1, "skip", num_tokens=CHUNK_TOKENS)
    try:
        assert _put(a, pool, key) and _put(a, pool, key)
        assert _put(b, pool, key)  # another writer: the file is there already
        size = _dir_usage(tmp_path)
        assert (a.writes, a.bytes_written, a.skipped_writes) == (1, size, 1)
        assert (b.writes, b.bytes_written, b.skipped_writes) == (0, 0, 1)
        assert a.usage().items == 1
    finally:
        a.close()
        b.close()


# -- clear is per namespace ---------------------------------------------------------------------
def test_clear_removes_only_this_stores_namespaces(tmp_path: Path, pool: BufferPool) -> None:
    a, b = _store(tmp_path, pool), _store(tmp_path, pool)
    ka = [make_key(i, "tenant-a", num_tokens=4) for i in range(3)]
    kb = [make_key(i, "tenant-b", num_tokens=4) for i in range(3)]
    try:
        for k in ka:
            assert _put(a, pool, k)
        for k in kb:
            assert _put(b, pool, k)
        b.clear()
        assert a.exists(ka) == [True] * 3, "tenant b's clear() deleted tenant a's chunks"
        assert a.exists(kb) == [False] * 3
        assert a.usage().items == 3
        b.clear(namespace=ka[0].namespace)  # an explicit namespace
        assert a.exists(ka) == [False] * 3
        assert _put(a, pool, ka[0]) and _put(b, pool, kb[0])
        a.clear(all_namespaces=True)
        assert _chunk_files(tmp_path) == [] and a.usage().used_bytes == 0
    finally:
        a.close()
        b.close()


# -- file modes -----------------------------------------------------------------------------------
def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_files_are_private_by_default(tmp_path: Path, pool: BufferPool) -> None:
    root = tmp_path / "private"
    s = _store(root, pool)
    key = make_key(1, "m", num_tokens=4)
    try:
        assert _put(s, pool, key)
        path = s._path(key)
        assert _mode(root) == 0o700
        assert _mode(path.parent) == 0o700 and _mode(path.parent.parent) == 0o700
        assert _mode(path) == 0o600 and _mode(root / LEDGER_NAME) == 0o600
    finally:
        s.close()


def test_mode_group_shares_with_the_group_despite_the_umask(tmp_path: Path, pool: BufferPool) -> None:
    root = tmp_path / "group"
    old = os.umask(0o077)
    try:
        s = _store(root, pool, "mode=group")
        key = make_key(1, "m", num_tokens=4)
        assert _put(s, pool, key)
    finally:
        os.umask(old)
    try:
        path = s._path(key)
        assert _mode(root) == 0o2770 and _mode(path.parent) == 0o2770
        assert _mode(path) == 0o640 and _mode(root / LEDGER_NAME) == 0o660
    finally:
        s.close()


def test_bad_mode_option_names_the_choices(tmp_path: Path, pool: BufferPool) -> None:
    from lmcache_core.errors import ConfigError

    with pytest.raises(ConfigError, match="private or group"):
        _store(tmp_path, pool, "mode=world")


# -- read-only roots serve reads ------------------------------------------------------------------
def _fill(root: Path, pool: BufferPool, keys: list[ChunkKey]) -> None:
    s = _store(root, pool)
    try:
        for k in keys:
            assert _put(s, pool, k)
    finally:
        s.close()


def _check_serves_reads(root: Path, pool: BufferPool, keys: list[ChunkKey]) -> None:
    s = _store(root, pool)
    try:
        assert s.health().ok, s.health().reason
        assert s.read_only and "read-only" in s.health().reason
        assert s.exists(keys) == [True] * len(keys)
        got = s.get(keys[0])
        try:
            assert_chunk_is(got, keys[0], LARGE_GEOMETRY)
        finally:
            if got is not None:
                got.release()
        assert not _put(s, pool, make_key(99, "ro", num_tokens=4)), "a write to a read-only root succeeded"
        assert s.declined_writes == 1
        assert s.usage().items == len(keys)
    finally:
        s.close()


def test_chmod_0555_root_still_serves_reads(tmp_path: Path, pool: BufferPool) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 0555 does not stop root's writes (the bind-mount test covers it)")
    root = tmp_path / "ro"
    keys = [make_key(i, "ro", num_tokens=CHUNK_TOKENS) for i in range(2)]
    _fill(root, pool, keys)
    dirs = [root, *[p for p in root.rglob("*") if p.is_dir()]]
    for d in dirs:
        d.chmod(0o555)
    try:
        _check_serves_reads(root, pool, keys)
    finally:
        for d in dirs:
            d.chmod(0o700)


def test_read_only_mount_still_serves_reads(tmp_path: Path, pool: BufferPool) -> None:
    src, root = tmp_path / "src", tmp_path / "mnt"
    keys = [make_key(i, "ro", num_tokens=CHUNK_TOKENS) for i in range(2)]
    _fill(src, pool, keys)
    root.mkdir()
    bind = subprocess.run(["mount", "--bind", str(src), str(root)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs CAP_SYS_ADMIN): {bind.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(root)], capture_output=True, text=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only: {ro.stderr.strip()}")
        _check_serves_reads(root, pool, keys)
    finally:
        subprocess.run(["umount", str(root)], check=False)


# -- hostile files at chunk paths -----------------------------------------------------------------
def test_fifo_at_a_chunk_path_never_blocks_a_read(tmp_path: Path, pool: BufferPool) -> None:
    s = _store(tmp_path, pool)
    key = make_key(1, "fifo", num_tokens=4)
    path = s._path(key)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    outcome: list[BaseException | object] = []
    t = threading.Thread(target=lambda: outcome.append(_get_outcome(s, key)), daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader so the test run can go on, then fail
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail("a read of a FIFO at a chunk path blocked")
    try:
        assert isinstance(outcome[0], ChunkError) and "not a regular file" in str(outcome[0])
        assert s.exists([key]) == [False]
        assert _put(s, pool, key, LARGE_GEOMETRY) and path.is_file() and s.writes == 1  # healed
    finally:
        s.close()


def _get_outcome(s: DiskStore, key: ChunkKey) -> object:
    try:
        got = s.get(key)
    except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
        return exc
    if got is not None:
        got.release()
    return got


@pytest.mark.parametrize("header", ["zeros", "valid-header"])
def test_huge_sparse_file_is_never_allocated_for(tmp_path: Path, pool: BufferPool, header: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    s = _store(tmp_path, pool)
    key = make_key(1, "sparse", num_tokens=4)
    path = s._path(key)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        if header == "valid-header":
            c = make_chunk(pool, key, LARGE_GEOMETRY)
            f.write(bytes(c.image()))
            c.release()
        f.truncate(2 << 30)  # 2 GiB, sparse
    asked: list[int] = []
    real = pool.acquire

    def spy(n: int):  # type: ignore[no-untyped-def]
        asked.append(n)
        return real(n)

    monkeypatch.setattr(pool, "acquire", spy)
    try:
        with pytest.raises(ChunkError):
            s.get(key)
        assert not asked or max(asked) < 8 * MiB, f"a {max(asked)}-byte buffer was allocated for a sparse file"
        assert s.delete([key]) == 1
    finally:
        s.close()


def test_symlink_at_a_chunk_path_is_not_followed(tmp_path: Path, pool: BufferPool) -> None:
    s = _store(tmp_path / "root", pool)
    key = make_key(1, "link", num_tokens=4)
    target = tmp_path / "elsewhere.kv"
    c = make_chunk(pool, key, LARGE_GEOMETRY)
    target.write_bytes(bytes(c.image()))
    c.release()
    path = s._path(key)
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    try:
        with pytest.raises(ChunkError, match="symbolic link"):
            s.get(key)
    finally:
        s.close()


def test_writes_and_skips_reach_the_context_callbacks(tmp_path: Path, pool: BufferPool) -> None:
    """What the tier stack's write metric needs (a skipped put returns True but wrote nothing)."""
    ctx = StoreContext(pool)
    wrote: list[tuple[str, int]] = []
    skipped: list[tuple[str, int]] = []
    ctx.on_write = lambda tier, n: wrote.append((tier, n))  # type: ignore[attr-defined]
    ctx.on_skip = lambda tier, n: skipped.append((tier, n))  # type: ignore[attr-defined]
    s = DiskStore.from_url(f"disk://{tmp_path}", ctx)
    key = make_key(1, "cb", num_tokens=CHUNK_TOKENS)
    try:
        assert DiskStore.reports_writes
        assert _put(s, pool, key) and _put(s, pool, key)
        assert wrote == [("disk", _dir_usage(tmp_path))] and skipped == [("disk", 1)]
    finally:
        s.close()
