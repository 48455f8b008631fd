"""``lmcache``: list plugins, show the resolved config, run the demo, run the conformance suite."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _cmd_plugins(args: argparse.Namespace) -> int:
    """Every plugin and what it registers; each factory is imported, so an import error, a
    missing package or a name two plugins registered shows here. Never crashes on a plugin."""
    from .plugins import get_plugin_manager

    pm = get_plugin_manager()
    infos = sorted(pm.plugins.values(), key=lambda p: (not p.builtin, p.name))
    problems = pm.problems()
    if args.json:
        print(json.dumps([p.to_json(problems) for p in infos], indent=2))
        for col in pm.collisions:
            print(f"error: {col.message}", file=sys.stderr)
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="lmcache plugins")
    for col in ("plugin", "distribution", "version", "status", "provides"):
        table.add_column(col)
    for p in infos:
        lines = []
        for r in p.registrations:
            line = f"{r.kind} {r.name}" + (f" ({', '.join(s + '://' for s in r.schemes)})" if r.schemes else "")
            problem = problems.get(r, "")
            if problem:
                line += f"  [{'conflict' if 'registered by' in problem else 'unavailable'}: {problem}]"
            lines.append(line)
        status = p.status + (f": {p.reason}" if p.reason else "")
        # Plugin text is data, not rich markup: "lmcache-core[ascend]" must print as written.
        table.add_row(*(escape(x) for x in (p.name, p.distribution, p.version, status, "\n".join(lines))))
    Console().print(table)
    for col in pm.collisions:
        print(f"error: {col.message}", file=sys.stderr)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from .config import Config

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key] = value
    cfg = Config.load(args.file, overrides)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _cmd_config_import(args: argparse.Namespace) -> int:
    """An upstream LMCache YAML -> the equivalent lmcache-core config, checked to load first."""
    from pathlib import Path

    from .config import Config, _read_yaml
    from .upstream_config import convert, render

    imported = convert(_read_yaml(Path(args.file)))
    Config.from_dict(imported.config)  # the result must load, or nothing is written
    text = render(imported, args.file)
    if not args.output:
        print(text, end="")
        return 0
    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    out.write_text(text)
    print(f"wrote {out} ({len(imported.dropped)} upstream settings not carried over, listed in it)", file=sys.stderr)
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    """``detect()`` of every registered device; a device that fails to import, collides or
    raises in ``detect()`` is a row that says so, never a traceback."""
    from .plugins import get_plugin_manager

    pm = get_plugin_manager()
    rows = []
    for name, reg in sorted(pm.registrations("device").items()):
        row = {"device": name, "distribution": reg.distribution, "available": False, "reason": "", "count": 0}
        try:
            cls = reg.load()
        except Exception as exc:  # noqa: BLE001 - listing never crashes on a plugin
            row["reason"] = str(exc)
            rows.append(row)
            continue
        try:
            det = cls.detect()
            row.update(available=bool(det.available), reason=det.reason, count=det.count)
        except Exception as exc:  # noqa: BLE001 - detect() must not raise; say that it did
            row["reason"] = f"detect() raised {type(exc).__name__}: {exc}"
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="lmcache devices")
    for col in ("device", "distribution", "available", "count", "reason"):
        table.add_column(col)
    for r in rows:
        # Plugin text is data, not rich markup (a reason may hold "lmcache-core[rocm]").
        table.add_row(*(escape(str(x)) for x in (r["device"], r["distribution"], "yes" if r["available"] else "no",
                                                 r["count"], r["reason"])))
    Console().print(table)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and len(argv) > 1:
        from .bench.cli import SCRIPTS, cmd_script

        if argv[1] in SCRIPTS:  # every argument is the script's own (argparse's REMAINDER drops leading options)
            return cmd_script(argparse.Namespace(script=SCRIPTS[argv[1]], args=argv[2:]))
    if argv[:1] == ["conformance"]:
        try:
            from lmcache_conformance.cli import main as conformance_main
        except ImportError:
            print('the conformance suite is not installed; install it with: pip install "lmcache-core[conformance]"',
                  file=sys.stderr)
            return 2
        return int(conformance_main(argv[1:]) or 0)

    parser = argparse.ArgumentParser(prog="lmcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list plugins, their distributions and what they register")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("config", help="configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved configuration")
    show.add_argument("--file", help="YAML config file (default: $LMCACHE_CONFIG_FILE)")
    show.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_cmd_config)
    imp = csub.add_parser("import", help="convert an upstream LMCache YAML config into an lmcache-core one")
    imp.add_argument("file", help="the upstream LMCache YAML file")
    imp.add_argument("-o", "--output", help="write the config here (default: print it)")
    imp.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    imp.set_defaults(func=_cmd_config_import)

    p = sub.add_parser("devices", help="detect every registered device (no device context is created)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_devices)

    p = sub.add_parser("demo", help="run a real small model with and without the cache")
    p.add_argument("--cache-dir", help="where chunks and the converted model live (default ~/.cache/lmcache-core)")
    p.add_argument("--phase", choices=("all", "first", "reuse"), default="all", help=argparse.SUPPRESS)
    p.add_argument("--random-model", action="store_true", help="use a random-weight Llama instead of SmolLM2")
    p.add_argument("--quick", action="store_true", help="a quarter of the document, two questions, two chat turns")
    p.add_argument("--full", action="store_true", help="the whole document and every request (several minutes)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_demo)

    sub.add_parser("conformance", help="run the conformance suite (lmcache conformance --help)")

    from .bench.cli import add_parser as add_bench_parser  # workloads against engines: docs/bench.md

    add_bench_parser(sub)

    from .daemon.cli import add_commands as add_daemon_commands

    add_daemon_commands(sub)  # serve, status, stats, clear, invalidate

    from .integrations.vllm.proxy import add_parser as add_proxy_parser  # stdlib only: no vLLM import

    add_proxy_parser(sub)  # disaggregated prefill in front of vLLM servers: docs/p2p.md

    args = parser.parse_args(argv)
    from .errors import LMCacheError

    try:
        return int(args.func(args) or 0)
    except LMCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
