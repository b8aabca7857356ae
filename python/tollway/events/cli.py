"""``tollway events tail``, ``tollway usage`` and ``tollway replay``.

Each finds NATS the way the gateway does: a ``nats://`` URL from the config
(or ``--url``), else the embedded server a running gateway started in the
data folder (``<data_dir>/nats.json``), else an embedded server started for
the command and stopped after it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TextIO

from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from tollway.config import Config, ConfigError
from tollway.events.broker import (
    EmbeddedNats,
    NatsUnavailable,
    connect,
    ensure_kv,
    ensure_stream,
    parse_servers,
    read_runtime_file,
    stream_config,
)
from tollway.events.projections import default_projections, usage, usage_projection
from tollway.events.projections.runner import ProjectionRunner
from tollway.events.replay import replay
from tollway.events.schema import subject_token

FindConfig = Callable[[str | None], Config]

TYPES = {
    "completed": "call.completed", "failed": "call.failed", "rejected": "call.rejected",
    "call": "call.*", "calls": "call.*", "breaker": "breaker.changed",
    "shadow": "shadow.compared", "budget": "budget.*",
}


def tail_subject(tenant: str | None, type_: str | None) -> str:
    """The subject filter for ``--tenant`` / ``--type``."""
    kind = TYPES.get(type_ or "", type_) if type_ else "*.*"
    if kind.count(".") != 1 or not all(kind.split(".")):
        raise ValueError(f"unknown event type {type_!r} (known: {', '.join(sorted(TYPES))}, "
                         "or a full one like call.completed)")
    return f"tollway.{kind}.{subject_token(tenant) if tenant is not None else '*'}"


@asynccontextmanager
async def open_nats(config: Config, url: str | None = None) -> AsyncIterator[NatsClient]:
    embedded: EmbeddedNats | None = None
    target: str | list[str]
    if url:
        target = parse_servers(url)
    elif config.nats.url != "embedded":
        target = parse_servers(config.nats.url)
    else:
        running = read_runtime_file(config.nats.data_dir)
        if running:
            target = running
        else:
            embedded = EmbeddedNats(config.nats.data_dir)
            target = await embedded.astart()
    try:
        nc = await connect(target, name="tollway-cli")
        try:
            ev = config.events
            await ensure_stream(nc.jetstream(), stream_config(
                name=ev.stream, replicas=ev.replicas, duplicate_window_s=ev.duplicate_window_s,
                max_age_s=ev.max_age_days * 86400))
            yield nc
        finally:
            with contextlib.suppress(Exception):
                await nc.close()  # not drain(): a pull request left open would hold it 30 s
    finally:
        if embedded is not None:
            embedded.stop()


# ---- tail ------------------------------------------------------------------------------------
async def tail(config: Config, args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    subject = tail_subject(args.tenant, args.type)
    stream = config.events.stream
    if args.since_seq:
        policy = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE,
                  "opt_start_seq": args.since_seq}
    elif args.from_start:
        policy = {"deliver_policy": DeliverPolicy.ALL}
    else:
        policy = {"deliver_policy": DeliverPolicy.NEW}
    printed = 0
    done = asyncio.Event()

    def emit(data: bytes) -> None:
        nonlocal printed
        out.write(data.decode() + "\n")
        out.flush()
        printed += 1
        if args.count and printed >= args.count:
            done.set()

    async with open_nats(config, args.url) as nc:
        js = nc.jetstream()
        if args.durable:
            # A durable consumer remembers what this subscriber acknowledged: restart it and
            # it continues where it stopped (an analytics job's usual shape).
            psub = await js.pull_subscribe(subject, durable=args.durable, stream=stream,
                                           config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                                 **policy))
            while not done.is_set():
                want = min(100, args.count - printed) if args.count else 100
                try:
                    msgs = await psub.fetch(want, timeout=args.idle_timeout or 5.0)
                except TimeoutError:
                    if args.idle_timeout:
                        break
                    continue
                for m in msgs:
                    if done.is_set():
                        await m.nak()  # not printed: the next run gets it
                        continue
                    emit(m.data)
                    await m.ack()
        else:
            async def on_msg(msg: Any) -> None:
                if not done.is_set():
                    emit(msg.data)

            sub = await js.subscribe(subject, stream=stream, cb=on_msg, ordered_consumer=True,
                                     config=ConsumerConfig(**policy))
            try:
                while not done.is_set():
                    before = printed
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(args.idle_timeout or None):
                            await done.wait()
                    if args.idle_timeout and printed == before:
                        break
            finally:
                await sub.unsubscribe()
    return 0


# ---- usage -----------------------------------------------------------------------------------
async def show_usage(config: Config, args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    async with open_nats(config, args.url) as nc:
        kv = await ensure_kv(nc.jetstream(), config.events.kv_bucket)
        projs = [usage_projection(config.events.retention_days)]
        runner = ProjectionRunner(nc, projs, kv=kv, stream=config.events.stream, read_only=True)
        await runner.start()
        try:
            if not await runner.catch_up(60):
                print("warning: the usage view may be behind the stream", file=sys.stderr)
        finally:
            await runner.stop()
    view: usage.UsageView = projs[0].view
    since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - (args.days - 1) * 86400))
    result = usage.query(view, tenant=args.tenant, since=since)
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
        return 0
    cols = ("day", "tenant", "model", "provider", "requests", "failed", "rejected",
            "prompt_tokens", "completion_tokens", "cost_usd")
    rows = [[str(r[c]) if c != "cost_usd" else f"{r[c]:.6f}" for c in cols]
            for r in result["rows"]]
    t = result["total"]
    rows.append(["total", "", "", "", str(t["requests"]), str(t["failed"]), str(t["rejected"]),
                 str(t["prompt_tokens"]), str(t["completion_tokens"]), f"{t['cost_usd']:.6f}"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    out.write("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + "\n")
    for r in rows:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + "\n")
    return 0


# ---- replay ----------------------------------------------------------------------------------
async def run_replay(config: Config, args: argparse.Namespace,
                     out: TextIO | None = None) -> int:
    out = out or sys.stdout
    async with open_nats(config, args.url) as nc:
        kv = await ensure_kv(nc.jetstream(), config.events.kv_bucket)
        result = await replay(nc, kv=kv, stream=config.events.stream, save=not args.dry_run,
                              projections=default_projections(config.events.retention_days))
    out.write(json.dumps({
        "messages": result.messages, "first_seq": result.first_seq,
        "last_seq": result.last_seq, "seconds": round(result.seconds, 3),
        "events_per_second": round(result.rate),
        "checkpoints": "not written (--dry-run)" if args.dry_run else "replaced",
        "views": {p.name: p.view.last_seq for p in result.projections},
    }) + "\n")
    return 0


# ---- argparse --------------------------------------------------------------------------------
Command = Callable[[Config, argparse.Namespace], Any]  # an async command: its exit code


def runner(find_config: FindConfig, fn: Command,
           failures: tuple[type[BaseException], ...] = (NatsUnavailable, ValueError)
           ) -> Callable[[argparse.Namespace], int]:
    """The argparse handler of an async command over the stream: exit 2 on a config
    error, 1 with the message on one of ``failures``, 130 on Ctrl-C."""
    def handler(args: argparse.Namespace) -> int:
        try:
            config = find_config(args.config)
            code: int = asyncio.run(fn(config, args))
            return code
        except ConfigError as exc:
            print(f"tollway: config error: {exc}", file=sys.stderr)
            return 2
        except failures as exc:
            print(f"tollway: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return handler


def common(p: argparse.ArgumentParser) -> None:
    """The options every command over the stream takes."""
    p.add_argument("--config", help="TOML file (default: $TOLLWAY_CONFIG or ./tollway.toml)")
    p.add_argument("--url", help="NATS URL(s), comma-separated (default: from the config)")


def add_commands(sub: Any, find_config: FindConfig) -> None:
    events = sub.add_parser("events", help="the event stream").add_subparsers(
        dest="events_command", required=True)
    p = events.add_parser("tail", help="print events as they arrive, one JSON object a line")
    common(p)
    p.add_argument("--tenant", help="only this tenant's events")
    p.add_argument("--type", help="completed, failed, rejected, call, breaker, budget, shadow, "
                                  "or a full type such as call.completed")
    p.add_argument("--from-start", action="store_true", help="from the first stored event")
    p.add_argument("--since-seq", type=int, default=0, help="from this stream sequence")
    p.add_argument("--durable", help="a named durable consumer: resumes where it stopped")
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
    p.add_argument("--idle-timeout", type=float, default=0.0,
                   help="stop after this many seconds without an event")
    p.set_defaults(func=runner(find_config, tail))

    p = sub.add_parser("usage", help="usage per day, tenant, model and provider")
    common(p)
    p.add_argument("--tenant", help="one tenant (default: all)")
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=runner(find_config, show_usage))

    p = sub.add_parser("replay", help="rebuild the views from the event log")
    common(p)
    p.add_argument("--dry-run", action="store_true", help="fold, report, keep the checkpoints")
    p.set_defaults(func=runner(find_config, run_replay))
