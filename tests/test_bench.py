"""lmcache bench: workloads from a seed, the runner's arrival modes, the report, and a short run of
the transformers target (a real random-weight Llama behind CachedModel)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from lmcache_core.bench import Arrival, Outcome, Request, Shape, make, run, summarize
from lmcache_core.bench.report import plot, table, write_json
from lmcache_core.bench.workloads import zipf_weights
from lmcache_core.cli import main

SMALL = Shape(vocab=512, users=3, rounds=3, docs=8, queries=10, qa_docs=2, questions=3, control_requests=5)


def test_workloads_are_a_function_of_the_seed():
    for name in ("chat", "rag", "qa", "control"):
        a, b, c = make(name, SMALL, 1), make(name, SMALL, 1), make(name, SMALL, 2)
        assert a == b and a.requests != c.requests, name
        assert all(16 <= t < 512 for r in a.requests for t in r.tokens), name
        assert len({r.id for r in a.requests}) == len(a.requests), name


def test_chat_history_grows_turn_by_turn():
    w = make("chat", SMALL, 0)
    assert len(w.sessions) == 3 and all(len(s) == 3 for s in w.sessions)
    for s in w.sessions:
        for prev, cur in zip(s, s[1:]):
            assert cur.tokens[: len(prev.tokens)] == prev.tokens  # the previous prompt is a prefix
            assert len(cur.tokens) == len(prev.tokens) + SMALL.answer + SMALL.user_turn
    assert w.sessions[0][0].tokens[: SMALL.system] == w.sessions[1][0].tokens[: SMALL.system]


def test_rag_draws_popular_documents_first():
    w = make("rag", Shape(vocab=512, docs=20, queries=200, k=2, doc_len=8, system=4, question=4), 0)
    weights = zipf_weights(20, 1.1)
    assert weights[0] > weights[-1] * 20
    firsts = [r.tokens[4:12] for r in w.requests]
    most = max(set(firsts), key=firsts.count)
    assert firsts.count(most) > 200 * 0.25  # the top document leads a good share of the queries
    assert all(len(r.tokens) == 4 + 2 * 8 + 4 for r in w.requests)


def test_control_has_no_reuse_beyond_its_short_system_prompt():
    w = make("control", SMALL, 0)
    bodies = {r.tokens[32:] for r in w.requests}
    assert len(bodies) == len(w.requests)


class _Recorder:
    """A target of our own (the runner's logic only): records when each request ran."""

    name = "recorder"

    def __init__(self, concurrent: bool, fail: str = "") -> None:
        self.concurrent = concurrent
        self.fail = fail
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.seen: list[str] = []

    def generate(self, r: Request) -> Outcome:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.seen.append(r.id)
        time.sleep(0.01)
        with self.lock:
            self.active -= 1
        if r.id == self.fail:
            raise RuntimeError("boom")
        return Outcome(0.001, 0.002, r.max_tokens, len(r.tokens) // 2)

    def info(self) -> dict[str, object]:
        return {}


def test_runner_closed_loop_keeps_turns_in_order_and_bounds_concurrency():
    w = make("chat", SMALL, 0)
    t = _Recorder(concurrent=True, fail="chat-u1-r1")
    rs = run(t, w, Arrival(concurrency=2))
    assert len(rs) == 9 and t.most == 2
    for s in w.sessions:
        order = [t.seen.index(r.id) for r in s]
        assert order == sorted(order)
    failed = [r for r in rs if r.error]
    assert [r.id for r in failed] == ["chat-u1-r1"] and "boom" in failed[0].error
    s = summarize("x", "chat", rs, 1.0)
    assert s.errors == 1 and s.requests == 9
    assert s.hit_rate == pytest.approx(0.5, abs=0.01)
    one = _Recorder(concurrent=False)
    assert len(run(one, w, Arrival(concurrency=4))) == 9 and one.most == 1  # CachedModel: one at a time


class _Batched:
    """A batched target of our own (the LLM API's way): records each wave it is handed."""

    name = "batched"
    concurrent = True
    batched = True

    def __init__(self, fail_wave: int = -1) -> None:
        self.waves: list[list[str]] = []
        self.fail_wave = fail_wave

    def generate_batch(self, reqs: list[Request]) -> list[Outcome]:
        self.waves.append([r.id for r in reqs])
        if len(self.waves) - 1 == self.fail_wave:
            raise RuntimeError("engine died")
        return [Outcome(0.001, 0.002, r.max_tokens, 0) for r in reqs]

    def generate(self, r: Request) -> Outcome:
        return self.generate_batch([r])[0]

    def info(self) -> dict[str, object]:
        return {}


def test_runner_feeds_a_batched_target_waves_of_the_closed_loop():
    w = make("chat", SMALL, 0)  # 3 users x 3 rounds
    t = _Batched()
    rs = run(t, w, Arrival(concurrency=2))
    assert len(rs) == 9 and not any(r.error for r in rs)
    # two users at a time, turn by turn; the third user takes the first free place
    assert t.waves[:3] == [["chat-u0-r0", "chat-u1-r0"], ["chat-u0-r1", "chat-u1-r1"],
                           ["chat-u0-r2", "chat-u1-r2"]]
    assert t.waves[3:] == [["chat-u2-r0"], ["chat-u2-r1"], ["chat-u2-r2"]]
    rag = make("rag", SMALL, 0)
    f = _Batched(fail_wave=1)
    rs = run(f, rag, Arrival(concurrency=4))
    assert [len(x) for x in f.waves] == [4, 4, 2]
    assert sorted(r.id for r in rs if r.error) == sorted(f.waves[1]) and "engine died" in rs[4].error
    po = _Batched()
    rs = run(po, rag, Arrival(rate=200.0, seed=1))  # open loop: what has arrived when the engine is free
    assert len(rs) == 10 and sum(map(len, po.waves)) == 10 and not any(r.error for r in rs)


def test_runner_poisson_arrivals_spread_over_time():
    w = make("rag", SMALL, 0)
    t = _Recorder(concurrent=True)
    t0 = time.perf_counter()
    rs = run(t, w, Arrival(rate=100.0, seed=3))
    wall = time.perf_counter() - t0
    assert len(rs) == 10 and not any(r.error for r in rs)
    starts = sorted(r.start_s for r in rs)
    assert starts[-1] > 0.03  # ten arrivals at 100/s take about 0.1 s, not all at once
    assert wall < 5


def test_report_json_table_and_plot(tmp_path):
    w = make("qa", SMALL, 0)
    rs = run(_Recorder(concurrent=True), w, Arrival(concurrency=3))
    s = summarize("cfg", "qa", rs, 0.5)
    path = write_json(tmp_path / "r.json", summaries=[s], results={"qa/cfg": rs}, params={"a": 1})
    doc = json.loads(path.read_text())
    assert doc["summaries"][0]["requests"] == len(w.requests) and doc["machine"]["cpus"]
    assert len(doc["results"]["qa/cfg"]) == len(w.requests)
    assert table([s]).row_count == 1
    out = plot(tmp_path / "p.png", {"qa/cfg": rs})
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert out is None and not (tmp_path / "p.png").exists()
    else:
        assert out is not None and out.stat().st_size > 1000


def test_plot_command_takes_several_runs(tmp_path):
    rs = run(_Recorder(concurrent=True), make("qa", SMALL, 0), Arrival(concurrency=2))
    paths = [write_json(tmp_path / f"r{i}.json", summaries=[], results={"qa/x": rs}, params={}) for i in (1, 2)]
    png = tmp_path / "p.png"
    rc = main(["bench", "plot", *map(str, paths), str(png)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc == 2 and not png.exists()  # said so on stderr; matplotlib is never a dependency
    else:
        assert rc == 0 and png.stat().st_size > 1000


@pytest.mark.slow
def test_bench_run_transformers_end_to_end(tmp_path, capsys):
    """The CLI against a real random-weight Llama behind CachedModel: no cache and embedded lmcache."""
    out = tmp_path / "bench.json"
    rc = main(["bench", "run", "--engine", "transformers", "--model", "random", "--configs",
               "none,lmcache,lmcache-adaptive", "--workloads", "chat,qa", "--quick", "--scale", "0.25",
               "--chunk-size", "16", "--max-tokens", "2", "--no-progress", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    by = {(s["workload"], s["config"]): s for s in doc["summaries"]}
    assert set(by) == {(w, c) for w in ("chat", "qa") for c in ("none", "lmcache", "lmcache-adaptive")}
    assert all(s["errors"] == 0 and s["requests"] > 0 for s in by.values())
    assert by[("chat", "none")]["cached_tokens"] == 0
    assert by[("chat", "lmcache")]["cached_tokens"] > 0  # later turns load the earlier ones
    assert "policy_stats" in doc["params"]


def test_policy_costs_measure_what_the_case_is_made_of():
    """lmcache bench policy's derivation, on a small shape: each step timed, the link computed."""
    from lmcache_core.bench.policy_bench import PolicyShape, policy_costs, policy_model

    shape = PolicyShape(system=256, doc=128, question=32, chunk_size=64)
    costs = policy_costs(policy_model(), shape, link_bytes_per_s=4e6, repeats=1)
    assert costs["kv_bytes_per_token"] == 4096  # 2 layers x K,V x 4 heads x 64 x fp32
    assert costs["load_doc_over_link_s"] == pytest.approx(128 * 4096 / 4e6)
    for k in ("prefill_whole_prompt_s", "prefill_system_s", "prefill_doc_and_question_behind_system_s",
              "prefill_question_behind_doc_s", "copy_system_from_memory_s"):
        assert 0 < costs[k] < 30, (k, costs)


def test_component_benchmarks_get_every_argument(capsys) -> None:  # type: ignore[no-untyped-def]
    """``lmcache bench SCRIPT --option``: options reach the script (argparse's REMAINDER would
    reject an option in first place)."""
    from lmcache_core.cli import main as lmcache_main

    assert lmcache_main(["bench", "lookup", "--help"]) == 0
    assert "--tokens" in capsys.readouterr().out
    assert lmcache_main(["bench", "lookup", "--no-such-option"]) == 2  # the script's own usage error
