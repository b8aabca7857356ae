"""The events layer: what publishing costs the gateway, and how fast the views fold.

Five measurements, each against a baseline taken in the same run:

1. ``record()`` on the response path: ns per call of ``EventRecorder.record``
   against ``NullRecorder.record`` (what the pipeline pays with events off).
2. Publishing: records through the publisher (queue -> events -> pipelined
   JetStream publishes with ``Nats-Msg-Id``, acks awaited) to the embedded
   nats-server, events/s and CPU us per event in the gateway process, on its
   raw connection and through the nats-py client, against nats-py's own
   ``js.publish_async`` pipeline publishing the same bytes; and the CPU per
   event at a steady 2,000 events/s (a gateway at full speed: small batches).
3. Folding: one million synthetic events (tollway.events.synthetic) through
   the default projections' folds: decoded events/s (the fold alone), and
   bytes -> decode -> fold events/s, against decoding alone.
4. Replay end to end (``tollway.events.replay``): the same events read back
   from the embedded server's stream and folded, events/s, through the bulk
   reader (tollway.events.nats.bulk) against nats-py's ordered push consumer (the
   projection runner's live path, what replay used before), interleaved.
5. Budget: ``reserve`` + ``settle`` per call from leases, against the naive
   shared reservation (one compare-and-set publish per call).

Rounds are interleaved (baseline, candidate, baseline, ...) and medians
quoted; the JSON of every round goes to
``benchmarks/results/events-<UTC timestamp>.json``.

    python benchmarks/events.py                      # ~4-5 minutes on 2 cores
    python benchmarks/events.py --fold-events 200000 --stream-events 100000 --rounds 3
    python benchmarks/events.py --only fold,replay   # the views: fold alone, replay end to end
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from tollway.events.broker import EmbeddedNats, connect, ensure_kv, ensure_stream, stream_config
from tollway.events.metrics import EventMetrics
from tollway.events.outbox import Outbox
from tollway.events.projections import default_projections
from tollway.events.publisher import Publisher
from tollway.events.recorder import EventRecorder
from tollway.events.replay import replay
from tollway.events.schema import Event, decode, encode, event_from_record
from tollway.events.synthetic import events as synthetic_events
from tollway.record import CallRecord, NullRecorder

ACCEPT_FOLD_PER_S = 100_000  # issue 5: "replay folds at least 100,000 events per second"
RESULTS = Path(__file__).resolve().parent / "results"


def _record(i: int) -> CallRecord:
    return CallRecord(
        request_id=f"req-{i}", tenant=("acme", "globex", "initech")[i % 3],
        occurred_at=time.time(), outcome="completed", route="auto", provider="openai",
        model="gpt-4o-mini", upstream_model="gpt-4o-mini", task="chat", tier="standard",
        prompt_tokens=120, completion_tokens=80, estimated_cost_nanousd=90_000,
        actual_cost_nanousd=66_000, latency_s=0.42, ttft_s=0.11, overhead_s=0.0004,
        attempts=1, stream=True)


# ---- 1. record() -----------------------------------------------------------------------------
def bench_record(n: int, rounds: int) -> dict[str, Any]:
    recs = [_record(i) for i in range(1000)]
    null = NullRecorder()
    runs = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            outbox = Outbox(d)
            outbox.open()
            pub = Publisher(outbox, queue_size=n + 1)
            rec = EventRecorder(pub)
            row = {}
            for name, recorder in (("null", null), ("events", rec)):
                gc.collect()
                t0 = time.perf_counter_ns()
                for i in range(n):
                    recorder.record(recs[i % 1000])
                row[name] = (time.perf_counter_ns() - t0) / n
            assert pub.queued == n
            outbox.close()
        runs.append(row)
    null_ns = statistics.median(r["null"] for r in runs)
    ev_ns = statistics.median(r["events"] for r in runs)
    return {"calls": n, "rounds": runs, "null_ns_per_call": null_ns,
            "events_ns_per_call": ev_ns, "added_ns_per_call": ev_ns - null_ns}


# ---- 2. publishing ---------------------------------------------------------------------------
async def _publish_ours(url: str, n: int, tmp: Path, raw: bool) -> dict[str, float]:
    nc = await connect(url)
    outbox = Outbox(tmp / f"ob-{time.monotonic_ns()}")
    outbox.open()
    pub = Publisher(outbox, metrics=EventMetrics(), queue_size=n + 1, raw=raw)
    await pub.start(nc)
    recs = [_record(i) for i in range(n)]
    c0, t0 = time.process_time(), time.perf_counter()
    # Steady flow, as from a busy gateway: 500 records, then the loop turns once.
    for start in range(0, n, 500):
        for r in recs[start:start + 500]:
            pub.submit(r)
        await asyncio.sleep(0)
    ok = await pub.flush(120)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert ok and outbox.pending == 0
    assert pub.via == ("wire" if raw else "nats-py"), pub.via
    reg = pub.metrics.registry
    published = reg.get_sample_value("tollway_events_published_total")
    # On a loaded machine an ack can miss publish_timeout_s: the event is resent from the
    # outbox and the stream drops the copy as a duplicate (counted once, as a duplicate).
    assert published == n, (published, n)
    await pub.stop()
    outbox.close()
    await nc.close()
    return {"events_per_s": n / dt, "cpu_us_per_event": cpu / n * 1e6}


async def _publish_paced(url: str, rate: float, seconds: float, tmp: Path,
                         raw: bool | None) -> float:
    """CPU us per event at a steady ``rate`` (a gateway at full speed: small batches, the
    cost per batch counts). ``raw=None``: the same pacing loop without a publisher."""
    nc = await connect(url)
    outbox = Outbox(tmp / f"ob-{time.monotonic_ns()}")
    outbox.open()
    pub = Publisher(outbox, metrics=EventMetrics(), raw=bool(raw))
    await pub.start(nc)
    recs = [_record(i) for i in range(1000)]
    n = int(rate * seconds)
    tick = 0.001
    sent = k = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while sent < n:
        k += 1
        due = min(n, int(rate * tick * k))
        while sent < due:
            if raw is not None:
                pub.submit(recs[sent % 1000])
            sent += 1
        await asyncio.sleep(max(0.0, t0 + k * tick - time.perf_counter()))
    assert await pub.flush(60)
    cpu = time.process_time() - c0
    if raw is not None:
        assert pub.via == ("wire" if raw else "nats-py"), pub.via
        assert pub.metrics.registry.get_sample_value("tollway_events_published_total") == n
    await pub.stop()
    outbox.close()
    await nc.close()
    return cpu / n * 1e6


async def _publish_baseline(url: str, n: int) -> dict[str, float]:
    """nats-py's pipelined JetStream publish of the same events (already converted)."""
    nc = await connect(url)
    js = nc.jetstream()
    evs = [event_from_record(_record(i), f"b{time.monotonic_ns()}-{i}") for i in range(n)]
    c0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, n, 256):
        futs = [await js.publish_async(e.subject(), encode(e),
                                       headers={"Nats-Msg-Id": e.event_id})
                for e in evs[start:start + 256]]
        await asyncio.gather(*futs)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    await nc.close()
    return {"events_per_s": n / dt, "cpu_us_per_event": cpu / n * 1e6}


