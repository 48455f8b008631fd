"""A cache tier on an S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph RGW), through boto3.

``s3://bucket/prefix?endpoint_url=http://host:8333&region=us-east-1&path_style=true``.
Credentials come from boto3's usual chain (environment, shared config and
credential files, ``profile=``, instance or container roles) unless the URL
names ``access_key_id``/``secret_access_key``. One object per chunk, holding
the sealed chunk image, under ``<prefix>/<namespace-hex>/<digest-hex>``.

Transfers: objects up to ``multipart_threshold`` go in one PUT; larger ones as
a multipart upload of ``part_size`` parts, ``concurrency`` at a time. Reads
of objects larger than ``part_size`` fetch the remaining ranges concurrently,
straight into one pooled buffer. Retries use botocore's ``standard`` mode
(exponential backoff with jitter, ``max_attempts``).

Copies, per chunk:

- put: none here. The body is a file-like view of the caller's buffer whose
  ``read`` returns ``memoryview`` slices, which urllib3 hands to ``sendall``
  as they are. botocore's optional request checksums are switched off
  (``when_required``): the chunk header already carries an xxh3 checksum.
- get: one copy that urllib3 forces (``HTTPResponse.readinto`` reads into a
  temporary ``bytes`` then copies), landing in the pooled buffer.

``ttl=SECONDS`` makes objects older than that a miss (and deletes them); S3
has no per-object expiry, so pair it with a bucket lifecycle rule to reclaim space.

Writes never upload an object another instance already wrote: a put HEADs the
key first (in parallel for a batch) and uploads only a missing or expired one,
with ``If-None-Match: *`` on the PUT or on completing a multipart upload
(``conditional=true``, the default), so a writer that loses a race leaves the
first object in place (412, counted as skipped). A server that answers the
condition with NotImplemented makes the store fall back to plain PUTs, logged
once. ``writes``/``bytes_written`` count objects this store uploaded,
``skipped_writes`` the puts that found the object there. ``clear()`` and
``usage()`` take only ``<prefix>/<32 hex>/<32 hex>`` objects (never a longer
prefix's), ``clear()`` only the namespaces this store used unless told otherwise.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

from lmcache_core.chunk import ChunkBuffer
from lmcache_core.errors import ConfigError
from lmcache_core.keys import ChunkKey
from lmcache_core.memory import PooledBuffer
from lmcache_core.storage import ByteStore, Health, StoreCapabilities, StoreContext, Usage, clear_targets, parse_url

logger = logging.getLogger(__name__)

OPTIONS = (
    "endpoint_url", "region", "path_style", "profile", "access_key_id", "secret_access_key", "session_token",
    "multipart_threshold", "part_size", "concurrency", "max_attempts", "connect_timeout", "read_timeout",
    "ttl", "create_bucket", "conditional",
)
MIN_PART = 5 << 20  # S3's smallest multipart part (except the last)


@dataclass(frozen=True)
class S3Options:
    bucket: str
    prefix: str
    endpoint_url: str | None
    region: str | None
    path_style: bool
    profile: str | None
    access_key_id: str | None
    secret_access_key: str | None
    session_token: str | None
    multipart_threshold: int
    part_size: int
    concurrency: int
    max_attempts: int
    connect_timeout: float
    read_timeout: float
    ttl: int | None
    create_bucket: bool
    conditional: bool = True

    @classmethod
    def from_url(cls, url: str) -> "S3Options":
        u = parse_url(url)
        u.check_options(OPTIONS)
        if u.scheme != "s3":
            raise ConfigError(f"{url}: scheme must be s3://")
        if not u.netloc:
            raise ConfigError(f"{url}: name the bucket, e.g. s3://my-bucket/lmcache")
        if (u.option("access_key_id") is None) != (u.option("secret_access_key") is None):
            raise ConfigError(f"{url}: give both access_key_id and secret_access_key, or neither "
                              "(to use the default credential chain)")
        part = u.size_option("part_size", 16 << 20) or 0
        if part < MIN_PART:
            raise ConfigError(f"{url}: part_size must be at least 5MiB (S3's minimum), got {part}")
        ttl = u.int_option("ttl", 0) or None
        opts = cls(
            bucket=u.netloc, prefix=u.path.strip("/"), endpoint_url=u.option("endpoint_url"),
            region=u.option("region"), path_style=u.bool_option("path_style", False),
            profile=u.option("profile"), access_key_id=u.option("access_key_id"),
            secret_access_key=u.option("secret_access_key"), session_token=u.option("session_token"),
            multipart_threshold=u.size_option("multipart_threshold", 64 << 20) or 0, part_size=part,
            concurrency=u.int_option("concurrency", 8), max_attempts=u.int_option("max_attempts", 3),
            connect_timeout=u.float_option("connect_timeout", 2.0),
            read_timeout=u.float_option("read_timeout", 30.0), ttl=ttl,
            create_bucket=u.bool_option("create_bucket", False),
            conditional=u.bool_option("conditional", True),
        )
        if opts.concurrency < 1 or opts.max_attempts < 1:
            raise ConfigError(f"{url}: concurrency and max_attempts must be >= 1")
        return opts

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint_url or 'AWS'}"


class ViewReader(io.RawIOBase):
    """A seekable, read-only file over a memoryview whose ``read`` returns views, not copies."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._view)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = min(max(base + offset, 0), len(self._view))
        return self._pos

    def read(self, size: int | None = -1) -> memoryview:  # type: ignore[override]
        end = len(self._view) if size is None or size < 0 else min(self._pos + size, len(self._view))
        out = self._view[self._pos : end]
        self._pos = end
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class S3Store(ByteStore):
    """Chunks as objects in one bucket under one prefix. Thread-safe (boto3 clients are)."""

    schemes = ("s3",)
    capabilities = StoreCapabilities(persistent=True, shared=True, ttl=True)
    #: counts its own writes (``writes``, ``bytes_written``, ``skipped_writes``) and reports them
    #: through ``context.on_write(tier, nbytes)`` / ``context.on_skip(tier, n)`` where the engine
    #: gives those: a put that found the value there returns True but uploaded nothing
    reports_writes = True

    def __init__(self, context: StoreContext, options: S3Options, name: str = "s3") -> None:
        super().__init__(name, context)
        self.options = options
        self._client: Any = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._bucket_checked = False
        self._conditional = options.conditional  # turned off when the server does not support it
        self._namespaces: set[bytes] = set()  # what clear() deletes by default
        self._counts = threading.Lock()
        self.writes = 0  # objects this store uploaded
        self.bytes_written = 0
        self.skipped_writes = 0  # puts of an object some instance had already written (not uploaded)

    @classmethod
    def from_url(cls, url: str, context: StoreContext) -> "S3Store":
        return cls(context, S3Options.from_url(url))

    # -- the client (built on first use; building never touches the network) --------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._closed:
                    raise ConnectionError(f"{self.name} tier is closed")
                if self._client is None:
                    self._client = self._build_client()
        return self._client

    def _build_client(self) -> Any:
        import boto3
        from botocore.config import Config

        o = self.options
        session = boto3.session.Session(profile_name=o.profile) if o.profile else boto3.session.Session()
        cfg = Config(
            region_name=o.region, connect_timeout=o.connect_timeout, read_timeout=o.read_timeout,
            retries={"max_attempts": o.max_attempts, "mode": "standard"},
            max_pool_connections=max(10, 2 * o.concurrency),
            s3={"addressing_style": "path" if o.path_style else "auto"},
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        return session.client("s3", endpoint_url=o.endpoint_url, aws_access_key_id=o.access_key_id,
                               aws_secret_access_key=o.secret_access_key, aws_session_token=o.session_token,
                               config=cfg)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.options.concurrency, thread_name_prefix=f"lmcache-{self.name}")
        return self._pool

    def object_key(self, key: ChunkKey) -> str:
        """``<prefix>/<namespace-hex>/<digest-hex>``: the namespace keeps models and tenants apart."""
        return f"{self.options.prefix}/{key.path}" if self.options.prefix else key.path

    @staticmethod
    def _code(exc: Exception) -> str:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def _is_missing(self, exc: Exception) -> bool:
        return self._code(exc) in ("404", "NoSuchKey", "NotFound")

    def _expired(self, last_modified: datetime | None) -> bool:
        ttl = self.options.ttl
        return bool(ttl and last_modified is not None
                    and (datetime.now(timezone.utc) - last_modified).total_seconds() > ttl)

    # -- writes --------------------------------------------------------------------------------
    def put(self, key: ChunkKey, chunk: ChunkBuffer) -> bool:
        return self.put_many([(key, chunk)])[0]

    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkBuffer]]) -> list[bool]:
        """HEAD every key (in parallel), upload the missing and expired ones one by one."""
        if not items:
            return []
        for key, _ in items:
            self._namespaces.add(key.namespace)
        keys = [k for k, _ in items]
        states = [self._state(keys[0])] if len(keys) == 1 else list(self._executor().map(self._state, keys))
        for (key, chunk), state in zip(items, states):
            if state == "fresh":
                self._count(skipped=1)
                continue
            # An expired object is overwritten: a conditional put would keep the stale one forever.
            if self._upload(key, chunk.image(), conditional=self._conditional and state == "missing"):
                self._count(written=1, nbytes=chunk.header.image_len)
            else:
                self._count(skipped=1)
        return [True] * len(items)

    def _write(self, key: ChunkKey, image: memoryview, chunk: ChunkBuffer) -> None:
        self.put(key, chunk)

    def _count(self, written: int = 0, nbytes: int = 0, skipped: int = 0) -> None:
        with self._counts:
            self.writes += written
            self.bytes_written += nbytes
            self.skipped_writes += skipped
        self.report_writes(nbytes, skipped)

    def _upload(self, key: ChunkKey, image: memoryview, conditional: bool) -> bool:
        """Upload ``image``; False when the condition failed (another writer's object is there)."""
        name = self.object_key(key)
        try:
            if len(image) <= self.options.multipart_threshold:
                extra = {"IfNoneMatch": "*"} if conditional else {}
                self.client.put_object(Bucket=self.options.bucket, Key=name, Body=ViewReader(image),
                                       ContentLength=len(image), **extra)
            else:
                self._multipart(name, image, conditional)
        except Exception as exc:
            code = self._code(exc)
            if conditional and code in _LOST_RACE:
                return False
            if conditional and code in _UNSUPPORTED:
                logger.warning("tier %s: %s does not support conditional puts (%s); uploading "
                               "unconditionally", self.name, self.options.describe(), code)
                self._conditional = False
                return self._upload(key, image, conditional=False)
            raise
        return True

    def _multipart(self, name: str, image: memoryview, conditional: bool = False) -> None:
        b, size = self.options.bucket, self.options.part_size
        upload = self.client.create_multipart_upload(Bucket=b, Key=name)["UploadId"]
        try:
            ranges = [(i + 1, off, min(off + size, len(image))) for i, off in enumerate(range(0, len(image), size))]

            def part(n: int, start: int, end: int) -> dict[str, Any]:
                r = self.client.upload_part(Bucket=b, Key=name, UploadId=upload, PartNumber=n,
                                            Body=ViewReader(image[start:end]), ContentLength=end - start)
                return {"PartNumber": n, "ETag": r["ETag"]}

            parts = list(self._executor().map(lambda t: part(*t), ranges))
            extra = {"IfNoneMatch": "*"} if conditional else {}
            self.client.complete_multipart_upload(Bucket=b, Key=name, UploadId=upload,
                                                  MultipartUpload={"Parts": parts}, **extra)
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=b, Key=name, UploadId=upload)
            except Exception as exc:  # noqa: BLE001 - the original error matters more
                logger.debug("aborting multipart upload of %s: %s", name, exc)
            raise

    # -- reads ---------------------------------------------------------------------------------
    def _read(self, key: ChunkKey, alloc: Any) -> tuple[PooledBuffer, int] | None:
        self._namespaces.add(key.namespace)
        b, name, size = self.options.bucket, self.object_key(key), self.options.part_size
        try:
            first = self.client.get_object(Bucket=b, Key=name, Range=f"bytes=0-{size - 1}")
        except Exception as exc:
            if self._is_missing(exc):
                return None
            if self._code(exc) == "InvalidRange":  # an empty object
                return alloc(0), 0
            raise
        if self._expired(first.get("LastModified")):
            first["Body"].close()
            self.delete([key])
            return None
        total = _total_length(first)
        buf = alloc(total)
        try:
            mv = buf.memoryview(0, total) if total else memoryview(b"")
            got = _read_body(first["Body"], mv[: min(size, total)])
            if total > size:
                ranges = [(off, min(off + size, total)) for off in range(size, total, size)]

                def fetch(r: tuple[int, int]) -> int:
                    part = self.client.get_object(Bucket=b, Key=name, Range=f"bytes={r[0]}-{r[1] - 1}")
                    return _read_body(part["Body"], mv[r[0] : r[1]])

                got += sum(self._executor().map(fetch, ranges))
        except BaseException:
            buf.release()
            raise
        return buf, got

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        if len(keys) == 1:
            return [self._head(keys[0])]
        return list(self._executor().map(self._head, keys))

    def _head(self, key: ChunkKey) -> bool:
        return self._state(key) == "fresh"

    def _state(self, key: ChunkKey) -> str:
        """``missing``, ``fresh`` or ``expired`` (older than ``ttl``), from one HEAD."""
        try:
            r = self.client.head_object(Bucket=self.options.bucket, Key=self.object_key(key))
        except Exception as exc:
            if self._is_missing(exc):
                return "missing"
            raise
        return "expired" if self._expired(r.get("LastModified")) else "fresh"

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Delete keys; returns how many existed (S3 deletes report success for absent keys, so
        presence is checked first)."""
        present = [k for k, ok in zip(keys, self._heads_raw(keys)) if ok]
        self._delete_names([self.object_key(k) for k in present])
        return len(present)

    def _heads_raw(self, keys: Sequence[ChunkKey]) -> list[bool]:
        def head(key: ChunkKey) -> bool:
            try:
                self.client.head_object(Bucket=self.options.bucket, Key=self.object_key(key))
                return True
            except Exception as exc:
                if self._is_missing(exc):
                    return False
                raise

        return list(self._executor().map(head, keys)) if len(keys) > 1 else [head(k) for k in keys]

    def _delete_names(self, names: list[str]) -> None:
        for name in names:  # DeleteObjects needs Content-MD5, which not every S3 clone accepts
            self.client.delete_object(Bucket=self.options.bucket, Key=name)

    # -- admin ---------------------------------------------------------------------------------
    def health(self) -> Health:
        try:
            self.client.head_bucket(Bucket=self.options.bucket)
        except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", with the reason
            code = self._code(exc)
            if code in ("404", "NoSuchBucket") and self.options.create_bucket:
                try:
                    self.client.create_bucket(Bucket=self.options.bucket)
                    return Health(True)
                except Exception as exc2:  # noqa: BLE001
                    return Health(False, f"{self.options.describe()}: cannot create bucket: {exc2}")
            if code in ("404", "NoSuchBucket"):
                return Health(False, f"{self.options.describe()}: bucket does not exist; create it "
                                     "or add create_bucket=true to the URL")
            return Health(False, f"{self.options.describe()}: {type(exc).__name__}: {exc}")
        return Health(True)

    def _list(self, namespace: bytes | None = None) -> list[tuple[str, int]]:
        """(key, size) of exactly this prefix's chunk objects (of one namespace, if given); a
        longer prefix's objects (``<prefix>/team-b/...``) are not ours."""
        base = f"{self.options.prefix}/" if self.options.prefix else ""
        ours = re.compile(re.escape(base) + "[0-9a-f]{32}/[0-9a-f]{32}")
        listed = base + (f"{namespace.hex()}/" if namespace is not None else "")
        out: list[tuple[str, int]] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.options.bucket,
                                                                          Prefix=listed):
            out.extend((o["Key"], int(o["Size"])) for o in page.get("Contents", []) if ours.fullmatch(o["Key"]))
        return out

    def usage(self) -> Usage:
        """Bytes and objects under the prefix (a LIST; zeros while the server is unreachable)."""
        try:
            objs = self._list()
        except Exception as exc:  # noqa: BLE001
            logger.debug("tier %s usage unavailable: %s", self.name, exc)
            return Usage(0, None, 0)
        return Usage(sum(s for _, s in objs), None, len(objs))

    def clear(self, namespace: bytes | Iterable[bytes] | None = None, *, all_namespaces: bool = False) -> None:
        """Delete the chunks of ``namespace`` (one id or several), by default of the namespaces this
        store wrote or read; ``all_namespaces`` deletes every chunk object under exactly this prefix."""
        if all_namespaces:
            names = [n for n, _ in self._list()]
        else:
            targets = clear_targets(namespace, self._namespaces)
            names = [n for ns in sorted(targets) for n, _ in self._list(ns)]
            self._namespaces -= targets
        if names:
            list(self._executor().map(lambda n: self._delete_names([n]), names))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            client, self._client = self._client, None
        if pool is not None:
            pool.shutdown(wait=True)
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001
                logger.debug("closing %s: %s", self.name, exc)


_LOST_RACE = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_UNSUPPORTED = ("NotImplemented", "501")


def _total_length(resp: dict[str, Any]) -> int:
    """Object size from a ranged GET's Content-Range (``bytes 0-N/TOTAL``), else its length."""
    cr = resp.get("ContentRange")
    if cr and "/" in cr:
        return int(cr.rsplit("/", 1)[1])
    return int(resp.get("ContentLength", 0))


def _read_body(body: Any, into: memoryview) -> int:
    """Read a streaming body into ``into`` (urllib3 copies once internally); returns bytes read."""
    done = 0
    try:
        while done < len(into):
            n = body.readinto(into[done:])
            if not n:
                break
            done += n
    finally:
        body.close()
    return done


__all__ = ["S3Options", "S3Store", "ViewReader"]
