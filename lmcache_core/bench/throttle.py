"""A TCP proxy that limits bandwidth: a local S3 server behind a link of the speed a remote one has.

A SeaweedFS S3 on loopback answers at hundreds of MB/s; an object store across a network
runs at tens of MB/s. ``ThrottledProxy(port, bytes_per_s)`` forwards every connection to
``127.0.0.1:port``, sharing one token bucket per direction among all connections (one
full-duplex link), so parallel readers split the bandwidth as they would on the wire.
"""

from __future__ import annotations

import socket
import threading
import time

CHUNK = 64 * 1024


class _Bucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next_free = time.monotonic()
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + nbytes / self.rate
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)


class ThrottledProxy:
    def __init__(self, target_port: int, bytes_per_s: float, target_host: str = "127.0.0.1") -> None:
        if bytes_per_s <= 0:
            raise ValueError(f"bytes_per_s must be positive, got {bytes_per_s}")
        self.target = (target_host, target_port)
        self.bytes_per_s = bytes_per_s
        self._down, self._up = _Bucket(bytes_per_s), _Bucket(bytes_per_s)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="throttle-accept", daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for src, dst, bucket in ((client, upstream, self._up), (upstream, client, self._down)):
                threading.Thread(target=self._pump, args=(src, dst, bucket), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, bucket: _Bucket) -> None:
        try:
            while data := src.recv(CHUNK):
                bucket.take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def __enter__(self) -> "ThrottledProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProxyProcess:
    """The proxy in a child process, so its copying never competes with the engine for the GIL."""

    def __init__(self, target_port: int, bytes_per_s: float) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-m", "lmcache_core.bench.throttle", str(target_port),
                                      str(bytes_per_s)], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"throttling proxy did not start (printed {line!r})")
        self.port = int(line)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


if __name__ == "__main__":
    import sys

    proxy = ThrottledProxy(int(sys.argv[1]), float(sys.argv[2]))
    print(proxy.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
