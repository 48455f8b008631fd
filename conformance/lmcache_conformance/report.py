"""The conformance report: per-test results collected from pytest, the table, the JSON file.

The JSON is what a vendor publishes: schema name, date, the machine, versions
of everything involved, the plugins under test (with detection results), one
entry per test (id, outcome, reason, duration, figures), a summary and the
xfail file's unmatched entries. The table folds it to plugin x contract.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import os
import platform
import socket
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import pytest

from .targets import redact_argv

SCHEMA = "lmcache-conformance-report/1"
CONTRACT_ORDER = ("chunk", "pipelining", "zero-copy", "storage", "transport")


@dataclass
class ContractResult:
    """One test's outcome: passed, failed, error, skipped, xfailed or xpassed."""

    id: str
    kind: str
    plugin: str
    contract: str
    test: str
    outcome: str
    reason: str = ""
    duration_s: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    nodeid: str = ""


class Collector:
    """A pytest plugin object gathering :class:`ContractResult` s (passed to ``pytest.main``)."""

    def __init__(self) -> None:
        self.results: dict[str, ContractResult] = {}
        self.config: pytest.Config | None = None

    def pytest_configure(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        info: dict[str, Any] | None = dict(report.user_properties).get("lmcache")  # type: ignore[assignment]
        if info is None:
            return
        res = self.results.get(report.nodeid)
        if res is None:
            res = ContractResult(info["id"], info["kind"], info["plugin"], info["contract"], info["test"],
                             "passed", nodeid=report.nodeid)
            self.results[report.nodeid] = res
        res.duration_s = round(res.duration_s + report.duration, 4)
        for k, v in report.user_properties:
            if isinstance(k, str) and k.startswith("figure:"):
                res.figures[k[len("figure:"):]] = v
        if hasattr(report, "wasxfail"):
            res.outcome = "xfailed" if report.skipped else "xpassed"
            res.reason = str(report.wasxfail)
            if report.skipped and report.longrepr is not None:
                res.reason += f" | {_first_line(report)}"
            return
        if report.skipped:
            if res.outcome == "passed":
                res.outcome, res.reason = "skipped", _skip_reason(report)
        elif report.failed:
            if res.outcome not in ("failed", "error"):
                res.outcome = "failed" if report.when == "call" else "error"
                res.reason = _first_line(report)


def _skip_reason(report: pytest.TestReport) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        reason = str(lr[2])
        return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    return str(lr)


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).strip()[:2000]
    return str(report.longrepr).strip().splitlines()[-1][:2000] if report.longrepr else ""


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """Facts about the host that ran the suite (no user names, no secrets)."""
    out: dict[str, Any] = {
        "hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
    }
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["torch_hip"] = getattr(torch.version, "hip", None)
        if torch.cuda.is_available():
            out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001 - the report must be written even without torch
        out["torch"] = f"unavailable: {exc}"
    return out


def versions(distributions: Iterable[str]) -> dict[str, str | None]:
    names = {"lmcache-core", "lmcache-conformance", "torch", "pytest", "hypothesis", "pluggy", *distributions}
    return {n: _version(n) for n in sorted(names) if n}


def summarize(results: Iterable[ContractResult]) -> dict[str, int]:
    out = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    for r in results:
        out[r.outcome] = out.get(r.outcome, 0) + 1
    out["total"] = sum(out.values())
    return out


def build_report(results: list[ContractResult], targets: list[dict[str, Any]], *, argv: list[str],
                 exit_status: int, xfail: dict[str, Any] | None, telemetry: dict[str, Any]) -> dict[str, Any]:
    dists = {t.get("distribution", "") for t in targets}
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["lmcache", "conformance", *redact_argv(argv)],
        "machine": machine(),
        "versions": versions(dists),
        "plugins": targets,
        "telemetry": telemetry,
        "summary": summarize(results),
        "exit_status": exit_status,
        "xfail": xfail,
        "results": [asdict(r) for r in sorted(results, key=lambda r: r.id)],
    }


@dataclass(frozen=True)
class Cell:
    """One plugin x contract square of the table."""

    status: str  # "pass" | "fail" | "skip" | "-"
    text: str


def table_cells(results: Iterable[ContractResult]) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
    """Rows (``kind:plugin``), columns (contracts) and cell summaries."""
    groups: dict[tuple[str, str], list[ContractResult]] = {}
    for r in results:
        groups.setdefault((f"{r.kind}:{r.plugin}", r.contract), []).append(r)
    rows = sorted({k[0] for k in groups})
    cols = [c for c in CONTRACT_ORDER if any(k[1] == c for k in groups)]
    cols += sorted({k[1] for k in groups} - set(cols))
    cells = {}
    for key, rs in groups.items():
        n = {o: sum(1 for r in rs if r.outcome == o) for o in
             ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
        bad = n["failed"] + n["error"]
        extra = "".join(f", {n[o]} {o}" for o in ("xfailed", "xpassed") if n[o]) + _figure_note(rs)
        if bad:
            first = next(r for r in rs if r.outcome in ("failed", "error"))
            cells[key] = Cell("fail", f"FAIL {bad}/{len(rs)}{extra}: {first.test}: {first.reason[:400]}")
        elif n["passed"] or n["xpassed"] or n["xfailed"]:
            skipped = f", {n['skipped']} skipped" if n["skipped"] else ""
            cells[key] = Cell("pass", f"pass {n['passed']}/{len(rs)}{skipped}{extra}")
        else:
            reasons = sorted({r.reason for r in rs})
            cells[key] = Cell("skip", f"skip: {reasons[0][:160]}" + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""))
    return rows, cols, cells


def _figure_note(rs: list[ContractResult]) -> str:
    """The measured overlap beside the threshold it is judged by, for the pipelining cell."""
    for r in rs:
        f = r.figures
        if "overlap_hidden_fraction" in f and "overlap_required_fraction" in f:
            return (f", overlap {float(f['overlap_hidden_fraction']):.1%} hidden "
                    f"(required {float(f['overlap_required_fraction']):.0%})")
    return ""


def render_table(results: list[ContractResult], *, width: int | None = None) -> str:
    """The plugin x contract table as text (rich, no colour codes), ready for a log."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    rows, cols, cells = table_cells(results)
    table = Table(title="lmcache conformance", show_lines=True)
    table.add_column("plugin", no_wrap=True)
    for c in cols:
        table.add_column(c, overflow="fold")
    for row in rows:
        table.add_row(row, *[cells.get((row, c), Cell("-", "-")).text for c in cols])
    buf = StringIO()
    Console(file=buf, width=width or 160, no_color=True, force_terminal=False).print(table)
    return buf.getvalue()


__all__ = ["SCHEMA", "Cell", "Collector", "ContractResult", "build_report", "machine", "render_table",
           "summarize", "table_cells", "versions"]
