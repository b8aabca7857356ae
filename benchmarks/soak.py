"""Soak: a gateway under a steady mixed load for a long time; does its memory or fd count climb?

Starts the simulated upstream (``python -m tollway.testing.upstream``) and a
real ``tollway serve`` with the config of ``benchmarks/load.py``'s ``events``
variant (auth, guards, metrics, the JSON access log, every call an event on
the embedded NATS) and several tenants, then drives it at a fixed rate, plain
and streaming calls mixed, for ``--minutes``. By default the gateway and its
nats-server run on CPU 0, the upstream, the load generator and this script on
CPU 1 (``--no-pin``: wherever the scheduler puts them).

The load generator is ``oha`` (Rust, fixed rate with latency correction): one
process per tenant and mode, each at its share of ``--rate``, started anew
every ``--interval`` seconds on a fixed clock (while the last calls of the
batch before finish) with a request count that fills the interval, so every
interval's calls are counted exactly (per-request CSV: latency and status),
the rate holds on the wall clock, and every client connection is closed and
reopened each interval (a socket the gateway fails to release shows up as a
climbing fd count). What the
generator costs is measured (CPU time of the finished oha processes).

Every interval, mid-load, it samples the gateway process and the embedded
nats-server separately: RSS, open file descriptors (``/proc/PID/fd``), TCP
connections by peer (clients, upstream, NATS), CPU; and for the interval:
achieved calls/s, statuses, transport errors, p50/p99 latency; plus a few
gauges from ``/api/ai/metrics`` (in flight, event queue, outbox).

The verdict (issue 11), after a warm-up (``--warmup-minutes``, default the
first 2 minutes, a quarter of shorter runs) that fills pools, caches and the
allocator's arenas:

- RSS: the median of the last window's samples is at most 10 % above the
  median of the first window after warm-up (a window is a minute, a third of
  what follows the warm-up in shorter runs);
- file descriptors flat: the same two medians differ by at most ``FD_SLACK``
  (a handful, whatever the duration: a leak of one fd per thousand calls
  would add 300 in 20 minutes);
- 0 responses >= 500 and 0 transport errors over the whole run.

    python benchmarks/soak.py                            # 300 calls/s, 20 minutes
    python benchmarks/soak.py --minutes 2                # a validation run
    python benchmarks/soak.py --rate 300 --minutes 20 --stream-fraction 0.3 --tenants 3

Results go to ``benchmarks/results/soak-<UTC timestamp>.json`` (rewritten
every minute, so a run cut short keeps what it measured) and a per-minute
markdown table is printed. Only loopback addresses are driven.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from load import (
    BASE_CONFIG,
    VARIANTS,
    check_loopback,
    find_oha,
    make_bodies,
    process_cpu_s,
    processes,
    start_gateway,
    start_upstream,
)
from procstat import (
    ProcState,
    fd_targets,
    find_child,
    idle,
    listening_ports,
    machine_stalls_s,
    pin,
    proc_state,
    socket_inodes,
    tcp_sockets,
)

RESULTS = Path(__file__).resolve().parent / "results"
RSS_MAX_GROWTH = 0.10
FD_SLACK = 4
SOAK = "soak"  # the variant name: load.py's start_gateway writes its config from VARIANTS


def tenant_key(i: int) -> str:
    return f"tw-soak{i}-" + hashlib.sha256(f"soak tenant {i}".encode()).hexdigest()[:32]


def soak_overlay(tenants: int) -> dict[str, Any]:
    """load.py's ``events`` variant with ``tenants`` tenants (unlimited, like its one)."""
    template = BASE_CONFIG["tenants"][0]
    return {
        **VARIANTS["events"],
        "tenants": [
            {
                **template,
                "id": f"soak{i}",
                "key_sha256": [hashlib.sha256(tenant_key(i).encode()).hexdigest()],
            }
            for i in range(tenants)
        ],
    }


# ---------------------------------------------------------------- metrics


WATCHED = (
    "tollway_in_flight_requests",
    "tollway_events_queue_depth",
    "tollway_events_outbox_depth",
    "tollway_events_published_total",
    "tollway_events_spilled_total",
    "tollway_events_dropped_total",
)


