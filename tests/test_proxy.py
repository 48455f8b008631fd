"""``lmcache proxy`` (disaggregated prefill) against two stand-in HTTP servers: a unit test of the
proxy's own logic (what it sends where, what it relays, how a failed prefill degrades). The real
vLLM servers behind it are in tests/integrations/test_vllm_disagg.py."""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from lmcache_core.cli import main
from lmcache_core.integrations.vllm.proxy import DisaggProxy

PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "lmcache": {"v": 1, "tokens": 512}}


class Stand:
    """An HTTP server that records the bodies it gets and answers with ``reply(body)``."""

    def __init__(self, reply: Any) -> None:
        self.bodies: list[dict[str, Any]] = []
        stand = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand.bodies.append(body)
                status, chunks = reply(body)
                self.send_response(status)
                self.send_header("Content-Type", "text/event-stream" if body.get("stream") else "application/json")
                self.end_headers()
                for c in chunks:
                    self.wfile.write(c)
                    self.wfile.flush()

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _prefill_ok(body: dict[str, Any]) -> tuple[int, list[bytes]]:
    return 200, [json.dumps({"choices": [{"text": ""}], "kv_transfer_params": PARAMS}).encode()]


def _decode(body: dict[str, Any]) -> tuple[int, list[bytes]]:
    got = json.dumps(body.get("kv_transfer_params"))
    return 200, [f"data: {json.dumps({'choices': [{'text': str(i)}], 'params': got})}\n\n".encode()
                 for i in range(3)] + [b"data: [DONE]\n\n"]


@pytest.fixture
def stands() -> Iterator[tuple[Stand, Stand]]:
    p, d = Stand(_prefill_ok), Stand(_decode)
    yield p, d
    p.close()
    d.close()


def _post(url: str, body: dict[str, Any], path: str = "/v1/completions") -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def test_prefill_then_decode_with_the_producers_params(stands: tuple[Stand, Stand]) -> None:
    p, d = stands
    with DisaggProxy([p.url], [d.url]) as proxy:
        body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 9, "stream": True,
                "stream_options": {"include_usage": True}}
        status, headers, data = _post(proxy.url, body)
    assert status == 200 and headers["x-lmcache-remote-prefill"] == "1"
    (pre,) = p.bodies
    assert pre["max_tokens"] == 1 and pre["stream"] is False and "stream_options" not in pre
    assert pre["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False}
    assert pre["prompt"] == [5, 6, 7]
    (dec,) = d.bodies
    assert dec == dict(body, kv_transfer_params=PARAMS)  # the client's request, plus the producer's params
    assert data.count(b"data: ") == 4 and data.endswith(b"data: [DONE]\n\n")  # relayed as streamed


def test_a_failed_prefill_is_a_decode_side_recompute(stands: tuple[Stand, Stand]) -> None:
    _, d = stands
    bad = Stand(lambda body: (500, [b'{"error": "boom"}']))
    silent = Stand(lambda body: (200, [b'{"choices": []}']))
    try:
        for pre, counter in ((bad, "prefill_failures"), (silent, "prefill_without_params")):
            with DisaggProxy([pre.url], [d.url]) as proxy:
                status, headers, _ = _post(proxy.url, {"model": "m", "prompt": [1], "max_tokens": 2})
                assert status == 200 and headers["x-lmcache-remote-prefill"] == "0"
                assert proxy.stats[counter] == 1
        assert all("kv_transfer_params" not in b for b in d.bodies)
        with DisaggProxy(["http://127.0.0.1:9"], [d.url]) as proxy:  # nothing listens there
            assert _post(proxy.url, {"model": "m", "prompt": [1]})[0] == 200
            assert proxy.stats["prefill_failures"] == 1
    finally:
        bad.close()
        silent.close()


def test_bad_requests_and_a_dead_decode_instance_get_clear_errors(stands: tuple[Stand, Stand]) -> None:
    p, _ = stands
    with DisaggProxy([p.url], ["http://127.0.0.1:9"]) as proxy:
        status, _, data = _post(proxy.url, {"prompt": [1]})
        assert status == 502 and b"decode instance http://127.0.0.1:9 failed" in data
        status, _, data = _post(proxy.url, {"prompt": [1]}, path="/v1/embeddings")
        assert status == 404 and b"/v1/completions" in data
        host, port = proxy.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", "/v1/completions", b"[1, 2]", {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 400 and b"not a JSON object" in resp.read()
    with pytest.raises(ValueError, match="http://host:port"):
        DisaggProxy(["localhost:8000"], ["http://127.0.0.1:8001"])
    assert main(["proxy", "--prefill", "nope", "--decode", "http://127.0.0.1:1"]) == 2
