"""The sink: events per second into PostgreSQL, exactly once under kills, lag under a gateway's
full call rate, and the Parquet export's round trip.

Four measurements against a real PostgreSQL (Debian's, started on a temporary folder with
its durable defaults: fsync on) and the embedded nats-server:

1. ``throughput``: one million synthetic events (tollway.events.synthetic) loaded into the
   stream, then written by ``PostgresSink`` from sequence 1 to the end: events/s; against
   the baseline a simple subscriber is, one INSERT and one commit per event (on the first
   ``--baseline-events`` of the same stream). Acceptance: at least 20,000 events/s.
2. ``kills``: ``tollway sink postgres`` processes killed with SIGKILL ``--kills`` times at
   random moments while ``--kill-events`` events flow into the stream; then one more run to
   the end. Acceptance: the tables hold each event once (count and sum of cost equal the
   stream's).
3. ``lag``: events published at ``--lag-rate`` a second (a gateway process at full speed
   serves about 3,000 calls a second) for ``--lag-seconds`` while a sink process writes them;
   the lag (stream's last sequence less the committed one) sampled every 50 ms.
4. ``parquet``: the million events of (1) exported with ``tollway export parquet``; DuckDB's
   count and sums over the files against the stream's. Acceptance: equal.

    python benchmarks/sink.py                          # ~4 minutes on 2 cores
    python benchmarks/sink.py --events 200000 --kill-events 20000 --only throughput,kills

Writes ``benchmarks/results/sink-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import psycopg

from tollway.events.broker import EmbeddedNats, connect, ensure_stream, stream_config
from tollway.events.outbox import Outbox
from tollway.events.publisher import Publisher
from tollway.events.schema import CallEvent, Event, decode, encode
from tollway.events.synthetic import events as synthetic_events
from tollway.sink.parquet import export
from tollway.sink.postgres import PostgresSink, migrate_only
from tollway.testing.postgres import PostgresServer

RESULTS = Path(__file__).resolve().parent / "results"
ACCEPT_EVENTS_PER_S = 20_000  # issue 18


def _events(n: int, seed: int, days: float = 30.0) -> list[Event]:
    return list(synthetic_events(n, seed=seed, days=days))[:n]


async def _load(url: str, evs: list[Event], tmp: Path, rate: float = 0.0) -> float:
    """Publish ``evs`` through the gateway's own publisher (``Nats-Msg-Id``, acks awaited);
    ``rate`` > 0 paces it. Returns events/s."""
    nc = await connect(url)
    outbox = Outbox(tmp / f"ob-{time.monotonic_ns()}")
    outbox.open()
    pub = Publisher(outbox, queue_size=len(evs) + 1, batch_size=1024)
    await pub.start(nc)
    t0 = time.perf_counter()
    step = 500 if rate <= 0 else max(1, int(rate / 100))
    for i in range(0, len(evs), step):
        for e in evs[i:i + step]:
            pub.submit(e)
        if rate > 0:
            ahead = t0 + (i + step) / rate - time.perf_counter()
            await asyncio.sleep(max(0.0, ahead))
        else:
            await asyncio.sleep(0)
    assert await pub.flush(1200)
    dt = time.perf_counter() - t0
    await pub.stop()
    outbox.close()
    await nc.close()
    return len(evs) / dt


def _fresh_db(pg: PostgresServer, name: str) -> str:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return pg.dsn.rsplit("/", 1)[0] + "/" + name


def _ledger_totals(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        calls, distinct, cost = conn.execute(
            "SELECT count(*), count(DISTINCT event_id), coalesce(sum(actual_cost_nanousd), 0) "
            "FROM calls").fetchone() or (0, 0, 0)
        rows = 0
        for t in ("calls", "budget_events", "breaker_events", "shadow_events", "admin_events",
                  "other_events"):
            r = conn.execute(f"SELECT count(*) FROM {t}").fetchone()
            rows += r[0] if r else 0
        pos = conn.execute("SELECT coalesce(max(last_seq), 0) FROM sink_position").fetchone()
    return {"calls": int(calls), "distinct_calls": int(distinct), "cost_nanousd": int(cost),
            "rows": rows, "position": int(pos[0]) if pos else 0}


def _stream_totals(evs: list[Event]) -> dict[str, int]:
    calls = [e for e in evs if isinstance(e, CallEvent)]
    return {"calls": len(calls), "cost_nanousd": sum(e.actual_cost_nanousd for e in calls),
            "rows": len(evs)}


# ---- 1. throughput ---------------------------------------------------------------------------
async def bench_throughput(url: str, pg: PostgresServer, evs: list[Event], tmp: Path,
                           baseline_n: int, batch_size: int) -> dict[str, Any]:
    load_rate = await _load(url, evs, tmp)
    print(f"loaded {len(evs):,} events into the stream at {load_rate:,.0f}/s", flush=True)
    # Baseline: one INSERT and one commit per event, as a simple subscriber does.
    dsn0 = _fresh_db(pg, "baseline")
    migrate_only(dsn0)
    payloads = [encode(e) for e in evs[:baseline_n]]
    t0 = time.perf_counter()
    with psycopg.connect(dsn0) as conn:
        for seq, data in enumerate(payloads, 1):
            e = decode(data)
            if isinstance(e, CallEvent):
                conn.execute("INSERT INTO calls (event_id, seq, occurred_at, day, outcome, "
                             "tenant, model, provider, actual_cost_nanousd) VALUES "
                             "(%s, %s, to_timestamp(%s), to_timestamp(%s)::date, %s, %s, %s, %s, "
                             "%s) ON CONFLICT DO NOTHING",
                             (e.event_id, seq, e.occurred_at, e.occurred_at, e.outcome,  # type: ignore[attr-defined]
                              e.tenant, e.model, e.provider, e.actual_cost_nanousd))
            conn.execute("UPDATE sink_position SET last_seq = %s", (seq,))
            conn.commit()
    baseline = baseline_n / (time.perf_counter() - t0)
    print(f"baseline (INSERT + commit per event): {baseline:,.0f} events/s", flush=True)
    dsn = _fresh_db(pg, "throughput")
    migrate_only(dsn)
    nc = await connect(url)
    sink = PostgresSink(nc, dsn, batch_size=batch_size)
    c0, t0 = time.process_time(), time.perf_counter()
    stats = await sink.run(until_caught_up=True)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    await nc.close()
    totals = _ledger_totals(dsn)
    want = _stream_totals(evs)
    rate = stats.events / dt
    ok = (totals["calls"] == want["calls"] and totals["cost_nanousd"] == want["cost_nanousd"]
          and totals["rows"] == want["rows"])
    print(f"sink: {rate:,.0f} events/s ({stats.events:,} events in {dt:.1f}s, "
          f"{cpu / stats.events * 1e6:.1f} us CPU/event in the sink process, "
          f"{stats.batches} transactions); {rate / baseline:.1f}x the baseline; all rows: {ok}; "
          f"acceptance >= {ACCEPT_EVENTS_PER_S:,}/s: "
          f"{'met' if rate >= ACCEPT_EVENTS_PER_S else 'NOT met'}", flush=True)
    return {"events": stats.events, "seconds": dt, "events_per_s": rate,
            "sink_cpu_us_per_event": cpu / stats.events * 1e6, "transactions": stats.batches,
            "batch_size": batch_size, "baseline_events": baseline_n,
            "baseline_events_per_s": baseline, "ratio_vs_baseline": rate / baseline,
            "load_events_per_s": load_rate, "ledger": totals, "stream": want,
            "all_rows": ok, "acceptance_events_per_s": ACCEPT_EVENTS_PER_S,
            "meets_acceptance": ok and rate >= ACCEPT_EVENTS_PER_S}


# ---- 2. kills --------------------------------------------------------------------------------
def _sink_cmd(url: str, dsn: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tollway.cli", "sink", "postgres", "--url", url, "--dsn", dsn,
            *extra]


ENV = {**os.environ, "TOLLWAY_CONFIG": ""}


async def bench_kills(pg: PostgresServer, tmp: Path, n: int, kills: int,
                      seed: int = 20) -> dict[str, Any]:
    srv = EmbeddedNats(tmp / "nats-kills")
    url = srv.start()
    try:
        nc = await connect(url)
        await ensure_stream(nc.jetstream(), stream_config())
        await nc.close()
        dsn = _fresh_db(pg, "kills")
        migrate_only(dsn)
        evs = _events(n, seed=seed, days=2.0)
        rng = random.Random(seed)
        # Each process is killed a random 0-1 s after it has committed something past the
        # previous kill's position (a process killed while it starts proves nothing).
        delays = [rng.uniform(0.0, 1.0) for _ in range(kills)]
        rate = n / (kills * 2.5)  # the events flow over the kills, not before them
        loader = asyncio.create_task(_load(url, evs, tmp, rate=rate))
        positions = []
        t0 = time.perf_counter()
        for d in delays:
            before = _ledger_totals(dsn)["position"]
            proc = subprocess.Popen(_sink_cmd(url, dsn, "--batch-size", "2000",
                                              "--max-wait", "0.05"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=ENV)
            deadline = time.monotonic() + 60
            while (before == _ledger_totals(dsn)["position"] < n
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.02)
            await asyncio.sleep(d)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            positions.append(_ledger_totals(dsn)["position"])
        await loader
        done = subprocess.run(_sink_cmd(url, dsn, "--once"), capture_output=True, env=ENV,
                              timeout=1200, check=False)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        seconds = time.perf_counter() - t0
    finally:
        srv.stop()
    totals = _ledger_totals(dsn)
    want = _stream_totals(evs)
    ok = (totals["calls"] == totals["distinct_calls"] == want["calls"]
          and totals["cost_nanousd"] == want["cost_nanousd"] and totals["rows"] == want["rows"]
          and totals["position"] == n)
    print(f"kills: {kills} SIGKILLs over {n:,} events flowing at {rate:,.0f}/s; positions at "
          f"each kill {positions}; ledger {totals} vs stream {want}: "
          f"{'each event exactly once' if ok else 'MISMATCH'}", flush=True)
    return {"events": n, "kills": kills, "publish_rate": rate, "kill_delays_s": delays,
            "positions_at_kills": positions, "ledger": totals, "stream": want,
            "seconds": seconds, "exactly_once": ok}


# ---- 3. lag ----------------------------------------------------------------------------------
async def bench_lag(pg: PostgresServer, tmp: Path, rate: float, seconds: float
                    ) -> dict[str, Any]:
    srv = EmbeddedNats(tmp / "nats-lag")
    url = srv.start()
    proc = None
    try:
        nc = await connect(url)
        js = nc.jetstream()
        await ensure_stream(js, stream_config())
        dsn = _fresh_db(pg, "lag")
        migrate_only(dsn)
        proc = subprocess.Popen(_sink_cmd(url, dsn), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=ENV)
        # Published once the sink is up: its first commit of a probe event.
        await _load(url, _events(1, seed=22), tmp)
        deadline = time.monotonic() + 60
        while _ledger_totals(dsn)["position"] < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        evs = _events(int(rate * seconds), seed=21, days=1.0)
        loader = asyncio.create_task(_load(url, evs, tmp, rate=rate))
        samples: list[int] = []
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while not loader.done():
                last = (await js.stream_info("TOLLWAY")).state.last_seq
                cur = await conn.execute("SELECT last_seq FROM sink_position")
                row = await cur.fetchone()
                samples.append(max(0, last - (row[0] if row else 0)))
                await asyncio.sleep(0.05)
            achieved = await loader
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                cur = await conn.execute("SELECT last_seq FROM sink_position")
                row = await cur.fetchone()
                if row and row[0] >= len(evs) + 1:
                    break
                await asyncio.sleep(0.05)
            drained = time.monotonic() - (deadline - 120)
        await nc.close()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        srv.stop()
    samples.sort()
    out = {"rate": rate, "achieved_rate": achieved, "seconds": seconds, "events": len(evs),
           "samples": len(samples),
           "lag_events_p50": statistics.median(samples),
           "lag_events_p99": samples[int(len(samples) * 0.99) - 1],
           "lag_events_max": samples[-1],
           "drained_s_after_last_publish": drained}
    out["lag_s_p99"] = out["lag_events_p99"] / achieved
    print(f"lag at {achieved:,.0f} events/s for {seconds:.0f}s: p50 {out['lag_events_p50']:.0f} "
          f"events, p99 {out['lag_events_p99']} ({out['lag_s_p99'] * 1000:.0f} ms), max "
          f"{out['lag_events_max']}; caught up {drained:.2f}s after the last publish",
          flush=True)
    return out


# ---- 4. parquet ------------------------------------------------------------------------------
async def bench_parquet(url: str, evs: list[Event], tmp: Path) -> dict[str, Any]:
    out_dir = tmp / "parquet"
    nc = await connect(url)
    t0 = time.perf_counter()
    result = await export(nc, out_dir)
    dt = time.perf_counter() - t0
    await nc.close()
    want = _stream_totals(evs)
    count, cost = duckdb.connect().execute(
        f"SELECT count(*), sum(actual_cost_nanousd) FROM read_parquet('{out_dir}/calls/*.parquet')"
    ).fetchone() or (0, 0)
    ok = (count, cost) == (want["calls"], want["cost_nanousd"]) and result.events == len(evs)
    size = sum(p.stat().st_size for p in out_dir.rglob("*.parquet"))
    print(f"parquet: {result.events:,} events in {len(result.files)} files, {size / 1e6:.1f} MB, "
          f"{dt:.1f}s ({result.events / dt:,.0f} events/s); DuckDB count {count:,} and cost "
          f"{cost:,} vs stream {want['calls']:,} / {want['cost_nanousd']:,}: "
          f"{'equal' if ok else 'NOT equal'}", flush=True)
    return {"events": result.events, "files": len(result.files), "bytes": size, "seconds": dt,
            "events_per_s": result.events / dt, "duckdb_calls": int(count),
            "duckdb_cost_nanousd": int(cost), "stream": want, "round_trip": ok}


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "benchmark": "sink", "utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "machine": platform.machine(),
        "load_average": os.getloadavg(), "psycopg": psycopg.__version__,
        "duckdb": duckdb.__version__,
    }
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as d, PostgresServer(durable=True) as pg:
        tmp = Path(d)
        with psycopg.connect(pg.dsn) as conn:
            out["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        if parts & {"throughput", "parquet"}:
            srv = EmbeddedNats(tmp / "nats")
            url = srv.start()
            try:
                nc = await connect(url)
                await ensure_stream(nc.jetstream(), stream_config())
                await nc.close()
                evs = _events(args.events, seed=7)
                if "throughput" in parts:
                    out["throughput"] = await bench_throughput(
                        url, pg, evs, tmp, args.baseline_events, args.batch_size)
                else:
                    await _load(url, evs, tmp)
                if "parquet" in parts:
                    out["parquet"] = await bench_parquet(url, evs, tmp)
                del evs
            finally:
                srv.stop()
        if "kills" in parts:
            out["kills"] = await bench_kills(pg, tmp, args.kill_events, args.kills)
        if "lag" in parts:
            out["lag"] = await bench_lag(pg, tmp, args.lag_rate, args.lag_seconds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--baseline-events", type=int, default=5_000)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--kill-events", type=int, default=100_000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--lag-rate", type=float, default=3000.0)
    ap.add_argument("--lag-seconds", type=float, default=20.0)
    ap.add_argument("--only", default="throughput,parquet,kills,lag",
                    help="comma-separated subset of: throughput,parquet,kills,lag")
    args = ap.parse_args()
    out = asyncio.run(amain(args))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"sink-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
