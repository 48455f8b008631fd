"""``lmcache bench``: ``run`` (workloads against engines and baselines), ``policy`` (load or
recompute), and the component benchmarks of a checkout's ``benchmarks/`` folder."""

from __future__ import annotations

import argparse
import logging
import runpy
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from . import engines as eng
from . import report
from .runner import Arrival, Result, run
from .workloads import WORKLOADS, Shape, make

logger = logging.getLogger(__name__)
SCRIPTS = {"storage": "storage.py", "gpu-transfer": "gpu_transfer.py", "connector-gpu": "connector_gpu.py",
           "demo-ttft": "demo_ttft.py", "lookup": "lookup.py"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark workloads against engines and baselines (lmcache bench -h)")
    bsub = p.add_subparsers(dest="bench_command", required=True)

    r = bsub.add_parser("run", help="drive an engine with workloads, every configuration in one run")
    r.add_argument("--engine", choices=("vllm-serve", "vllm-llm", "transformers", "url"), default="url",
                   help="vllm-serve: start `vllm serve` per configuration group; vllm-llm: vLLM's Python LLM "
                        "API, one engine per group; transformers: CachedModel; url: a server you run (--url)")
    r.add_argument("--url", help="base URL of an OpenAI-compatible server (engine url)")
    r.add_argument("--model", default="", help="vllm-serve, vllm-llm: model directory; transformers: smollm2, random or "
                                                "a directory; url: the served model name")
    r.add_argument("--configs", help="comma-separated; vllm-serve, vllm-llm: " + ",".join(eng.VLLM_CONFIGS) +
                   "; transformers: " + ",".join(eng.HF_CONFIGS) + "; url: server,none (none: a unique "
                   "cache_salt per request)")
    r.add_argument("--workloads", default="chat,rag", help=f"comma-separated from {','.join(WORKLOADS)}")
    r.add_argument("--concurrency", type=int, default=4, help="sessions in flight (closed loop)")
    r.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals, requests per second (open loop)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--scale", type=float, default=1.0, help="multiply every prompt length")
    r.add_argument("--quick", action="store_true", help="small workloads (CI): fewer users, rounds, queries")
    r.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request")
    r.add_argument("--vocab", type=int, default=0, help="token ids below this (default: the model's vocabulary)")
    r.add_argument("--tiers", default="memory://?capacity=1GiB", help="lmcache tiers, comma-separated")
    r.add_argument("--chunk-size", type=int, default=256)
    r.add_argument("--daemon", default="", help="daemon socket of lmcache-daemon (default: start one)")
    r.add_argument("--kv-blocks", type=int, default=0, help="vllm-serve, vllm-llm: the engine's KV cache in blocks "
                   "(--num-gpu-blocks-override), so its prefix cache evicts as a busy server's does")
    r.add_argument("--vllm-python", help="interpreter with vLLM (default: this one, then .venv-vllm)")
    r.add_argument("--upstream-python", help="interpreter with vLLM and upstream LMCache (config upstream)")
    r.add_argument("--json", help="write results here (default benchmarks/results/bench-<machine>-<date>.json "
                                  "in a checkout, else ./bench-....json)")
    r.add_argument("--plot", help="write plots to this PNG (when matplotlib is importable)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_run)

    pol = bsub.add_parser("policy", help="load_policy always vs adaptive vs no cache (CachedModel)")
    pol.add_argument("--slow-tier", default="", help="tier URL of the slow shared tier (e.g. s3://...); "
                                                     "empty: the memory-tier case")
    pol.add_argument("--local-s3", action="store_true", help="start a local SeaweedFS S3 for the slow tier, "
                                                              "behind a link of --link-mb-s")
    pol.add_argument("--link-mb-s", type=float, default=4.0, help="bandwidth to the local S3 in MB/s "
                     "(each direction; 0: no limit); the instance that wrote the documents has its own link")
    pol.add_argument("--requests", type=int, default=24)
    pol.add_argument("--costs-only", action="store_true", help="measure the costs the case is made of "
                     "(each configuration's prefill, the memory copy, the link) and stop; a run measures them first")
    pol.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine's other load "
                     "stalls a multi-threaded prefill at every barrier; 0: torch's default)")
    pol.add_argument("--json", help="write results here")
    pol.set_defaults(func=cmd_policy)

    pl = bsub.add_parser("plot", help="plot bench JSONs (TTFT CDF, hit rate over time, tokens saved)")
    pl.add_argument("json", nargs="+", help="one or more results; with several, each curve is named "
                                             "after its run's time (the JSON's date)")
    pl.add_argument("png")
    pl.set_defaults(func=cmd_plot)

    for name, script in SCRIPTS.items():
        s = bsub.add_parser(name, help=f"benchmarks/{script} of a checkout (arguments pass through)",
                            add_help=False)
        s.add_argument("args", nargs=argparse.REMAINDER)
        s.set_defaults(func=cmd_script, script=script)


def cmd_plot(args: argparse.Namespace) -> int:
    import json

    results: dict[str, list[Result]] = {}
    for name in args.json:
        rs = report.read_results(Path(name))
        when = json.loads(Path(name).read_text()).get("date", name)[11:16] if len(args.json) > 1 else ""
        results.update({f"{when} {k}".strip(): v for k, v in rs.items()})
    out = report.plot(Path(args.png), results)
    if out is None:
        print("matplotlib is not importable here; run this with an interpreter that has it", file=sys.stderr)
        return 2
    print(out)
    return 0


def cmd_script(args: argparse.Namespace) -> int:
    path = eng.ROOT / "benchmarks" / args.script
    if not path.exists():
        print(f"{path} is not here: the component benchmarks live in a checkout of lmcache-core", file=sys.stderr)
        return 2
    sys.argv = [str(path), *args.args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


def default_json(kind: str) -> Path:
    import socket

    name = f"bench-{kind}-{socket.gethostname().split('.')[0]}-{time.strftime('%Y-%m-%d')}.json"
    folder = eng.ROOT / "benchmarks" / "results"
    return folder / name if folder.is_dir() else Path(name)


class Progress:
    """One live line: configuration, requests done, mean TTFT and hit rate so far."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._live: Any = None
        self._rows: list[Result] = []
        self.label = ""
        self.total = 0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self._rows = label, total, []
        if self.enabled and self._live is None:
            from rich.live import Live

            self._live = Live("", refresh_per_second=4, transient=True)
            self._live.start()
        self._show()

    def add(self, r: Result) -> None:
        self._rows.append(r)
        self._show()

    def _show(self) -> None:
        if self._live is None:
            return
        ok = [r for r in self._rows if not r.error]
        ttft = sum(r.ttft_s for r in ok) / len(ok) * 1e3 if ok else 0.0
        prompt = sum(r.prompt_tokens for r in ok)
        hit = sum(r.cached_tokens or 0 for r in ok)
        err = len(self._rows) - len(ok)
        self._live.update(f"[bold]{self.label}[/] {len(self._rows)}/{self.total} requests  "
                          f"TTFT mean {ttft:.1f} ms  hit rate {hit / prompt if prompt else 0:.1%}"
                          + (f"  [red]{err} errors[/]" if err else ""))

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _shape(args: argparse.Namespace, vocab: int) -> Shape:
    shape = Shape(vocab=args.vocab or vocab, max_tokens=args.max_tokens)
    if args.quick:
        shape = Shape(vocab=shape.vocab, max_tokens=shape.max_tokens, users=2, rounds=3, docs=6, queries=6,
                      qa_docs=2, questions=2, control_requests=4, qa_doc_len=512)
    return shape.scaled(args.scale)


def _phase(target: Any, config: str, workloads: list[Any], arrival: Arrival, progress: Progress,
           summaries: list[report.Summary], results: dict[str, list[Result]]) -> None:
    for w in workloads:
        progress.start(f"{w.name} / {config}", len(w.requests))
        t0 = time.perf_counter()
        rs = run(target, w, arrival, on_result=progress.add)
        wall = time.perf_counter() - t0
        results[f"{w.name}/{config}"] = rs
        summaries.append(report.summarize(config, w.name, rs, wall))


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    arrival = Arrival(args.concurrency, args.rate, args.seed)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    progress = Progress(not args.no_progress and console.is_terminal)
    summaries: list[report.Summary] = []
    results: dict[str, list[Result]] = {}
    notes: list[str] = []
    params: dict[str, Any] = {"engine": args.engine, "model": args.model, "arrival": arrival.describe(),
                              "seed": args.seed, "scale": args.scale, "quick": args.quick,
                              "tiers": args.tiers, "chunk_size": args.chunk_size, "max_tokens": args.max_tokens,
                              "kv_blocks": args.kv_blocks}
    try:
        if args.engine == "transformers":
            _run_transformers(args, names, arrival, progress, summaries, results, params, notes)
        elif args.engine in ("vllm-serve", "vllm-llm"):
            _run_vllm(args, names, arrival, progress, summaries, results, params, notes)
        else:
            _run_url(args, names, arrival, progress, summaries, results, params)
    finally:
        progress.stop()
    # order: per workload, configurations as given (the first one is the baseline of "x vs first")
    summaries.sort(key=lambda s: names.index(s.workload))
    Console().print(report.table(summaries))
    for n in notes:
        console.print(f"note: {n}")
    path = Path(args.json) if args.json else default_json(args.engine)
    report.write_json(path, summaries=summaries, results=results, params=params, notes=notes)
    console.print(f"results: {path}")
    if args.plot:
        out = report.plot(Path(args.plot), results)
        console.print(f"plot: {out}" if out else "plot: skipped (matplotlib is not importable)")
    errors = sum(s.errors for s in summaries)
    if errors:
        console.print(f"[red]{errors} requests failed[/]")
    return 1 if errors else 0


def _configs(args: argparse.Namespace, allowed: tuple[str, ...], default: str) -> list[str]:
    configs = [c.strip() for c in (args.configs or default).split(",") if c.strip()]
    bad = [c for c in configs if c not in allowed]
    if bad:
        raise SystemExit(f"--configs: {', '.join(bad)} not known for engine {args.engine}; "
                         f"choose from {', '.join(allowed)}")
    return configs


def _run_url(args: argparse.Namespace, names: list[str], arrival: Arrival, progress: Progress,
             summaries: list[report.Summary], results: dict[str, list[Result]], params: dict[str, Any]) -> None:
    from .targets import OpenAITarget

    if not args.url:
        raise SystemExit("--engine url needs --url http://host:port (and --model, the served model name)")
    configs = _configs(args, ("server", "none"), "server")
    workloads = [make(n, _shape(args, args.vocab or 32000), args.seed) for n in names]
    for cfg in configs:
        target = OpenAITarget(cfg, args.url, args.model, unique_salt=cfg == "none")
        _phase(target, cfg, workloads, arrival, progress, summaries, results)
    params["url"] = args.url


def _model_config(model_dir: str) -> tuple[int, int]:
    """(vocabulary size, context length) of a model directory, or defaults."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    return int(cfg.get("vocab_size", 32000)), min(8192, int(cfg.get("max_position_embeddings", 4096)))


def _run_vllm(args: argparse.Namespace, names: list[str], arrival: Arrival, progress: Progress,
              summaries: list[report.Summary], results: dict[str, list[Result]], params: dict[str, Any],
              notes: list[str]) -> None:
    """``vllm serve`` (HTTP, streaming) or ``vllm.LLM`` in a worker (waves): one engine per group."""
    from .llm_api import LLMTarget, LLMWorker
    from .targets import OpenAITarget

    if not args.model:
        raise SystemExit(f"--engine {args.engine} needs --model DIR (a model directory vLLM can load)")
    configs = _configs(args, eng.VLLM_CONFIGS, "none,prefix,lmcache")
    python = eng.python_with("vllm", args.vllm_python)
    if python is None:
        raise SystemExit("no interpreter imports vllm and lmcache_core; pass --vllm-python")
    vocab, context = _model_config(args.model)
    workloads = [make(n, _shape(args, vocab), args.seed) for n in names]
    longest = max((len(r.tokens) + r.max_tokens for w in workloads for r in w.requests), default=0)
    if longest > context:
        raise SystemExit(f"the longest prompt has {longest} tokens, the model's context is {context}; "
                         "use --scale below 1 or --quick")
    tiers = [t for t in args.tiers.split(",") if t]
    run_salt = uuid.uuid4().hex[:8]
    startups: dict[str, float] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="lmcache-bench-"))
    for group, cfgs in eng.server_groups(configs):
        connector, env, py, daemon = None, {}, python, None
        if group == "lmcache":
            connector = eng.lmcache_connector({"tiers": tiers, "chunk_size": args.chunk_size, "salt": run_salt})
        elif group == "lmcache-daemon":
            if not args.daemon:
                daemon = eng.start_daemon(tiers, args.chunk_size, log_dir)
            socket_path = args.daemon or daemon.socket
            connector = eng.lmcache_connector({"daemon": f"daemon://{socket_path}", "chunk_size": args.chunk_size,
                                               "salt": run_salt})
        elif group == "upstream":
            py = eng.python_with("lmcache", args.upstream_python) or ""
            if not py:
                notes.append("upstream: no interpreter imports vllm, lmcache and lmcache_core "
                             "(pass --upstream-python); skipped")
                continue
            connector, env = eng.upstream_connector()
        server: eng.VLLMServer | LLMWorker
        if args.engine == "vllm-llm":
            server = LLMWorker(py, args.model, connector=connector, env=env, log_dir=log_dir, max_model_len=context,
                               num_blocks=args.kv_blocks)
        else:
            server = eng.VLLMServer(py, args.model, connector=connector, env=env, log_dir=log_dir,
                                    max_model_len=context,
                                    extra_args=("--num-gpu-blocks-override", str(args.kv_blocks)) if args.kv_blocks
                                    else ())
        try:
            try:
                server.start()
            except RuntimeError as exc:
                if group == "upstream":  # a peer that does not run here is a finding, not a bench error
                    notes.append(f"upstream: {args.engine} with LMCacheConnectorV1 did not start: "
                                 f"{str(exc)[-600:]}")
                    continue
                raise
            startups[group] = round(server.startup_s, 1)
            for cfg in cfgs:
                target: Any = (LLMTarget(cfg, server, unique_salt=cfg == "none") if isinstance(server, LLMWorker)
                               else OpenAITarget(cfg, server.url, "bench", unique_salt=cfg == "none"))
                _phase(target, cfg, workloads, arrival, progress, summaries, results)
            if group == "upstream":
                notes.append("upstream: " + eng.upstream_findings(server.log_path))
        finally:
            server.close()
            if daemon is not None:
                daemon.stop()
    params["server_startup_s"] = startups


