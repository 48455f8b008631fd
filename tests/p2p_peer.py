"""One P2P peer in its own process: an embedded CacheEngine (memory + p2p tiers) that stores a
prompt's KV and then serves it to other peers.

    python p2p_peer.py SPEC_JSON

SPEC: ``{"directory": url, "token_file": path, "transport": "tcp"|"nixl", "tenant": str,
"tokens": [...], "seed": int, "fault": "" | "die-mid-read" | "corrupt"}``. Prints one JSON
line ``{"address": host:port, "stored": n}`` when it serves, then answers ``stats`` on
stdin with the peer server's counters as one JSON line; ``quit`` ends it.

Faults (test-only, injected here in the child, never in the library): ``die-mid-read`` sends
half of a chunk's bytes through the tcp transport and SIGKILLs this process;
``corrupt`` flips one payload byte of every chunk it sends.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

L, H, D, BS, NB = 4, 2, 16, 16, 48
CHUNK = 32


def paged(seed: int) -> tuple[list[torch.Tensor], object]:
    from conftest import random_kv

    from lmcache_core.layout import PagedKV

    caches = [random_kv((2, NB, BS, H, D), torch.bfloat16, seed * 100 + i) for i in range(L)]
    return caches, PagedKV.from_vllm_flash(caches)


def tiers(directory: str, token_file: str, transport: str, listen: str = "127.0.0.1",
          timeout: float = 2.0) -> list[str]:
    return ["memory://?capacity=64MiB",
            f"p2p://{listen}?directory={directory}&token_file={token_file}&transport={transport}&timeout={timeout}"]


def inject(fault: str) -> None:
    from lmcache_core.builtin import tcp_transport as tt
    from lmcache_core.chunk import HEADER_SIZE

    original = tt.TcpTransport._serve_one

    def serve_one(self, sock, op, handle, n):  # type: ignore[no-untyped-def]
        if op != b"R":
            return original(self, sock, op, handle, n)
        with self._lock:
            mv = self._buffers.get(handle)
        if mv is None:
            return original(self, sock, op, handle, n)
        sock.sendall(tt._REPLY.pack(b"K", n))
        if fault == "die-mid-read":
            sock.sendall(mv[: n // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        data = bytearray(mv[:n])
        data[HEADER_SIZE + 100] ^= 0x40
        sock.sendall(data)

    tt.TcpTransport._serve_one = serve_one  # type: ignore[method-assign]


def main() -> None:
    spec = json.loads(sys.argv[1])
    from lmcache_core import CacheEngine, Config

    if spec.get("fault"):
        inject(spec["fault"])
    _, kv = paged(spec["seed"])
    cfg = Config.from_dict({"tiers": tiers(spec["directory"], spec["token_file"], spec["transport"]),
                            "chunk_size": CHUNK, "device": "cpu", "tenant": spec["tenant"]})
    engine = CacheEngine(kv.geometry, cfg, model="p2p-test-model")
    p2p = engine.tiers.by_name("p2p")
    tokens = spec["tokens"]
    stored = engine.store(tokens, kv, torch.arange((len(tokens) + BS - 1) // BS), wait=True)
    engine.flush()
    print(json.dumps({"address": p2p.address, "stored": stored}), flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps(p2p.server.stats.as_dict()), flush=True)
        elif line.strip() == "quit":
            break
    engine.close()


if __name__ == "__main__":
    main()