async def bench_publish(n: int, rounds: int, tmp: Path, *, rate: float = 2000.0,
                        paced_s: float = 3.0) -> dict[str, Any]:
    """Three ways to publish, interleaved: nats-py's ``publish_async`` (baseline), the
    publisher through the nats-py client (its fallback), and the publisher on its own raw
    connection (``wire``, its default). Then the publisher's CPU per event at a steady
    ``rate``, over the same pacing loop without it."""
    srv = EmbeddedNats(tmp / "nats-publish")
    url = srv.start()
    try:
        nc = await connect(url)
        await ensure_stream(nc.jetstream(), stream_config())
        await nc.close()
        runs = []
        for r in range(rounds):
            row: dict[str, Any] = {}
            order = [("baseline", None), ("nats_py", False), ("wire", True)]
            for who, raw in order[r % 3:] + order[:r % 3]:  # rotate: drift hits all alike
                row[who] = (await _publish_baseline(url, n) if raw is None
                            else await _publish_ours(url, n, tmp, raw))
            if rate and paced_s:
                idle = await _publish_paced(url, rate, paced_s, tmp, None)
                for who, raw in (("nats_py", False), ("wire", True)):
                    row[who]["paced_cpu_us_per_event"] = (
                        await _publish_paced(url, rate, paced_s, tmp, raw) - idle)
            runs.append(row)
    finally:
        srv.stop()

    def med(who: str, key: str) -> float:
        return statistics.median(r[who][key] for r in runs)

    ours, base = med("wire", "events_per_s"), med("baseline", "events_per_s")
    out = {
        "events": n, "rounds": runs,
        "tollway_events_per_s": ours, "baseline_events_per_s": base,
        "nats_py_path_events_per_s": med("nats_py", "events_per_s"),
        "ratio_vs_baseline": statistics.median(r["wire"]["events_per_s"] /
                                               r["baseline"]["events_per_s"] for r in runs),
        "ratio_vs_nats_py_path": statistics.median(r["wire"]["events_per_s"] /
                                                   r["nats_py"]["events_per_s"] for r in runs),
        "tollway_cpu_us_per_event": med("wire", "cpu_us_per_event"),
        "nats_py_path_cpu_us_per_event": med("nats_py", "cpu_us_per_event"),
        "baseline_cpu_us_per_event": med("baseline", "cpu_us_per_event"),
    }
    if rate and paced_s:
        out.update({"paced_rate": rate,
                    "paced_cpu_us_per_event": med("wire", "paced_cpu_us_per_event"),
                    "nats_py_path_paced_cpu_us_per_event": med("nats_py",
                                                               "paced_cpu_us_per_event")})
    return out