def scrape(url: str) -> dict[str, float]:
    """The WATCHED families from the gateway's /metrics, summed over labels."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("#") or not line:
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in WATCHED:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


# ---------------------------------------------------------------- the load generator


@dataclass(frozen=True)
class Flow:
    """One oha process per interval: one tenant, one mode, a share of the rate."""

    tenant: int
    mode: str  # "plain" | "stream"
    rate: float

    def command(self, oha: str, url: str, body: str, count: int, conns: int) -> list[str]:
        return [
            oha, "--no-tui", "--output-format", "csv", "--worker-threads", "1",
            "-m", "POST", "-H", "content-type: application/json",
            "-H", f"authorization: Bearer {tenant_key(self.tenant)}", "-d", body,
            "-c", str(conns), "-q", f"{self.rate:.3f}", "--latency-correction",
            "-n", str(count), "-t", "30s", url,
        ]  # fmt: skip


def flows(rate: float, stream_fraction: float, tenants: int) -> list[Flow]:
    shares = {"plain": 1.0 - stream_fraction, "stream": stream_fraction}
    return [
        Flow(t, mode, rate * share / tenants)
        for t in range(tenants)
        for mode, share in shares.items()
        if share > 0
    ]


@dataclass
class Calls:
    """Calls answered in one interval, by mode: latencies (s) and statuses."""

    latencies: dict[str, array[float]] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # sent, no response (connection refused or reset, timeout)

    def add_csv(self, mode: str, text: str, sent: int) -> None:
        lat = self.latencies.setdefault(mode, array("d"))
        rows = 0
        for row in csv.DictReader(io.StringIO(text)):
            rows += 1
            lat.append(float(row["request-duration"]))
            self.status[row["status"]] = self.status.get(row["status"], 0) + 1
        self.errors += max(0, sent - rows)

    @property
    def answered(self) -> int:
        return sum(self.status.values())

    def all_latencies(self) -> array[float]:
        out = array("d")
        for lat in self.latencies.values():
            out.extend(lat)
        return out


def percentile(xs: array[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


@dataclass
class Batch:
    """One interval's oha processes, writing their CSV to files (a pipe could fill up while
    this script is busy with the batch before)."""

    flows: list[Flow]
    counts: list[int]
    running: list[subprocess.Popen[bytes]]
    outputs: list[Path]


def start_batch(
    oha: str, url: str, bodies: dict[str, str], plan: list[Flow], seconds: float, conns: int,
    outdir: Path,
) -> Batch:
    check_loopback(url)
    counts = [max(1, round(f.rate * seconds)) for f in plan]
    outputs = [outdir / f"oha-{i}.csv" for i in range(len(plan))]
    running = []
    for f, n, out in zip(plan, counts, outputs, strict=True):
        with out.open("wb") as sink, out.with_suffix(".err").open("wb") as err:
            running.append(subprocess.Popen(
                f.command(oha, url, bodies[f.mode], n, conns), stdout=sink, stderr=err,
            ))  # fmt: skip
    return Batch(plan, counts, running, outputs)


def collect(batch: Batch, timeout_s: float) -> Calls:
    """Wait for every process of the batch and count its calls."""
    calls = Calls()
    for f, n, p, out in zip(batch.flows, batch.counts, batch.running, batch.outputs, strict=True):
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.returncode != 0:
            err = out.with_suffix(".err").read_text(errors="replace").strip()
            print(f"warning: oha ({f.mode}, tenant {f.tenant}) exited {p.returncode}: "
                  f"{err[-500:]}", file=sys.stderr)
        calls.add_csv(f.mode, out.read_text(errors="replace"), n)
    return calls


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


# ---------------------------------------------------------------- samples


@dataclass
class Sample:
    t_s: float  # since the load started, at the end of the interval
    interval_s: float
    calls_per_s: float
    answered: int
    status: dict[str, int]
    errors: int
    p50_ms: float
    p99_ms: float
    p50_ms_by_mode: dict[str, float]
    p99_ms_by_mode: dict[str, float]
    gateway: ProcState
    nats: ProcState | None
    gateway_cpu_share: float  # of one core, over the interval
    nats_cpu_share: float
    upstream_cpu_share: float
    generator_cpu_share: float
    generator_cpu_us_per_call: float
    load_avg: float
    # share of the interval the machine was stalled (pressure stall information, steal):
    # cpu_some 0.6 = some task waited for a CPU 60 % of the time
    machine_stalls: dict[str, float]
    metrics: dict[str, float]

    def line(self) -> str:
        gw, nats = self.gateway, self.nats
        failed = self.answered - self.status.get("200", 0) + self.errors
        return (
            f"{self.t_s:7.0f} s {self.calls_per_s:6.1f}/s p50 {self.p50_ms:6.2f} "
            f"p99 {self.p99_ms:7.2f} ms non-200 {failed:3d} "
            f"rss {gw.rss_mb:6.1f} MB nats {nats.rss_mb if nats else 0:6.1f} MB "
            f"fds {gw.fds:3d} (fixed {gw.fixed_fds}) conns {gw.conns} "
            f"cpu gw {self.gateway_cpu_share * 100:3.0f}% "
            f"oha {self.generator_cpu_share * 100:3.0f}% load {self.load_avg:.1f} "
            f"stalls cpu {self.machine_stalls.get('cpu_some', 0) * 100:.0f}% "
            f"io {self.machine_stalls.get('io_some', 0) * 100:.0f}%"
        )


def make_sample(
    calls: Calls, t_s: float, dt: float, gw: ProcState, nats: ProcState | None,
    cpu_used: dict[str, float], metrics: dict[str, float],
) -> Sample:
    """One interval's sample; ``cpu_used``: CPU seconds of each process in the interval."""
    lat = calls.all_latencies()
    by_mode = calls.latencies.items()
    return Sample(
        t_s=t_s, interval_s=dt, calls_per_s=calls.answered / dt,
        answered=calls.answered, status=dict(sorted(calls.status.items())),
        errors=calls.errors,
        p50_ms=percentile(lat, 0.50) * 1000, p99_ms=percentile(lat, 0.99) * 1000,
        p50_ms_by_mode={m: percentile(x, 0.50) * 1000 for m, x in by_mode},
        p99_ms_by_mode={m: percentile(x, 0.99) * 1000 for m, x in by_mode},
        gateway=gw, nats=nats,
        gateway_cpu_share=cpu_used["gateway"] / dt, nats_cpu_share=cpu_used["nats"] / dt,
        upstream_cpu_share=cpu_used["upstream"] / dt, generator_cpu_share=cpu_used["oha"] / dt,
        generator_cpu_us_per_call=cpu_used["oha"] / max(1, calls.answered) * 1e6,
        load_avg=os.getloadavg()[0], metrics=metrics,
        machine_stalls={k.removeprefix("machine_"): v / dt for k, v in cpu_used.items()
                        if k.startswith("machine_")},
    )  # fmt: skip


