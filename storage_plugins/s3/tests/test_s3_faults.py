"""Fault tests through the engine against a private SeaweedFS S3 server: dead, restarted, hung, corrupt."""

from __future__ import annotations

from typing import Iterator

import pytest

from lmcache_core.keys import ChunkKey
from lmcache_core.storage import Store
from lmcache_core.testing.fault_tests import RemoteTier, RemoteTierFaultTests
from lmcache_core.testing.fixtures import ServerFactory
from lmcache_core.testing.servers import SeaweedS3


def raw_set(store: Store, key: ChunkKey, data: bytes) -> None:
    store.client.put_object(Bucket=store.options.bucket, Key=store.object_key(key), Body=data)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def private_s3() -> Iterator[SeaweedS3]:
    """One private server for the module (each start costs about 3 s); tests kill and restart it."""
    factory = ServerFactory()
    yield factory.seaweedfs()
    factory.close()


class TestS3Faults(RemoteTierFaultTests):
    @pytest.fixture
    def remote(self, private_s3: SeaweedS3) -> RemoteTier:
        server = private_s3
        if not server.running:
            server.restart()
        url = server.url("faults", "lm", create_bucket="true", max_attempts="1", connect_timeout="0.5",
                         read_timeout="1")
        return RemoteTier(url=url, name="s3", stop=server.kill, start=lambda: server.restart(keep_data=False),
                          raw_set=raw_set, pid=lambda: server.proc.pid if server.proc else None, call_timeout_s=1.5)


def test_a_port_taken_before_weed_binds_it_means_fresh_ports_not_a_failed_start() -> None:
    # the eight ports are drawn free, then bound by weed a moment later; another process (a
    # parallel test run) can take one in between: the server starts again on fresh ports
    import socket

    from lmcache_core.testing.servers import ServerUnavailable, find_weed

    try:
        find_weed()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    server = SeaweedS3()
    taken = server._ports["filer"]
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", taken))
    blocker.listen(1)
    try:
        server.start()
        assert server.running and taken not in server._ports.values()
        assert "address already in use" in server.log_tail(10_000)
        client = server.client()
        client.create_bucket(Bucket="ports")
        assert client.head_bucket(Bucket="ports")["ResponseMetadata"]["HTTPStatusCode"] == 200
    finally:
        blocker.close()
        server.close()