def _run_transformers(args: argparse.Namespace, names: list[str], arrival: Arrival, progress: Progress,
                      summaries: list[report.Summary], results: dict[str, list[Result]], params: dict[str, Any],
                      notes: list[str]) -> None:
    from rich.console import Console

    from ..config import Config, default_cache_dir
    from ..demo import load_model
    from ..engine import CacheEngine
    from ..integrations.transformers import CachedModel, geometry_for, model_identity
    from .targets import CachedModelTarget

    configs = _configs(args, eng.HF_CONFIGS, "none,lmcache")
    model, _, model_name = load_model(default_cache_dir(), args.model == "random", Console(stderr=True))
    params["model"] = model_name
    workloads = [make(n, _shape(args, int(model.config.vocab_size)), args.seed) for n in names]
    tiers = [t for t in args.tiers.split(",") if t]
    run_salt = uuid.uuid4().hex[:8]
    for cfg in configs:
        extra: dict[str, Any] = {"tiers": tiers, "chunk_size": args.chunk_size, "device": "cpu",
                                 "salt": f"{run_salt}-{cfg}"}
        if cfg == "lmcache-adaptive":
            extra["load_policy"] = "adaptive"
        daemon = None
        if cfg == "lmcache-daemon":
            if not args.daemon:
                daemon = eng.start_daemon(tiers, args.chunk_size, Path(tempfile.mkdtemp(prefix="lmcache-bench-")))
            extra["daemon"] = f"daemon://{args.daemon or daemon.socket}"
        engine = CacheEngine(geometry_for(model), Config.from_dict(extra), model=model_identity(model))
        try:
            target = CachedModelTarget(cfg, CachedModel(model, engine), use_cache=cfg != "none")
            _phase(target, cfg, workloads, arrival, progress, summaries, results)
            if cfg == "lmcache-adaptive":
                params["policy_stats"] = engine.policy.stats()
        finally:
            engine.close()
            if daemon is not None:
                daemon.stop()