# ---- budget ----------------------------------------------------------------------------------
async def bench_budget(n: int, rounds: int, tmp: Path) -> dict[str, Any]:
    """reserve + settle per call (leases) against one CAS publish per call (no leases)."""
    from prometheus_client import CollectorRegistry

    from tollway.config import EventsConfig, NatsConfig
    from tollway.events.service import EventsService

    srv = EmbeddedNats(tmp / "nats-budget")
    url = srv.start()
    runs = []
    try:
        for r in range(rounds):
            svc = EventsService(NatsConfig(url=url, data_dir=str(tmp / f"gw-budget-{r}")),
                                EventsConfig(), registry=CollectorRegistry())
            await svc.start()
            assert svc.nc is not None
            js = svc.nc.jetstream()
            await js.add_stream(name=f"BENCH{r}", subjects=[f"bench{r}.>"])  # not TOLLWAY
            tenant = f"bench{r}"
            t0 = time.perf_counter()
            last = 0
            for _ in range(n):  # baseline: the naive shared reservation, a CAS round trip each
                ack = await js.publish(f"bench{r}.cas.{tenant}", b"{}", headers={
                    "Nats-Expected-Last-Subject-Sequence": str(last)})
                last = ack.seq
            cas_us = (time.perf_counter() - t0) / n * 1e6
            b = svc.budget
            t0 = time.perf_counter()
            for i in range(n):
                res = await b.reserve(tenant, 100_000, 10**12, request_id=f"b{i}")
                assert res is not None
                b.settle(res, 50_000)
            lease_us = (time.perf_counter() - t0) / n * 1e6
            leases = svc.metrics.registry.get_sample_value("tollway_budget_leases_total")
            runs.append({"cas_round_trip_us": cas_us, "lease_reserve_settle_us": lease_us,
                         "leases": leases})
            await svc.stop()
    finally:
        srv.stop()
    cas = statistics.median(r["cas_round_trip_us"] for r in runs)
    lease = statistics.median(r["lease_reserve_settle_us"] for r in runs)
    return {"calls": n, "rounds": runs, "lease_reserve_settle_us": lease,
            "baseline_cas_round_trip_us": cas, "speedup": cas / lease}


# ---- 3. folding ------------------------------------------------------------------------------
def synthetic(n: int) -> list[bytes]:
    return [encode(e) for e in itertools.islice(synthetic_events(n, days=30.0), n)]


