"""``tollway sink postgres`` and ``tollway export parquet``.

Both find NATS as ``tollway events tail`` does (``--url``, else the config's ``[nats] url``,
else a running gateway's embedded server). They need the ``sink`` extra
(``pip install 'tollway[sink]'``: psycopg, pyarrow), imported only when they run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from tollway.config import Config
from tollway.events.broker import NatsUnavailable
from tollway.events.cli import Command, FindConfig, common, open_nats, runner

DSN_ENV = "TOLLWAY_SINK_DSN"


@contextlib.contextmanager
def _logging(level: str) -> Iterator[None]:
    """JSON lines on stderr from the sink (and the events layer under it) while it runs; the
    loggers are put back after, so that running the command in-process leaves no trace."""
    from tollway.logs import JsonLinesHandler

    handler = JsonLinesHandler(sys.stderr, None)
    saved = []
    for name in ("tollway.sink", "tollway.events"):
        log = logging.getLogger(name)
        saved.append((log, log.handlers[:], log.level, log.propagate))
        log.handlers[:] = [handler]
        log.setLevel(level.upper())
        log.propagate = False
    try:
        yield
    finally:
        for log, handlers, lvl, propagate in saved:
            log.handlers[:] = handlers
            log.setLevel(lvl)
            log.propagate = propagate


def _missing_extra(exc: ImportError) -> int:
    print(f"tollway: {exc.name} is not installed: pip install 'tollway[sink]'", file=sys.stderr)
    return 2


def parse_time(text: str) -> float:
    """A date (``2026-01-31``: its 00:00 UTC) or an ISO 8601 time (UTC unless it says) as
    unix seconds."""
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date or ISO 8601 time: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


async def run_sink(config: Config, args: argparse.Namespace) -> int:
    import psycopg

    from tollway.sink import migrations
    from tollway.sink.postgres import PostgresSink, migrate_only

    dsn = args.dsn or os.environ.get(DSN_ENV, "")
    if not dsn:
        print(f"tollway: give --dsn or set {DSN_ENV} (libpq's PG* variables and ~/.pgpass "
              "apply too: keep passwords out of the command line)", file=sys.stderr)
        return 2
    try:
        if args.migrate_only:
            done = await asyncio.to_thread(migrate_only, dsn)
            print(json.dumps({"applied": done}))
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        with _logging(config.server.log_level):
            async with open_nats(config, args.url) as nc:
                sink = PostgresSink(nc, dsn, stream=config.events.stream,
                                    batch_size=args.batch_size, max_wait_s=args.max_wait,
                                    migrate=args.migrate, log_interval_s=args.log_interval)
                stats = await sink.run(stop, until_caught_up=args.once)
        if args.once:
            print(json.dumps({"committed_seq": stats.committed_seq, "events": stats.events,
                              "rows": stats.rows, "batches": stats.batches}))
        return 0
    except migrations.SchemaError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"tollway: PostgreSQL: {exc}", file=sys.stderr)
        return 1


async def run_export(config: Config, args: argparse.Namespace,
                     out: TextIO | None = None) -> int:
    from tollway.sink.parquet import export

    out = out or sys.stdout
    if args.since is not None and args.until is not None and args.until <= args.since:
        print("tollway: --until must be after --since", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    async with open_nats(config, args.url) as nc:
        result = await export(nc, Path(args.out), since=args.since, until=args.until,
                              stream=config.events.stream)
    out.write(json.dumps({"out": str(args.out), "events": result.events,
                          "read": result.read, "unreadable": result.unreadable,
                          "seconds": round(time.perf_counter() - t0, 3),
                          "files": result.files}) + "\n")
    return 0


def _needs_extra(fn: Command) -> Command:
    """The command, telling how to install the extra it lacks (psycopg, pyarrow)."""
    async def run(config: Config, args: argparse.Namespace) -> int:
        try:
            code: int = await fn(config, args)
            return code
        except ImportError as exc:
            if exc.name in ("psycopg", "pyarrow"):
                return _missing_extra(exc)
            raise
    return run


def add_commands(sub: Any, find_config: FindConfig) -> None:
    def run(fn: Command) -> Callable[[argparse.Namespace], int]:
        return runner(find_config, _needs_extra(fn),
                      failures=(NatsUnavailable, ValueError, OSError))

    sink = sub.add_parser("sink", help="write the event stream into a database").add_subparsers(
        dest="sink_command", required=True)
    p = sink.add_parser("postgres", help="every event into PostgreSQL, exactly once "
                                         "(runs until stopped)")
    common(p)
    p.add_argument("--dsn", help=f"libpq connection string or URI (default: ${DSN_ENV})")
    p.add_argument("--migrate", action="store_true",
                   help="apply the ledger's schema migrations the database lacks, then run")
    p.add_argument("--migrate-only", action="store_true",
                   help="apply the migrations and exit")
    p.add_argument("--once", action="store_true",
                   help="write what the stream holds now, then exit")
    p.add_argument("--batch-size", type=int, default=5000,
                   help="events per transaction at most (default 5000)")
    p.add_argument("--max-wait", type=float, default=0.5,
                   help="seconds an event waits for its batch to fill (default 0.5)")
    p.add_argument("--log-interval", type=float, default=30.0,
                   help="seconds between progress log lines (default 30)")
    p.set_defaults(func=run(run_sink))

    export = sub.add_parser("export", help="export the ledger").add_subparsers(
        dest="export_command", required=True)
    p = export.add_parser("parquet", help="the stream's events as Parquet files, one per table "
                                          "and UTC day: OUT/<table>/<YYYY-MM-DD>.parquet")
    common(p)
    p.add_argument("--since", type=parse_time, default=None,
                   help="first instant, inclusive: a date (its 00:00 UTC) or an ISO 8601 time")
    p.add_argument("--until", type=parse_time, default=None,
                   help="last instant, exclusive (default: no end)")
    p.add_argument("out", metavar="OUT", help="folder to write into")
    p.set_defaults(func=run(run_export))
