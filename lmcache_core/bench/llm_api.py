"""vLLM's Python ``LLM`` API as a bench target: one ``vllm.LLM`` per configuration group, in a
worker process of the vLLM interpreter, fed a wave of token-id prompts at a time.

The bench (any interpreter) starts ``python -m lmcache_core.bench.llm_api`` with the interpreter
that imports vLLM; the worker builds ``LLM(..., kv_transfer_config=...)``, says it is ready, then
answers one JSON line per wave: it calls ``llm.generate`` on the wave's prompts (vLLM batches
them) and sends back, per request, vLLM's own time to first token (``RequestOutput.metrics``),
the prompt tokens vLLM did not compute (``num_cached_tokens``) and the tokens generated. The
worker's stdout carries only that protocol: vLLM's prints and logs go to its stderr, a log file.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any, Sequence

from .engines import file_tail
from .targets import Outcome
from .workloads import Request

logger = logging.getLogger(__name__)
START_S = 300.0  # an engine that is not ready by then is killed
WAVE_S = 600.0  # a wave that has not come back by then: the worker is killed, the wave fails


class LLMWorker:
    """A worker process holding one ``vllm.LLM``; ``connector`` is its ``kv_transfer_config``."""

    def __init__(self, python: str, model: str, *, connector: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, max_model_len: int = 4096, num_blocks: int = 0,
                 log_dir: Path | None = None) -> None:
        self.python = python
        self.spec: dict[str, Any] = {"model": model, "connector": connector, "max_model_len": max_model_len,
                                     "num_blocks": num_blocks}
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="lmcache-bench-"))
        self.log_path = log_dir / f"vllm-llm-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.startup_s = 0.0
        self._lock = threading.Lock()

    def log_tail(self, n: int = 30) -> str:
        return file_tail(self.log_path, n)

    def _reply(self, timeout: float, what: str) -> dict[str, Any]:
        """The worker's next protocol line; the worker is killed if it takes longer than ``timeout``."""
        assert self.proc is not None and self.proc.stdout is not None
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            code = self.proc.wait(30)
            how = f"killed after {timeout:.0f} s" if code < 0 else f"exit {code}"
            raise RuntimeError(f"vLLM LLM worker ended ({how}) during {what}; log {self.log_path}:\n"
                               f"{self.log_tail()}")
        msg: dict[str, Any] = json.loads(line)
        if msg.get("error"):
            raise RuntimeError(f"vLLM LLM worker: {msg['error']} (log {self.log_path})")
        return msg

    def start(self) -> "LLMWorker":
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([self.python, "-m", "lmcache_core.bench.llm_api", json.dumps(self.spec)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env,
                                         text=True, start_new_session=True)
        try:
            self._reply(START_S, "startup")
        except Exception:
            self.close()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def generate(self, prompts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """One wave: ``[{"tokens", "max_tokens", "salt"}]`` in, one result dict per prompt out."""
        with self._lock:
            if self.proc is None or self.proc.stdin is None:
                raise RuntimeError("the vLLM LLM worker is not running")
            self.proc.stdin.write(json.dumps({"prompts": list(prompts)}) + "\n")
            self.proc.stdin.flush()
            outs: list[dict[str, Any]] = self._reply(WAVE_S, f"a wave of {len(prompts)} prompts")["outputs"]
        if len(outs) != len(prompts):
            raise RuntimeError(f"vLLM LLM worker answered {len(outs)} outputs for {len(prompts)} prompts")
        return outs

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None and proc.stdin is not None:
            try:  # a clean exit flushes the connector's stores
                proc.stdin.write(json.dumps({"stop": True}) + "\n")
                proc.stdin.close()
                proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def __enter__(self) -> "LLMWorker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class LLMTarget:
    """A configuration on an :class:`LLMWorker`. ``batched``: the runner hands it whole waves.
    ``unique_salt`` gives every prompt its own ``cache_salt`` (the no-cache baseline)."""

    concurrent = True
    batched = True

    def __init__(self, name: str, worker: LLMWorker, *, unique_salt: bool = False) -> None:
        self.name = name
        self.worker = worker
        self.unique_salt = unique_salt

    def generate_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        outs = self.worker.generate([{"tokens": list(r.tokens), "max_tokens": r.max_tokens,
                                      "salt": uuid.uuid4().hex if self.unique_salt else ""} for r in requests])
        return [Outcome(float(o["ttft_s"]), float(o["total_s"]), int(o["output_tokens"]), o.get("cached_tokens"))
                for o in outs]

    def generate(self, request: Request) -> Outcome:
        return self.generate_batch([request])[0]

    def info(self) -> dict[str, Any]:
        return {"kind": "vllm-llm", "model": self.worker.spec["model"], "unique_salt": self.unique_salt}


# -- the worker (runs in the vLLM interpreter) ---------------------------------------------------
def _first_token_s(output: Any) -> tuple[float, float]:
    """(TTFT, time to the last token) of one finished ``RequestOutput`` from vLLM's own per-request
    stats (``RequestStateStats``, kept when ``disable_log_stats=False``): ``first_token_latency``
    is the front end's wall clock when it took in the output holding the first token minus the
    request's arrival (when ``generate`` added it); the decode after it is the engine core's
    ``last_token_ts - first_token_ts``."""
    m = getattr(output, "metrics", None)
    ttft = float(getattr(m, "first_token_latency", 0.0) or 0.0)
    if not ttft > 0:
        raise RuntimeError(f"vLLM returned no first-token latency for request {output.request_id} "
                           f"(metrics {m!r}); the engine needs disable_log_stats=False")
    first, last = float(getattr(m, "first_token_ts", 0.0) or 0.0), float(getattr(m, "last_token_ts", 0.0) or 0.0)
    return ttft, ttft + max(last - first, 0.0)


def _serve(spec: dict[str, Any], proto: IO[str]) -> None:
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True,
                                  dtype="float32", max_model_len=spec["max_model_len"], seed=0,
                                  enable_prefix_caching=True, disable_log_stats=False)
    if spec.get("num_blocks"):
        kwargs["num_gpu_blocks_override"] = spec["num_blocks"]
    if spec.get("connector") is not None:
        kwargs["kv_transfer_config"] = spec["connector"]
    llm = LLM(**kwargs)

    def send(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    send({"ready": True})
    try:
        for line in sys.stdin:
            msg = json.loads(line)
            if msg.get("stop"):
                break
            try:
                prompts = [{"prompt_token_ids": p["tokens"], **({"cache_salt": p["salt"]} if p["salt"] else {})}
                           for p in msg["prompts"]]
                params = [SamplingParams(max_tokens=p["max_tokens"], temperature=0.0, ignore_eos=True)
                          for p in msg["prompts"]]
                outputs = llm.generate(prompts, params, use_tqdm=False)
                replies = []
                for o in outputs:
                    ttft, total = _first_token_s(o)
                    replies.append({"ttft_s": ttft, "total_s": total, "output_tokens": len(o.outputs[0].token_ids),
                                    "cached_tokens": o.num_cached_tokens})
                send({"outputs": replies})
            except Exception as exc:  # noqa: BLE001 - the wave fails, the engine goes on
                logger.exception("wave failed")
                send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        llm.llm_engine.engine_core.shutdown()  # flushes the connector's stores


def main(argv: Sequence[str]) -> None:
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM's prints and logs (and its engine process's) go to the log, not the protocol
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO)
    try:
        _serve(json.loads(argv[0]), proto)
    except Exception as exc:
        proto.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        proto.flush()
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
