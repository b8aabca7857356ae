"""The ``tollway`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tollway import admin_cli
from tollway.config import Config, ConfigError, default_config, load_config, missing_secrets
from tollway.events import cli as events_cli
from tollway.shadow import cli as shadow_cli
from tollway.sink import cli as sink_cli

Handler = Callable[[argparse.Namespace], int]


def _config_path(path: str | None) -> str | None:
    """--config, else $TOLLWAY_CONFIG, else ./tollway.toml when present, else None."""
    path = path or os.environ.get("TOLLWAY_CONFIG")
    if path:
        return path
    return "tollway.toml" if Path("tollway.toml").is_file() else None


def _find_config(path: str | None) -> Config:
    """The config file :func:`_config_path` finds, else the defaults."""
    path = _config_path(path)
    return load_config(path) if path else default_config()


def cmd_serve(args: argparse.Namespace) -> int:
    from tollway.app import create_app
    from tollway.logs import configure_logging, logger
    from tollway.server import bind, serve
    from tollway.workers import Supervisor, worker_count

    try:
        config = _find_config(args.config)
        host = args.host or config.server.host
        port = config.server.port if args.port is None else args.port
        workers = worker_count(config.server.workers if args.workers is None
                               else args.workers)
        configure_logging(config.server.log_level)
        # With workers, each builds its own app; the parent builds one only to refuse a
        # config they would refuse, before it binds the port.
        app = create_app(config)
    except ConfigError as exc:
        print(f"tollway: config error: {exc}", file=sys.stderr)
        return 2
    if not config.tenants:
        logger.warning("no tenants configured: every API call will be refused (401)")
    sock = bind(host, port)
    if workers > 1:
        del app
        path = _config_path(args.config)
        return Supervisor(config, sock, workers,
                          config_path=str(Path(path).resolve()) if path else None).run()
    if not config.server.access_log:
        logger.getChild("access").disabled = True
    real = sock.getsockname()[1]
    serve(app, sock, log_level=config.server.log_level,
          on_ready=lambda: logger.info("serving", extra={"host": host, "port": real}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tollway import demo

    return demo.run(args.host, args.port, args.latency_ms)


def cmd_keys_create(args: argparse.Namespace) -> int:
    import re

    from tollway.auth import hash_key, new_key

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", args.tenant):
        print("tollway: a tenant id is 1-64 letters, digits, '_' or '-'", file=sys.stderr)
        return 2
    key = new_key()
    print(f"key: {key}")
    print("  (shown once: store it now; tollway keeps only its SHA-256)")
    print(f"Add to [[tenants]] id = {args.tenant!r} in the config:")
    print(f'key_sha256 = ["{hash_key(key)}"]')
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in missing_secrets(config):
        print(f"warning: environment variable {name} is not set; `tollway serve` will refuse "
              "to start without it", file=sys.stderr)
    print(f"ok: {args.path}: {len(config.providers)} providers "
          f"({', '.join(p.name for p in config.providers) or 'none'}), "
          f"{len(config.models)} models, {len(config.routes)} routes, "
          f"{len(config.tenants)} tenants")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollway", description="An OpenAI-compatible AI gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", help="TOML file (default: $TOLLWAY_CONFIG or ./tollway.toml)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--workers", default=None, metavar="N",
                   help="processes serving the port, under one parent; 'auto': one per core "
                        "(default: [server] workers, 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="gateway + simulated upstream, with a ready key")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--latency-ms", type=float, default=0.0, help="simulated upstream latency")
    p.set_defaults(func=cmd_demo)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command",
                                                                 required=True)
    admin_cli.add_key_commands(keys, cmd_keys_create)
    admin_cli.add_tenant_commands(sub)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("path")
    p.set_defaults(func=cmd_check_config)

    events_cli.add_commands(sub, find_config=_find_config)  # events tail, usage, replay
    shadow_cli.add_commands(sub, find_config=_find_config)  # shadow report
    sink_cli.add_commands(sub, find_config=_find_config)  # sink postgres, export parquet
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.func
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
