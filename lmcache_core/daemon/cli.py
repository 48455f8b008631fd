"""``lmcache serve`` and the admin commands that call its HTTP API (status, stats, clear, invalidate)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import urllib.error
import urllib.request
from typing import Any

DEFAULT_ADMIN = "http://127.0.0.1:8089"


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..config import Config
    from .server import Daemon, serve_forever
    from .settings import hash_token, load_settings

    if args.hash_token:
        print(hash_token(args.hash_token))
        return 0
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lmcache_core").setLevel(args.log_level)
    path = args.config or os.environ.get("LMCACHE_CONFIG_FILE")
    config = Config.load(path)
    settings = load_settings(path, {"socket": args.socket, "http": args.http, "tcp": args.tcp,
                                    "arena_dir": args.arena_dir, "memory": args.memory})
    serve_forever(Daemon(settings, config))
    return 0


def _admin(args: argparse.Namespace, path: str, body: dict[str, Any] | None = None) -> Any:
    url = args.url.rstrip("/") + path
    token = args.token or os.environ.get("LMCACHE_ADMIN_TOKEN", "")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise SystemExit(f"error: {url}: HTTP {exc.code}: {detail.strip()}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SystemExit(f"error: no daemon admin API at {args.url} ({exc}); start `lmcache serve --http "
                         "127.0.0.1:8089` or pass --url") from None


def _cmd_status(args: argparse.Namespace) -> int:
    health = _admin(args, "/health")
    stats = _admin(args, "/stats")
    print(f"daemon {args.url}: {health['status']}, protocol {health['protocol']}, "
          f"{health['sessions']} client(s), up {stats['uptime_s']} s")
    for name, t in stats["tenants"].items():
        mem = t["tiers"].get("memory", {})
        print(f"  tenant {name}: arena {t['arena_used'] >> 20}/{t['arena_bytes'] >> 20} MiB, memory tier "
              f"{mem.get('used_bytes', 0) >> 20} MiB in {mem.get('items', 0)} chunks, {t['sessions']} session(s), "
              f"models {', '.join(t['models']) or '-'}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    print(json.dumps(_admin(args, "/stats"), indent=2))
    return 0


def _tenant_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.tenant:
        body["tenant"] = args.tenant
    if args.model:
        body["model"] = args.model
    return body


def _cmd_clear(args: argparse.Namespace) -> int:
    print(json.dumps(_admin(args, "/invalidate", _tenant_body(args))))
    return 0


def _cmd_invalidate(args: argparse.Namespace) -> int:
    body = _tenant_body(args)
    if args.tokens:
        try:
            body["tokens"] = [int(t) for t in args.tokens.replace(",", " ").split()]
        except ValueError:
            raise SystemExit("error: --tokens takes token ids, e.g. --tokens 1,2,3") from None
    print(json.dumps(_admin(args, "/invalidate", body)))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the cache as its own process (daemon mode; docs/daemon.md)")
    p.add_argument("--config", help="YAML config (tiers and the serve: section; default $LMCACHE_CONFIG_FILE)")
    p.add_argument("--socket", help="Unix socket path (default /tmp/lmcache-core.sock)")
    p.add_argument("--http", metavar="HOST:PORT", help="admin API address, e.g. 127.0.0.1:8089")
    p.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (needs --arena-dir)")
    p.add_argument("--arena-dir", help="back arenas with files here (e.g. /dev/shm) instead of memfds")
    p.add_argument("--memory", help="memory tier per tenant, e.g. 8GiB")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--hash-token", metavar="TOKEN", help="print the SHA-256 to put in serve.tenants and exit")
    p.set_defaults(func=_cmd_serve)
    for name, func, helptext in (("status", _cmd_status, "the daemon's health and tenants"),
                                 ("stats", _cmd_stats, "the daemon's statistics as JSON"),
                                 ("clear", _cmd_clear, "drop a tenant's chunks (all, or one model's)"),
                                 ("invalidate", _cmd_invalidate, "drop chunks of a token prefix or a model")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--url", default=os.environ.get("LMCACHE_ADMIN_URL", DEFAULT_ADMIN),
                       help=f"admin API (default $LMCACHE_ADMIN_URL or {DEFAULT_ADMIN})")
        p.add_argument("--token", help="admin or tenant token (default $LMCACHE_ADMIN_TOKEN)")
        if name in ("clear", "invalidate"):
            p.add_argument("--tenant")
            p.add_argument("--model")
        if name == "invalidate":
            p.add_argument("--tokens", help="token ids of the prefix, comma or space separated")
        p.set_defaults(func=func)


__all__ = ["add_commands"]
