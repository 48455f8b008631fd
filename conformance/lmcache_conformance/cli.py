"""``lmcache conformance``: run the contract suite over plugins, print the table, write the report.

The core CLI delegates ``lmcache conformance ARGS`` to :func:`main`; ``python -m
lmcache_conformance`` and ``lmcache-conformance`` call it too. The suite runs
in-process under pytest with this package's own settings (``suite/pytest.ini``),
whatever the current directory is. Exit status: 0 when nothing failed (known
failures from ``--xfail-file`` do not count), 1 when a test failed or a plugin
or URL named on the command line cannot be resolved or loaded, 2 on a usage
error, when two plugins registered one name or scheme, or when pytest could
not run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

SUITE_DIR = Path(__file__).resolve().parent / "suite"
SUITES = {"device": "suite_devices.py", "storage": "suite_storage.py", "transport": "suite_transports.py",
          "codec": "suite_codecs.py"}
CONTRACTS = ("chunk", "pipelining", "zero-copy", "storage", "transport", "codec")

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmcache conformance",
        description="Run the lmcache contract suite over device, storage and transport plugins. "
                    "With no --device/--storage/--transport, every registered plugin is tested.",
    )
    p.add_argument("--device", action="append", default=[], metavar="NAME",
                   help="device plugin to test (repeatable)")
    p.add_argument("--storage", action="append", default=[], metavar="URL",
                   help="storage URL to test, e.g. redis://127.0.0.1:6379/0 (repeatable)")
    p.add_argument("--transport", action="append", default=[], metavar="NAME",
                   help="transport plugin to test (repeatable)")
    p.add_argument("--codec", action="append", default=[], metavar="SPEC",
                   help="codec (or chain, e.g. lossless+aesgcm) to test (repeatable)")
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument("--xfail-file", metavar="FILE",
                   help="known failures: one test-id pattern per line, '*' wildcards, '# reason'")
    p.add_argument("--contract", action="append", choices=CONTRACTS, default=[],
                   help="run only these contracts (repeatable)")
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k expression to narrow the tests")
    p.add_argument("--print-json", action="store_true", help="also print the JSON report to stdout (CI logs)")
    p.add_argument("--list", action="store_true", help="list the plugins that would be tested and exit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="pytest verbosity")
    p.add_argument("--pytest-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for pytest (repeatable), e.g. --pytest-arg=-x")
    return p


def _kinds(args: argparse.Namespace) -> list[str]:
    named = [k for k, v in (("device", args.device), ("storage", args.storage), ("transport", args.transport),
                            ("codec", args.codec)) if v]
    kinds = named or list(SUITES)
    if args.contract:
        by_kind = {"device": {"chunk", "pipelining", "zero-copy"}, "storage": {"storage", "chunk", "zero-copy"},
                   "transport": {"transport"}, "codec": {"codec"}}
        kinds = [k for k in kinds if by_kind[k] & set(args.contract)]
    return kinds


def _targets(args: argparse.Namespace, kinds: list[str]) -> list[Any]:
    from lmcache_core.plugins import get_plugin_manager

    from .targets import device_targets, storage_targets, transport_targets

    pm = get_plugin_manager()
    out: list[Any] = []
    if "device" in kinds:
        out += device_targets(pm, args.device or None)
    if "storage" in kinds:
        out += storage_targets(pm, args.storage or None)
    if "transport" in kinds:
        out += transport_targets(pm, args.transport or None)
    return out


def pytest_args(args: argparse.Namespace, kinds: list[str]) -> list[str]:
    files = [str(SUITE_DIR / SUITES[k]) for k in kinds if (SUITE_DIR / SUITES[k]).exists()]
    argv = [*files, "-c", str(SUITE_DIR / "pytest.ini"), "--rootdir", str(SUITE_DIR),
            "-p", "lmcache_conformance.pytest_plugin", "--tb=short", "-rfE"]
    argv.append("-" + "v" * args.verbose if args.verbose else "-q")
    for name in args.device:
        argv += ["--lmcache-device", name]
    for url in args.storage:
        argv += ["--lmcache-storage", url]
    for name in args.transport:
        argv += ["--lmcache-transport", name]
    if args.codec:  # read by suite_codecs.py (codecs are not plugin targets)
        import os

        os.environ["LMCACHE_CONFORMANCE_CODECS"] = ",".join(args.codec)
    if args.xfail_file:
        argv += ["--lmcache-xfail-file", args.xfail_file]
    if args.contract:
        argv += ["-m", " or ".join(f"lmcache_{c.replace('-', '_')}" for c in args.contract)]
    if args.keyword:
        argv += ["-k", args.keyword]
    argv += args.pytest_arg
    return argv


def _collisions(kinds: list[str]) -> list[str]:
    """Messages of the name/scheme collisions that touch the kinds under test (a device's
    round trips go through stores, so storage collisions touch device runs too)."""
    from lmcache_core.plugins import get_plugin_manager

    touched = set(kinds) | ({"storage"} if "device" in kinds else set())
    return [c.message for c in get_plugin_manager().collisions
            if (c.kind if c.kind != "scheme" else "storage") in touched]


def _telemetry(targets: list[Any]) -> dict[str, Any]:
    """``telemetry()`` of every runnable device (management-library facts for the report)."""
    from lmcache_core.plugins import get_plugin_manager

    out: dict[str, Any] = {}
    for t in targets:
        if t.kind != "device" or t.skip or t.error:
            continue
        try:
            dev = get_plugin_manager().get("device", t.name).load()()
            out[t.name] = {"describe": _plain(dev.describe()), "telemetry": _plain(dev.telemetry())}
        except Exception as exc:  # noqa: BLE001 - telemetry is informative, never fatal
            out[t.name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lmcache conformance``; returns the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    kinds = _kinds(args)
    if args.xfail_file and not Path(args.xfail_file).is_file():
        print(f"lmcache conformance: --xfail-file {args.xfail_file!r} does not exist", file=sys.stderr)
        return 2
    collisions = _collisions(kinds)
    if collisions:
        for message in collisions:
            print(f"lmcache conformance: {message}", file=sys.stderr)
        return 2
    targets = _targets(args, kinds)
    errors = [t for t in targets if t.error]
    if args.list:
        for t in targets:
            state = f"FAILS: {t.error}" if t.error else ("runs" if not t.skip else f"skipped: {t.skip}")
            print(f"{t.kind:9} {t.name:20} {t.distribution or '-':28} {state}")
        return 1 if errors else 0
    if not kinds:
        print("lmcache conformance: the --contract choice selects no test of the named plugin kinds",
              file=sys.stderr)
        return 2

    import pytest

    from .report import Collector, build_report, render_table

    collector = Collector()
    code = int(pytest.main(pytest_args(args, kinds), plugins=[collector]))
    from .pytest_plugin import xfail_state  # after pytest.main: pytest imports its plugin itself

    results = list(collector.results.values())
    xf = xfail_state(collector.config) if collector.config is not None else None
    xfail: dict[str, Any] | None = None
    if xf is not None:
        xfail = {"file": xf.path, "entries": len(xf.entries),
                 "unmatched": [{"line": e.line, "pattern": e.pattern, "reason": e.reason} for e in xf.unmatched()]}
    failed = any(r.outcome in ("failed", "error") for r in results) or bool(errors)
    status = 1 if failed else (0 if code in (0, 1, 5) else 2)
    report = build_report(results, [t.to_json() for t in targets], argv=list(argv or []), exit_status=status,
                          xfail=xfail, telemetry=_telemetry(targets))
    print()
    print(render_table(results))
    s = report["summary"]
    print(", ".join(f"{v} {k}" for k, v in s.items() if v and k != "total") or "no tests ran")
    for t in errors:
        who = f" ({t.distribution} {t.version})" if t.distribution else ""
        print(f"FAIL: {t.kind} {t.name!r}{who} cannot be used: {t.error}")
    if xfail is not None:
        for e in xfail["unmatched"]:
            print(f"xfail file {xfail['file']}:{e['line']}: entry {e['pattern']!r} matched no test")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"report written to {args.report}")
    if args.print_json:
        print("LMCACHE-CONFORMANCE-REPORT-BEGIN")
        print(json.dumps(report, indent=2, default=str))
        print("LMCACHE-CONFORMANCE-REPORT-END")
    if code not in (0, 1, 5) and not failed:
        print(f"lmcache conformance: pytest exited with status {code}", file=sys.stderr)
    return status


def console_main() -> None:
    sys.exit(main())


__all__ = ["CONTRACTS", "build_parser", "console_main", "main", "pytest_args"]