def cpu_seconds(pids: dict[str, int | None]) -> dict[str, float]:
    """user + system CPU seconds so far of each process (nan if gone), as "oha" of the
    children this script has waited for (the finished load-generator processes), and the
    machine's stall totals as "machine_<what>"."""
    out = {f"machine_{k}": v for k, v in machine_stalls_s().items()}
    for name, pid in pids.items():
        cpu = process_cpu_s(pid) if pid else None
        out[name] = sum(cpu) if cpu else float("nan")
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out | {"oha": r.ru_utime + r.ru_stime}


# ---------------------------------------------------------------- verdict


def windows(samples: list[Sample], warmup_s: float) -> tuple[list[Sample], list[Sample]]:
    """The first and last window after the warm-up: a minute each, or a third of what
    follows the warm-up when that is shorter than three minutes."""
    after = [s for s in samples if s.t_s > warmup_s]
    if not after:
        return [], []
    span = after[-1].t_s - warmup_s
    width = min(60.0, span / 3)
    first = [s for s in after if s.t_s <= warmup_s + width] or after[:1]
    last = [s for s in after if s.t_s >= after[-1].t_s - width] or after[-1:]
    return first, last


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return float("nan")
    mx = statistics.fmean(p[0] for p in points)
    my = statistics.fmean(p[1] for p in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den * 3600 if den else float("nan")


def span(xs: Iterable[int]) -> list[int]:
    values = list(xs)
    return [min(values), max(values)]


def fmt_span(v: list[int]) -> str:
    return f"{v[0]}-{v[1]}" if v[0] != v[1] else str(v[0])


def verdict(samples: list[Sample], warmup_s: float, rate: float) -> dict[str, Any]:
    first, last = windows(samples, warmup_s)
    out: dict[str, Any] = {"warmup_s": warmup_s, "lines": [], "pass": False}
    if not first:
        out["lines"].append("FAIL no sample after the warm-up")
        return out
    after = [s for s in samples if s.t_s > warmup_s]
    rss0 = statistics.median(s.gateway.rss_mb for s in first)
    rss1 = statistics.median(s.gateway.rss_mb for s in last)
    fd0 = statistics.median(s.gateway.fixed_fds for s in first)
    fd1 = statistics.median(s.gateway.fixed_fds for s in last)
    growth = rss1 / rss0 - 1
    fail5xx = sum(n for s in samples for code, n in s.status.items() if int(code) >= 500)
    errors = sum(s.errors for s in samples)
    answered = sum(s.answered for s in samples)
    wall = sum(s.interval_s for s in samples)
    checks = {
        "rss": growth <= RSS_MAX_GROWTH,
        "fds": fd1 - fd0 <= FD_SLACK,
        "5xx": fail5xx == 0 and errors == 0,
    }
    out |= {
        "rss_first_mb": rss0, "rss_last_mb": rss1, "rss_growth": growth,
        "rss_peak_after_warmup_mb": max(s.gateway.rss_mb for s in after),
        "rss_slope_mb_per_hour": slope_per_hour([(s.t_s, s.gateway.rss_mb) for s in after]),
        "fixed_fds_first": fd0, "fixed_fds_last": fd1,
        "fixed_fds_min_max_after_warmup": span(s.gateway.fixed_fds for s in after),
        "fds_min_max_after_warmup": span(s.gateway.fds for s in after),
        "fds_slope_per_hour": slope_per_hour([(s.t_s, s.gateway.fds) for s in after]),
        "connections_min_max_after_warmup": {
            role: span(s.gateway.conns.get(role, 0) for s in after)
            for role in ("clients", "upstream", "nats", "other")
        },
        "close_wait_max": max(s.gateway.conns.get("close_wait", 0) for s in samples),
        "responses_5xx": fail5xx, "transport_errors": errors, "answered": answered,
        "achieved_calls_per_s": answered / wall if wall else 0.0,
        "min_interval_calls_per_s": min(s.calls_per_s for s in samples),
        "checks": checks, "pass": all(checks.values()),
    }  # fmt: skip
    if any(s.nats for s in after):
        nats = [s.nats.rss_mb for s in first + last if s.nats]
        out["nats_rss_first_last_mb"] = [nats[0], nats[-1]]
    wm = warmup_s / 60
    out["lines"] = [
        f"{'PASS' if checks['rss'] else 'FAIL'} gateway RSS after the {wm:g}-minute warm-up: "
        f"{rss0:.1f} -> {rss1:.1f} MB ({growth * 100:+.1f} %, bar +{RSS_MAX_GROWTH * 100:.0f} %)",
        f"{'PASS' if checks['fds'] else 'FAIL'} gateway fds not held by an established "
        f"connection after the warm-up: {fd0:g} -> {fd1:g} (flat: the last window's median "
        f"at most {FD_SLACK} above the first's; "
        f"range {fmt_span(out['fixed_fds_min_max_after_warmup'])})",
        f"info: all gateway fds after the warm-up {fmt_span(out['fds_min_max_after_warmup'])} "
        f"({out['fds_slope_per_hour']:+.1f}/hour); established connections "
        + ", ".join(f"{role} {fmt_span(v)}"
                    for role, v in out["connections_min_max_after_warmup"].items())
        + f"; CLOSE_WAIT at most {out['close_wait_max']}",
        f"{'PASS' if checks['5xx'] else 'FAIL'} {fail5xx} responses >= 500 and {errors} transport "
        f"errors in {answered + errors} calls",
        f"info: {out['achieved_calls_per_s']:.1f} calls/s achieved of {rate:g} "
        f"(slowest interval {out['min_interval_calls_per_s']:.1f})",
    ]
    return out


# ---------------------------------------------------------------- report


def minute_rows(samples: list[Sample], interval_s: float) -> list[dict[str, Any]]:
    """One row per minute of intervals (by count: the few ms between two intervals, while
    oha restarts, do not push the last one into a minute of its own)."""
    rows: list[dict[str, Any]] = []
    by_minute: dict[int, list[Sample]] = {}
    for i, s in enumerate(samples):
        by_minute.setdefault(int(i * interval_s // 60), []).append(s)
    for m, sel in by_minute.items():
        wall = sum(s.interval_s for s in sel)
        nats = [s.nats for s in sel if s.nats]
        rows.append({
            "minute": m + 1,
            "calls_per_s": sum(s.answered for s in sel) / wall,
            "p50_ms": statistics.median(s.p50_ms for s in sel),
            "p99_ms": max(s.p99_ms for s in sel),
            "non_200": sum(n for s in sel for c, n in s.status.items() if c != "200")
            + sum(s.errors for s in sel),
            "rss_mb": sel[-1].gateway.rss_mb,
            "nats_rss_mb": nats[-1].rss_mb if nats else float("nan"),
            "fds": f"{min(s.gateway.fds for s in sel)}-{max(s.gateway.fds for s in sel)}",
            "nats_fds": nats[-1].fds if nats else 0,
            "conns": "/".join(str(sel[-1].gateway.conns.get(k, 0))
                              for k in ("clients", "upstream", "nats")),
            "gateway_cpu": statistics.fmean(s.gateway_cpu_share for s in sel),
            "generator_cpu": statistics.fmean(s.generator_cpu_share for s in sel),
            "cpu_pressure": statistics.fmean(s.machine_stalls.get("cpu_some", math.nan)
                                             for s in sel),
        })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| minute | calls/s | p50 ms | p99 ms (worst 10 s) | non-200 | gateway RSS MB "
        "| nats RSS MB | gateway fds | conns clients/upstream/nats | gateway CPU | oha CPU "
        "| CPU pressure |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['minute']} | {r['calls_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.1f} "
            f"| {r['non_200']} | {r['rss_mb']:.1f} | {r['nats_rss_mb']:.1f} | {r['fds']} "
            f"| {r['conns']} | {r['gateway_cpu'] * 100:.0f} % | {r['generator_cpu'] * 100:.0f} % "
            f"| {r['cpu_pressure'] * 100:.0f} % |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def soak(args: argparse.Namespace, oha: str, workdir: Path, doc: dict[str, Any],
         write: Any) -> list[Sample]:
    VARIANTS[SOAK] = soak_overlay(args.tenants)
    plain, stream = make_bodies()
    bodies = {"plain": plain, "stream": stream}
    plan = flows(args.rate, args.stream_fraction, args.tenants)
    samples: list[Sample] = []
    with processes() as procs:
        upstream, upstream_base = start_upstream(workdir, args.reply_words)
        procs.append(upstream)
        gateway, gateway_base = start_gateway(workdir, SOAK, upstream_base)
        procs.append(gateway)
        gw_pid, up_pid = gateway.popen.pid, upstream.popen.pid
        nats_pid = find_child(gw_pid, "nats-server")
        if args.pin:
            for pid in (gw_pid, nats_pid):
                if pid is not None:
                    pin(pid, {0})
            pin(up_pid, {1})
            os.sched_setaffinity(0, {1})  # this script, and the oha processes it starts
        gw_port = int(gateway_base.split(":")[2].split("/")[0])
        up_port = int(upstream_base.split(":")[2].split("/")[0])
        table = tcp_sockets()
        nats_ports = (
            listening_ports(socket_inodes(fd_targets(nats_pid)), table) if nats_pid else set()
        )
        gw_peers = {"clients": {gw_port}, "upstream": {up_port}, "nats": nats_ports}
        url = f"{gateway_base}/chat/completions"
        metrics_url = gateway_base.replace("/v1", "/metrics")
        pids = {"gateway": gw_pid, "nats": nats_pid, "upstream": up_pid}
        doc["pids"] = pids
        doc["idle_before"] = idle(gw_pid, table, gw_peers)

        def sample() -> tuple[ProcState | None, ProcState | None, dict[str, float]]:
            table = tcp_sockets()
            return (proc_state(gw_pid, table, gw_peers),
                    proc_state(nats_pid, table, {"clients": nats_ports}) if nats_pid else None,
                    scrape(metrics_url))

        intervals = max(1, round(args.minutes * 60 / args.interval))
        outdirs = [workdir / "oha-a", workdir / "oha-b"]  # one batch writes, one is read
        for d in outdirs:
            d.mkdir(exist_ok=True)
        start = time.monotonic()
        last_write = t_prev = start
        cpu = cpu_seconds(pids)
        previous: tuple[Batch, ProcState | None, ProcState | None, dict[str, float]] | None
        previous = None
        try:
            # Batches start on a fixed grid, the next one while the last calls of the one
            # before are still out: no gap between intervals, so the rate holds on the clock.
            for i in range(intervals + 1):
                sleep_until(start + i * args.interval)
                batch = None
                if i < intervals:
                    batch = start_batch(oha, url, bodies, plan, args.interval,
                                        args.connections, outdirs[i % 2])
                if previous is not None:
                    done, gw, nats, metrics = previous
                    calls = collect(done, args.interval * 3 + 30)
                    t1 = time.monotonic()
                    if gw is None or gateway.popen.poll() is not None:
                        raise SystemExit(f"the gateway died during the soak:\n{gateway.tail()}")
                    now = cpu_seconds(pids)
                    used = {k: now[k] - cpu[k] for k in now}
                    s = make_sample(calls, t1 - start, t1 - t_prev, gw, nats, used, metrics)
                    cpu, t_prev = now, t1
                    samples.append(s)
                    print(s.line(), file=sys.stderr, flush=True)
                    if t1 - last_write >= 60:
                        write(samples)
                        last_write = t1
                if batch is None:
                    break
                sleep_until(start + (i + 0.5) * args.interval)
                previous = (batch, *sample())
        except KeyboardInterrupt:  # the oha processes got it too: report what was measured
            doc["interrupted"] = True
        time.sleep(3)  # the clients are gone; pools may close idle connections
        doc["idle_after"] = idle(gw_pid, tcp_sockets(), gw_peers)
        doc["metrics_after"] = scrape(metrics_url)
        doc["gateway_log_tail"] = gateway.tail(5)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=300.0, help="calls/s, all tenants")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--stream-fraction", type=float, default=0.3)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds per sample")
    parser.add_argument("--warmup-minutes", type=float, default=None,
                        help="default: 2, or a quarter of a run shorter than 8 minutes")
    parser.add_argument("--connections", type=int, default=8, help="per oha process")
    parser.add_argument("--reply-words", type=int, default=20,
                        help="upstream reply length (stream events = words + 4)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the gateway to CPU 0 and the rest to CPU 1")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--workdir", help="keep configs and logs here (default: a temp dir)")
    args = parser.parse_args()
    if not 0.0 <= args.stream_fraction <= 1.0 or args.rate <= 0 or args.tenants < 1:
        parser.error("need 0 <= --stream-fraction <= 1, --rate > 0, --tenants >= 1")
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    warmup_min = args.warmup_minutes
    if warmup_min is None:
        warmup_min = 2.0 if args.minutes >= 8 else args.minutes / 4
    oha = find_oha()
    started = datetime.now(UTC)
    path = RESULTS / f"soak-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    doc: dict[str, Any] = {
        "benchmark": "soak",
        "started_at": started.isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_avg_at_start": os.getloadavg()},
        "load_generator": subprocess.run([oha, "--version"], capture_output=True, text=True,
                                         check=False).stdout.strip(),
        "config": {k: v for k, v in vars(args).items() if k not in ("no_write", "workdir")},
        "warmup_minutes": warmup_min,
        "gateway_config": "load.py BASE_CONFIG + the events variant, with these tenants",
        "tenants": soak_overlay(args.tenants)["tenants"],
        "bar": {"rss_max_growth": RSS_MAX_GROWTH, "fd_slack": FD_SLACK, "responses_5xx": 0},
    }  # fmt: skip

    def write(samples: list[Sample], final: bool = False) -> None:
        doc["complete"] = final
        doc["verdict"] = verdict(samples, warmup_min * 60, args.rate)
        doc["minutes"] = minute_rows(samples, args.interval)
        doc["samples"] = [asdict(s) for s in samples]
        if not args.no_write:
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1) + "\n")

    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tollway-soak-")))
        samples = soak(args, oha, workdir, doc, write)
    write(samples, final=True)
    load_avg = doc["machine"]["load_avg_at_start"][0]
    print(f"\nSoak: {args.rate:g} calls/s ({args.stream_fraction * 100:.0f} % streamed, "
          f"{args.tenants} tenants) for {args.minutes:g} minutes; {os.cpu_count()} CPUs, "
          f"load average at start {load_avg:.1f}\n")  # fmt: skip
    print(markdown(doc["minutes"]))
    print("\n" + "\n".join(doc["verdict"]["lines"]))
    published = doc["metrics_after"].get("tollway_events_published_total", float("nan"))
    ok = sum(s.status.get("200", 0) for s in samples)
    print(f"info: {published:.0f} events published for {ok} calls answered 200 "
          f"(one event per call, plus budget leases)")
    gen = [s.generator_cpu_us_per_call for s in samples]
    print(f"info: the load generator used {statistics.median(gen):.0f} us CPU per call "
          f"({statistics.fmean(s.generator_cpu_share for s in samples) * 100:.1f} % of a core)")
    if not args.no_write:
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
