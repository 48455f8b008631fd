"""The local-disk tier: one file per chunk, atomic writes, one LRU byte budget per directory.

``disk:///var/cache/lmcache?capacity=20GiB&direct=auto&mode=private``. Files are
``ROOT/<namespace>/<hh>/<digest>.kv`` holding the chunk image padded to 4096
bytes. Writes go to a temporary file then ``os.replace`` (readers see whole
files or nothing); reads land straight in a pooled, aligned buffer. Large
images use ``O_DIRECT`` where the filesystem allows it, which skips the page
cache copy. Recency survives restarts through file mtimes (touched on hits).

Several processes may share one root, and ``capacity`` is the directory's, not
each process's:

- ``ROOT/.lmcache-usage`` is a 32-byte ledger (bytes and files of the published
  chunks, and a publish counter). A process changes the directory's chunks
  only under an exclusive ``flock`` of that file: renaming a finished
  temporary file into place, evicting, deleting. The data is written before
  the lock is taken, so a write holds it for a ``pread`` and a ``pwrite`` of 32
  bytes, the rename and its victims' unlinks. ``flock`` locks an open file, so
  two stores in one process exclude each other as two processes do.
- Victims are the least recent unpinned chunks of the process's own index
  (what it wrote, read or found). When those do not free enough, or other
  processes published more than a quarter of its index since it last looked,
  it rescans the directory under the lock: the real usage becomes the
  ledger's and its index is rebuilt in mtime order (mtimes are touched on
  hits, so that order is the directory's recency). Pins protect a chunk only
  from the process that pinned it; one evicted by another process is a miss.
- Each start (a scan under the lock) and each rescan corrects the ledger, so a
  process killed between a rename and its ledger update costs at most one
  chunk over budget until then. Temporary files in flight are not counted.

``clear()`` removes only the namespaces this store wrote or read, or those it
is given (``clear(namespace=...)``), never another tenant's; ``clear(all_namespaces=True)``
empties the directory. Files are ``0600`` and directories ``0700``;
``mode=group`` shares the root with the group (directories ``2770``, chunk files
``0640``, the ledger ``0660``). A root this process cannot write (permissions,
a read-only mount) still serves reads; its writes are declined and counted.
Reads open with ``O_NONBLOCK | O_NOFOLLOW`` and ``fstat`` first: anything but a
regular file whose size matches its own 4 KiB header is a :class:`ChunkError`
(a FIFO never blocks a read, a huge sparse file is never allocated for).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
import urllib.parse
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..chunk import HEADER_SIZE, ChunkBuffer, decode_header
from ..errors import ChunkError, ConfigError
from ..keys import ChunkKey
from ..memory import ALIGN, PooledBuffer, round_up
from ..storage import (ByteStore, Health, ParsedURL, StoreCapabilities, StoreContext, Usage, clear_targets,
                       parse_url)
from .lru import LRUIndex

logger = logging.getLogger(__name__)

SUFFIX = ".kv"
TMP_PREFIX = ".tmp."
LEDGER_NAME = ".lmcache-usage"
DIRECT_MIN_BYTES = 1 << 20
RESCAN_MIN_INTERVAL_S = 1.0  # a rescan that could not free room is not repeated sooner
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass(frozen=True)
class FileModes:
    """Permission bits of what the disk tier creates (URL option ``mode``)."""

    dirs: int
    files: int
    ledger: int
    group: bool  # set explicitly after creation: a umask must not take the group's bits


MODES = {
    "private": FileModes(dirs=0o700, files=0o600, ledger=0o600, group=False),
    "group": FileModes(dirs=0o2770, files=0o640, ledger=0o660, group=True),
}


class Ledger:
    """Bytes and files of one directory's published chunks, shared by every process using it.

    A fixed record in ``ROOT/.lmcache-usage``, read and written only inside :meth:`locked`
    (an exclusive ``flock`` of the file, plus a thread lock for this store's threads).
    """

    _REC = struct.Struct("<8sqqq")  # magic, used bytes, files, publishes
    MAGIC = b"LMCUSE01"

    def __init__(self, path: Path, modes: FileModes) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, modes.ledger)
        if modes.group:
            try:
                os.fchmod(self._fd, modes.ledger)
            except OSError:  # another user created it; its mode is theirs to set
                pass
        self._lock = threading.Lock()
        self.used = 0
        self.files = 0
        self.publishes = 0
        self.valid = False  # False: absent or damaged, the caller rescans

    @contextmanager
    def locked(self) -> Iterator["Ledger"]:
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._load()
                before = (self.used, self.files, self.publishes, self.valid)
                yield self
                if (self.used, self.files, self.publishes, self.valid) != before:
                    os.pwrite(self._fd, self._REC.pack(self.MAGIC, max(self.used, 0), max(self.files, 0),
                                                       self.publishes), 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _load(self) -> None:
        raw = os.pread(self._fd, self._REC.size, 0)
        if len(raw) == self._REC.size:
            magic, used, files, publishes = self._REC.unpack(raw)
            if magic == self.MAGIC:
                self.used, self.files, self.publishes, self.valid = max(used, 0), max(files, 0), publishes, True
                return
        self.used = self.files = self.publishes = 0
        self.valid = False

    def reset(self, used: int, files: int) -> None:
        self.used, self.files, self.valid = used, files, True

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class DiskStore(ByteStore):
    schemes = ("disk", "file")
    capabilities = StoreCapabilities(persistent=True, shared=True, pinning=True)
    #: counts its own writes (``writes``, ``bytes_written``, ``skipped_writes``) and reports them
    #: through ``context.on_write(tier, nbytes)`` / ``context.on_skip(tier, n)`` where the engine
    #: gives those: a put that found the file there returns True but wrote nothing
    reports_writes = True

    def __init__(self, context: StoreContext, root: Path, capacity: int | None, direct: str = "auto",
                 name: str = "disk", mode: str = "private") -> None:
        super().__init__(name, context)
        if direct not in ("auto", "true", "false"):
            raise ConfigError(f"disk tier option direct must be auto, true or false, got {direct!r}")
        if mode not in MODES:
            raise ConfigError(f"disk tier option mode must be {' or '.join(MODES)}, got {mode!r}")
        self.root = root
        self.capacity = capacity
        self.direct = direct
        self.mode = mode
        self._modes = MODES[mode]
        self._direct_ok = bool(_O_DIRECT) and direct != "false"
        self._index: LRUIndex[ChunkKey] = LRUIndex(capacity)
        self._namespaces: set[bytes] = set()  # what clear() removes by default
        self._counts = threading.Lock()
        self.evictions = 0
        self.writes = 0  # chunk files this store published
        self.bytes_written = 0
        self.skipped_writes = 0  # puts of a chunk already on disk (this or another process wrote it)
        self.declined_writes = 0  # read-only root, or no room (pinned chunks, image over capacity)
        self.rescans = 0
        self.read_only = ""  # why the root is read-only, or ""
        self._seen_publishes = 0
        self._foreign_publishes = 0  # other processes' publishes since this store last rescanned
        self._last_failed_rescan = -RESCAN_MIN_INTERVAL_S
        self._closed = False
        self._ledger: Ledger | None = None
        self._make_root()
        self._scan()

    @classmethod
    def from_url(cls, url: str, context: StoreContext) -> "DiskStore":
        u = parse_url(url)
        u.check_options(["capacity", "direct", "mode"])
        return cls(context, _root_from_url(u), u.size_option("capacity"),
                   u.option("direct", "auto").lower(), mode=u.option("mode", "private").lower())

    # -- the root and the ledger -------------------------------------------------------
    def _make_root(self) -> None:
        if not self.root.is_dir():
            try:
                self.root.mkdir(parents=True, mode=self._modes.dirs)
                if self._modes.group:
                    os.chmod(self.root, self._modes.dirs)
            except FileExistsError:
                pass
            except OSError as exc:
                raise ConfigError(f"disk tier root {str(self.root)!r} cannot be created: {exc.strerror}") from exc
        if not os.access(self.root, os.W_OK):
            self._set_read_only(f"{self.root} is not writable")
            return
        try:
            self._ledger = Ledger(self.root / LEDGER_NAME, self._modes)
        except OSError as exc:
            if exc.errno not in _NOT_WRITABLE:
                raise ConfigError(f"disk tier ledger {self.root / LEDGER_NAME} cannot be opened: "
                                  f"{exc.strerror}") from exc
            self._set_read_only(f"{self.root / LEDGER_NAME}: {exc.strerror}")

    def _set_read_only(self, reason: str) -> None:
        if not self.read_only:
            self.read_only = reason
            logger.warning("disk tier %s is read-only (%s): serving reads, declining writes", self.root, reason)

    def _scan(self) -> None:
        """Rebuild the index from the files (oldest mtime first) and, under the lock, the ledger."""
        if self._ledger is None:
            found = self._walk()
            self._adopt(found)
        else:
            with self._ledger.locked() as ledger:
                found = self._walk(clean_tmp=True)
                self._adopt(found, ledger)
        if found:
            logger.info("disk tier %s: %d chunks, %d bytes from a previous run", self.root, len(found),
                        sum(s for _, _, s in found))

    def _adopt(self, found: list[tuple[float, ChunkKey, int]], ledger: Ledger | None = None) -> None:
        found.sort(key=lambda t: t[0])
        with self._index.lock:
            self._index.replace((key, size) for _, key, size in found)
        if ledger is not None:
            ledger.reset(sum(s for _, _, s in found), len(found))
            self._seen_publishes = ledger.publishes
            self._foreign_publishes = 0

    def _rescan(self, ledger: Ledger) -> None:
        """The directory's real usage and recency, under the ledger lock."""
        self._adopt(self._walk(), ledger)
        self.rescans += 1

    def _walk(self, namespace: bytes | None = None, clean_tmp: bool = False) -> list[tuple[float, ChunkKey, int]]:
        """(mtime, key, size) of every regular chunk file (of ``namespace`` only, if given)."""
        found: list[tuple[float, ChunkKey, int]] = []
        now = time.time()
        if namespace is not None:
            ns_dirs = [(namespace, self.root / namespace.hex())]
        else:
            ns_dirs = []
            for e in _scandir(self.root):
                if len(e.name) == 32 and e.is_dir(follow_symlinks=False):
                    try:
                        ns_dirs.append((bytes.fromhex(e.name), Path(e.path)))
                    except ValueError:
                        continue
        for ns, ns_dir in ns_dirs:
            for sub in _scandir(ns_dir):
                if not sub.is_dir(follow_symlinks=False):
                    continue
                for entry in _scandir(Path(sub.path)):
                    name = entry.name
                    if name.startswith(TMP_PREFIX):
                        if clean_tmp:
                            try:
                                if _stale_tmp(name, entry.stat(follow_symlinks=False).st_mtime, now):
                                    _unlink(Path(entry.path))
                            except OSError:
                                pass
                        continue
                    if not name.endswith(SUFFIX) or len(name) != 32 + len(SUFFIX):
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                        key = ChunkKey(ns, bytes.fromhex(name[:32]), 0)
                    except (OSError, ValueError):
                        continue
                    found.append((st.st_mtime, key, st.st_size))
        return found

    # -- files -------------------------------------------------------------------------
    def _path(self, key: ChunkKey) -> Path:
        d = key.digest.hex()
        return self.root / key.namespace.hex() / d[:2] / (d + SUFFIX)

    def _count(self, **deltas: int) -> None:
        with self._counts:
            for name, n in deltas.items():
                setattr(self, name, getattr(self, name) + n)
        self.report_writes(deltas.get("bytes_written", 0), deltas.get("skipped_writes", 0))

    def put(self, key: ChunkKey, chunk: ChunkBuffer) -> bool:
        """True when the chunk is on disk (written now or found there); False when declined."""
        path = self._path(key)
        self._namespaces.add(key.namespace)
        if os.path.isfile(path):
            with self._index.lock:
                self._index.touch(key)
            self._count(skipped_writes=1)
            return True
        ledger = self._ledger
        if ledger is None or self.read_only or self._closed:
            self._count(declined_writes=1)
            return False
        data = chunk.padded_image()
        size = len(data)
        if self.capacity is not None and size > self.capacity:
            logger.debug("disk tier %s: a %d-byte image exceeds the capacity %d", self.root, size, self.capacity)
            self._count(declined_writes=1)
            return False
        try:
            tmp = self._write_tmp(path, data)
        except OSError as exc:
            if exc.errno not in _NOT_WRITABLE:
                raise
            self._set_read_only(f"{path.parent}: {exc.strerror}")
            self._count(declined_writes=1)
            return False
        try:
            outcome, evicted = self._publish(ledger, key, path, tmp, size)
        except BaseException:
            _unlink(tmp)
            raise
        if evicted:
            self._count(evictions=evicted)
            if self.context.on_evict:
                self.context.on_evict(self.name, evicted)
        if outcome == "written":
            self._count(writes=1, bytes_written=size)
        elif outcome == "present":
            self._count(skipped_writes=1)
        else:
            logger.debug("disk tier %s full of pinned chunks; not writing %s", self.root, key)
            self._count(declined_writes=1)
        return outcome != "full"

    def _write(self, key: ChunkKey, image: memoryview, chunk: ChunkBuffer) -> None:
        self.put(key, chunk)

    def _publish(self, ledger: Ledger, key: ChunkKey, path: Path, tmp: Path, size: int) -> tuple[str, int]:
        """Rename ``tmp`` into place within the directory's budget: ("written" | "present" | "full", evicted)."""
        evicted = 0
        with ledger.locked():
            if not ledger.valid:
                self._rescan(ledger)
            if os.path.isfile(path):  # another process published it while we wrote
                _unlink(tmp)
                return "present", evicted
            self._foreign_publishes += ledger.publishes - self._seen_publishes
            self._seen_publishes = ledger.publishes
            if self.capacity is not None and ledger.used + size > self.capacity:
                with self._index.lock:
                    stale = self._foreign_publishes > max(64, len(self._index) // 4)
                if stale:
                    self._rescan(ledger)
                evicted, short = self._evict(ledger, ledger.used + size - self.capacity)
                if short > 0 and not stale and time.monotonic() - self._last_failed_rescan >= RESCAN_MIN_INTERVAL_S:
                    self._rescan(ledger)  # the bytes are other processes' chunks this index does not know
                    more, short = self._evict(ledger, ledger.used + size - self.capacity)
                    evicted += more
                    if short > 0:
                        self._last_failed_rescan = time.monotonic()
                if short > 0:
                    _unlink(tmp)
                    return "full", evicted
            os.replace(tmp, path)
            ledger.used += size
            ledger.files += 1
            ledger.publishes += 1
            self._seen_publishes = ledger.publishes
        with self._index.lock:
            self._index.add(key, size)
        return "written", evicted

    def _evict(self, ledger: Ledger, need: int) -> tuple[int, int]:
        """Remove least recent unpinned chunks until ``need`` bytes are free: (evicted, bytes still short)."""
        evicted = 0
        while need > 0:
            with self._index.lock:
                victims, _ = self._index.pick(need)
                for v in victims:
                    self._index.remove(v)
            if not victims:
                break
            for v in victims:
                removed, nbytes = self._remove_file(self._path(v), ledger)
                if removed:
                    evicted += 1
                    need -= nbytes
        return evicted, max(need, 0)

    @staticmethod
    def _remove_file(path: Path, ledger: Ledger) -> tuple[bool, int]:
        """Unlink a chunk's path under the ledger lock; (removed, bytes given back to the ledger)."""
        try:
            st = os.lstat(path)
            os.unlink(path)
        except FileNotFoundError:
            return False, 0  # another process removed it and gave its bytes back
        except OSError as exc:
            logger.warning("cannot remove %s: %s", path, exc)
            return False, 0
        if not stat.S_ISREG(st.st_mode):
            return True, 0  # never counted
        ledger.used -= st.st_size
        ledger.files -= 1
        return True, st.st_size

    def _makedirs(self, d: Path) -> None:
        if d.is_dir():
            return
        for level in (d.parent, d):
            try:
                os.mkdir(level, self._modes.dirs)
            except FileExistsError:
                continue
            if self._modes.group:
                os.chmod(level, self._modes.dirs)

    def _write_tmp(self, path: Path, data: memoryview) -> Path:
        self._makedirs(path.parent)
        tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}.{uuid.uuid4().hex}"
        try:
            self._write_file(tmp, data)
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    def _write_file(self, tmp: Path, data: memoryview) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
        use_direct = self._direct_ok and (self.direct == "true" or len(data) >= DIRECT_MIN_BYTES)
        fd = -1
        if use_direct:
            try:
                fd = os.open(tmp, flags | _O_DIRECT, self._modes.files)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                logger.info("disk tier %s: O_DIRECT unsupported here; using buffered I/O", self.root)
                self._direct_ok = False
        if fd < 0:
            fd = os.open(tmp, flags, self._modes.files)
        try:
            if self._modes.group:
                os.fchmod(fd, self._modes.files)
            view, done = data, 0
            while done < len(view):
                done += os.write(fd, view[done:])
        finally:
            os.close(fd)

    def _read(self, key: ChunkKey, alloc: Any) -> tuple[PooledBuffer, int] | None:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            with self._index.lock:
                self._index.remove(key)
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ChunkError(f"{path} is a symbolic link, not a chunk file") from exc
            raise
        buf: PooledBuffer | None = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ChunkError(f"{path} is not a regular file ({stat.filemode(st.st_mode)})")
            size = st.st_size
            head = os.pread(fd, HEADER_SIZE, 0)
            header = decode_header(head)  # before any allocation: a foreign file never sizes one
            if header.key != key:
                raise ChunkError(f"{path} holds key {header.key}")
            if not header.image_len <= size <= round_up(header.image_len):
                raise ChunkError(f"{path} is {size} bytes but its header describes a {header.image_len}-byte image")
            buf = alloc(max(size, ALIGN))
            mv = buf.memoryview(0, round_up(size))
            mv[: len(head)] = head
            done = len(head)
            if done < size and self._direct_ok and (self.direct == "true" or size >= DIRECT_MIN_BYTES):
                _set_direct(fd)
            while done < size:
                n = os.preadv(fd, [mv[done:]], done)
                if n == 0:
                    break
                done += n
        except BaseException:
            if buf is not None:
                buf.release()
            raise
        finally:
            os.close(fd)
        self._namespaces.add(key.namespace)
        with self._index.lock:
            if key not in self._index:
                self._index.add(key, size)  # written by another process
            self._index.touch(key)
        if not self.read_only:
            try:
                os.utime(path)  # recency that survives a restart and that other processes' rescans see
            except OSError:
                pass
        return buf, done

    # -- the rest of the contract ----------------------------------------------------------
    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [os.path.isfile(self._path(k)) for k in keys]

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        if not keys:
            return 0
        with self._index.lock:
            for k in keys:
                self._index.remove(k)
        ledger = self._ledger
        if ledger is None or self._closed:
            return sum(_unlink(self._path(k)) for k in keys)
        n = 0
        with ledger.locked():
            for k in keys:
                n += self._remove_file(self._path(k), ledger)[0]
        return n

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        self._index.pin_many(keys)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        self._index.unpin_many(keys)

    def usage(self) -> Usage:
        """The directory's usage (every process's chunks), from the ledger."""
        ledger = self._ledger
        if ledger is not None and not self._closed:
            with ledger.locked():
                return Usage(ledger.used, self.capacity, ledger.files)
        with self._index.lock:
            return Usage(self._index.used, self.capacity, len(self._index))

    def health(self) -> Health:
        if self.read_only:
            return Health(True, f"read-only: {self.read_only}")
        return Health(True)

    def clear(self, namespace: bytes | Iterable[bytes] | None = None, *, all_namespaces: bool = False) -> None:
        """Delete the chunks of ``namespace`` (one id or several), by default of the namespaces this
        store wrote or read; other tenants' chunks stay. ``all_namespaces`` empties the directory."""
        if all_namespaces:
            found = self._walk()
        else:
            targets = clear_targets(namespace, self._namespaces)
            found = [f for ns in sorted(targets) for f in self._walk(ns)]
            self._namespaces -= targets
        self.delete([key for _, key, _ in found])

    def close(self) -> None:
        self._closed = True
        if self._ledger is not None:
            self._ledger.close()


def _root_from_url(u: ParsedURL) -> Path:
    """The tier's root directory: an absolute path (``~`` expanded) that is not the filesystem root.

    A relative path (``disk://relative/dir``) would move with the working directory, and the root
    of the filesystem is no place for a tier that creates, scans and deletes files under it."""
    path = (u.netloc + u.path) if u.netloc else u.path
    if not path:
        raise ConfigError(f"{u.raw}: the disk tier needs a path, e.g. disk:///var/cache/lmcache")
    expanded = os.path.expanduser(path)
    if not os.path.isabs(expanded):
        absolute = Path(expanded).absolute()
        query = u.raw.partition("?")[2]
        fixed = f"{u.scheme}://{urllib.parse.quote(str(absolute))}" + (f"?{query}" if query else "")
        raise ConfigError(f"{u.raw}: {path!r} is a relative path (here it would be {str(absolute)!r}, and it changes "
                          f"with the working directory); write the absolute path after three slashes: {fixed}")
    root = Path(os.path.normpath(expanded))
    if root.parent == root or root.resolve().parent == root.resolve():
        raise ConfigError(f"{u.raw}: the disk tier's root would be the root of the filesystem ({path!r}); the tier "
                          f"creates, scans and deletes files under its root, so give it a directory of its own, "
                          f"e.g. {u.scheme}:///var/cache/lmcache")
    return Path(expanded).absolute()


def _set_direct(fd: int) -> None:
    """Turn on O_DIRECT for the rest of a read (the header came through the page cache)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("cannot remove %s: %s", path, exc)
        return False


def _stale_tmp(name: str, mtime: float, now: float) -> bool:
    """A temp file is stale when its writer process is gone or it is over an hour old."""
    try:
        pid = int(name[len(TMP_PREFIX):].split(".", 1)[0])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:
        pass
    return now - mtime > 3600