def bench_fold(lines: list[bytes], rounds: int, chunk: int = 100_000) -> dict[str, Any]:
    raw_decoder = msgspec.json.Decoder()
    runs = []
    for _ in range(rounds):
        projs = default_projections()
        decode_only = fold = decode_s = 0.0
        for start in range(0, len(lines), chunk):
            part = lines[start:start + chunk]
            gc.collect()
            t0 = time.perf_counter()
            for b in part:
                raw_decoder.decode(b)  # baseline: JSON to dicts, no types
            decode_only += time.perf_counter() - t0
            t0 = time.perf_counter()
            evs: list[Event] = []
            for b in part:
                e = decode(b)
                assert e is not None
                evs.append(e)
            decode_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            for seq, e in enumerate(evs, start + 1):
                for p in projs:
                    p.view = p.fold(p.view, seq, e)
            fold += time.perf_counter() - t0
            del evs
        n = len(lines)
        runs.append({"fold_per_s": n / fold, "decode_and_fold_per_s": n / (decode_s + fold),
                     "json_decode_per_s": n / decode_only})
    fold_rate = statistics.median(r["fold_per_s"] for r in runs)
    return {
        "events": len(lines), "rounds": runs,
        "fold_events_per_s": fold_rate,
        "decode_and_fold_events_per_s": statistics.median(r["decode_and_fold_per_s"]
                                                          for r in runs),
        "baseline_json_decode_per_s": statistics.median(r["json_decode_per_s"] for r in runs),
        "acceptance_fold_per_s": ACCEPT_FOLD_PER_S,
        "meets_acceptance": fold_rate >= ACCEPT_FOLD_PER_S,
    }


# ---- 4. replay from the stream ---------------------------------------------------------------
async def bench_stream_replay(lines: list[bytes], rounds: int, tmp: Path) -> dict[str, Any]:
    srv = EmbeddedNats(tmp / "nats-replay")
    url = srv.start()
    try:
        nc = await connect(url)
        js = nc.jetstream()
        await ensure_stream(js, stream_config())
        kv = await ensure_kv(js)
        outbox = Outbox(tmp / "ob-replay")
        outbox.open()
        pub = Publisher(outbox, queue_size=len(lines) + 1, batch_size=1024)
        await pub.start(nc)
        t0 = time.perf_counter()
        for start in range(0, len(lines), 5000):
            for b in lines[start:start + 5000]:
                e = decode(b)
                assert e is not None
                pub.submit(e)
            await asyncio.sleep(0)
        assert await pub.flush(600)
        load_s = time.perf_counter() - t0
        await pub.stop()
        outbox.close()
        runs = []
        views = None
        for _ in range(rounds):
            row: dict[str, Any] = {}
            for name, bulk in (("nats_py", False), ("bulk", True)):
                gc.collect()
                c0 = time.process_time()
                result = await replay(nc, kv=kv, save=False, timeout=1200, bulk=bulk)
                cpu = time.process_time() - c0
                assert result.messages == len(lines)
                assert result.bulk_messages == (len(lines) if bulk else 0)
                got = [p.view for p in result.projections]
                assert views is None or got == views, "both paths fold the same views"
                views = got
                row[name] = {"events_per_s": result.rate, "seconds": result.seconds,
                             "cpu_us_per_event": cpu / len(lines) * 1e6}
            row["speedup"] = row["bulk"]["events_per_s"] / row["nats_py"]["events_per_s"]
            runs.append(row)
        await nc.close()
    finally:
        srv.stop()

    def med(who: str, key: str) -> float:
        return float(statistics.median(r[who][key] for r in runs))

    rate = med("bulk", "events_per_s")
    return {"events": len(lines), "load_events_per_s": len(lines) / load_s, "rounds": runs,
            "replay_events_per_s": rate,
            "baseline_nats_py_events_per_s": med("nats_py", "events_per_s"),
            "speedup": statistics.median(r["speedup"] for r in runs),
            "cpu_us_per_event": med("bulk", "cpu_us_per_event"),
            "baseline_cpu_us_per_event": med("nats_py", "cpu_us_per_event"),
            "acceptance_replay_per_s": ACCEPT_FOLD_PER_S,
            "meets_acceptance": rate >= ACCEPT_FOLD_PER_S}


