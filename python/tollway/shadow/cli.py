"""``tollway shadow report``: the shadow table, from a running gateway or from the stream.

By default it asks the gateway's ``GET /api/ai/shadow`` (``--gateway``,
default the config's ``[server]`` host and port) with the admin key from the
environment variable the config names. ``--stream`` instead folds the
``ShadowCompared`` (and A/B call) events of the event stream itself, without
a gateway: the same fold and the same table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

from tollway.config import Config, ConfigError
from tollway.events.schema import day_of
from tollway.shadow.report import (
    format_ab_table,
    format_learned,
    format_table,
    query,
    query_ab,
    query_learned,
)

FindConfig = Callable[[str | None], Config]

__all__ = ["add_commands", "fetch_report", "render", "stream_report"]


def fetch_report(base: str, admin_key: str, route: str | None, days: int | None,
                 timeout: float = 10.0) -> dict[str, Any]:
    params = {k: str(v) for k, v in (("route", route), ("days", days)) if v}
    url = base.rstrip("/") + "/api/ai/shadow" + (f"?{urllib.parse.urlencode(params)}"
                                                  if params else "")
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {admin_key}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


async def stream_report(config: Config, url: str | None, route: str | None,
                        days: int | None) -> dict[str, Any]:
    from tollway.events.cli import open_nats
    from tollway.events.projections import Projection
    from tollway.events.projections.runner import ProjectionRunner
    from tollway.shadow import projection

    proj = Projection("shadow", projection.VERSION, projection.ShadowView(), projection.apply,
                      projection.ShadowView, projection.dump, projection.load)
    async with open_nats(config, url) as nc:
        runner = ProjectionRunner(nc, [proj], stream=config.events.stream, read_only=True)
        await runner.start(resume=False)
        try:
            if not await runner.catch_up(60):
                print("warning: the shadow view may be behind the stream", file=sys.stderr)
        finally:
            await runner.stop()
    since = day_of(time.time() - (days - 1) * 86400) if days else ""
    view = proj.view
    return {"object": "shadow.report", "source": "stream", "as_of_sequence": view.last_seq,
            "data": query(view, route=route, since=since),
            "ab": query_ab(view, route=route, since=since),
            "learning": query_learned(view, route=route)}


def render(doc: dict[str, Any], out: TextIO) -> None:
    out.write(format_table(doc.get("data") or []) + "\n")
    ab = format_ab_table(doc.get("ab") or [])
    if ab:
        out.write("\nA/B split (live calls)\n" + ab + "\n")
    learned = format_learned(doc.get("learning") or {"decisions": []})
    if learned:
        out.write("\nLearning routing (decisions, oldest first)\n" + learned + "\n")
    runtime = doc.get("runtime") or {}
    skipped = {name: r.get("skipped") for name, r in runtime.items() if r.get("skipped")}
    for name, reasons in skipped.items():
        text = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        out.write(f"\n{name}: skipped in this gateway process: {text}\n")


def cmd_report(config: Config, args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.stream:
        doc = asyncio.run(stream_report(config, args.url, args.route, args.days))
    else:
        env = config.server.admin_key_env
        key = os.environ.get(env, "") if env else ""
        if not key:
            print(f"tollway: set {env or 'the admin key variable'} to the admin key "
                  "(or use --stream)", file=sys.stderr)
            return 2
        base = args.gateway or f"http://{config.server.host}:{config.server.port}"
        try:
            doc = fetch_report(base, key, args.route, args.days)
        except urllib.error.HTTPError as exc:
            print(f"tollway: {base}: HTTP {exc.code}: {exc.read()[:500].decode(errors='replace')}",
                  file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"tollway: cannot reach the gateway at {base}: {exc}", file=sys.stderr)
            return 1
    if args.json:
        out.write(json.dumps(doc, indent=2) + "\n")
    else:
        render(doc, out)
    return 0


def add_commands(sub: Any, find_config: FindConfig) -> None:
    shadow = sub.add_parser("shadow", help="shadow mode and A/B evaluation").add_subparsers(
        dest="shadow_command", required=True)
    p = shadow.add_parser("report", help="per route and candidate: samples, latency, cost "
                                         "ratio, agreement, errors")
    p.add_argument("--config", help="TOML file (default: $TOLLWAY_CONFIG or ./tollway.toml)")
    p.add_argument("--gateway", help="gateway base URL (default: the config's host and port)")
    p.add_argument("--stream", action="store_true",
                   help="fold the event stream instead of asking a gateway")
    p.add_argument("--url", help="with --stream: NATS URL(s) (default: from the config)")
    p.add_argument("--route", help="one route only")
    p.add_argument("--days", type=int, default=None, help="only the last N days")
    p.add_argument("--json", action="store_true")

    def handler(args: argparse.Namespace) -> int:
        try:
            return cmd_report(find_config(args.config), args)
        except ConfigError as exc:
            print(f"tollway: config error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        except Exception as exc:  # NATS unreachable and the like: a message, not a trace
            print(f"tollway: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1

    p.set_defaults(func=handler)
