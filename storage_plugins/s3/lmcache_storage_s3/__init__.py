"""lmcache-storage-s3: an S3-compatible object-store tier for lmcache-core (``s3://bucket/prefix``).
The store is :mod:`lmcache_storage_s3.store`, imported only when a tier uses ``s3://``."""

from __future__ import annotations

__version__ = "0.1.0"