# ---- main ------------------------------------------------------------------------------------
async def amain(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "benchmark": "events", "utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "machine": platform.machine(),
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        parts = set(args.only.split(","))
        if "record" in parts:
            out["record"] = r = bench_record(args.record_calls, args.rounds)
            print(f"record():  {r['events_ns_per_call']:.0f} ns/call "
                  f"(NullRecorder {r['null_ns_per_call']:.0f} ns; added "
                  f"{r['added_ns_per_call']:.0f} ns)", flush=True)
        if "publish" in parts:
            out["publish"] = p = await bench_publish(args.publish_events, args.rounds, tmp,
                                                     rate=args.publish_rate)
            print(f"publish:   {p['tollway_events_per_s']:,.0f} events/s, "
                  f"{p['tollway_cpu_us_per_event']:.1f} us CPU/event in the gateway process "
                  f"(through nats-py: {p['nats_py_path_events_per_s']:,.0f} events/s, "
                  f"{p['nats_py_path_cpu_us_per_event']:.1f} us; nats-py publish_async: "
                  f"{p['baseline_events_per_s']:,.0f} events/s, "
                  f"{p['baseline_cpu_us_per_event']:.1f} us; ratio "
                  f"{p['ratio_vs_baseline']:.2f}x)", flush=True)
            if "paced_rate" in p:
                print(f"           at {p['paced_rate']:,.0f} events/s: "
                      f"{p['paced_cpu_us_per_event']:.1f} us CPU/event (through nats-py: "
                      f"{p['nats_py_path_paced_cpu_us_per_event']:.1f} us)", flush=True)
        if "budget" in parts:
            out["budget"] = b = await bench_budget(args.budget_calls, args.rounds, tmp)
            print(f"budget:    reserve+settle {b['lease_reserve_settle_us']:.1f} us per call "
                  f"from leases (a CAS publish per call: {b['baseline_cas_round_trip_us']:.0f} "
                  f"us; {b['speedup']:.0f}x)", flush=True)
        lines = synthetic(max(args.fold_events, args.stream_events))
        if "fold" in parts:
            out["fold"] = f = bench_fold(lines[:args.fold_events], args.rounds)
            print(f"fold:      {f['fold_events_per_s']:,.0f} events/s over {f['events']:,} "
                  f"decoded events ({len(default_projections())} views); "
                  f"decode+fold {f['decode_and_fold_events_per_s']:,.0f}/s "
                  f"(JSON decode alone {f['baseline_json_decode_per_s']:,.0f}/s); acceptance "
                  f">= {ACCEPT_FOLD_PER_S:,}: {'met' if f['meets_acceptance'] else 'NOT met'}",
                  flush=True)
        if "replay" in parts and args.stream_events:
            s_lines = lines[:args.stream_events]
            del lines
            out["replay"] = s = await bench_stream_replay(s_lines, args.replay_rounds, tmp)
            print(f"replay:    {s['replay_events_per_s']:,.0f} events/s end to end from the "
                  f"stream, bulk reader ({s['cpu_us_per_event']:.1f} us CPU/event); nats-py "
                  f"consumer {s['baseline_nats_py_events_per_s']:,.0f}/s "
                  f"({s['baseline_cpu_us_per_event']:.1f} us); {s['speedup']:.2f}x; "
                  f"{len(s_lines):,} events (loaded at {s['load_events_per_s']:,.0f}/s); "
                  f"acceptance >= {ACCEPT_FOLD_PER_S:,}: "
                  f"{'met' if s['meets_acceptance'] else 'NOT met'}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--record-calls", type=int, default=200_000)
    ap.add_argument("--publish-events", type=int, default=50_000)
    ap.add_argument("--publish-rate", type=float, default=2000.0,
                    help="steady rate for the CPU per event of small batches (0: skip)")
    ap.add_argument("--budget-calls", type=int, default=5_000)
    ap.add_argument("--fold-events", type=int, default=1_000_000)
    ap.add_argument("--stream-events", type=int, default=1_000_000,
                    help="events loaded into a stream and replayed end to end (0: skip)")
    ap.add_argument("--replay-rounds", type=int, default=3,
                    help="replays of the stream per path (nats-py, bulk), interleaved")
    ap.add_argument("--only", default="record,publish,budget,fold,replay",
                    help="comma-separated subset of: record,publish,budget,fold,replay")
    args = ap.parse_args()
    out = asyncio.run(amain(args))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"events-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
