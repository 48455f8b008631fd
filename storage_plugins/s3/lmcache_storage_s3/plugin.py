"""Entry point of lmcache-storage-s3: registers the ``s3://`` scheme."""

from __future__ import annotations

from lmcache_core import hookimpl
from lmcache_core.hookspecs import RegisterStorage


@hookimpl
def lmcache_register_storage(register: RegisterStorage) -> None:
    register("s3", "lmcache_storage_s3.store:S3Store", schemes=("s3",), extra="s3", requires=("boto3",),
             description="S3-compatible object stores (boto3): multipart, ranged parallel reads, retries")
