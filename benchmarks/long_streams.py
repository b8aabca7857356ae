"""Streams at an LLM's pace: the gateway's CPU per relayed chunk, and the delay it adds.

Real answers are hundreds of SSE chunks 10-30 ms apart. This script starts two
simulated upstreams that pace their streams (``--chunk-interval-ms``, one timer
for all streams, each from a random phase): one sends N_LONG chunks D_LONG ms
apart, the other N_SHORT chunks D_SHORT ms apart, both streams about as long
(200 x 10 ms and 20 x 100 ms by default). One gateway process (the ``events``
variant of ``load.py``: guards, events on the embedded NATS, metrics) fronts
both. Each leg holds a fixed number of streams open for ``--duration`` seconds:
``oha`` drives all but ``--probes`` of them; the probes are this script's own
client, which timestamps every event as it completes. The upstream opens each
event with ``: t=<monotonic ns>`` (``--stamp``), so for each event:

- relay latency = arrival at the client - written by the upstream;
- added gap = (time since the previous event at the client) - (the same at the
  upstream): what the issue calls the added delay between chunks.

Reported per leg: streams, gateway CPU per stream (``/proc``, user + system),
latency and added gap p50/p99. CPU per chunk is the slope between the two
chunk counts at the same concurrency: (CPU per long stream - CPU per short
stream) / (N_LONG - N_SHORT), which leaves out what a stream costs once
(request, guards, event, log line). The sweep raises the concurrency of long
streams until the added gap's p99 passes 5 ms (or a leg fails streams), and
the ``direct`` legs (the same load on the upstream itself) show the floor that
the client, the upstream and the kernel set on this machine.

    python benchmarks/long_streams.py                      # ~2 minutes
    python benchmarks/long_streams.py --quick              # 4 s legs, no sweep
    python benchmarks/long_streams.py --sweep 200,400,800,1600 --rounds 3
    python benchmarks/long_streams.py --variants events,events@before \\
        --python before=/path/to/old-checkout/venv/bin/python

Results go to ``benchmarks/results/long-streams-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httptools

from load import (
    ADMIN_KEY,
    BASE_CONFIG,
    HOST,
    PYTHONS,
    RESULTS,
    TENANT_KEY,
    UPSTREAM_KEY,
    VARIANTS,
    Proc,
    check_loopback,
    deep_merge,
    find_oha,
    free_port,
    process_cpu_s,
    split_variant,
    to_toml,
    wait_ready,
)

MODEL = "gpt-4o-mini"
LONG, SHORT = "paced-long", "paced-short"  # the gateway's model ids, one per upstream
EVENTS_PER_REPLY = 4  # the role chunk, the finish chunk, the usage chunk, [DONE]
BAR_ADDED_MS = 5.0  # the sweep's limit on the added gap's p99
BAR_CPU_PER_CHUNK_US = 10.0


def start_paced_upstream(workdir: Path, name: str, chunks: int, interval_ms: float
                         ) -> tuple[Proc, str]:
    """A simulated upstream whose streams have ``chunks`` events (``[DONE]`` included)."""
    port = free_port()
    log = workdir / f"upstream-{name}.log"
    popen = subprocess.Popen(
        [sys.executable, "-m", "tollway.testing.upstream", "--host", HOST, "--port", str(port),
         "--reply-words", str(max(1, chunks - EVENTS_PER_REPLY)),
         "--chunk-interval-ms", str(interval_ms), "--stamp", "--api-key", UPSTREAM_KEY],
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    proc = Proc(f"upstream[{name}]", popen, log)
    base = f"http://{HOST}:{port}/v1"
    wait_ready(proc, f"{base}/models", {"authorization": f"Bearer {UPSTREAM_KEY}"})
    return proc, base


def start_gateway(workdir: Path, variant: str, upstreams: dict[str, str]) -> tuple[Proc, str]:
    """A gateway of ``variant`` (``load.VARIANTS``) with one model per paced upstream."""
    name, python = split_variant(variant)
    cfg = deep_merge(BASE_CONFIG, VARIANTS[name])
    template = cfg["providers"][0]
    cfg["providers"] = [{**template, "name": f"sim-{m}", "base_url": url,
                         # the default pool would queue streams past it
                         "max_connections": 8192}
                        for m, url in upstreams.items()]
    price = {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}
    cfg["models"] = [{"id": m, "provider": f"sim-{m}", "upstream": MODEL, **price}
                     for m in upstreams]
    port = free_port()
    cfg["server"]["port"] = port
    cfg["server"]["max_connections"] = 16384
    where = workdir / variant
    where.mkdir(exist_ok=True)
    if isinstance(cfg.get("nats"), dict):
        cfg["nats"].setdefault("data_dir", str(where / "nats"))
    path = where / "tollway.toml"
    path.write_text(to_toml(cfg))
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "LOCAL_OPENAI_URL",
                        "LOCAL_API_KEY")}
    env |= {"SIM_API_KEY": UPSTREAM_KEY, "TOLLWAY_BENCH_ADMIN_KEY": ADMIN_KEY}
    log = where / "gateway.log"
    popen = subprocess.Popen(
        [python, "-c", "import sys; from tollway.cli import main; sys.exit(main())", "serve",
         "--config", str(path), "--host", HOST, "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=where)
    proc = Proc(f"gateway[{variant}]", popen, log)
    wait_ready(proc, f"http://{HOST}:{port}/api/ai/health", {})
    return proc, f"http://{HOST}:{port}/api/ai/v1"


def request_body(model: str) -> bytes:
    return json.dumps({
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    }).encode()


# ---------------------------------------------------------------- the probe client


class _ProbeConnection(asyncio.Protocol):
    """One keep-alive connection that runs streams back to back until told to stop."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.buf = bytearray()
        self.scanned = 0
        self.stamps: list[tuple[int, int]] = []  # (arrival, upstream's stamp), ns
        self.status = 0
        self.done: asyncio.Future[bool] | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(False)
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.abort()
            return
        self._scan(now)

    def on_status(self, status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.buf += body

    def on_message_complete(self) -> None:
        self._scan(time.monotonic_ns())
        if self.done is not None and not self.done.done():
            self.done.set_result(self.status == 200 and self.buf.endswith(b"data: [DONE]\n\n"))

    def _scan(self, now: int) -> None:
        buf = self.buf
        while True:
            end = buf.find(b"\n\n", self.scanned)
            if end < 0:
                return
            if buf.startswith(b": t=", self.scanned):
                line_end = buf.find(b"\n", self.scanned)
                self.stamps.append((now, int(buf[self.scanned + 4:line_end])))
            self.scanned = end + 2

    async def one_stream(self, request: bytes) -> bool:
        assert self.transport is not None
        self.buf = bytearray()
        self.scanned = 0
        self.stamps = []
        self.status = 0
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        ok = await self.done
        self.done = None
        if ok:
            self.probe.take(self.stamps)
        return ok


class Probe:
    """``n`` connections that each run streams back to back until ``deadline``."""

    def __init__(self, url: str, key: str, body: bytes) -> None:
        check_loopback(url)
        rest = url.split("//", 1)[1]
        hostport, _, path = rest.partition("/")
        self.host, _, port = hostport.rpartition(":")
        self.port = int(port)
        self.request = (
            f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.latency_us: list[float] = []
        self.added_us: list[float] = []
        self.streams = 0
        self.failed = 0

    def take(self, stamps: list[tuple[int, int]]) -> None:
        self.streams += 1
        previous: tuple[int, int] | None = None
        for arrived, sent in stamps:
            self.latency_us.append((arrived - sent) / 1e3)
            if previous is not None:
                self.added_us.append(((arrived - previous[0]) - (sent - previous[1])) / 1e3)
            previous = arrived, sent

    async def run(self, n: int, deadline: float) -> None:
        await asyncio.gather(*(self._one(deadline) for _ in range(n)))

    async def _one(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        conn: _ProbeConnection | None = None
        while time.monotonic() < deadline:
            if conn is None or conn.lost.done():
                try:
                    _, conn = await loop.create_connection(
                        lambda: _ProbeConnection(self), self.host, self.port)
                except OSError:
                    self.failed += 1
                    await asyncio.sleep(0.1)
                    continue
            if not await conn.one_stream(self.request):
                self.failed += 1
        if conn is not None and conn.transport is not None:
            conn.transport.close()


# ---------------------------------------------------------------- legs


@dataclass
class Leg:
    target: str  # "direct" or a gateway variant
    kind: str  # "long" | "short"
    concurrency: int
    round: int = 0
    streams: int = 0
    failed: int = 0
    seconds: float = 0.0
    cpu_s: float = float("nan")  # the server's user + system CPU during the leg
    cpu_per_stream_ms: float = float("nan")
    sys_share: float = float("nan")  # of that CPU, the kernel's (syscalls, loopback TCP)
    latency_p50_ms: float = float("nan")
    latency_p99_ms: float = float("nan")
    added_p50_ms: float = float("nan")
    added_p99_ms: float = float("nan")
    probe_events: int = 0
    oha_status: dict[str, int] = field(default_factory=dict)
    oha_errors: dict[str, int] = field(default_factory=dict)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run_leg(oha: str, leg: Leg, url: str, key: str, body: bytes, pid: int,
                  duration: float, probes: int) -> Leg:
    probe = Probe(url, key, body)
    n_oha = max(0, leg.concurrency - probes)
    cpu0 = process_cpu_s(pid)
    t0 = time.monotonic()
    proc = None
    if n_oha:
        check_loopback(url)
        proc = await asyncio.create_subprocess_exec(
            oha, "--no-tui", "--output-format", "json", "-m", "POST",
            "-H", "content-type: application/json", "-H", f"authorization: Bearer {key}",
            "-d", body.decode(), "-c", str(n_oha), "-z", f"{duration}s", "-w",
            "-t", "60s", url, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    await probe.run(min(probes, leg.concurrency), t0 + duration)
    doc: dict[str, Any] = {}
    if proc is not None:
        out, err = await asyncio.wait_for(proc.communicate(), duration * 3 + 60)
        if proc.returncode != 0:
            raise SystemExit(f"oha failed ({proc.returncode}): {err.decode()[:2000]}")
        doc = json.loads(out)
    leg.seconds = time.monotonic() - t0
    cpu1 = process_cpu_s(pid)
    leg.oha_status = {str(k): int(v) for k, v in (doc.get("statusCodeDistribution") or {}).items()}
    leg.oha_errors = {str(k): int(v) for k, v in (doc.get("errorDistribution") or {}).items()}
    leg.streams = probe.streams + leg.oha_status.get("200", 0)
    leg.failed = probe.failed + sum(v for k, v in leg.oha_status.items() if k != "200") + sum(
        leg.oha_errors.values())
    if cpu0 is not None and cpu1 is not None:
        leg.cpu_s = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
        leg.sys_share = (cpu1[1] - cpu0[1]) / leg.cpu_s if leg.cpu_s else float("nan")
        if leg.streams:
            leg.cpu_per_stream_ms = leg.cpu_s / leg.streams * 1e3
    leg.probe_events = len(probe.latency_us)
    leg.latency_p50_ms = _pct(probe.latency_us, 0.50) / 1e3
    leg.latency_p99_ms = _pct(probe.latency_us, 0.99) / 1e3
    leg.added_p50_ms = _pct(probe.added_us, 0.50) / 1e3
    leg.added_p99_ms = _pct(probe.added_us, 0.99) / 1e3
    return leg


def show(leg: Leg) -> None:
    print(f"  {leg.target:>14} {leg.kind:>5} c={leg.concurrency:<5} streams {leg.streams:5d} "
          f"failed {leg.failed:3d} cpu {leg.cpu_s:6.2f} s ({leg.sys_share:4.0%} sys) = "
          f"{leg.cpu_per_stream_ms:6.2f} ms/stream"
          f"  latency p50/p99 {leg.latency_p50_ms:6.2f}/{leg.latency_p99_ms:6.2f} ms"
          f"  added p50/p99 {leg.added_p50_ms:6.2f}/{leg.added_p99_ms:6.2f} ms", flush=True)


def median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def summarize(legs: list[Leg], variants: list[str], n_long: int, n_short: int,
              concurrency: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target in ["direct", *variants]:
        if not any(x.target == target for x in legs):
            continue
        main = [x for x in legs if x.target == target and x.concurrency == concurrency]
        longs = [x for x in main if x.kind == "long"]
        shorts = [x for x in main if x.kind == "short"]
        # The slope per round, then the median: both legs of a round share its noise.
        slopes = [(a.cpu_per_stream_ms - b.cpu_per_stream_ms) / (n_long - n_short) * 1e3
                  for a, b in zip(longs, shorts, strict=False)]
        row: dict[str, Any] = {
            "cpu_per_chunk_us": median(slopes),
            "cpu_per_chunk_us_rounds": slopes,
            "cpu_per_long_stream_ms": median([x.cpu_per_stream_ms for x in longs]),
            "cpu_per_short_stream_ms": median([x.cpu_per_stream_ms for x in shorts]),
            "sys_share_long": median([x.sys_share for x in longs]),
            "latency_p50_ms": median([x.latency_p50_ms for x in longs]),
            "latency_p99_ms": median([x.latency_p99_ms for x in longs]),
            "added_p50_ms": median([x.added_p50_ms for x in longs]),
            "added_p99_ms": median([x.added_p99_ms for x in longs]),
        }
        sweep: dict[int, dict[str, float]] = {}
        for c in sorted({x.concurrency for x in legs if x.target == target and x.kind == "long"}):
            sel = [x for x in legs if x.target == target and x.kind == "long"
                   and x.concurrency == c]
            sweep[c] = {
                "added_p50_ms": median([x.added_p50_ms for x in sel]),
                "added_p99_ms": median([x.added_p99_ms for x in sel]),
                "latency_p99_ms": median([x.latency_p99_ms for x in sel]),
                "cpu_per_stream_ms": median([x.cpu_per_stream_ms for x in sel]),
                "failed": sum(x.failed for x in sel),
            }
        row["sweep"] = sweep
        held = [c for c, s in sweep.items() if s["added_p99_ms"] <= BAR_ADDED_MS
                and not s["failed"]]
        row["held_concurrency"] = max(held) if held else 0
        out[target] = row
    return out


def markdown(summary: dict[str, Any], n_long: int, n_short: int) -> str:
    lines = [f"| target | CPU per chunk (slope) | CPU per {n_long}-chunk stream | "
             f"CPU per {n_short}-chunk stream | added gap p50 / p99 | relay latency p50 / p99 "
             "| streams held at p99 <= 5 ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for target, row in summary.items():
        cpu = "-" if target == "direct" else f"{row['cpu_per_chunk_us']:.1f} us"
        lines.append(
            f"| {target} | {cpu} | {row['cpu_per_long_stream_ms']:.2f} ms | "
            f"{row['cpu_per_short_stream_ms']:.2f} ms | {row['added_p50_ms']:.2f} / "
            f"{row['added_p99_ms']:.2f} ms | {row['latency_p50_ms']:.2f} / "
            f"{row['latency_p99_ms']:.2f} ms | {row['held_concurrency'] or '-'} |")
    return "\n".join(lines)


async def run(args: argparse.Namespace, variants: list[str]) -> tuple[list[Leg], dict[str, Any]]:
    oha = find_oha()
    legs: list[Leg] = []
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="tollway-long-streams-") as tmp:
        workdir = Path(tmp)
        try:
            up_long, url_long = start_paced_upstream(workdir, "long", args.chunks_long,
                                                     args.interval_long)
            procs.append(up_long)
            up_short, url_short = start_paced_upstream(workdir, "short", args.chunks_short,
                                                       args.interval_short)
            procs.append(up_short)
            gateways: dict[str, tuple[int, str]] = {}
            for variant in variants:
                gw, base = start_gateway(workdir, variant, {LONG: url_long, SHORT: url_short})
                procs.append(gw)
                gateways[variant] = gw.popen.pid, base
            targets: dict[str, dict[str, tuple[int, str, str, bytes]]] = {"direct": {
                "long": (up_long.popen.pid, f"{url_long}/chat/completions", UPSTREAM_KEY,
                         request_body(MODEL)),
                "short": (up_short.popen.pid, f"{url_short}/chat/completions", UPSTREAM_KEY,
                          request_body(MODEL)),
            }}
            for variant, (pid, base) in gateways.items():
                targets[variant] = {
                    "long": (pid, f"{base}/chat/completions", TENANT_KEY, request_body(LONG)),
                    "short": (pid, f"{base}/chat/completions", TENANT_KEY, request_body(SHORT)),
                }
            # Warm-up: connections, the pool, the first calls' imports.
            for variant in variants:
                pid, url, key, body = targets[variant]["short"]
                await run_leg(oha, Leg(variant, "short", 20), url, key, body, pid, 1.0,
                              args.probes)
            order = ["direct", *variants] if args.direct else list(variants)
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}, {args.concurrency} streams open", flush=True)
                for i in range(len(order)):
                    target = order[(i + r) % len(order)]
                    for kind in ("long", "short") if r % 2 == 0 else ("short", "long"):
                        pid, url, key, body = targets[target][kind]
                        leg = await run_leg(oha, Leg(target, kind, args.concurrency, r), url,
                                            key, body, pid, args.duration, args.probes)
                        legs.append(leg)
                        show(leg)
            for target in order if args.sweep else ():
                print(f"sweep: {target}", flush=True)
                for c in args.sweep:
                    pid, url, key, body = targets[target]["long"]
                    leg = await run_leg(oha, Leg(target, "long", c), url, key, body, pid,
                                        args.duration, args.probes)
                    legs.append(leg)
                    show(leg)
                    if leg.failed or leg.added_p99_ms > BAR_ADDED_MS:
                        break
        finally:
            for proc in reversed(procs):
                proc.stop()
    return legs, summarize(legs, variants, args.chunks_long, args.chunks_short,
                           args.concurrency)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="events",
                    help="gateway variants of load.py, comma-separated (VARIANT@LABEL too)")
    ap.add_argument("--python", action="append", default=[], metavar="LABEL=PATH",
                    help="the interpreter of another checkout, for VARIANT@LABEL")
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per leg")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--probes", type=int, default=20,
                    help="of the streams open, how many this script times (the rest: oha)")
    ap.add_argument("--chunks-long", type=int, default=200)
    ap.add_argument("--interval-long", type=float, default=10.0, help="ms")
    ap.add_argument("--chunks-short", type=int, default=20)
    ap.add_argument("--interval-short", type=float, default=100.0, help="ms")
    ap.add_argument("--sweep", default="400,800,1200,1600,2000",
                    help="concurrencies of long streams to try, in order ('' for none)")
    ap.add_argument("--no-direct", dest="direct", action="store_false",
                    help="skip the legs on the upstream itself")
    ap.add_argument("--quick", action="store_true", help="4 s legs, no sweep")
    args = ap.parse_args()
    for item in args.python:
        label, _, path = item.partition("=")
        PYTHONS[label] = path
    if args.quick:
        args.duration, args.sweep = 4.0, ""
    args.sweep = [int(c) for c in args.sweep.split(",") if c.strip()]
    variants = [v for v in args.variants.split(",") if v]
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None)
    with runner:
        legs, summary = runner.run(run(args, variants))
    table = markdown(summary, args.chunks_long, args.chunks_short)
    print()
    print(table)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"long-streams-{stamp}.json"
    path.write_text(json.dumps({
        "when": stamp,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": sys.version.split()[0], "load_avg": os.getloadavg()},
        "args": {k: v for k, v in vars(args).items() if k != "python"},
        "pythons": PYTHONS,
        "summary": summary,
        "legs": [asdict(x) for x in legs],
        "table": table,
    }, indent=2, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
