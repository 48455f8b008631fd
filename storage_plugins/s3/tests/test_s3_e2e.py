"""Two processes share KV through S3 (SeaweedFS) with the transformers integration; the child
processes find credentials through boto3's default chain (environment variables)."""

from __future__ import annotations

import pytest

from lmcache_core.testing.e2e import run_two_process
from lmcache_core.testing.servers import SeaweedS3

pytestmark = pytest.mark.slow


def test_two_processes_share_kv_through_s3(s3_server: SeaweedS3, s3_bucket: str, unique_prefix: str) -> None:
    url = (f"s3://{s3_bucket}/{unique_prefix}?endpoint_url={s3_server.endpoint_url}&path_style=true")
    report = run_two_process(url, "s3", env=s3_server.env)
    assert report["hit_tokens"] >= 256
