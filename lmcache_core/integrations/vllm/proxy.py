"""A minimal disaggregated-prefill proxy for vLLM OpenAI servers (``lmcache proxy``).

Per completion request it does what vLLM's own P/D proxies do: send the request to a
prefill instance with ``max_tokens: 1``, no streaming and ``kv_transfer_params:
{"do_remote_decode": true}``; take the ``kv_transfer_params`` of its answer (our connector
on the prefill side says there how many prompt tokens it stored); send the original
request with those params to a decode instance and relay its answer, streamed or not,
as it comes. Instances are used round-robin.

A prefill instance that fails, times out or answers without params costs time, never the
request: the decode instance is asked without params and computes the prompt itself
(counted in ``/stats`` and logged). Standard library only; for production traffic use
vLLM's own proxy, which speaks the same convention (docs/p2p.md).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import logging
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

logger = logging.getLogger(__name__)

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_BODY = 64 << 20  # a request body larger than this is refused (413)
PREFILL_TIMEOUT_S = 600.0
DECODE_TIMEOUT_S = 3600.0


class _Upstream:
    """One vLLM server, ``http://host:port``."""

    def __init__(self, url: str) -> None:
        u = urllib.parse.urlsplit(url.rstrip("/"))
        if u.scheme != "http" or not u.hostname or not u.port:
            raise ValueError(f"an instance URL must be http://host:port, got {url!r}")
        self.url, self.host, self.port, self.base = url.rstrip("/"), u.hostname, u.port, u.path

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


class DisaggProxy:
    """Prefill on one pool, decode on another; ``start()`` serves in a thread, ``serve()`` in this one."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        if not prefill or not decode:
            raise ValueError("give at least one prefill and one decode instance (--prefill URL --decode URL)")
        self.prefill = [_Upstream(u) for u in prefill]
        self.decode = [_Upstream(u) for u in decode]
        self._next_prefill = itertools.cycle(self.prefill)
        self._next_decode = itertools.cycle(self.decode)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "prefill_failures": 0, "prefill_without_params": 0, "decode_failures": 0}
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _pick(self, pool: "itertools.cycle[_Upstream]") -> _Upstream:
        with self._lock:
            return next(pool)

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def prefill_params(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any] | None, float]:
        """Run the prompt on a prefill instance; its ``kv_transfer_params`` (None on any failure)
        and the seconds it took."""
        req = dict(body, max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True,
                                                                          "do_remote_prefill": False})
        req.pop("stream_options", None)
        req.pop("max_completion_tokens", None)
        up = self._pick(self._next_prefill)
        t0 = time.perf_counter()
        try:
            conn = up.connect(PREFILL_TIMEOUT_S)
            try:
                conn.request("POST", up.base + path, json.dumps(req), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read(MAX_BODY)
            finally:
                conn.close()
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}: {data[:300]!r}")
            params = json.loads(data).get("kv_transfer_params")
        except Exception as exc:  # noqa: BLE001 - a failed prefill is a decode-side recompute
            self._count("prefill_failures")
            logger.warning("lmcache proxy: prefill on %s failed (%s); the decode instance computes the prompt",
                           up.url, exc)
            return None, time.perf_counter() - t0
        if not isinstance(params, dict):
            self._count("prefill_without_params")
            logger.warning("lmcache proxy: %s answered without kv_transfer_params (is its kv_transfer_config our "
                           "connector with kv_role kv_producer or kv_both?); the decode instance computes the "
                           "prompt", up.url)
            return None, time.perf_counter() - t0
        return params, time.perf_counter() - t0

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the answer ends when the connection closes: relays any stream

            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("lmcache proxy: " + fmt, *args)

            def _reply(self, status: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/stats":
                    with proxy._lock:
                        self._reply(200, dict(proxy.stats))
                    return
                if self.path in ("/health", "/v1/models"):
                    self._relay("GET", proxy.decode[0], self.path, None, {})
                    return
                self._reply(404, {"error": f"no route {self.path}; POST {' or '.join(COMPLETION_PATHS)}"})

            def do_POST(self) -> None:  # noqa: N802
                if self.path not in COMPLETION_PATHS:
                    self._reply(404, {"error": f"no route {self.path}; POST {' or '.join(COMPLETION_PATHS)}"})
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length <= 0 or length > MAX_BODY:
                    self._reply(413 if length > MAX_BODY else 400, {"error": "a JSON body with Content-Length "
                                                                    f"of at most {MAX_BODY} bytes is required"})
                    return
                try:
                    body = json.loads(self.rfile.read(length))
                    if not isinstance(body, dict):
                        raise ValueError("not an object")
                except ValueError as exc:
                    self._reply(400, {"error": f"the body is not a JSON object: {exc}"})
                    return
                proxy._count("requests")
                params, prefill_s = proxy.prefill_params(self.path, body)
                if params is not None:
                    body = dict(body, kv_transfer_params=params)
                self._relay("POST", proxy._pick(proxy._next_decode), self.path, body,
                            {"X-Lmcache-Prefill-Ms": f"{prefill_s * 1000:.1f}",
                             "X-Lmcache-Remote-Prefill": "1" if params is not None else "0"})

            def _relay(self, method: str, up: _Upstream, path: str, body: dict[str, Any] | None,
                       extra: dict[str, str]) -> None:
                try:
                    conn = up.connect(DECODE_TIMEOUT_S)
                    conn.request(method, up.base + path, None if body is None else json.dumps(body),
                                 {"Content-Type": "application/json"} if body is not None else {})
                    resp = conn.getresponse()
                except Exception as exc:  # noqa: BLE001 - the client gets a 502 naming the instance
                    proxy._count("decode_failures")
                    self._reply(502, {"error": f"decode instance {up.url} failed: {exc}"})
                    return
                try:
                    self.send_response(resp.status)
                    ctype = resp.getheader("Content-Type")
                    if ctype:
                        self.send_header("Content-Type", ctype)
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.end_headers()
                    while True:
                        piece = resp.read1(65536)
                        if not piece:
                            break
                        self.wfile.write(piece)
                        self.wfile.flush()
                except OSError as exc:  # the client went away: stop relaying
                    logger.info("lmcache proxy: relay from %s ended early: %s", up.url, exc)
                finally:
                    conn.close()

        return Handler

    def start(self) -> "DisaggProxy":
        self._thread = threading.Thread(target=self.server.serve_forever, name="lmcache-proxy", daemon=True)
        self._thread.start()
        return self

    def serve(self) -> None:
        self.server.serve_forever()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "DisaggProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_parser(sub: Any) -> None:
    p = sub.add_parser("proxy", help="disaggregated prefill: a proxy in front of prefill and decode vLLM servers")
    p.add_argument("--prefill", action="append", required=True, metavar="URL",
                   help="a prefill instance (kv_role kv_producer), http://host:port; repeat for several")
    p.add_argument("--decode", action="append", required=True, metavar="URL",
                   help="a decode instance (kv_role kv_consumer), http://host:port; repeat for several")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_cmd_proxy)


def _cmd_proxy(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        proxy = DisaggProxy(args.prefill, args.decode, args.host, args.port)
    except (ValueError, OSError) as exc:
        print(f"lmcache proxy: {exc}")
        return 2
    logger.info("lmcache proxy on %s: prefill %s, decode %s", proxy.url, [u.url for u in proxy.prefill],
                [u.url for u in proxy.decode])
    try:
        proxy.serve()
    except KeyboardInterrupt:
        pass
    return 0