def cmd_policy(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .policy_bench import PolicyShape, policy_costs, policy_model, policy_stats, run_policy_bench

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    console = Console()
    shape = PolicyShape(requests=args.requests)
    model = policy_model()
    link = args.link_mb_s * 1e6 if args.local_s3 else 0.0
    costs = policy_costs(model, shape, link)
    console.print("costs (s, best of 3): " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()))
    if args.costs_only:
        path = Path(args.json) if args.json else default_json("policy-costs")
        report.write_json(path, summaries=[], results={}, params={"shape": shape.__dict__, "threads": args.threads,
                                                                  "link_mb_s": args.link_mb_s, "costs": costs})
        console.print(f"results: {path}")
        return 0
    slow, server, proxy, writer = args.slow_tier or None, None, None, None
    if args.local_s3:
        from ..testing.servers import SeaweedS3
        from .throttle import ProxyProcess

        server = SeaweedS3().start()
        bucket = server.create_bucket(f"lmcache-bench-{uuid.uuid4().hex[:8]}")
        if args.link_mb_s > 0:
            proxy = ProxyProcess(server.port, args.link_mb_s * 1e6)
            slow = server.url(bucket, endpoint_url=proxy.endpoint_url)
            writer = server.url(bucket)
        else:
            slow = server.url(bucket)
    try:
        run = run_policy_bench(model, slow, shape, writer_tier=writer)
    finally:
        if proxy is not None:
            proxy.close()
        if server is not None:
            server.close()
    results = run.results
    summaries = [report.summarize(cfg, "policy-" + ("slow" if slow else "memory"), rs,
                                  sum(r.total_s for r in rs)) for cfg, rs in results.items()]
    console.print(report.table(summaries, title="load_policy: " + ("slow tier" if slow else "memory tier")))
    console.print("mean TTFT without the first request (ms): " + ", ".join(
        f"{k} {v * 1e3:.1f}" for k, v in policy_stats(results, 1).items()))
    path = Path(args.json) if args.json else default_json("policy")
    report.write_json(path, summaries=summaries, results=results,
                      params={"slow_tier": bool(slow), "requests": args.requests, "shape": shape.__dict__,
                              "link_mb_s": args.link_mb_s if args.local_s3 else None, "threads": args.threads,
                              "costs": costs, "adaptive_estimates": run.policy})
    console.print(f"results: {path}")
    return 0
