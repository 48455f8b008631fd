"""The local-disk tier: one file per chunk, atomic writes, LRU under a byte budget across restarts.

``disk:///var/cache/lmcache?capacity=20GiB&direct=auto``. Files are
``ROOT/<namespace>/<hh>/<digest>.kv`` holding the chunk image padded to 4096
bytes. Writes go to a temporary file then ``os.replace`` (readers see whole
files or nothing); reads land straight in a pooled, aligned buffer. Large
images use ``O_DIRECT`` where the filesystem allows it, which skips the page
cache copy. Recency survives restarts through file mtimes (touched on hits).
The files are shared by every process using the same root: presence is
checked on the filesystem, the in-process index only drives eviction.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from ..chunk import ChunkBuffer
from ..errors import ConfigError
from ..keys import ChunkKey
from ..memory import ALIGN, PooledBuffer, round_up
from ..storage import ByteStore, Health, StoreCapabilities, StoreContext, Usage, parse_url
from .lru import LRUIndex

logger = logging.getLogger(__name__)

SUFFIX = ".kv"
TMP_PREFIX = ".tmp."
DIRECT_MIN_BYTES = 1 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class DiskStore(ByteStore):
    schemes = ("disk", "file")
    capabilities = StoreCapabilities(persistent=True, shared=True, pinning=True)

    def __init__(self, context: StoreContext, root: Path, capacity: int | None, direct: str = "auto",
                 name: str = "disk") -> None:
        super().__init__(name, context)
        if direct not in ("auto", "true", "false"):
            raise ConfigError(f"disk tier option direct must be auto, true or false, got {direct!r}")
        self.root = root
        self.direct = direct
        self._direct_ok = bool(_O_DIRECT) and direct != "false"
        self._index: LRUIndex[ChunkKey] = LRUIndex(capacity)
        self.evictions = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"disk tier root {str(root)!r} cannot be created: {exc.strerror}") from exc
        self._scan()

    @classmethod
    def from_url(cls, url: str, context: StoreContext) -> "DiskStore":
        u = parse_url(url)
        u.check_options(["capacity", "direct"])
        path = (u.netloc + u.path) if u.netloc else u.path
        if not path:
            raise ConfigError(f"{url}: the disk tier needs a path, e.g. disk:///var/cache/lmcache")
        return cls(context, Path(os.path.expanduser(path)).absolute(), u.size_option("capacity"),
                   u.option("direct", "auto").lower())

    # -- files -------------------------------------------------------------------------
    def _path(self, key: ChunkKey) -> Path:
        d = key.digest.hex()
        return self.root / key.namespace.hex() / d[:2] / (d + SUFFIX)

    def _scan(self) -> None:
        """Rebuild the LRU index from the files (oldest mtime first); drop stale temp files."""
        found: list[tuple[float, ChunkKey, int]] = []
        now = time.time()
        for ns_dir in _scandir(self.root):
            if not ns_dir.is_dir() or len(ns_dir.name) != 32:
                continue
            for sub in _scandir(Path(ns_dir.path)):
                if not sub.is_dir():
                    continue
                for entry in _scandir(Path(sub.path)):
                    name = entry.name
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    if name.startswith(TMP_PREFIX):
                        if _stale_tmp(name, st.st_mtime, now):
                            _unlink(Path(entry.path))
                        continue
                    if not name.endswith(SUFFIX) or len(name) != 32 + len(SUFFIX):
                        continue
                    try:
                        key = ChunkKey(bytes.fromhex(ns_dir.name), bytes.fromhex(name[:32]), 0)
                    except ValueError:
                        continue
                    found.append((st.st_mtime, key, st.st_size))
        found.sort(key=lambda t: t[0])
        with self._index.lock:
            for _, key, size in found:
                self._index.add(key, size)
        if found:
            logger.info("disk tier %s: %d chunks, %d bytes from a previous run", self.root, len(found),
                        self._index.used)

    def _write(self, key: ChunkKey, image: memoryview, chunk: ChunkBuffer) -> None:
        path = self._path(key)
        if path.exists():
            with self._index.lock:
                self._index.touch(key)
            return
        data = chunk.padded_image()
        size = len(data)
        with self._index.lock:
            victims = self._index.make_room(size)
            if victims is None:
                logger.debug("disk tier full of pinned chunks; not writing %s", key)
                return
            for victim in victims:
                self._index.remove(victim)
            self._index.add(key, size)  # reserve before writing, so concurrent writers see it
        for victim in victims:
            _unlink(self._path(victim))
        self.evictions += len(victims)
        if victims and self.context.on_evict:
            self.context.on_evict(self.name, len(victims))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}.{uuid.uuid4().hex}"
        try:
            self._write_file(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            with self._index.lock:
                self._index.remove(key)
            raise

    def _write_file(self, tmp: Path, data: memoryview) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        use_direct = self._direct_ok and (self.direct == "true" or len(data) >= DIRECT_MIN_BYTES)
        fd = -1
        if use_direct:
            try:
                fd = os.open(tmp, flags | _O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                logger.info("disk tier %s: O_DIRECT unsupported here; using buffered I/O", self.root)
                self._direct_ok = False
        if fd < 0:
            fd = os.open(tmp, flags, 0o644)
        try:
            view, done = data, 0
            while done < len(view):
                done += os.write(fd, view[done:])
        finally:
            os.close(fd)

    def _read(self, key: ChunkKey, alloc: Any) -> tuple[PooledBuffer, int] | None:
        path = self._path(key)
        try:
            fd = self._open_read(path)
        except FileNotFoundError:
            with self._index.lock:
                self._index.remove(key)
            return None
        buf: PooledBuffer | None = None
        try:
            size = os.fstat(fd).st_size
            buf = alloc(max(size, ALIGN))
            mv = buf.memoryview(0, round_up(size))
            done = 0
            while done < size:
                n = os.readv(fd, [mv[done:]])
                if n == 0:
                    break
                done += n
        except BaseException:
            if buf is not None:
                buf.release()
            raise
        finally:
            os.close(fd)
        with self._index.lock:
            if key not in self._index:
                self._index.add(key, size)  # written by another process
            self._index.touch(key)
        try:
            os.utime(path)  # recency that survives a restart
        except OSError:
            pass
        return buf, done

    def _open_read(self, path: Path) -> int:
        if self._direct_ok:
            try:
                return os.open(path, os.O_RDONLY | _O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        return os.open(path, os.O_RDONLY)

    # -- the rest of the contract ----------------------------------------------------------
    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [self._path(k).exists() for k in keys]

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        n = 0
        for k in keys:
            with self._index.lock:
                self._index.remove(k)
            n += _unlink(self._path(k))
        return n

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        self._index.pin_many(keys)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        self._index.unpin_many(keys)

    def usage(self) -> Usage:
        with self._index.lock:
            return Usage(self._index.used, self._index.capacity, len(self._index))

    def health(self) -> Health:
        if not os.access(self.root, os.W_OK):
            return Health(False, f"{self.root} is not writable")
        return Health(True)

    def clear(self) -> None:
        with self._index.lock:
            keys = list(self._index)
        self.delete(keys)


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
