"""``lmcache``: list plugins, show the resolved config, run the demo, run the conformance suite."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import get_plugin_manager

    pm = get_plugin_manager()
    infos = sorted(pm.plugins.values(), key=lambda p: (not p.builtin, p.name))
    if args.json:
        print(json.dumps([p.to_json() for p in infos], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lmcache plugins")
    for col in ("plugin", "distribution", "version", "status", "provides"):
        table.add_column(col)
    for p in infos:
        provides = "\n".join(
            f"{r.kind} {r.name}" + (f" ({', '.join(s + '://' for s in r.schemes)})" if r.schemes else "")
            + ("" if not r.missing_modules() else f"  [needs: {r.install_hint()}]")
            for r in p.registrations
        )
        status = p.status + (f": {p.reason}" if p.reason else "")
        table.add_row(p.name, p.distribution, p.version, status, provides)
    Console().print(table)
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


def _cmd_devices(args: argparse.Namespace) -> int:
    from .errors import MissingDependencyError
    from .plugins import get_plugin_manager

    pm = get_plugin_manager()
    rows = []
    for name, reg in sorted(pm.registrations("device").items()):
        try:
            det = reg.load().detect()
            rows.append({"device": name, "available": det.available, "reason": det.reason, "count": det.count})
        except MissingDependencyError as exc:
            rows.append({"device": name, "available": False, "reason": str(exc), "count": 0})
    print(json.dumps(rows, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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

    p = sub.add_parser("devices", help="detect every registered device (no device context is created)")
    p.set_defaults(func=_cmd_devices)

    p = sub.add_parser("demo", help="run a real small model with and without the cache")
    p.add_argument("--cache-dir", help="where chunks and the converted model live (default ~/.cache/lmcache-core)")
    p.add_argument("--phase", choices=("all", "first", "reuse"), default="all", help=argparse.SUPPRESS)
    p.add_argument("--random-model", action="store_true", help="use a random-weight Llama instead of SmolLM2")
    p.add_argument("--quick", action="store_true", help="a quarter of the document, two questions, two chat turns")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_demo)

    sub.add_parser("conformance", help="run the conformance suite (lmcache conformance --help)")

    args = parser.parse_args(argv)
    from .errors import LMCacheError

    try:
        return int(args.func(args) or 0)
    except LMCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
